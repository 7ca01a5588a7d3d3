"""``Personalizer``: the client object that owns settings and loaded resources; a facade over the flow.

data (``data.indexing``, ``data.forget``) -> retrieval (``retrieval``) and adapters (``adapters``, ``jobs``) ->
router and prompt (``serving.requests``) -> a serving backend (``serving.backend``) -> a ``GenerationResult``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from personalize.adapters.cache import AdapterCache
from personalize.adapters.store import LocalAdapterStore, owned_adapter
from personalize.adapters.task_adapters import TASKS_FOLDER, TaskAdapterInfo, TaskAdapterStore, task_model
from personalize.data.checks import check_int
from personalize.data.forget import forget_user
from personalize.data.indexing import Indexer, ItemLike, doc_text
from personalize.data.items import ProfileItem, UserInfo
from personalize.data.naming import user_key, validate_user_id
from personalize.data.store import Store, UpsertReport
from personalize.errors import InvalidInputError
from personalize.jobs import training_jobs
from personalize.jobs.store import AdapterInfo, JobInfo, JobOutcome, Jobs
from personalize.jobs.training_jobs import EnqueueResult
from personalize.methods import ZERO_SHOT
from personalize.results import ForgetReport, GenerationResult
from personalize.retrieval import RetrievedItem, Retriever, RetrieverContext
from personalize.retrieval.embedding import get_embedder
from personalize.retrieval.search import Retrievers
from personalize.retrieval.vectorstore import VectorStore
from personalize.serving.backend import ServingBackend
from personalize.serving.batching import Coalescer
from personalize.serving.dispatch import Dispatcher
from personalize.serving.modeling import LoadedModel, get_model
from personalize.serving.requests import (
    MAX_K,
    METHODS,
    PreparedRequest,
    ResolvedUser,
    adapter_base,
    check_prompt,
    choose_method,
    prepare_request,
    task_for,
)
from personalize.serving.router import Router
from personalize.settings import Settings
from personalize.tasks.registry import Task

if TYPE_CHECKING:
    from celery import Celery

    from personalize.data.consistency import ConsistencyReport

Method = Literal["auto", "none", "rag", "peft", "rag+peft", "zero-shot"]
MAX_NEW_TOKENS = 4096  # the bound of Settings.max_new_tokens


def check_max_new_tokens(value: object, default: int) -> int:
    """``None`` means the default; 0 or a negative number is an error, never silently the default."""
    return default if value is None else check_int(value, "max_new_tokens", 1, MAX_NEW_TOKENS)


class Personalizer:
    """Holds the settings, the SQL store, the vector store, the models and a serving backend; one per process.

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
        self.indexer = Indexer(self.store, self.vectors, self.embedder, self.settings.max_item_chars, self._changed)
        context = RetrieverContext(self.store, self.vectors, self.embedder, doc_text)
        self.retrievers = Retrievers(context, self.store, self.settings.retriever)
        self.router = Router(self.store, self.settings.router)
        self.jobs = Jobs(self.store, self.settings.job_stale_after_s, self.settings.job_max_attempts)
        self.adapter_store = LocalAdapterStore(self.settings.resolved_adapters_dir)
        self.task_adapters = TaskAdapterStore(self.settings.resolved_adapters_dir / TASKS_FOLDER)
        self.serving = Dispatcher(lambda: self.settings)
        self._celery: Celery | None = None
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
    def backend(self) -> ServingBackend:
        """The serving backend ``settings.decoder`` names."""
        return self.serving.backend

    @property
    def model(self) -> LoadedModel:
        """The base model as loaded (zero-shot): no task adapter."""
        return get_model(self.settings.model, self.settings.models_dir)

    def current_task_adapter(self, task: Task | str) -> TaskAdapterInfo | None:
        """The newest task adapter of ``task`` for the configured model, or None."""
        return self.task_adapters.current(task.name if isinstance(task, Task) else task, self.settings.model)

    def base_for(self, task: Task | str, method: str = "none") -> tuple[LoadedModel, TaskAdapterInfo | None]:
        """The model a method runs on for ``task``: the base with the task's adapter merged in (``Settings.base``
        'task', where one exists), else the plain base; ``zero-shot`` is always the plain base."""
        if method == ZERO_SHOT or self.settings.base == "zero-shot":
            return self.model, None
        info = self.current_task_adapter(task)
        return (task_model(self.model, info), info) if info is not None else (self.model, None)

    # -- users and items (``data``) --------------------------------------------------------------------------

    def add_user(self, user_id: str) -> bool:
        return self.store.add_user(user_id)

    def add_items(self, user_id: str, items: Iterable[ItemLike], show_progress: bool = False) -> UpsertReport:
        """Upsert items for a user (created if new) and index the changed ones; atomic per call."""
        return self.indexer.add_items(user_id, items, show_progress)

    def check_items(self, items: object) -> list[ProfileItem]:
        """Validate items as ``add_items`` would store them, without writing anything."""
        return self.indexer.check_items(items)

    def import_users(self, users: Mapping[str, Iterable[ItemLike]], show_progress: bool = False) -> list[UpsertReport]:
        """Add many users' items (one file's worth), all or nothing (``Indexer.import_users``)."""
        return self.indexer.import_users(users, show_progress)

    def _changed(self, user_id: str) -> str | None:
        return self.maybe_queue_retrain(user_id) if self.settings.auto_train else None

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
        """Remove everything of a user, all or nothing (``data.forget``)."""
        return forget_user(self, user_id)

    def check(self, repair: bool = False) -> ConsistencyReport:
        """Compare SQL, Chroma and the adapter folders (and fix them with ``repair``); see ``consistency``."""
        from personalize.data.consistency import check_stores

        return check_stores(self, repair)

    def resolve_user(self, user_id: str, *, with_adapter: bool) -> ResolvedUser:
        """A request's user, read once (row, counts, tasks and, ``with_adapter``, the newest adapter)."""
        validate_user_id(user_id)
        info, adapter = self.jobs.resolve(user_id, self.settings.model, with_adapter)
        return ResolvedUser(user_id, user_key(user_id), info, self._owned(user_id, adapter))

    # -- retrieval (``retrieval``) -------------------------------------------------------------------------

    def retriever(self, name: str | None = None) -> Retriever:
        """The retriever registered as ``name`` (default: ``settings.retriever``), built once per client."""
        return self.retrievers.get(name)

    def retrieve(
        self, user_id: str, query: str, k: int | None = None, retriever: str | None = None
    ) -> list[RetrievedItem]:
        """The user's top-k items for ``query``; only ever this user's items, as stored in SQL."""
        validate_user_id(user_id)
        query = check_prompt(query, self.settings.max_prompt_chars, "query")
        k = self.settings.k if k is None else check_int(k, "k", 0, MAX_K)
        self.store.get_user(user_id)
        return self.retrievers.search(user_id, query, k, retriever) if k else []

    # -- generation (``serving``) ----------------------------------------------------------------------------

    def choose_method(self, info: UserInfo, method: str, adapter: AdapterInfo | None) -> tuple[str, list[str]]:
        """Resolve ``auto`` and fall back when the requested method cannot run; say why in notes."""
        return choose_method(self.router, info, method, adapter is not None)

    def prepare(
        self,
        user_id: str,
        prompt: str,
        *,
        method: str = "auto",
        k: int | None = None,
        max_new_tokens: int = 1,
        retriever: str | None = None,
        task: str | Task | None = None,
    ) -> PreparedRequest:
        """Everything before the forward passes (``serving.requests.prepare_request``)."""
        return prepare_request(self, user_id, prompt, method, k, max_new_tokens, retriever, task)

    def generate(
        self,
        user_id: str,
        prompt: str,
        method: Method | str = "auto",
        *,
        k: int | None = None,
        max_new_tokens: int | None = None,
        retriever: str | None = None,
        task: str | Task | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` for ``user_id`` with the base model (``none``), retrieval (``rag``), the user's adapter
        (``peft``) or both (``rag+peft``); ``auto`` picks by the user's data."""
        n = check_max_new_tokens(max_new_tokens, self.settings.max_new_tokens)
        prep = self.prepare(user_id, prompt, method=method, k=k, max_new_tokens=n, retriever=retriever, task=task)
        return self.serving.generate(prep, n)

    @property
    def coalescer(self) -> Coalescer:
        """Batches concurrent ``generate`` calls (``Settings.batch_window_ms``, ``Settings.max_batch``)."""
        return self.serving.coalescer

    def generate_batch(
        self,
        requests: Sequence[tuple[str, str]],
        method: Method | str = "auto",
        *,
        k: int | None = None,
        max_new_tokens: int | None = None,
        retriever: str | None = None,
        task: str | Task | None = None,
    ) -> list[GenerationResult]:
        """Serve many (user_id, prompt) requests in batched forward passes, each row with its own user's adapter;
        greedy results equal one-at-a-time ``generate``."""
        n = check_max_new_tokens(max_new_tokens, self.settings.max_new_tokens)
        preps = [
            self.prepare(u, q, method=method, k=k, max_new_tokens=n, retriever=retriever, task=task)
            for u, q in requests
        ]
        return self.serving.generate_batch(preps, n)

    def score_labels(
        self,
        user_id: str,
        prompt: str,
        labels: Sequence[str],
        method: Method | str = "auto",
        *,
        k: int | None = None,
        retriever: str | None = None,
        task: str | Task | None = None,
        calibrate: bool = False,
    ) -> GenerationResult:
        """Pick the most likely of ``labels`` as the answer (``serving.scoring.label_scores``); ``timings.extra``
        holds every label's log-likelihood. Same methods, retrieval and fallbacks as ``generate``."""
        if not labels:
            raise InvalidInputError("score_labels needs at least one label")
        prep = self.prepare(user_id, prompt, method=method, k=k, retriever=retriever, task=task)
        return self.serving.score_labels(prep, prompt, labels, calibrate)

    # -- adapters and training (``adapters``, ``jobs``) ------------------------------------------------------

    @property
    def adapter_cache(self) -> AdapterCache:
        """The user adapters loaded on the plain base model."""
        return self.adapter_cache_for(self.model)

    def adapter_cache_for(self, loaded: LoadedModel) -> AdapterCache:
        """The user adapters loaded on ``loaded`` (the plain base, or a task-adapted one)."""
        return self.serving.cache_for(loaded)

    def current_adapter(self, user_id: str) -> AdapterInfo | None:
        """The user's newest complete adapter for the configured model, or None."""
        return self._owned(user_id, self.jobs.current_adapter(user_id, base_model=self.settings.model))

    def _owned(self, user_id: str, adapter: AdapterInfo | None) -> AdapterInfo | None:
        """``adapter`` if complete and the user's own (``adapters.store.owned_adapter``), else None."""
        what = f"adapter v{adapter.version} of user {user_id!r}" if adapter else ""
        return adapter if adapter and owned_adapter(Path(adapter.path), user_key(user_id), what) else None

    def training_base(self, user_id: str, info: UserInfo | None = None) -> tuple[LoadedModel, TaskAdapterInfo | None]:
        """What the user's adapter trains on: the base for the user's task (``base_for``)."""
        return self.base_for(task_for(info or self.store.get_user(user_id), None), "peft")

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
            from personalize.jobs.queue import make_celery

            self._celery = make_celery(self.settings, main="personalize-client")
        return self._celery

    def enqueue_training(self, user_id: str, force: bool = False) -> EnqueueResult:
        """Queue training of the user's adapter for the workers; a no-op (that says so) when nothing changed."""
        return training_jobs.enqueue_training(self, user_id, force)

    def enqueue_all(self) -> list[EnqueueResult]:
        """Queue every user whose data changed since their adapter and who has at least ``train_min_items``."""
        users = self.jobs.users_needing_training(self.settings.train_min_items, self.settings.model)
        return [self.enqueue_training(u) for u in users]

    def queue_quietly(self, user_id: str) -> str:
        return training_jobs.queue_quietly(self, user_id)

    def maybe_queue_retrain(self, user_id: str) -> str | None:
        """Queue (re)training when the user's data grew enough (``jobs.training_jobs.maybe_queue_retrain``)."""
        return training_jobs.maybe_queue_retrain(self, user_id)

    def recover_jobs(self, only_if_queue_empty: bool = False) -> list[int]:
        """Requeue jobs of lost workers and resend lost messages (``jobs.training_jobs.recover_jobs``)."""
        return training_jobs.recover_jobs(self, only_if_queue_empty)

    def queued_messages(self) -> int | None:
        """Messages waiting in the training queue of the broker (None when the broker cannot say)."""
        return training_jobs.queued_messages(self)

    def train(self, user_id: str, progress: bool = False) -> AdapterInfo:
        """Train the user's adapter in this process (no worker needed); returns the new adapter."""
        return training_jobs.train_in_process(self, user_id, progress)

    def run_training_job(self, job_id: int, progress: bool = False) -> JobOutcome:
        """Claim and run one training job; what a worker's task calls (``jobs.training_jobs``)."""
        return training_jobs.run_training_job(self, job_id, progress)


def adapter_name(user_id: str) -> str:
    """The adapter's name inside the shared PeftModel: the user's hash-derived key."""
    return user_key(user_id)


__all__ = ["METHODS", "EnqueueResult", "Personalizer", "adapter_name", "check_max_new_tokens"]
