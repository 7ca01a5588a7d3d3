"""The Celery app: ``celery -A workers worker``. A thin shell: each task calls one library function.

With no ``PERSONALIZE_BROKER_URL`` the worker uses the embedded SQLite broker in the home folder (no server
needed); set it to ``redis://...`` or ``amqp://...`` for a real broker. The model is loaded lazily, once per worker
process, by the first task that needs it (never in a signal handler).
"""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_ready

import personalize
from personalize.errors import BrokerUnavailableError, DatabaseUnavailableError
from personalize.jobs.queue import TRAIN_ALL, TRAIN_TASK_ADAPTER, TRAIN_USER, make_celery
from personalize.personalizer import Personalizer
from personalize.settings import Settings

log = logging.getLogger("personalize.workers")

app = make_celery(Settings(), main="workers")
celery = app


def personalizer() -> Personalizer:
    """This worker process's ``Personalizer`` (and so its model): the library's default, created on first use."""
    return personalize.get_default()


@app.task(
    name=TRAIN_USER,
    bind=True,
    acks_late=True,
    autoretry_for=(DatabaseUnavailableError,),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=5,
)
def train_user(self, job_id: int) -> str:  # noqa: ANN001
    """Train (or retrain) one user's adapter for the job row ``job_id``."""
    outcome = personalizer().run_training_job(job_id)
    if outcome == "busy":  # another job of the same user is training: try again shortly
        raise self.retry(countdown=5, max_retries=None)
    log.info("training job %s: %s", job_id, outcome)
    return outcome


@app.task(name=TRAIN_ALL, acks_late=True)
def train_all() -> list[int]:
    """Queue every user whose data changed since their adapter."""
    return [r.job_id for r in personalizer().enqueue_all() if r.job_id is not None]


@app.task(name=TRAIN_TASK_ADAPTER, acks_late=True)
def train_task_adapter(job_id: str) -> str:
    """Train a task adapter for the job record ``job_id`` (its progress is written to the record)."""
    from personalize.jobs.task_adapter_jobs import run_job

    outcome = run_job(personalizer(), job_id)
    log.info("task adapter job %s: %s", job_id, outcome)
    return outcome


@worker_ready.connect
def _recover_jobs(sender=None, **_: object) -> None:  # noqa: ANN001
    """On start, requeue jobs of workers that died and resend queued jobs whose message may be lost; then keep
    looking every ``job_recover_every_s`` (a broker restarted without persistence loses its queue silently)."""
    _recover_once(only_if_queue_empty=False)
    every = Settings().job_recover_every_s
    if every > 0:
        threading.Thread(target=_recover_forever, args=(every,), name="personalize-recover", daemon=True).start()


def _recover_once(only_if_queue_empty: bool) -> None:
    try:
        requeued = personalizer().recover_jobs(only_if_queue_empty=only_if_queue_empty)
        if requeued:
            log.warning("requeued training jobs %s", requeued)
    except (BrokerUnavailableError, DatabaseUnavailableError) as exc:
        log.error("could not recover jobs: %s", exc)
    except Exception:  # never let the watcher die: the next round may succeed
        log.exception("recovering jobs failed")


def _recover_forever(every: float) -> None:
    while True:
        time.sleep(every)
        _recover_once(only_if_queue_empty=True)
