"""``Personalizer``: the client object that owns settings and loaded resources; a facade over the flow.

data (``data.indexing``, ``data.forget``) -> retrieval (``retrieval``) and adapters (``adapters``, ``jobs``) ->
router and prompt (``serving.requests``) -> a serving backend (``serving.backend``) -> a ``GenerationResult``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from personalize.adapters.cache import AdapterCache
from personalize.adapters.store import LocalAdapterStore
from personalize.adapters.task_adapters import TASKS_FOLDER, TaskAdapterStore
from personalize.data.forget import forget_user
from personalize.data.indexing import Indexer, ItemLike, doc_text
from personalize.data.items import ProfileItem, UserInfo
from personalize.data.store import Store, UpsertReport
from personalize.errors import InvalidInputError
from personalize.jobs import training_jobs
from personalize.jobs.store import AdapterInfo, JobInfo, JobOutcome, Jobs
from personalize.jobs.training_jobs import EnqueueResult
from personalize.results import ForgetReport, GenerationResult
from personalize.retrieval import RetrievedItem, Retriever, RetrieverContext
from personalize.retrieval.embedding import get_embedder
from personalize.retrieval.search import Retrievers
from personalize.retrieval.vectorstore import VectorStore
from personalize.serving.bases import Bases
from personalize.serving.dispatch import Dispatcher
from personalize.serving.modeling import LoadedModel
from personalize.serving.requests import (
    METHODS,
    Method,
    PreparedRequest,
    check_max_new_tokens,
    prepare_request,
    retrieve_checked,
)
from personalize.serving.router import Router
from personalize.settings import Settings
from personalize.tasks.registry import Task

if TYPE_CHECKING:
    from celery import Celery

    from personalize.data.consistency import ConsistencyReport


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
        context = RetrieverContext(
            self.store, self.vectors, self.embedder, doc_text, lambda: self.bases.model, self.settings.rerank_candidates
        )
        self.retrievers = Retrievers(context, self.store, self.settings.retriever)
        self.router = Router(self.store, self.settings.router)
        self.jobs = Jobs(self.store, self.settings.job_stale_after_s, self.settings.job_max_attempts)
        self.adapter_store = LocalAdapterStore(self.settings.resolved_adapters_dir)
        self.task_adapters = TaskAdapterStore(self.settings.resolved_adapters_dir / TASKS_FOLDER)
        self.serving = Dispatcher(lambda: self.settings)
        self.bases = Bases(lambda: self.settings, self.jobs, self.task_adapters)
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
        return self.bases.model

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
        return training_jobs.maybe_queue_retrain(self, user_id) if self.settings.auto_train else None

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

    # -- retrieval (``retrieval``) -------------------------------------------------------------------------

    def retriever(self, name: str | None = None) -> Retriever:
        """The retriever registered as ``name`` (default: ``settings.retriever``), built once per client."""
        return self.retrievers.get(name)

    def retrieve(
        self, user_id: str, query: str, k: int | None = None, retriever: str | None = None
    ) -> list[RetrievedItem]:
        """The user's top-k items for ``query``; only ever this user's items, as stored in SQL."""
        return retrieve_checked(self, user_id, query, k, retriever)

    # -- generation (``serving``) ----------------------------------------------------------------------------

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
        """The user adapters loaded into peft on the plain base model: the plain decoder's, and the fast decoder's
        fallback (the fast decoder reads LoRA adapters into its own tables: ``FastBackend.tables_for``)."""
        return self.serving.cache_for(self.model)

    def current_adapter(self, user_id: str, method: str = "lora") -> AdapterInfo | None:
        """The user's newest complete adapter of ``method`` ('lora', 'ia3', ...) for the configured model, or None."""
        return self.bases.current_adapter(user_id, method)

    def adapter_is_current(self, user_id: str, adapter: AdapterInfo | None, info: UserInfo | None = None) -> bool:
        """The adapter was trained on the user's current data and on the base their task now runs on."""
        return self.bases.adapter_is_current(adapter, info or self.store.get_user(user_id))

    def adapters(self, user_id: str) -> list[AdapterInfo]:
        return self.jobs.adapters(user_id)

    def training_jobs(self, user_id: str | None = None, limit: int = 100) -> list[JobInfo]:
        return self.jobs.list(user_id, limit=limit)

    @cached_property
    def celery(self) -> Celery:
        """The client's Celery app; celery itself is imported on first use."""
        from personalize.jobs.queue import make_celery

        return make_celery(self.settings, main="personalize-client")

    def enqueue_training(self, user_id: str, force: bool = False, *, method: str = "lora") -> EnqueueResult:
        """Queue training of the user's adapter of ``method`` for the workers; a no-op (that says so) when nothing
        changed."""
        return training_jobs.enqueue_training(self, user_id, force, method)

    def enqueue_all(self) -> list[EnqueueResult]:
        """Queue every user whose data changed since their adapter and who has at least ``train_min_items``."""
        return training_jobs.enqueue_all(self)

    def recover_jobs(self, only_if_queue_empty: bool = False) -> list[int]:
        """Requeue jobs of lost workers and resend lost messages (``jobs.training_jobs.recover_jobs``)."""
        return training_jobs.recover_jobs(self, only_if_queue_empty)

    def train(self, user_id: str, progress: bool = False, *, method: str = "lora") -> AdapterInfo:
        """Train the user's adapter of ``method`` (an adapter method: 'lora', 'ia3', 'prompt-tuning', 'p-tuning',
        'prefix-tuning') in this process (no worker needed); returns the new adapter."""
        return training_jobs.train_in_process(self, user_id, progress, method)

    def run_training_job(self, job_id: int, progress: bool = False) -> JobOutcome:
        """Claim and run one training job; what a worker's task calls (``jobs.training_jobs``)."""
        return training_jobs.run_training_job(self, job_id, progress)


__all__ = ["METHODS", "EnqueueResult", "Personalizer"]
