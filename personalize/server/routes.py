"""The library's endpoints under ``/v1``: users and items, forgetting, training jobs, retrieval and generation.

Each handler is a plain (threaded) function that checks the caller's scope, calls one ``Personalizer`` method and
writes its result with ``wire``. Ids in paths are percent-encoded; ``{user_id:path}`` keeps an id with ``/`` whole.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Body, Depends, Path, Request

from personalize.data.naming import validate_user_id
from personalize.errors import InvalidInputError, ServerBusyError, UnknownJobError
from personalize.personalizer import Personalizer
from personalize.results import GenerationResult
from personalize.server import wire
from personalize.server.auth import Caller, authenticate
from personalize.server.metrics import Metrics
from personalize.server.schemas import GenerateIn, ItemsIn, RetrieveIn, TrainIn
from personalize.settings import ServerSettings

ERROR_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "field": {"type": ["string", "null"]},
                        },
                    }
                },
            }
        }
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": what, **ERROR_BODY}
    for status, what in [
        (401, "No API key, or an unknown one"),
        (403, "The API key is not scoped to this user"),
        (404, "Unknown user or job"),
        (409, "Conflict (an adapter trained on another base)"),
        (422, "Bad input; `field` names it"),
        (503, "Busy or a backing service is down; see Retry-After"),
    ]
}
MAX_JOB_ID = 2**63 - 1

router = APIRouter(prefix="/v1", responses=ERRORS)


class Limiter:
    """At most ``limit`` generations in flight; one more is refused at once (503, Retry-After), never queued."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self.limit = limit
        self.retry_after_s = retry_after_s

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise ServerBusyError(
                f"the server is answering {self.limit} requests already (PERSONALIZE_SERVER__MAX_CONCURRENT); "
                f"retry in {self.retry_after_s} s",
                self.retry_after_s,
            )
        try:
            yield
        finally:
            self._slots.release()


def personalizer(request: Request) -> Personalizer:
    return request.app.state.personalizer


def server_settings(request: Request) -> ServerSettings:
    return request.app.state.server_settings


def check_new_tokens(value: int | None, cap: int, field: str = "max_new_tokens") -> int | None:
    """Refuse more new tokens than the server's cap (``Settings.server.max_new_tokens``), naming the field."""
    if value is not None and value > cap:
        raise InvalidInputError(f"{field} is at most {cap} on this server (PERSONALIZE_SERVER__MAX_NEW_TOKENS)", field)
    return value


def run_generation(request: Request, body: GenerateIn) -> GenerationResult:
    """``Personalizer.generate`` under the server's cap and concurrency limit, counted in the metrics."""
    check_new_tokens(body.max_new_tokens, server_settings(request).max_new_tokens)
    limiter: Limiter = request.app.state.limiter
    with limiter.slot():
        result = personalizer(request).generate(
            body.user_id,
            body.prompt,
            body.method,
            k=body.k,
            max_new_tokens=body.max_new_tokens,
            retriever=body.retriever,
            task=body.task,
        )
    metrics: Metrics = request.app.state.metrics
    metrics.observe_result(result)
    return result


UserId = Path(description="The user id, percent-encoded (an id may hold '/', '%', '..', any Unicode).")


@router.post("/users/{user_id:path}/items", summary="Add or update a user's items (atomic)")
def add_items(
    request: Request, body: ItemsIn, user_id: str = UserId, caller: Caller = Depends(authenticate)
) -> dict[str, Any]:
    caller.check_user(user_id)
    items = [item.model_dump(exclude_unset=True) for item in body.items]
    return wire.upsert_to_wire(personalizer(request).add_items(user_id, items))


@router.post("/users/{user_id:path}/retrieve", summary="A user's items most relevant to a query")
def retrieve(
    request: Request, body: RetrieveIn, user_id: str = UserId, caller: Caller = Depends(authenticate)
) -> dict[str, Any]:
    caller.check_user(user_id)
    return wire.retrieved_to_wire(personalizer(request).retrieve(user_id, body.query, body.k, body.retriever))


@router.post("/users/{user_id:path}/train", status_code=202, summary="Queue training of the user's adapter")
def train(
    request: Request,
    body: TrainIn | None = Body(None),
    user_id: str = UserId,
    caller: Caller = Depends(authenticate),
) -> dict[str, Any]:
    caller.check_user(user_id)
    force = body.force if body is not None else False
    return wire.enqueue_to_wire(personalizer(request).enqueue_training(user_id, force=force))


@router.get("/users/{user_id:path}", summary="A user: item count, data version, tasks")
def get_user(request: Request, user_id: str = UserId, caller: Caller = Depends(authenticate)) -> dict[str, Any]:
    caller.check_user(user_id)
    return wire.user_to_wire(personalizer(request).user(validate_user_id(user_id)))


@router.delete("/users/{user_id:path}", summary="Forget a user: rows, collection, adapters, files")
def forget(request: Request, user_id: str = UserId, caller: Caller = Depends(authenticate)) -> dict[str, Any]:
    caller.check_user(user_id)
    return wire.forget_to_wire(personalizer(request).forget(user_id))


@router.get("/jobs/{job_id}", summary="A training job: state, progress, loss, error")
def get_job(
    request: Request, job_id: int = Path(ge=1, le=MAX_JOB_ID), caller: Caller = Depends(authenticate)
) -> dict[str, Any]:
    job = personalizer(request).jobs.get(job_id)
    if job is None:
        raise UnknownJobError(job_id)
    caller.check_user(job.user_id)
    return wire.job_to_wire(job)


@router.post("/generate", summary="Answer a prompt for a user: the full result")
def generate(request: Request, body: GenerateIn, caller: Caller = Depends(authenticate)) -> dict[str, Any]:
    caller.check_user(body.user_id)
    return wire.result_to_wire(run_generation(request, body))
