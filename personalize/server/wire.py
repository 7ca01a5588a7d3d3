"""The one place that knows how results, items and errors look as JSON on the wire, both ways.

The server (``personalize.server``) writes these shapes and the client (``personalize.remote``) reads them back into
the same typed classes the library returns in-process, so an application cannot tell which mode answered. No HTTP
framework is imported here: the client needs only this module and httpx.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import date, datetime
from typing import Any

from personalize.data.items import ProfileItem, UserInfo
from personalize.data.store import UpsertReport
from personalize.errors import PersonalizeError, ServerError, error_classes
from personalize.jobs.store import JobInfo
from personalize.jobs.training_jobs import EnqueueResult
from personalize.results import ForgetReport, GenerationResult, RetrievedRef, ServingFacts, Timings
from personalize.retrieval.base import RetrievedItem


def jsonable(value: Any) -> Any:
    """Dataclasses, datetimes and containers as plain JSON values (non-finite floats become None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _datetime(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def item_to_wire(item: ProfileItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "text": item.text,
        "fields": item.fields,
        "output": item.output,
        "timestamp": item.timestamp.isoformat() if item.timestamp else None,
        "task": item.task,
    }


def item_from_wire(data: dict[str, Any]) -> ProfileItem:
    return ProfileItem(
        id=data["id"],
        text=data["text"],
        fields=data.get("fields"),
        output=data.get("output"),
        timestamp=_datetime(data.get("timestamp")),
        task=data.get("task"),
    )


def upsert_to_wire(report: UpsertReport) -> dict[str, Any]:
    return {**jsonable(report), "changed": [item_to_wire(i) for i in report.changed]}


def upsert_from_wire(data: dict[str, Any]) -> UpsertReport:
    return UpsertReport(
        user_id=data["user_id"],
        added=data["added"],
        updated=data["updated"],
        unchanged=data["unchanged"],
        data_version=data["data_version"],
        changed=[item_from_wire(i) for i in data.get("changed", [])],
        training=data.get("training"),
    )


def user_to_wire(info: UserInfo) -> dict[str, Any]:
    return jsonable(info)


def user_from_wire(data: dict[str, Any]) -> UserInfo:
    created, updated = _datetime(data["created_at"]), _datetime(data["updated_at"])
    assert created is not None and updated is not None
    return UserInfo(data["user_id"], data["n_items"], data["data_version"], created, updated, list(data["tasks"]))


def result_to_wire(result: GenerationResult) -> dict[str, Any]:
    return {**jsonable(result), "retrieved_ids": result.retrieved_ids}


def result_from_wire(data: dict[str, Any]) -> GenerationResult:
    t = data["timings"]
    timings = Timings(t["retrieval_s"], t["prompt_s"], t["generation_s"], t["total_s"], ServingFacts(**t["extra"]))
    return GenerationResult(
        user_id=data["user_id"],
        text=data["text"],
        method=data["method"],
        requested_method=data["requested_method"],
        task=data["task"],
        retriever=data.get("retriever"),
        retrieved=[RetrievedRef(r["id"], r["score"]) for r in data["retrieved"]],
        prompt=data["prompt"],
        prompt_tokens=data["prompt_tokens"],
        new_tokens=data["new_tokens"],
        timings=timings,
        notes=list(data.get("notes", [])),
        truncated=bool(data.get("truncated", False)),
    )


def retrieved_to_wire(hits: list[RetrievedItem]) -> dict[str, Any]:
    return {"items": [{"id": h.id, "score": h.score, "item": item_to_wire(h.item)} for h in hits]}


def retrieved_from_wire(data: dict[str, Any]) -> list[RetrievedItem]:
    return [RetrievedItem(h["id"], h["score"], item_from_wire(h["item"])) for h in data["items"]]


def forget_to_wire(report: ForgetReport) -> dict[str, Any]:
    return jsonable(report)


def forget_from_wire(data: dict[str, Any]) -> ForgetReport:
    names = {f.name for f in dataclasses.fields(ForgetReport)}
    return ForgetReport(**{k: v for k, v in data.items() if k in names})


def job_to_wire(job: JobInfo) -> dict[str, Any]:
    return jsonable(job)


def job_from_wire(data: dict[str, Any]) -> JobInfo:
    dates = {k: _datetime(data.get(k)) for k in ("created_at", "started_at", "finished_at")}
    return JobInfo(**{**data, **dates})


def enqueue_to_wire(result: EnqueueResult) -> dict[str, Any]:
    return jsonable(result)


def enqueue_from_wire(data: dict[str, Any]) -> EnqueueResult:
    return EnqueueResult(data["user_id"], data.get("job_id"), bool(data["queued"]), data["message"])


def error_to_wire(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """Every error body: ``{"error": {"code", "message", "field"}}``."""
    return {"error": {"code": code, "message": message, "field": field}}


def error_from_wire(body: object, status: int, retry_after: str | None = None) -> PersonalizeError:
    """The library's exception for an error body (its class by ``code``); a ``ServerError`` for anything else."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ServerError(f"the server answered HTTP {status} without an error body")
    code, message = str(error.get("code", "")), str(error.get("message", ""))
    cls = error_classes().get(code, ServerError)
    exc = cls.__new__(cls)  # not cls(...): each class's __init__ builds its own message from other arguments
    Exception.__init__(exc, message or f"HTTP {status} ({code})")
    exc.field = error.get("field") if isinstance(error.get("field"), str) else None
    if code == "unknown_user":
        exc.user_id = error.get("user_id")  # type: ignore[attr-defined]
    if code == "server_busy":
        exc.retry_after_s = float(retry_after) if retry_after and retry_after.isdigit() else 1.0  # type: ignore[attr-defined]
    return exc
