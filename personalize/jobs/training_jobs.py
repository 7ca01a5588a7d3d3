"""Per-user training as jobs: queue them for the Celery workers, recover lost ones, and run one (the worker's body).

The job row in SQL is the truth (``jobs.store``); the broker only carries job ids. Running a job claims it in SQL,
trains on the base the user's task runs on, writes the adapter atomically and registers it in one transaction, so a
message delivered twice, a worker killed mid-training or a user forgotten meanwhile never leaves a wrong adapter.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from personalize.adapters.distill import distill_pairs, distill_summary, teacher_retrieval
from personalize.adapters.methods import get_adapter_method
from personalize.adapters.training import train_adapter, training_pairs
from personalize.data.naming import user_key
from personalize.errors import (
    BrokerUnavailableError,
    DatabaseUnavailableError,
    InvalidInputError,
    PersonalizeError,
    TrainingCancelled,
    TrainingFailedError,
    UnknownUserError,
)
from personalize.jobs.queue import QUEUE, TRAIN_USER, describe_broker
from personalize.jobs.store import AdapterInfo, Claim, JobOutcome, Jobs, TrainedAdapter
from personalize.settings import AdapterTrainingSettings, DistillSettings

if TYPE_CHECKING:
    from personalize.data.items import ProfileItem
    from personalize.personalizer import Personalizer
    from personalize.serving.modeling import LoadedModel


@dataclass(frozen=True)
class EnqueueResult:
    user_id: str
    job_id: int | None
    queued: bool
    message: str


def enqueue_training(p: Personalizer, user_id: str, force: bool = False, method: str = "lora") -> EnqueueResult:
    """Queue training of the user's adapter of ``method`` for the workers; a no-op (that says so) when nothing
    changed."""
    get_adapter_method(method)
    info = p.store.get_user(user_id)
    current = p.bases.current_adapter(user_id, method)
    if not force and current is not None and p.bases.adapter_is_current(current, info):
        return EnqueueResult(
            user_id,
            None,
            False,
            f"up to date: adapter v{current.version} was trained on the current data (version {info.data_version})",
        )
    active = p.jobs.active_job(user_id, method)
    if active is not None and (active.state == "queued" or active.data_version == info.data_version):
        return EnqueueResult(user_id, active.id, False, f"already {active.state}: job {active.id}")
    if info.n_items == 0:
        raise InvalidInputError(f"user {user_id!r} has no items to train an adapter on")
    job = p.jobs.create(user_id, method)
    send_job(p, job.id)
    return EnqueueResult(user_id, job.id, True, f"queued: job {job.id}")


def send_job(p: Personalizer, job_id: int) -> None:
    """Hand a queued job's id to the broker; an unreachable broker leaves the job queued and says so."""
    try:
        sent = p.celery.send_task(
            TRAIN_USER, args=[job_id], queue=QUEUE, retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2}
        )
    except Exception as exc:
        raise BrokerUnavailableError(
            f"cannot reach the broker {describe_broker(p.settings)} ({type(exc).__name__}); job {job_id} "
            "stays queued and is sent again when a worker starts (or run `personalize train --all`)"
        ) from None
    p.jobs.set_task_id(job_id, sent.id)


def enqueue_all(p: Personalizer) -> list[EnqueueResult]:
    """Queue every user whose data changed since their adapter and who has at least ``train_min_items``."""
    users = p.jobs.users_needing_training(p.settings.train_min_items, p.settings.model)
    return [enqueue_training(p, u) for u in users]


def queue_quietly(p: Personalizer, user_id: str, method: str = "lora") -> str:
    """Queue training (of an adapter of ``method``) and say what happened, never raising (a request must not fail
    for it)."""
    try:
        return f"training {enqueue_training(p, user_id, method=method).message}"
    except PersonalizeError as exc:
        return f"could not queue training: {exc}"


def maybe_queue_retrain(p: Personalizer, user_id: str) -> str | None:
    """Queue (re)training when the user's items passed ``train_min_items`` (no adapter yet), or grew by
    ``retrain_min_new_items`` or by ``retrain_growth`` since the current adapter."""
    n_items = p.store.count_items(user_id)
    current = p.current_adapter(user_id)
    if current is None:
        due = n_items >= p.settings.train_min_items
    else:
        grown = n_items - current.n_items
        due = grown >= p.settings.retrain_min_new_items or (
            grown > 0 and n_items >= current.n_items * (1 + p.settings.retrain_growth)
        )
    return queue_quietly(p, user_id) if due else None


def recover_jobs(p: Personalizer, only_if_queue_empty: bool = False) -> list[int]:
    """Requeue jobs of lost workers and resend queued jobs whose message may be lost; duplicates are harmless
    because a job is claimed in SQL before it runs.

    ``only_if_queue_empty`` (the workers' periodic check) resends old queued jobs only when the broker's queue
    is empty: then their messages are certainly gone (a broker restarted without persistence), whereas a long
    queue is just slow. Temporary folders of adapter saves whose worker died are removed too."""
    p.adapter_store.remove_stale_temp(p.settings.job_stale_after_s)
    requeued = set(p.jobs.recover_stale())
    lost = p.jobs.lost_queued()
    if lost and (not only_if_queue_empty or queued_messages(p) == 0):
        requeued.update(lost)
    for job_id in sorted(requeued):
        send_job(p, job_id)
    return sorted(requeued)


def queued_messages(p: Personalizer) -> int | None:
    """Messages waiting in the training queue of the broker (None when the broker cannot say)."""
    try:
        with p.celery.connection_for_write() as conn, conn.channel() as channel:
            return int(channel.queue_declare(QUEUE, passive=True).message_count)
    except Exception as exc:  # a queue never declared (or deleted by a restart) holds nothing
        if "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower():
            return 0
        return None


def train_in_process(p: Personalizer, user_id: str, progress: bool = False, method: str = "lora") -> AdapterInfo:
    """Train the user's adapter of ``method`` in this process (no worker needed), as a job like any other; the new
    adapter."""
    get_adapter_method(method)
    if p.store.get_user(user_id).n_items == 0:
        raise InvalidInputError(f"user {user_id!r} has no items to train an adapter on")
    job = p.jobs.create(user_id, method)
    outcome = run_training_job(p, job.id, progress=progress)
    final = p.jobs.get(job.id)
    if outcome != JobOutcome.DONE or final is None or final.adapter_id is None:
        raise TrainingFailedError(f"training {user_id!r} ended {outcome}: {final.error if final else 'job gone'}")
    adapter = p.bases.current_adapter(user_id, method)
    assert adapter is not None
    return adapter


def run_training_job(p: Personalizer, job_id: int, progress: bool = False) -> JobOutcome:
    """Claim and run one training job; what a worker's task calls."""
    claim, job = p.jobs.claim(job_id)
    if claim is not Claim.CLAIMED or job is None:
        return JobOutcome(claim.value)
    user_id = job.user_id
    beat = Heartbeat(p.jobs, job_id, progress)
    try:
        method = get_adapter_method(job.method)
        settings = p.settings.adapter_settings(method.name)
        items = p.store.items(user_id)
        loaded, task_adapter = p.bases.training_base(p.store.get_user(user_id))
        pairs, distilled, train_progress = _training_pairs(p, method.distilled, settings, items, loaded, beat)
        distill_record = {"distill": distilled} if distilled else {}  # in the adapter's metadata and its SQL row
        version = p.jobs.next_version(user_id)
        out = p.adapter_store.path_for(user_id, version)
        p.adapter_store.discard_incomplete(out)  # left by a crash between the rename and the SQL insert
        p.adapter_store.remove_stale_temp(p.settings.job_stale_after_s, user_id)  # killed mid-save
        task_ref = task_adapter.ref if task_adapter else None
        result = train_adapter(
            loaded,
            pairs,
            settings,
            out,
            progress=train_progress,
            should_stop=beat.should_stop,
            owner=user_key(user_id),
            extra={"task_adapter": task_ref, **distill_record},
        )
    except TrainingCancelled as exc:
        p.jobs.fail(job_id, str(exc), state="cancelled")
        return JobOutcome.CANCELLED
    except (DatabaseUnavailableError, UnknownUserError) as exc:
        if isinstance(exc, UnknownUserError):  # forgotten while starting
            return JobOutcome.DISCARDED
        p.jobs.release(job_id, str(exc))
        raise
    except Exception as exc:
        p.jobs.fail(job_id, f"{type(exc).__name__}: {exc}")
        return JobOutcome.FAILED
    finally:
        beat.close()
    trained = TrainedAdapter(
        version=version,
        path=str(result.path),
        base_model=p.settings.model,
        n_items=len(items),
        train_seconds=result.train_seconds,
        final_loss=result.final_loss,
        size_bytes=result.size_bytes,
        method=method.name,
        config={
            **result.config,
            "n_pairs": result.n_pairs,
            "n_tokens": result.n_tokens,
            "steps": result.steps,
            "trainable_params": result.trainable_params,
            "trained_on": loaded.name,
            "task_adapter": task_ref,
            "peft_type": method.peft_type,
            "trainer_used": result.trainer,
            "trainer_note": result.trainer_note,
            "compute_precision": result.precision,  # what the frozen base computed in ("auto" resolved)
            **distill_record,
        },
    )
    if p.jobs.finish(job_id, trained) is None:  # the user was forgotten, or the job reclaimed: never write back
        shutil.rmtree(result.path, ignore_errors=True)
        if not p.jobs.user_exists(user_id):
            p.adapter_store.delete_user(user_id)
        return JobOutcome.DISCARDED
    return JobOutcome.DONE


def _training_pairs(
    p: Personalizer,
    distilled: bool,
    settings: AdapterTrainingSettings,
    items: list[ProfileItem],
    loaded: LoadedModel,
    beat: Heartbeat,
) -> tuple[list[tuple[str, str]], dict[str, Any] | None, Callable[[float, float | None], None]]:
    """The pairs an adapter trains on, what the metadata records of a distilled one's targets, and the progress
    callback of training: a distilled adapter's teacher answers fill the first half of the bar."""
    if not distilled:
        return training_pairs(items, None, max_items=settings.max_items), None, beat.progress
    assert isinstance(settings, DistillSettings)
    retrieval = teacher_retrieval(p.settings, settings)
    made = distill_pairs(loaded, items, settings, retrieval, p.embedder, lambda f, _: beat.progress(f / 2, None))
    return [d.pair for d in made], distill_summary(made, retrieval), lambda f, loss: beat.progress(0.5 + f / 2, loss)


class Heartbeat:
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


__all__ = [
    "EnqueueResult",
    "Heartbeat",
    "enqueue_training",
    "enqueue_all",
    "maybe_queue_retrain",
    "queue_quietly",
    "queued_messages",
    "recover_jobs",
    "run_training_job",
    "send_job",
    "train_in_process",
]
