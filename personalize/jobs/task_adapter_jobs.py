"""Training task adapters: in this process (with a bar and an ETA), or as a Celery job whose progress a dashboard reads.

A job is one JSON record under the task-adapter store (``_tasks/_jobs/{id}.json``, replaced atomically): state
(queued, running, done, failed), progress, loss, ETA, and the resulting adapter's ref. ``forget`` queues one per
task adapter that the forgotten user's items trained, with that user excluded.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from personalize.adapters.task_adapters import (
    TaskAdapterInfo,
    TaskAdapterSource,
    TaskTrainResult,
    _now,
    select_training_users,
    train_task_adapter,
)
from personalize.data.items import ProfileItem
from personalize.data.naming import user_key
from personalize.errors import BrokerUnavailableError, PersonalizeError
from personalize.jobs.queue import QUEUE, TRAIN_TASK_ADAPTER, describe_broker

if TYPE_CHECKING:
    from personalize.personalizer import Personalizer

STORE_SOURCE = "store"
SYNTHETIC_SOURCE = "SYNTHETIC"


def source_users(p: Personalizer, source: TaskAdapterSource) -> dict[str, list[ProfileItem]]:
    """The users and items a source names, after its hygiene rule and its exclusions."""
    if source.data == STORE_SOURCE:
        return _store_users(p, source)
    from personalize.eval.datasets.loading import load_dataset

    synthetic = (source.users or 20) if source.data == SYNTHETIC_SOURCE else None
    dataset, _ = load_dataset(source.task, source.split, None if synthetic else source.data, synthetic)
    return select_training_users(dataset, source)


def _store_users(p: Personalizer, source: TaskAdapterSource) -> dict[str, list[ProfileItem]]:
    """Users of the store with items of the task: all of those items (the store holds no queries to cut at)."""
    out: dict[str, list[ProfileItem]] = {}
    excluded = set(source.exclude_user_keys)
    offset = 0
    while True:
        page = p.store.list_users(None, 500, offset)
        if not page:
            return out
        offset += len(page)
        for info in page:
            if user_key(info.user_id) in excluded:
                continue
            items = [i for i in p.store.items(info.user_id) if i.task == source.task]
            if items:
                out[info.user_id] = items
            if source.users and len(out) >= source.users:
                return out


class _Progress:
    """A tqdm bar with an ETA on an interactive terminal, and the job record (at most once a second)."""

    def __init__(self, p: Personalizer, job_id: str | None, show: bool, desc: str) -> None:
        self.p, self.job_id = p, job_id
        self.start = time.monotonic()
        self._last = 0.0
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=100, unit="%", desc=desc, disable=not sys.stderr.isatty())

    def __call__(self, fraction: float, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.n = round(fraction * 100)
            self.bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-")
        now = time.monotonic()
        if self.job_id is not None and (now - self._last >= 1.0 or fraction >= 1.0):
            self._last = now
            elapsed = now - self.start
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
            _update_job(self.p, self.job_id, progress=fraction, loss=loss, eta_s=eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _update_job(p: Personalizer, job_id: str, **changes: Any) -> None:
    record = p.task_adapters.job(job_id) or {"id": job_id}
    record.update(changes)
    p.task_adapters.write_job(job_id, record)


def train_now(
    p: Personalizer, source: TaskAdapterSource, *, progress: bool = False, job_id: str | None = None
) -> TaskTrainResult:
    """Train a task adapter on ``source`` in this process, on the plain base model (never on another task
    adapter); older versions that carry a forgotten user's mark are removed once the new one is in place."""
    users = source_users(p, source)
    bar = _Progress(p, job_id, progress, f"task adapter {source.task}")
    try:
        result = train_task_adapter(
            p.model,
            p.task_adapters,
            source,
            p.settings.task_adapter,
            users,
            token_budget=p.settings.token_budget,
            input_share=p.settings.input_share,
            embedder=p.embedder if source.retriever == "dense" else None,
            progress=bar,
        )
    finally:
        bar.close()
    for old in p.task_adapters.versions(source.task, p.settings.model):
        if old.version < result.info.version and old.forgotten:
            p.task_adapters.remove(source.task, p.settings.model, old.version)
    return result


def queue_train(p: Personalizer, source: TaskAdapterSource, reason: str = "requested") -> str:
    """Queue training for the workers; returns the job id. The job record stays queued when the broker is down."""
    job_id = p.task_adapters.new_job(source, p.settings.model, reason)
    try:
        p.celery.send_task(TRAIN_TASK_ADAPTER, args=[job_id], queue=QUEUE, retry=True, retry_policy={"max_retries": 3})
    except Exception as exc:
        raise BrokerUnavailableError(
            f"cannot reach the broker {describe_broker(p.settings)} ({type(exc).__name__}); task adapter job "
            f"{job_id} stays queued: run `personalize task-adapter train` with its source, or queue it again"
        ) from None
    return job_id


def run_job(p: Personalizer, job_id: str, *, progress: bool = False) -> str:
    """What a worker runs for a queued task adapter job (and the CLI for an inline one, with a bar): done (with the
    new ref) or failed (with why); the record's progress, loss and ETA are what the dashboard shows meanwhile."""
    record = p.task_adapters.job(job_id)
    if record is None:
        return "gone"
    if record.get("state") in ("done", "running"):
        return "duplicate"
    _update_job(p, job_id, state="running", started_at=_now())
    try:
        result = train_now(p, TaskAdapterSource(**record["source"]), job_id=job_id, progress=progress)
    except PersonalizeError as exc:
        _update_job(p, job_id, state="failed", error=str(exc), finished_at=_now())
        return "failed"
    except Exception as exc:
        _update_job(p, job_id, state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=_now())
        return "failed"
    _update_job(p, job_id, state="done", progress=1.0, adapter=result.info.ref, finished_at=_now(), eta_s=0)
    return "done"


def retrain_source(info: TaskAdapterInfo) -> TaskAdapterSource:
    """The adapter's own source with every user forgotten since (and before) excluded."""
    source = TaskAdapterSource(**info.metadata["source"])
    source.exclude_user_keys = sorted({*source.exclude_user_keys, *info.forgotten})
    return source


def queue_task_adapter_retrain(p: Personalizer, info: TaskAdapterInfo) -> str:
    """Queue a retrain of ``info`` without its forgotten users; one line saying what happened."""
    try:
        job_id = queue_train(p, retrain_source(info), reason=f"forget: retrain {info.ref} without forgotten users")
    except BrokerUnavailableError as exc:
        return f"{info.ref}: retrain not queued ({exc})"
    return f"{info.ref}: retrain queued as task adapter job {job_id}"


__all__ = ["queue_task_adapter_retrain", "queue_train", "retrain_source", "run_job", "source_users", "train_now"]
