"""``Personalizer``: the client object that owns settings and loaded resources, and answers ``generate``."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from personalize.embedding import get_embedder
from personalize.errors import EmptyPromptError, InvalidInputError, UnknownUserError
from personalize.items import ProfileItem, UserInfo, make_item
from personalize.modeling import LoadedModel, get_model
from personalize.naming import user_dir, validate_user_id
from personalize.prompting import build_prompt
from personalize.results import ForgetReport, GenerationResult, RetrievedRef, Timings
from personalize.retrieval import (
    BM25Retriever,
    DenseRetriever,
    RecencyRetriever,
    RetrievedItem,
    Retriever,
    check_retriever,
)
from personalize.settings import Settings
from personalize.store import Store, UpsertReport
from personalize.tasks import Task, get_task
from personalize.vectorstore import VectorStore

Method = Literal["auto", "none", "rag"]
METHODS = ("auto", "none", "rag")
ItemLike = ProfileItem | dict[str, Any]


def _as_item(value: ItemLike) -> ProfileItem:
    if isinstance(value, ProfileItem):
        return value
    if not isinstance(value, dict):
        raise InvalidInputError(f"an item must be a ProfileItem or a dict, got {type(value).__name__}")
    known = {"id", "text", "fields", "output", "timestamp", "task"}
    extra = set(value) - known - {"user_id"}
    if extra:
        raise InvalidInputError(f"unknown item field(s) {sorted(extra)}; known: {sorted(known)}")
    return make_item(**{k: v for k, v in value.items() if k in known})


class Personalizer:
    """Holds the settings, the SQL store, the vector store and the models; use one per process.

    Usable as a context manager; ``personalize.generate`` and friends use a default instance.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings or Settings()
        self.settings = base.model_copy(update=overrides) if overrides else base
        self.store = Store(self.settings.resolved_database_url)
        self.vectors = VectorStore(
            self.settings.chroma if self.settings.chroma_is_server else self.settings.chroma_path
        )
        self.embedder = get_embedder(self.settings.embedding_model)
        self._retrievers: dict[str, Retriever] = {}
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)

    def __enter__(self) -> Personalizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.vectors.close()
        self.store.close()

    @property
    def model(self) -> LoadedModel:
        return get_model(self.settings.model, self.settings.models_dir)

    # -- users and items ---------------------------------------------------------------------------------------

    def add_user(self, user_id: str) -> bool:
        return self.store.add_user(user_id)

    def add_items(self, user_id: str, items: Iterable[ItemLike], show_progress: bool = False) -> UpsertReport:
        """Upsert items for a user (created if new) and index the changed ones; atomic per call.

        Embeddings are computed before the SQL transaction opens, so a slow embedding never holds a write lock.
        """
        validate_user_id(user_id)
        parsed = [_as_item(i) for i in items]
        stored = self.store.item_hashes(user_id, [i.id for i in parsed])
        todo = [i for i in parsed if stored.get(i.id) != i.content_hash()]
        vectors = dict(zip([i.id for i in todo], self._embed(todo, show_progress), strict=True))

        def index(report: UpsertReport) -> None:
            missing = [i for i in report.changed if i.id not in vectors]  # changed by another writer meanwhile
            vectors.update(zip([i.id for i in missing], self._embed(missing, False), strict=True))
            changed = report.changed
            metadatas = [{"ts": i.timestamp.isoformat() if i.timestamp else "", "task": i.task or ""} for i in changed]
            matrix = np.stack([vectors[i.id] for i in changed])
            self.vectors.upsert(user_id, [i.id for i in changed], matrix, metadatas)

        return self.store.upsert_items(user_id, parsed, before_commit=index)

    def _embed(self, items: Sequence[ProfileItem], show_progress: bool) -> np.ndarray:
        return self.embedder.embed([self._doc_text(i) for i in items], show_progress=show_progress)

    @staticmethod
    def _doc_text(item: ProfileItem) -> str:
        task = get_task(item.task) if item.task else get_task("generic")
        return task.doc_text(task.item_values(item)) or item.text

    def user(self, user_id: str) -> UserInfo:
        return self.store.get_user(user_id)

    def users(self, search: str | None = None, limit: int = 100, offset: int = 0) -> list[UserInfo]:
        return self.store.list_users(search, limit, offset)

    def items(self, user_id: str) -> list[ProfileItem]:
        return self.store.items(user_id)

    def count_users(self) -> int:
        return self.store.count_users()

    def count_items(self, user_id: str | None = None) -> int:
        return self.store.count_items(user_id)

    def forget(self, user_id: str) -> ForgetReport:
        """Remove everything of a user: SQL rows, the Chroma collection, adapters and files under the home."""
        validate_user_id(user_id)
        report = ForgetReport(user_id)
        adapter_paths: list[str] = []
        known = True
        try:
            deleted = self.store.delete_user(user_id)
            report.items, report.adapters, report.jobs = deleted.items, deleted.adapters, deleted.jobs
            adapter_paths = deleted.adapter_paths
        except UnknownUserError:
            known = False
        report.collection = self.vectors.delete_user(user_id)
        bm25 = self._retrievers.get("bm25")
        if isinstance(bm25, BM25Retriever):
            bm25.forget(user_id)
        folders = [user_dir(self.settings.users_dir, user_id), *map(Path, adapter_paths)]
        for folder in folders:
            if folder.exists():
                shutil.rmtree(folder)
                report.files.append(str(folder))
        if not known and not report.collection and not report.files:
            raise UnknownUserError(user_id)
        return report

    # -- retrieval ---------------------------------------------------------------------------------------------

    def retriever(self, name: str | None = None) -> Retriever:
        name = check_retriever(name or self.settings.retriever)
        if name not in self._retrievers:
            if name == "dense":
                self._retrievers[name] = DenseRetriever(self.vectors, self.embedder)
            elif name == "bm25":
                self._retrievers[name] = BM25Retriever(self.store, self._doc_text)
            else:
                self._retrievers[name] = RecencyRetriever(self.store)
        return self._retrievers[name]

    def retrieve(
        self, user_id: str, query: str, k: int | None = None, retriever: str | None = None
    ) -> list[RetrievedItem]:
        """The user's top-k items for ``query``; only ever this user's items, as stored in SQL."""
        validate_user_id(user_id)
        self.store.get_user(user_id)
        k = self.settings.k if k is None else k
        if k < 0:
            raise InvalidInputError("k must be >= 0")
        hits = self.retriever(retriever).search(user_id, query, k) if k else []
        by_id = {i.id: i for i in self.store.items(user_id, [h[0] for h in hits])} if hits else {}
        return [RetrievedItem(item_id, score, by_id[item_id]) for item_id, score in hits if item_id in by_id]

    # -- generation --------------------------------------------------------------------------------------------

    def _check_prompt(self, prompt: object) -> str:
        if not isinstance(prompt, str):
            raise InvalidInputError(f"the prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise EmptyPromptError()
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidInputError(
                f"the prompt has {len(prompt):,} characters; the limit is {self.settings.max_prompt_chars:,} "
                "(PERSONALIZE_MAX_PROMPT_CHARS)"
            )
        return prompt

    def _task_for(self, info: UserInfo, task: str | Task | None) -> Task:
        if isinstance(task, Task):
            return task
        if task:
            return get_task(task)
        return get_task(info.tasks[0]) if len(info.tasks) == 1 else get_task("generic")

    def choose_method(self, info: UserInfo, method: str) -> tuple[str, list[str]]:
        """Resolve ``auto`` and fall back when the requested method cannot run; say why in notes."""
        if method not in METHODS:
            raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "auto":
            chosen = "rag" if info.n_items else "none"
            return chosen, [f"auto chose {chosen}: the user has {info.n_items} item(s)"]
        if method == "rag" and info.n_items == 0:
            return "none", ["rag fell back to none: the user has no items"]
        return method, []

    def generate(
        self,
        user_id: str,
        prompt: str,
        method: Method | str = "auto",
        k: int | None = None,
        max_new_tokens: int | None = None,
        retriever: str | None = None,
        task: str | Task | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` for ``user_id`` with no personalization (``none``) or with retrieval (``rag``)."""
        start = time.perf_counter()
        validate_user_id(user_id)
        prompt = self._check_prompt(prompt)
        max_new_tokens = max_new_tokens or self.settings.max_new_tokens
        info = self.store.get_user(user_id)
        chosen, notes = self.choose_method(info, method)
        the_task = self._task_for(info, task)
        timings = Timings()

        retrieved: list[RetrievedItem] = []
        retriever_name = None
        if chosen == "rag":
            retriever_name = check_retriever(retriever or self.settings.retriever)
            t0 = time.perf_counter()
            retrieved = self.retrieve(user_id, the_task.query_text(prompt), k, retriever_name)
            timings.retrieval_s = time.perf_counter() - t0

        loaded = self.model
        t0 = time.perf_counter()
        built = build_prompt(
            loaded, the_task, prompt, retrieved, self.settings.token_budget, self.settings.input_share, max_new_tokens
        )
        timings.prompt_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        text, n_new = generate_text(loaded, built.input_ids, max_new_tokens)
        timings.generation_s = time.perf_counter() - t0
        timings.total_s = time.perf_counter() - start
        return GenerationResult(
            user_id=user_id,
            text=text,
            method=chosen,
            requested_method=method,
            task=the_task.name,
            retriever=retriever_name,
            retrieved=[RetrievedRef(h.id, h.score) for h in built.used],
            prompt=built.text,
            prompt_tokens=len(built.input_ids),
            new_tokens=n_new,
            timings=timings,
            notes=notes + built.notes,
            truncated=built.truncated,
        )


def generate_text(loaded: LoadedModel, input_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """Greedy decoding; returns the new text and how many tokens were generated."""
    import torch

    tok = loaded.tokenizer
    ids = torch.tensor([input_ids], dtype=torch.long)
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    new = out[0] if loaded.is_encoder_decoder else out[0, ids.shape[1] :]
    return tok.decode(new, skip_special_tokens=True).strip(), int(new.shape[0])


__all__ = ["Personalizer", "generate_text"]
