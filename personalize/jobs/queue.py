"""The Celery configuration shared by the client (which enqueues) and ``workers/`` (which runs the tasks).

Tasks are addressed by name, so the library enqueues without importing the worker package. With no broker
configured, an embedded SQLite broker in the home folder (kombu's SQLAlchemy transport) needs no server.
"""

from __future__ import annotations

from typing import Any

from personalize.data.store import redact_url
from personalize.settings import Settings

TRAIN_USER = "personalize.train_user"
TRAIN_ALL = "personalize.train_all"
TRAIN_TASK_ADAPTER = "personalize.train_task_adapter"
QUEUE = "personalize-training"


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.resolved_broker_url
    if broker.startswith("sqla+sqlite"):
        settings.resolved_home.mkdir(parents=True, exist_ok=True)
    transport: dict[str, Any] = {}  # kombu's SQLAlchemy transport polls once a second and passes options to SQLAlchemy
    if broker.startswith(("redis://", "rediss://")):
        # a killed worker's unacknowledged message comes back after this; the job row guards against doubles
        transport = {"visibility_timeout": max(settings.train_time_limit_s * 2, 600)}
    return {
        "broker_url": broker,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,  # job state lives in SQL, not in a result backend
        "task_acks_late": True,  # a message is acknowledged after the task ran, so a lost worker's job comes back
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # long jobs: never hoard messages another worker could run
        "task_time_limit": settings.train_time_limit_s,
        "task_soft_time_limit": max(settings.train_time_limit_s - 30, 10),
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def make_celery(settings: Settings, main: str = "personalize"):  # noqa: ANN201 - celery is imported lazily
    from celery import Celery

    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app


def describe_broker(settings: Settings) -> str:
    return redact_url(settings.resolved_broker_url.removeprefix("sqla+"))
