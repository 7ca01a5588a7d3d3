"""Training jobs as rows in SQL: queued -> running (progress, loss, heartbeat) -> done | failed | cancelled.

The row, not the broker, is the truth: a message delivered twice, a worker killed mid-training, or a broker restart
all resolve here. A job is claimed with a conditional update under a lock on the user's row, so two jobs for the same
user never train at once; a running job whose worker is gone (dead pid on this host, or no heartbeat for
``stale_after`` seconds) is reclaimed or failed, never left running for ever.
"""

from __future__ import annotations

import builtins
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from personalize.data.items import UserInfo
from personalize.data.schema import Adapter, Item, TrainingJob, User, utcnow
from personalize.data.store import Store, rowcount
from personalize.errors import UnknownUserError
from personalize.jobs.process_ids import local_pid_alive, worker_identity

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class TrainedAdapter:
    """What a finished training job registers: the adapter row's columns (``config``: how it was trained)."""

    version: int
    path: str
    base_model: str
    n_items: int
    train_seconds: float
    final_loss: float | None
    size_bytes: int
    config: dict[str, Any]
    method: str = "lora"  # the adapter method (``adapters.methods``)


class JobOutcome(StrEnum):
    """How running one training job ended (a worker's task returns it; ``busy`` asks for a retry)."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DISCARDED = "discarded"  # the user was forgotten meanwhile, or the job reclaimed: nothing written back
    BUSY = "busy"
    DUPLICATE = "duplicate"
    GONE = "gone"


class Claim(StrEnum):
    CLAIMED = "claimed"
    BUSY = "busy"  # another job of the same user is running: try again later
    DUPLICATE = "duplicate"  # this job is running elsewhere, alive: a redelivered message
    GONE = "gone"  # no such job (the user was forgotten) or it already finished


@dataclass(frozen=True)
class JobInfo:
    id: int
    user_id: str
    state: str
    data_version: int
    progress: float
    loss: float | None
    error: str | None
    attempts: int
    worker: str | None
    adapter_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    method: str = "lora"  # the adapter method the job trains


@dataclass(frozen=True)
class AdapterInfo:
    id: int
    user_id: str
    version: int
    path: str
    base_model: str
    data_version: int
    n_items: int
    train_seconds: float
    final_loss: float | None
    size_bytes: int
    created_at: datetime
    config: dict[str, Any] | None = None  # how it was trained (steps, tokens, the base it was trained on)
    method: str = "lora"  # the adapter method (``adapters.methods``): 'lora', 'ia3', 'prompt-tuning', ...


def _job_info(job: TrainingJob, user_id: str) -> JobInfo:
    return JobInfo(
        job.id,
        user_id,
        job.state,
        job.data_version,
        job.progress,
        job.loss,
        job.error,
        job.attempts,
        job.worker,
        job.adapter_id,
        job.created_at,
        job.started_at,
        job.finished_at,
        job.method,
    )


def _adapter_info(row: Adapter, user_id: str) -> AdapterInfo:
    return AdapterInfo(
        row.id,
        user_id,
        row.version,
        row.path,
        row.base_model,
        row.data_version,
        row.n_items,
        row.train_seconds,
        row.final_loss,
        row.size_bytes,
        row.created_at,
        row.config,
        row.method,
    )


class Jobs:
    """Job and adapter bookkeeping on top of ``Store``."""

    def __init__(self, store: Store, stale_after_s: float = 120.0, max_attempts: int = 3) -> None:
        self.store = store
        self.stale_after = timedelta(seconds=stale_after_s)
        self.max_attempts = max_attempts

    # -- adapters ----------------------------------------------------------------------------------------------

    def current_adapter(self, user_id: str, base_model: str | None = None, method: str = "lora") -> AdapterInfo | None:
        """The user's newest adapter of ``method`` (for ``base_model``, when given)."""
        with self.store.session() as s:
            return self._current_adapter(s, self.store._user(s, user_id), base_model, method)

    def resolve(
        self, user_id: str, base_model: str, with_adapter: bool, method: str = "lora"
    ) -> tuple[UserInfo, AdapterInfo | None]:
        """A request's user in one transaction, its row read once: the user's info and (``with_adapter``) their
        newest adapter of ``method`` for ``base_model``."""
        with self.store.session() as s:
            user = self.store._user(s, user_id)
            info = self.store.user_info(s, user)
            return info, self._current_adapter(s, user, base_model, method) if with_adapter else None

    @staticmethod
    def _current_adapter(s: Session, user: User, base_model: str | None, method: str) -> AdapterInfo | None:
        query = select(Adapter).where(Adapter.user_pk == user.id, Adapter.method == method)
        if base_model is not None:
            query = query.where(Adapter.base_model == base_model)
        row = s.scalar(query.order_by(Adapter.version.desc()).limit(1))
        return _adapter_info(row, user.external_id) if row else None

    def adapters(self, user_id: str) -> list[AdapterInfo]:
        with self.store.session() as s:
            user = self.store._user(s, user_id)
            rows = s.scalars(select(Adapter).where(Adapter.user_pk == user.id).order_by(Adapter.version))
            return [_adapter_info(r, user_id) for r in rows]

    def next_version(self, user_id: str) -> int:
        with self.store.session() as s:
            user = self.store._user(s, user_id)
            return int(s.scalar(select(func.max(Adapter.version)).where(Adapter.user_pk == user.id)) or 0) + 1

    # -- jobs --------------------------------------------------------------------------------------------------

    def active_job(self, user_id: str, method: str = "lora") -> JobInfo | None:
        """The user's newest queued or running job of ``method``."""
        with self.store.session() as s:
            user = self.store._user(s, user_id)
            job = s.scalar(
                select(TrainingJob)
                .where(TrainingJob.user_pk == user.id, TrainingJob.state.in_(ACTIVE), TrainingJob.method == method)
                .order_by(TrainingJob.id.desc())
                .limit(1)
            )
            return _job_info(job, user_id) if job else None

    def create(self, user_id: str, method: str = "lora") -> JobInfo:
        with self.store.session() as s:
            user = self.store._user(s, user_id)
            job = TrainingJob(user_pk=user.id, state="queued", data_version=user.data_version, method=method)
            s.add(job)
            s.flush()
            return _job_info(job, user_id)

    def set_task_id(self, job_id: int, task_id: str) -> None:
        with self.store.session() as s:
            s.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(task_id=task_id))

    def get(self, job_id: int) -> JobInfo | None:
        with self.store.session() as s:
            row = s.execute(select(TrainingJob, User.external_id).join(User).where(TrainingJob.id == job_id)).first()
            return _job_info(row[0], row[1]) if row else None

    def list(
        self, user_id: str | None = None, states: tuple[str, ...] | None = None, limit: int = 100
    ) -> list[JobInfo]:
        with self.store.session() as s:
            query = select(TrainingJob, User.external_id).join(User).order_by(TrainingJob.id.desc()).limit(limit)
            if user_id is not None:
                query = query.where(User.external_id == user_id)
            if states:
                query = query.where(TrainingJob.state.in_(states))
            return [_job_info(job, uid) for job, uid in s.execute(query).all()]

    def states(self, job_ids: builtins.list[int]) -> dict[int, tuple[str, str | None]]:
        """State and error of many jobs in one query (for pollers)."""
        with self.store.session() as s:
            rows = s.execute(
                select(TrainingJob.id, TrainingJob.state, TrainingJob.error).where(TrainingJob.id.in_(job_ids))
            )
            return {job_id: (state, error) for job_id, state, error in rows}

    def lost_queued(self) -> builtins.list[int]:
        """Queued jobs older than ``stale_after``: their message may have been lost (e.g. a broker restart)."""
        cutoff = utcnow() - self.stale_after
        with self.store.session() as s:
            query = select(TrainingJob.id).where(TrainingJob.state == "queued", TrainingJob.created_at < cutoff)
            return list(s.scalars(query))

    def claim(self, job_id: int, worker: str | None = None) -> tuple[Claim, JobInfo | None]:
        """Mark the job running for this worker, unless it finished, runs elsewhere, or its user is busy."""
        worker = worker or worker_identity()
        now = utcnow()
        with self.store.session() as s:
            row = s.execute(select(TrainingJob, User).join(User).where(TrainingJob.id == job_id)).first()
            if row is None:
                return Claim.GONE, None
            job, user = row
            # serialise claims for one user (PostgreSQL row lock; SQLite serialises all writers anyway)
            s.execute(select(User.id).where(User.id == user.id).with_for_update())
            s.refresh(job)
            if job.state not in ACTIVE:
                return Claim.GONE, _job_info(job, user.external_id)
            if job.state == "running" and not self._is_stale(job, now):
                return Claim.DUPLICATE, _job_info(job, user.external_id)
            if job.attempts >= self.max_attempts:  # a redelivery after the last allowed attempt's worker died
                lost = f"worker {job.worker} lost" if job.state == "running" else "gave up"
                job.state, job.finished_at = "failed", now
                job.error = f"{lost} after {job.attempts} attempt(s) (job_max_attempts={self.max_attempts})"
                return Claim.GONE, _job_info(job, user.external_id)
            others = s.scalars(
                select(TrainingJob).where(
                    TrainingJob.user_pk == user.id, TrainingJob.id != job.id, TrainingJob.state == "running"
                )
            ).all()
            if any(not self._is_stale(o, now) for o in others):
                return Claim.BUSY, _job_info(job, user.external_id)
            for o in others:  # a stale job of the same user: its worker is gone
                o.state, o.error, o.finished_at = "failed", "worker lost (no heartbeat)", now
            job.state, job.worker, job.attempts = "running", worker, job.attempts + 1
            job.started_at = job.heartbeat_at = now
            job.progress, job.loss, job.error = 0.0, None, None
            job.data_version = user.data_version  # the items read next are at least this version
            return Claim.CLAIMED, _job_info(job, user.external_id)

    def _is_stale(self, job: TrainingJob, now: datetime) -> bool:
        """A job's worker is lost when its process on this host is gone, or, for a worker on another host, when its
        heartbeat is older than ``stale_after``. A live process on this host is never judged by its heartbeat: on an
        oversubscribed CPU a step can outlast ``stale_after`` (hung workers are ended by the task time limit)."""
        local = local_pid_alive(job.worker)
        if local is not None:
            return not local
        beat = job.heartbeat_at or job.started_at
        return beat is None or now - beat > self.stale_after

    def heartbeat(self, job_id: int, progress: float, loss: float | None) -> bool:
        """Record progress; False when the job is no longer this worker's to finish (forgotten, reclaimed)."""
        with self.store.session() as s:
            result = s.execute(
                update(TrainingJob)
                .where(
                    TrainingJob.id == job_id, TrainingJob.state == "running", TrainingJob.worker == worker_identity()
                )
                .values(progress=progress, loss=loss, heartbeat_at=utcnow())
            )
            return bool(rowcount(result))

    def still_mine(self, job_id: int) -> bool:
        with self.store.session() as s:
            state, worker = s.execute(
                select(TrainingJob.state, TrainingJob.worker).where(TrainingJob.id == job_id)
            ).first() or (None, None)
            return state == "running" and worker == worker_identity()

    def finish(self, job_id: int, adapter: TrainedAdapter) -> int | None:
        """Register the adapter and mark the job done in one transaction; None if the job is no longer ours."""
        with self.store.session() as s:
            job = s.get(TrainingJob, job_id, with_for_update=True)
            if job is None or job.state != "running" or job.worker != worker_identity():
                return None
            row = Adapter(user_pk=job.user_pk, data_version=job.data_version, **asdict(adapter))
            s.add(row)
            s.flush()
            job.state, job.progress, job.adapter_id, job.finished_at = "done", 1.0, row.id, utcnow()
            job.loss = adapter.final_loss
            return row.id

    def fail(self, job_id: int, error: str, state: str = "failed") -> None:
        with self.store.session() as s:
            s.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.state.in_(ACTIVE))
                .values(state=state, error=error[:4000], finished_at=utcnow())
            )

    def release(self, job_id: int, error: str) -> bool:
        """Put a running job back to queued after a transient error (or fail it after max attempts)."""
        with self.store.session() as s:
            job = s.get(TrainingJob, job_id)
            if job is None or job.state != "running":
                return False
            if job.attempts >= self.max_attempts:
                job.state, job.error, job.finished_at = (
                    "failed",
                    f"gave up after {job.attempts} attempts: {error}",
                    utcnow(),
                )
                return False
            job.state, job.error, job.worker = "queued", error[:4000], None
            return True

    def recover_stale(self) -> builtins.list[int]:
        """Requeue (or fail, past max attempts) running jobs whose worker is gone; return the requeued ids."""
        now = utcnow()
        requeued: list[int] = []
        with self.store.session() as s:
            for job in s.scalars(select(TrainingJob).where(TrainingJob.state == "running")):
                if not self._is_stale(job, now):
                    continue
                if job.attempts >= self.max_attempts:
                    job.state, job.finished_at = "failed", now
                    job.error = f"worker {job.worker} lost after {job.attempts} attempt(s)"
                else:
                    job.state, job.error, job.worker = "queued", f"worker {job.worker} lost; requeued", None
                    requeued.append(job.id)
        return requeued

    def users_needing_training(self, min_items: int, base_model: str) -> builtins.list[str]:
        """Users with at least ``min_items`` items whose data changed since their latest adapter (or who have none)."""
        with self.store.session() as s:
            counts = select(Item.user_pk, func.count(Item.id).label("n")).group_by(Item.user_pk).subquery()
            latest = (
                select(Adapter.user_pk, func.max(Adapter.data_version).label("v"))
                .where(Adapter.base_model == base_model, Adapter.method == "lora")
                .group_by(Adapter.user_pk)
                .subquery()
            )
            query = (
                select(User.external_id)
                .join(counts, counts.c.user_pk == User.id)
                .outerjoin(latest, latest.c.user_pk == User.id)
                .where(counts.c.n >= min_items)
                .where((latest.c.v.is_(None)) | (latest.c.v < User.data_version))
                .order_by(User.external_id)
            )
            return list(s.scalars(query))

    def user_exists(self, user_id: str) -> bool:
        try:
            with self.store.session() as s:
                self.store._user(s, user_id)
            return True
        except UnknownUserError:
            return False
