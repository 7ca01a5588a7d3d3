"""``Personalizer``: the client object that owns settings and loaded resources, and answers ``generate``."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from personalize.adapters.cache import AdapterCache
from personalize.adapters.cache import generate_batch as batch_generate
from personalize.adapters.format import read_metadata
from personalize.adapters.store import LocalAdapterStore
from personalize.adapters.task_adapters import TASKS_FOLDER, TaskAdapterInfo, TaskAdapterStore, task_model
from personalize.adapters.training import train_adapter, training_pairs
from personalize.cpu.fastpath import FastDecoder, WeightFormat, decoder_for, fast_weights, unsupported_reason
from personalize.data.checks import check_int, check_unicode, short
from personalize.data.crashpoints import crash_point
from personalize.data.items import ProfileItem, UserInfo, item_chars, make_item
from personalize.data.naming import user_dir, user_key, validate_user_id
from personalize.data.store import Store, UpsertReport
from personalize.errors import (
    AdapterBaseMismatchError,
    AdapterOwnershipError,
    BrokerUnavailableError,
    DatabaseUnavailableError,
    EmptyPromptError,
    ImportIncompleteError,
    InvalidInputError,
    PersonalizeError,
    TrainingCancelled,
    TrainingFailedError,
    UnknownUserError,
)
from personalize.jobs.queue import QUEUE, TRAIN_USER, describe_broker, make_celery
from personalize.jobs.store import AdapterInfo, Claim, JobInfo, Jobs
from personalize.methods import AUTO, SERVED_METHODS, ZERO_SHOT, uses_adapter, uses_retrieval, without_adapter
from personalize.results import ForgetReport, GenerationResult, RetrievedRef, Timings
from personalize.retrieval import (
    ForgetsUsers,
    RetrievedItem,
    Retriever,
    RetrieverContext,
    check_retriever,
    get_retriever_spec,
)
from personalize.retrieval.embedding import get_embedder
from personalize.retrieval.vectorstore import VectorStore, vector_metadata
from personalize.serving.batching import Coalescer, Request
from personalize.serving.modeling import LoadedModel, get_model
from personalize.serving.router import Router
from personalize.serving.scoring import candidate_log_likelihoods
from personalize.settings import Settings
from personalize.tasks.prompting import BuiltPrompt, build_prompt, encode
from personalize.tasks.registry import Task, get_task

if TYPE_CHECKING:
    from celery import Celery

    from personalize.data.consistency import ConsistencyReport

Method = Literal["auto", "none", "rag", "peft", "rag+peft", "zero-shot"]
METHODS = (AUTO, *SERVED_METHODS)
ItemLike = ProfileItem | dict[str, Any]


MAX_K = 1000
MAX_NEW_TOKENS = 4096  # the bound of Settings.max_new_tokens


def _as_item(value: ItemLike) -> ProfileItem:
    """Validate one item; a ``ProfileItem`` is checked again, since its constructor checks nothing."""
    if isinstance(value, ProfileItem):
        return make_item(value.id, value.text, value.fields, value.output, value.timestamp, value.task)
    if not isinstance(value, dict):
        raise InvalidInputError(f"an item must be a ProfileItem or a dict, got {type(value).__name__}")
    known = ("id", "text", "fields", "output", "timestamp", "task")
    extra = set(value) - set(known) - {"user_id"}
    if extra:
        raise InvalidInputError(f"unknown item field(s) {[short(k) for k in extra]}; known: {sorted(known)}")
    return make_item(*(value.get(k) for k in known))


def _as_items(items: object) -> list[ProfileItem]:
    """A list of validated items; a lone item, a string or a mapping in place of a list is refused."""
    if isinstance(items, str | bytes | dict | ProfileItem) or not isinstance(items, Iterable):
        raise InvalidInputError(f"items must be a list of items, got {type(items).__name__}")
    return [_as_item(i) for i in items]


def _progress(items: list, unit: str, show: bool) -> Iterable:
    """A tqdm bar over ``items`` on an interactive stderr when asked, else the items themselves."""
    if not show or len(items) < 2:
        return items
    import sys

    from tqdm import tqdm

    return tqdm(items, unit=unit, disable=not sys.stderr.isatty())


def check_max_new_tokens(value: object, default: int) -> int:
    """``None`` means the default; 0 or a negative number is an error, never silently the default."""
    return default if value is None else check_int(value, "max_new_tokens", 1, MAX_NEW_TOKENS)


class Personalizer:
    """Holds the settings, the SQL store, the vector store and the models; use one per process.

    Usable as a context manager; ``personalize.generate`` and friends use a default instance.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings or Settings()
        self.settings = base.model_copy(update=overrides) if overrides else base
        self.store = Store(self.settings.resolved_database_url)
        chroma = self.settings.chroma
        self.vectors = VectorStore(
            chroma if chroma is not None and self.settings.chroma_is_server else self.settings.chroma_path
        )
        self.embedder = get_embedder(self.settings.embedding_model)
        self._retrievers: dict[str, Retriever] = {}
        self.router = Router(self.store, self.settings.router)
        self.jobs = Jobs(self.store, self.settings.job_stale_after_s, self.settings.job_max_attempts)
        self.adapter_store = LocalAdapterStore(self.settings.resolved_adapters_dir)
        self.task_adapters = TaskAdapterStore(self.settings.resolved_adapters_dir / TASKS_FOLDER)
        self._adapter_caches: dict[str, AdapterCache] = {}
        self._coalescer: Coalescer | None = None
        self._coalescer_lock = threading.Lock()
        self._celery = None
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
        """The base model as loaded (zero-shot): no task adapter."""
        return get_model(self.settings.model, self.settings.models_dir)

    def current_task_adapter(self, task: Task | str) -> TaskAdapterInfo | None:
        """The newest task adapter of ``task`` for the configured model, or None."""
        name = task.name if isinstance(task, Task) else task
        return self.task_adapters.current(name, self.settings.model)

    def base_for(self, task: Task | str, method: str = "none") -> tuple[LoadedModel, TaskAdapterInfo | None]:
        """The model a method runs on for ``task``: the base with the task's adapter merged in (``Settings.base``
        'task', where one exists), else the plain base; ``zero-shot`` is always the plain base."""
        if method == ZERO_SHOT or self.settings.base == "zero-shot":
            return self.model, None
        info = self.current_task_adapter(task)
        return (task_model(self.model, info), info) if info is not None else (self.model, None)

    # -- users and items ---------------------------------------------------------------------------------------

    def add_user(self, user_id: str) -> bool:
        return self.store.add_user(user_id)

    def add_items(self, user_id: str, items: Iterable[ItemLike], show_progress: bool = False) -> UpsertReport:
        """Upsert items for a user (created if new) and index the changed ones; atomic per call.

        Embeddings are computed before the SQL transaction opens, so a slow embedding never holds a write lock.
        Vectors are written before the SQL commit: a crash between the two leaves vectors without rows, which
        retrieval skips and ``check(repair=True)`` removes, never rows that dense retrieval cannot find.
        """
        validate_user_id(user_id)
        return self._add_checked(user_id, self.check_items(items), show_progress)

    def check_items(self, items: object) -> list[ProfileItem]:
        """Validate items as ``add_items`` would store them, without writing anything."""
        parsed = _as_items(items)
        limit = self.settings.max_item_chars
        for item in parsed:
            size = item_chars(item)
            if size > limit:
                raise InvalidInputError(
                    f"item {item.id!r} has {size:,} characters (text, output and fields together); the limit is "
                    f"{limit:,} (PERSONALIZE_MAX_ITEM_CHARS)"
                )
        return parsed

    def import_users(self, users: Mapping[str, Iterable[ItemLike]], show_progress: bool = False) -> list[UpsertReport]:
        """Add many users' items (one file's worth), all or nothing: every item is validated before the first write,
        and every user's rows go into ONE SQL transaction, committed after each user's vectors are written. A failure
        anywhere (a busy or unreachable vector store, the database) rolls every user back; vectors already written
        for the file are then what a crash leaves (retrieval skips them, ``check(repair=True)`` removes them)."""
        checked: list[tuple[str, list[ProfileItem]]] = []
        for user_id, items in users.items():
            validate_user_id(user_id)
            try:
                checked.append((user_id, self.check_items(items)))
            except InvalidInputError as exc:
                raise InvalidInputError(f"user {short(user_id)}: {exc}") from None
        batches = [
            (u, parsed, self._indexer(u, parsed, False)) for u, parsed in _progress(checked, "users", show_progress)
        ]
        try:
            reports = self.store.upsert_many(batches)
        except PersonalizeError as exc:
            raise ImportIncompleteError(
                f"{exc} (nothing of the file's {len(checked)} user(s) was stored: the import is one transaction; "
                "importing again is safe)"
            ) from None
        crash_point("committed")
        for report in reports:
            if report.changed and self.settings.auto_train:
                report.training = self.maybe_queue_retrain(report.user_id)
        return reports

    def _add_checked(self, user_id: str, parsed: list[ProfileItem], show_progress: bool) -> UpsertReport:
        report = self.store.upsert_items(user_id, parsed, before_commit=self._indexer(user_id, parsed, show_progress))
        crash_point("committed")
        if report.changed and self.settings.auto_train:
            report.training = self.maybe_queue_retrain(user_id)
        return report

    def _indexer(self, user_id: str, parsed: list[ProfileItem], show_progress: bool) -> Callable[[UpsertReport], None]:
        """Embed the items that changed (before any transaction opens, so a slow embedding never holds a write
        lock), and return the hook that writes their vectors inside the SQL transaction, before its commit."""
        stored = self.store.item_hashes(user_id, [i.id for i in parsed])
        todo = [i for i in parsed if stored.get(i.id) != i.content_hash()]
        vectors = dict(zip([i.id for i in todo], self._embed(todo, show_progress), strict=True))
        crash_point("embedded")

        def index(report: UpsertReport) -> None:
            missing = [i for i in report.changed if i.id not in vectors]  # changed by another writer meanwhile
            vectors.update(zip([i.id for i in missing], self._embed(missing, False), strict=True))
            changed = report.changed
            crash_point("sql-flushed")
            self.vectors.upsert(
                user_id,
                [i.id for i in changed],
                np.stack([vectors[i.id] for i in changed]),
                [vector_metadata(i) for i in changed],
            )
            crash_point("chroma-written")

        return index

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
        """Remove everything of a user: SQL rows, the Chroma collection, adapters and files under the home.

        All or nothing: the Chroma writer lock is taken (or the server reached) before any row is deleted, so a
        busy or unreachable vector store raises and changes nothing. A crash after the SQL delete leaves a
        collection no user owns: ``forget`` again, or ``check(repair=True)``, removes it.
        """
        validate_user_id(user_id)
        report = ForgetReport(user_id)
        self.vectors.prepare_delete(user_id)
        adapter_paths: list[str] = []
        known = True
        try:
            deleted = self.store.delete_user(user_id)
            report.items, report.adapters, report.jobs = deleted.items, deleted.adapters, deleted.jobs
            report.eval_answers = deleted.eval_answers
            adapter_paths, report.wal_truncated = deleted.adapter_paths, deleted.scrubbed
        except UnknownUserError:
            known = False
        crash_point("forget-sql-deleted")
        report.collection = self.vectors.delete_user(user_id)
        crash_point("forget-chroma-deleted")
        for built in list(self._retrievers.values()):
            if isinstance(built, ForgetsUsers):
                built.forget(user_id)
        for cache in self._adapter_caches.values():
            cache.evict(adapter_name(user_id))
        self._forget_in_task_adapters(user_id, report)
        folders = [user_dir(self.settings.users_dir, user_id), self.adapter_store.user_root(user_id)]
        folders += [Path(p) for p in adapter_paths if Path(p).exists()]
        for folder in folders:
            if folder.exists():
                shutil.rmtree(folder)
                report.files.append(str(folder))
        if not report.wal_truncated:  # a reader held the WAL for busy_timeout: try again now the rest is done
            report.wal_truncated = self.store.scrub_wal()
        if not known and not report.collection and not report.files:
            raise UnknownUserError(user_id)
        return report

    def _forget_in_task_adapters(self, user_id: str, report: ForgetReport) -> None:
        """Mark every task adapter trained on the user's items and (``task_adapter.retrain_on_forget``) queue a
        retrain without them; a broker that cannot be reached is said in the report, never a failed forget."""
        from personalize.jobs.task_adapter_jobs import queue_task_adapter_retrain

        for info in self.task_adapters.mark_forgotten(user_key(user_id)):
            report.task_adapters.append(info.ref)
            if self.settings.task_adapter.retrain_on_forget:
                report.task_adapter_retrain.append(queue_task_adapter_retrain(self, info))

    def check(self, repair: bool = False) -> ConsistencyReport:
        """Compare SQL, Chroma and the adapter folders (and fix them with ``repair``); see ``consistency``."""
        from personalize.data.consistency import check_stores

        return check_stores(self, repair)

    # -- retrieval ---------------------------------------------------------------------------------------------

    def retriever(self, name: str | None = None) -> Retriever:
        """The retriever registered as ``name`` (default: ``settings.retriever``), built once per client."""
        name = self._retriever_name(name)
        if name not in self._retrievers:
            context = RetrieverContext(self.store, self.vectors, self.embedder, self._doc_text)
            self._retrievers[name] = get_retriever_spec(name).factory(context)
        return self._retrievers[name]

    def _retriever_name(self, name: str | None) -> str:
        """``name``, or the settings' default, as a registered retriever; an unknown default says where it came from."""
        if name:
            return check_retriever(name)
        try:
            return check_retriever(self.settings.retriever)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{exc} (the default: settings.retriever, PERSONALIZE_RETRIEVER)") from None

    def retrieve(
        self, user_id: str, query: str, k: int | None = None, retriever: str | None = None
    ) -> list[RetrievedItem]:
        """The user's top-k items for ``query``; only ever this user's items, as stored in SQL."""
        validate_user_id(user_id)
        query = self._check_prompt(query, "query")
        k = self.settings.k if k is None else check_int(k, "k", 0, MAX_K)
        self.store.get_user(user_id)
        return self._search_stored(user_id, query, k, self.retriever(retriever)) if k else []

    def _search_stored(self, user_id: str, query: str, k: int, retriever: Retriever) -> list[RetrievedItem]:
        """The top k hits that SQL holds. Vectors left without rows by a crash (until repaired) are skipped and
        more are fetched, so k items come back whenever the user has k; each round asks for four times more."""
        fetch = k
        while True:
            hits = retriever.search(user_id, query, fetch)
            by_id = {i.id: i for i in self.store.items(user_id, [h[0] for h in hits])} if hits else {}
            found = [RetrievedItem(item_id, score, by_id[item_id]) for item_id, score in hits if item_id in by_id]
            if len(found) >= k or len(hits) < fetch:
                return found[:k]
            fetch *= 4

    # -- generation --------------------------------------------------------------------------------------------

    def _check_prompt(self, prompt: object, field: str = "prompt") -> str:
        if not isinstance(prompt, str):
            raise InvalidInputError(f"the {field} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            if field == "prompt":
                raise EmptyPromptError()
            raise InvalidInputError(f"the {field} is empty: pass some text to search for")
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidInputError(
                f"the {field} has {len(prompt):,} characters; the limit is {self.settings.max_prompt_chars:,} "
                "(PERSONALIZE_MAX_PROMPT_CHARS)"
            )
        return check_unicode(prompt, f"the {field}")

    def _task_for(self, info: UserInfo, task: str | Task | None) -> Task:
        if isinstance(task, Task):
            return task
        if task:
            return get_task(task)
        return get_task(info.tasks[0]) if len(info.tasks) == 1 else get_task("generic")

    def choose_method(self, info: UserInfo, method: str, adapter: AdapterInfo | None) -> tuple[str, list[str]]:
        """Resolve ``auto`` and fall back when the requested method cannot run; say why in notes."""
        if method not in METHODS:
            raise InvalidInputError(f"unknown method {short(method)}; choose one of {', '.join(METHODS)}")
        notes: list[str] = []
        if method == "auto":
            decision = self.router.choose(self._task_for(info, None).name, info.n_items, adapter is not None)
            method = decision.method
            notes.append(f"auto chose {method}: {decision.reason}")
        if uses_adapter(method) and adapter is None:
            fallback = without_adapter(method)
            notes.append(f"{method} fell back to {fallback}: the user has no adapter yet")
            method = fallback
        if method == "rag" and info.n_items == 0:
            notes.append("rag fell back to none: the user has no items")
            method = "none"
        return method, notes

    def _prepare(
        self,
        user_id: str,
        prompt: str,
        method: str,
        k: int | None,
        max_new_tokens: int,
        retriever: str | None,
        task: str | Task | None,
    ) -> _Prepared:
        """Everything before the forward passes: checks, method choice, retrieval and the prompt."""
        start = time.perf_counter()
        validate_user_id(user_id)
        prompt = self._check_prompt(prompt)
        if k is not None:
            check_int(k, "k", 0, MAX_K)
        if retriever is not None:
            check_retriever(retriever)
        info = self.store.get_user(user_id)
        the_task = self._task_for(info, task)
        wants_adapter = uses_adapter(method) or method == AUTO
        adapter = self.current_adapter(user_id) if wants_adapter else None
        loaded, task_adapter = self.base_for(the_task, method)
        mismatch_note = None
        if adapter is not None and (trained_on := adapter_base(adapter)) != loaded.name:
            if method != AUTO:
                raise AdapterBaseMismatchError(
                    f"adapter v{adapter.version} of user {user_id!r} was trained on {trained_on!r}, but {method} for "
                    f"task {the_task.name!r} runs on {loaded.name!r}: retrain it (`personalize train {user_id}`)"
                )
            mismatch_note = f"adapter v{adapter.version} was trained on another base ({trained_on}); not used"
            adapter = None
        chosen, notes = self.choose_method(info, method, adapter)
        if mismatch_note:
            notes.insert(0, mismatch_note)
        if uses_adapter(method) and adapter is None and self.settings.auto_train and info.n_items:
            notes.append(self._queue_quietly(user_id))
        if not uses_adapter(chosen):
            adapter = None
        if chosen == ZERO_SHOT:
            loaded, task_adapter = self.model, None
        timings = Timings()
        retrieved: list[RetrievedItem] = []
        retriever_name = None
        if uses_retrieval(chosen):
            retriever_name = self._retriever_name(retriever)
            t0 = time.perf_counter()
            retrieved = self.retrieve(user_id, the_task.query_text(prompt), k, retriever_name)
            timings.retrieval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        built = build_prompt(
            loaded, the_task, prompt, retrieved, self.settings.token_budget, self.settings.input_share, max_new_tokens
        )
        timings.prompt_s = time.perf_counter() - t0
        return _Prepared(
            user_id,
            method,
            chosen,
            notes,
            the_task,
            retriever_name,
            built,
            adapter,
            timings,
            start,
            loaded,
            task_adapter,
        )

    def _result(self, prep: _Prepared, text: str, n_new: int) -> GenerationResult:
        prep.timings.total_s = time.perf_counter() - prep.start
        if prep.adapter is not None:
            prep.timings.extra["adapter_version"] = prep.adapter.version
        prep.timings.extra["task_adapter"] = prep.task_adapter.ref if prep.task_adapter is not None else None
        return GenerationResult(
            user_id=prep.user_id,
            text=text,
            method=prep.chosen,
            requested_method=prep.requested,
            task=prep.task.name,
            retriever=prep.retriever,
            retrieved=[RetrievedRef(h.id, h.score) for h in prep.built.used],
            prompt=prep.built.text,
            prompt_tokens=len(prep.built.input_ids),
            new_tokens=n_new,
            timings=prep.timings,
            notes=prep.notes + prep.built.notes,
            truncated=prep.built.truncated,
        )

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
        """Answer ``prompt`` for ``user_id`` with the base model (``none``), retrieval (``rag``), the user's adapter
        (``peft``) or both (``rag+peft``); ``auto`` picks by the user's data."""
        max_new_tokens = check_max_new_tokens(max_new_tokens, self.settings.max_new_tokens)
        prep = self._prepare(user_id, prompt, method, k, max_new_tokens, retriever, task)
        t0 = time.perf_counter()
        adapter = (adapter_name(prep.user_id), Path(prep.adapter.path)) if prep.adapter is not None else None
        if self.settings.batch_window_ms > 0:
            request = Request(prep.built.input_ids, adapter, max_new_tokens, model=prep.loaded)
            text, n_new = self.coalescer.submit(request)
            prep.timings.extra.update(request.extra)
        else:
            [(text, n_new)] = self._decode(
                prep.loaded, [prep.built.input_ids], [adapter], max_new_tokens, prep.timings.extra
            )
        prep.timings.generation_s = time.perf_counter() - t0
        return self._result(prep, text, n_new)

    @property
    def coalescer(self) -> Coalescer:
        """Batches concurrent ``generate`` calls (``Settings.batch_window_ms``, ``Settings.max_batch``)."""
        with self._coalescer_lock:
            if self._coalescer is None:
                self._coalescer = Coalescer(
                    self._run_batch,
                    max_batch=self.settings.max_batch,
                    window_s=self.settings.batch_window_ms / 1000,
                    max_adapters=self.settings.adapter_cache_size,
                )
            return self._coalescer

    def _run_batch(self, batch: list[Request]) -> None:
        extra: dict[str, Any] = {}
        loaded = batch[0].model or self.model
        outputs = self._decode(
            loaded, [r.input_ids for r in batch], [r.adapter for r in batch], batch[0].max_new_tokens, extra
        )
        for request, output in zip(batch, outputs, strict=True):
            request.result = output
            request.extra = {**extra, "batch_size": len(batch)}

    def _fast_decoder(self, loaded: LoadedModel) -> tuple[FastDecoder | None, str | None]:
        """The fast decoder for ``loaded`` and a note on why it is not the best one, or None and why not
        (``Settings.decoder``)."""
        if self.settings.decoder == "plain":
            return None, None
        if loaded.is_encoder_decoder:
            return None, "encoder-decoder model"
        reason = unsupported_reason(loaded.model)
        if reason:
            return None, reason
        weights: WeightFormat = "fp32"
        note = None
        if self.settings.decoder == "fast":
            weights, note = fast_weights(loaded.model)
        return decoder_for(loaded, weights), note

    def _decode(
        self,
        loaded: LoadedModel,
        encoded: Sequence[Sequence[int]],
        adapters: Sequence[tuple[str, Path] | None],
        max_new_tokens: int,
        extra: dict[str, Any],
    ) -> list[tuple[str, int]]:
        """Greedy generation for prompts with their adapters (None: the base model) on the fast path when it
        applies, else the plain one; ``extra`` (the timings' extra dict) records which ran, why, and adapter loads."""
        decoder, why = self._fast_decoder(loaded)
        loras: list[Any] = [None] * len(encoded)
        t0 = time.perf_counter()
        if any(adapters):
            cache = self.adapter_cache_for(loaded)
            hits = []
            with cache.lock:  # load (LRU) and copy each adapter's LoRA matrices out: decoding needs no lock after
                for row, adapter in enumerate(adapters):
                    if adapter is None:
                        continue
                    hits.append(cache.ensure_loaded(*adapter))
                    if decoder is None:
                        continue
                    reason = decoder.lora_unsupported_reason(cache.model, adapter[0])
                    if reason:
                        decoder, why = None, reason
                    else:
                        loras[row] = decoder.lora_weights(cache.model, adapter[0], str(adapter[1]))
            extra["adapter_cache_hit"] = all(hits)
            extra["adapter_load_s"] = time.perf_counter() - t0
        if decoder is not None:
            extra["decoder"] = f"fast-{decoder.weights}"
            if why:
                extra["decoder_note"] = why
            tok = loaded.tokenizer
            eos, pad = loaded.eos_ids, loaded.pad_id
            rows = decoder.generate(encoded, max_new_tokens, eos, pad, loras)
            return [(tok.decode(r, skip_special_tokens=True).strip(), len(r)) for r in rows]
        extra["decoder"] = "plain"
        if why:
            extra["decoder_note"] = f"fast path not used: {why}"
        if not any(adapters) and len(encoded) == 1:
            return [generate_text(loaded, encoded[0], max_new_tokens)]
        cache = self.adapter_cache_for(loaded)
        with cache.lock:
            if len(encoded) == 1:
                assert adapters[0] is not None
                cache.activate(*adapters[0])
                return [generate_text(loaded, encoded[0], max_new_tokens, model=cache.model)]
            for adapter in adapters:
                if adapter is not None:
                    cache.ensure_loaded(*adapter)
            return batch_generate(cache, encoded, [a[0] if a else None for a in adapters], max_new_tokens)

    def generate_batch(
        self,
        requests: Sequence[tuple[str, str]],
        method: Method | str = "auto",
        k: int | None = None,
        max_new_tokens: int | None = None,
        retriever: str | None = None,
        task: str | Task | None = None,
    ) -> list[GenerationResult]:
        """Serve many (user_id, prompt) requests in batched forward passes, each row with its own user's adapter
        (peft's mixed-adapter batching); greedy results equal one-at-a-time ``generate``."""
        max_new_tokens = check_max_new_tokens(max_new_tokens, self.settings.max_new_tokens)
        preps = [self._prepare(u, p, method, k, max_new_tokens, retriever, task) for u, p in requests]
        results: list[GenerationResult | None] = [None] * len(preps)
        order = list(range(len(preps)))
        while order:  # one batch: one base (task adapter), at most as many distinct adapters as the cache holds
            chunk: list[int] = []
            names: set[str] = set()
            loaded = preps[order[0]].loaded
            cache = self.adapter_cache_for(loaded)
            for i in list(order):
                if preps[i].loaded is not loaded:
                    continue
                name = adapter_name(preps[i].user_id) if preps[i].adapter else None
                if name is not None and name not in names and len(names) >= cache.capacity:
                    continue
                if name is not None:
                    names.add(name)
                chunk.append(i)
                order.remove(i)
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            adapters = [
                (adapter_name(preps[i].user_id), Path(adapter.path)) if (adapter := preps[i].adapter) else None
                for i in chunk
            ]
            outputs = self._decode(loaded, [preps[i].built.input_ids for i in chunk], adapters, max_new_tokens, extra)
            elapsed = time.perf_counter() - t0
            for i, (text, n_new) in zip(chunk, outputs, strict=True):
                preps[i].timings.generation_s = elapsed
                preps[i].timings.extra.update(extra, batch_size=len(chunk))
                results[i] = self._result(preps[i], text, n_new)
        return [r for r in results if r is not None]

    def score_labels(
        self,
        user_id: str,
        prompt: str,
        labels: Sequence[str],
        method: Method | str = "auto",
        k: int | None = None,
        retriever: str | None = None,
        task: str | Task | None = None,
        calibrate: bool = False,
    ) -> GenerationResult:
        """Pick the most likely of ``labels`` as the answer (one batched forward pass); ``timings.extra`` holds
        every label's log-likelihood. Same methods, retrieval and fallbacks as ``generate``.

        ``calibrate`` subtracts each label's log-likelihood under the same prompt with the query's content replaced
        by "N/A" (contextual calibration, Zhao et al. 2021): small models put most mass on one label whatever
        the input, and this removes that prior while keeping what the user's context and the query add."""
        if not labels:
            raise InvalidInputError("score_labels needs at least one label")
        prep = self._prepare(user_id, prompt, method, k, 1, retriever, task)
        loaded = prep.loaded
        t0 = time.perf_counter()
        prompts = [prep.built.input_ids]
        if calibrate:
            content = prep.task.query_text(prompt)
            blank = prep.built.text.replace(content, "N/A") if content and content != prompt else "N/A"
            prompts.append(encode(loaded, blank))
        if prep.adapter is None:
            rows = [candidate_log_likelihoods(loaded, ids, labels) for ids in prompts]
        else:
            cache = self.adapter_cache_for(loaded)
            with cache.lock:
                cache.activate(adapter_name(prep.user_id), Path(prep.adapter.path))
                rows = [candidate_log_likelihoods(loaded, ids, labels, model=cache.model) for ids in prompts]
        scores = rows[0] if not calibrate else [a - b for a, b in zip(rows[0], rows[1], strict=True)]
        prep.timings.generation_s = time.perf_counter() - t0
        prep.timings.extra["label_log_likelihoods"] = dict(zip(labels, scores, strict=True))
        best = max(range(len(labels)), key=lambda i: scores[i])
        return self._result(prep, labels[best], 0)

    # -- adapters and training ---------------------------------------------------------------------------------

    @property
    def adapter_cache(self) -> AdapterCache:
        """The user adapters loaded on the plain base model."""
        return self.adapter_cache_for(self.model)

    def adapter_cache_for(self, loaded: LoadedModel) -> AdapterCache:
        """The user adapters loaded on ``loaded`` (the plain base, or a task-adapted one)."""
        if loaded.name not in self._adapter_caches:
            self._adapter_caches[loaded.name] = AdapterCache(loaded, capacity=self.settings.adapter_cache_size)
        return self._adapter_caches[loaded.name]

    def current_adapter(self, user_id: str) -> AdapterInfo | None:
        """The user's newest complete adapter for the configured model, or None; never one stamped for another
        user (a mixed-up row or a copied folder on a shared store would otherwise answer for the wrong person)."""
        adapter = self.jobs.current_adapter(user_id, base_model=self.settings.model)
        if adapter is None:
            return None
        metadata = read_metadata(Path(adapter.path))
        if metadata is None:
            return None
        owner = metadata.get("owner")
        if owner is not None and owner != user_key(user_id):
            raise AdapterOwnershipError(
                f"adapter v{adapter.version} of user {user_id!r} at {adapter.path} was trained for another user "
                f"({owner}); refusing to serve it"
            )
        return adapter

    def training_base(self, user_id: str, info: UserInfo | None = None) -> tuple[LoadedModel, TaskAdapterInfo | None]:
        """What the user's adapter trains on: the base for the user's task (``base_for``)."""
        info = info or self.store.get_user(user_id)
        return self.base_for(self._task_for(info, None), "peft")

    def adapter_is_current(self, user_id: str, adapter: AdapterInfo | None, info: UserInfo | None = None) -> bool:
        """The adapter was trained on the user's current data and on the base their task now runs on."""
        info = info or self.store.get_user(user_id)
        if adapter is None or adapter.data_version != info.data_version:
            return False
        return adapter_base(adapter) == self.training_base(user_id, info)[0].name

    def adapters(self, user_id: str) -> list[AdapterInfo]:
        return self.jobs.adapters(user_id)

    def training_jobs(self, user_id: str | None = None, limit: int = 100) -> list[JobInfo]:
        return self.jobs.list(user_id, limit=limit)

    @property
    def celery(self) -> Celery:  # celery itself is imported lazily
        if self._celery is None:
            self._celery = make_celery(self.settings, main="personalize-client")
        return self._celery

    def enqueue_training(self, user_id: str, force: bool = False) -> EnqueueResult:
        """Queue training of the user's adapter for the workers; a no-op (that says so) when nothing changed."""
        info = self.store.get_user(user_id)
        current = self.current_adapter(user_id)
        if not force and current is not None and self.adapter_is_current(user_id, current, info):
            return EnqueueResult(
                user_id,
                None,
                False,
                f"up to date: adapter v{current.version} was trained on the current data (version {info.data_version})",
            )
        active = self.jobs.active_job(user_id)
        if active is not None and (active.state == "queued" or active.data_version == info.data_version):
            return EnqueueResult(user_id, active.id, False, f"already {active.state}: job {active.id}")
        if info.n_items == 0:
            raise InvalidInputError(f"user {user_id!r} has no items to train an adapter on")
        job = self.jobs.create(user_id)
        self._send(job.id)
        return EnqueueResult(user_id, job.id, True, f"queued: job {job.id}")

    def enqueue_all(self) -> list[EnqueueResult]:
        """Queue every user whose data changed since their adapter and who has at least ``train_min_items``."""
        users = self.jobs.users_needing_training(self.settings.train_min_items, self.settings.model)
        return [self.enqueue_training(u) for u in users]

    def _send(self, job_id: int) -> None:
        try:
            sent = self.celery.send_task(
                TRAIN_USER,
                args=[job_id],
                queue=QUEUE,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2},
            )
        except Exception as exc:
            raise BrokerUnavailableError(
                f"cannot reach the broker {describe_broker(self.settings)} ({type(exc).__name__}); job {job_id} "
                "stays queued and is sent again when a worker starts (or run `personalize train --all`)"
            ) from None
        self.jobs.set_task_id(job_id, sent.id)

    def _queue_quietly(self, user_id: str) -> str:
        try:
            return f"training {self.enqueue_training(user_id).message}"
        except PersonalizeError as exc:
            return f"could not queue training: {exc}"

    def maybe_queue_retrain(self, user_id: str) -> str | None:
        """Queue (re)training when the user's items passed ``train_min_items`` (no adapter yet), or grew by
        ``retrain_min_new_items`` or by ``retrain_growth`` since the current adapter."""
        n_items = self.store.count_items(user_id)
        current = self.current_adapter(user_id)
        if current is None:
            due = n_items >= self.settings.train_min_items
        else:
            grown = n_items - current.n_items
            due = grown >= self.settings.retrain_min_new_items or (
                grown > 0 and n_items >= current.n_items * (1 + self.settings.retrain_growth)
            )
        return self._queue_quietly(user_id) if due else None

    def recover_jobs(self, only_if_queue_empty: bool = False) -> list[int]:
        """Requeue jobs of lost workers and resend queued jobs whose message may be lost; duplicates are harmless
        because a job is claimed in SQL before it runs.

        ``only_if_queue_empty`` (the workers' periodic check) resends old queued jobs only when the broker's queue
        is empty: then their messages are certainly gone (a broker restarted without persistence), whereas a long
        queue is just slow. Temporary folders of adapter saves whose worker died are removed too."""
        self.adapter_store.remove_stale_temp(self.settings.job_stale_after_s)
        requeued = set(self.jobs.recover_stale())
        lost = self.jobs.lost_queued()
        if lost and (not only_if_queue_empty or self.queued_messages() == 0):
            requeued.update(lost)
        for job_id in sorted(requeued):
            self._send(job_id)
        return sorted(requeued)

    def queued_messages(self) -> int | None:
        """Messages waiting in the training queue of the broker (None when the broker cannot say)."""
        try:
            with self.celery.connection_for_write() as conn, conn.channel() as channel:
                return int(channel.queue_declare(QUEUE, passive=True).message_count)
        except Exception as exc:  # a queue never declared (or deleted by a restart) holds nothing
            if "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower():
                return 0
            return None

    def train(self, user_id: str, progress: bool = False) -> AdapterInfo:
        """Train the user's adapter in this process (no worker needed); returns the new adapter."""
        info = self.store.get_user(user_id)
        if info.n_items == 0:
            raise InvalidInputError(f"user {user_id!r} has no items to train an adapter on")
        job = self.jobs.create(user_id)
        outcome = self.run_training_job(job.id, progress=progress)
        final = self.jobs.get(job.id)
        if outcome != "done" or final is None or final.adapter_id is None:
            raise TrainingFailedError(f"training {user_id!r} ended {outcome}: {final.error if final else 'job gone'}")
        adapter = self.current_adapter(user_id)
        assert adapter is not None
        return adapter

    def run_training_job(self, job_id: int, progress: bool = False) -> str:
        """Claim and run one training job; what a worker's task calls. Returns the outcome: done, failed,
        cancelled, discarded (the user was forgotten meanwhile), or a claim result (busy, duplicate, gone)."""
        claim, job = self.jobs.claim(job_id)
        if claim is not Claim.CLAIMED or job is None:
            return claim.value
        user_id = job.user_id
        out: Path | None = None
        beat = _Heartbeat(self.jobs, job_id, progress)
        try:
            items = self.store.items(user_id)
            loaded, task_adapter = self.training_base(user_id)
            pairs = training_pairs(items, None, max_items=self.settings.lora.max_items)
            version = self.jobs.next_version(user_id)
            out = self.adapter_store.path_for(user_id, version)
            self.adapter_store.discard_incomplete(out)  # left by a crash between the rename and the SQL insert
            self.adapter_store.remove_stale_temp(self.settings.job_stale_after_s, user_id)  # killed mid-save
            result = train_adapter(
                loaded,
                pairs,
                self.settings.lora,
                out,
                progress=beat.progress,
                should_stop=beat.should_stop,
                owner=user_key(user_id),
                extra={"task_adapter": task_adapter.ref if task_adapter else None},
            )
        except TrainingCancelled as exc:
            self.jobs.fail(job_id, str(exc), state="cancelled")
            return "cancelled"
        except (DatabaseUnavailableError, UnknownUserError) as exc:
            if isinstance(exc, UnknownUserError):  # forgotten while starting
                return "discarded"
            self.jobs.release(job_id, str(exc))
            raise
        except Exception as exc:
            self.jobs.fail(job_id, f"{type(exc).__name__}: {exc}")
            return "failed"
        finally:
            beat.close()
        adapter_id = self.jobs.finish(
            job_id,
            {
                "version": version,
                "path": str(result.path),
                "base_model": self.settings.model,
                "n_items": len(items),
                "train_seconds": result.train_seconds,
                "final_loss": result.final_loss,
                "size_bytes": result.size_bytes,
                "config": {
                    **result.config,
                    "n_pairs": result.n_pairs,
                    "n_tokens": result.n_tokens,
                    "steps": result.steps,
                    "trained_on": loaded.name,
                    "task_adapter": task_adapter.ref if task_adapter else None,
                },
            },
        )
        if adapter_id is None:  # the user was forgotten, or the job reclaimed: never write an adapter back
            shutil.rmtree(result.path, ignore_errors=True)
            if not self.jobs.user_exists(user_id):
                self.adapter_store.delete_user(user_id)
            return "discarded"
        return "done"


class _Heartbeat:
    """Progress from the training loop to the job row (at most once a second) and a tqdm bar if asked."""

    def __init__(self, jobs: Jobs, job_id: int, show_bar: bool) -> None:
        self.jobs, self.job_id = jobs, job_id
        self._last = 0.0
        self._mine = True
        self._bar = None
        if show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=100, unit="%", desc=f"training job {job_id}")

    def progress(self, fraction: float, loss: float | None) -> None:
        if self._bar is not None:
            self._bar.n = round(fraction * 100)
            self._bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-")
        now = time.monotonic()
        if now - self._last >= 1.0 or fraction >= 1.0:
            self._last = now
            self._mine = self.jobs.heartbeat(self.job_id, fraction, loss)

    def should_stop(self) -> bool:
        return not self._mine or (time.monotonic() - self._last >= 1.0 and not self.jobs.still_mine(self.job_id))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class _Prepared:
    user_id: str
    requested: str
    chosen: str
    notes: list[str]
    task: Task
    retriever: str | None
    built: BuiltPrompt
    adapter: AdapterInfo | None
    timings: Timings
    start: float
    loaded: LoadedModel
    task_adapter: TaskAdapterInfo | None


@dataclass(frozen=True)
class EnqueueResult:
    user_id: str
    job_id: int | None
    queued: bool
    message: str


def adapter_base(adapter: AdapterInfo) -> str:
    """The model a user adapter was trained on: ``{base}+{task adapter}`` on a task-adapted base, else the base
    model (adapters from before task adapters were all trained on the plain base)."""
    trained_on = (adapter.config or {}).get("trained_on")
    return trained_on if isinstance(trained_on, str) else adapter.base_model


def adapter_name(user_id: str) -> str:
    """The adapter's name inside the shared PeftModel: the user's hash-derived key."""
    return user_key(user_id)


def generate_text(
    loaded: LoadedModel, input_ids: Sequence[int], max_new_tokens: int, model: Any = None
) -> tuple[str, int]:
    """Greedy decoding; returns the new text and how many tokens were generated."""
    import torch

    tok = loaded.tokenizer
    ids = torch.tensor([input_ids], dtype=torch.long)
    with torch.inference_mode():
        out = (model or loaded.model).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **loaded.greedy(max_new_tokens)
        )
    new = out[0] if loaded.is_encoder_decoder else out[0, ids.shape[1] :]
    return tok.decode(new, skip_special_tokens=True).strip(), int(new.shape[0])


__all__ = ["EnqueueResult", "Personalizer", "generate_text"]
