"""Client mode: ``personalize.generate``, ``add_items``, ``retrieve`` and ``forget`` calling a ``personalize serve``.

With ``PERSONALIZE_SERVER`` set (a URL, or the ``server`` settings section as JSON with a ``url``) the module-level
shortcuts send each call to that server over httpx instead of loading anything here; they return the same typed
results and raise the same exception classes as in-process (the error's ``code`` names its class). Without it,
everything runs in-process as before. ``RemoteClient`` can also be held directly, like a ``Personalizer``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr, ValidationError

from personalize.data.items import ProfileItem, UserInfo
from personalize.data.store import UpsertReport
from personalize.errors import InvalidInputError, ServerUnavailableError
from personalize.jobs.store import JobInfo
from personalize.jobs.training_jobs import EnqueueResult
from personalize.results import ForgetReport, GenerationResult
from personalize.retrieval.base import RetrievedItem
from personalize.server import wire
from personalize.settings import ServerSettings, parse_server

ENV = "PERSONALIZE_SERVER"


def user_path(user_id: str) -> str:
    """A user id as one path segment: every reserved character percent-encoded, dots too (so ``..`` survives
    clients and proxies that resolve dot segments)."""
    if not isinstance(user_id, str):
        raise InvalidInputError(f"user_id must be a string, got {type(user_id).__name__}", "user_id")
    try:
        return quote(user_id, safe="").replace(".", "%2E")
    except UnicodeEncodeError:
        raise InvalidInputError("user_id holds a lone surrogate: not valid Unicode", "user_id") from None


def _json_default(value: object) -> Any:
    if isinstance(value, ProfileItem):
        return wire.item_to_wire(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def encode(payload: object) -> bytes:
    """The request body; what JSON cannot carry is refused here, as the library would refuse it."""
    try:
        return json.dumps(payload, default=_json_default, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"the request holds a value JSON cannot carry ({exc})") from None
    except UnicodeEncodeError:
        raise InvalidInputError("the request holds a lone surrogate: not valid Unicode") from None


class RemoteClient:
    """The library's calls on a server: the same arguments, results and exceptions as ``Personalizer``."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)

    @classmethod
    def from_settings(cls, server: ServerSettings) -> RemoteClient:
        if not server.url:
            raise InvalidInputError(f"{ENV} has no url", "url")
        key = server.api_key.get_secret_value() if server.api_key else None
        return cls(server.url, key, server.timeout_s)

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, payload: object = None) -> Any:
        """One call; an error response raises the library's exception for its code."""
        content = None if payload is None else encode(payload)
        headers = {"Content-Type": "application/json"} if content is not None else {}
        try:
            response = self.http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnavailableError(
                f"cannot reach the personalize server at {self.url} ({type(exc).__name__}: {exc}); is "
                f"`personalize serve` running? ({ENV})"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_error:
            raise wire.error_from_wire(body, response.status_code, response.headers.get("retry-after"))
        return body

    def add_items(self, user_id: str, items: Iterable[ProfileItem | dict[str, Any]]) -> UpsertReport:
        if isinstance(items, dict | str | bytes) or not isinstance(items, Iterable):
            raise InvalidInputError(f"items must be a list of items, got {type(items).__name__}", "items")
        body = self.request("POST", f"/v1/users/{user_path(user_id)}/items", {"items": list(items)})
        return wire.upsert_from_wire(body)

    def user(self, user_id: str) -> UserInfo:
        return wire.user_from_wire(self.request("GET", f"/v1/users/{user_path(user_id)}"))

    def forget(self, user_id: str) -> ForgetReport:
        return wire.forget_from_wire(self.request("DELETE", f"/v1/users/{user_path(user_id)}"))

    def retrieve(
        self, user_id: str, query: str, k: int | None = None, retriever: str | None = None
    ) -> list[RetrievedItem]:
        body = self.request(
            "POST", f"/v1/users/{user_path(user_id)}/retrieve", _given(query=query, k=k, retriever=retriever)
        )
        return wire.retrieved_from_wire(body)

    def generate(
        self,
        user_id: str,
        prompt: str,
        method: str = "auto",
        *,
        k: int | None = None,
        max_new_tokens: int | None = None,
        retriever: str | None = None,
        task: str | None = None,
    ) -> GenerationResult:
        payload = _given(
            user_id=user_id,
            prompt=prompt,
            method=method,
            k=k,
            max_new_tokens=max_new_tokens,
            retriever=retriever,
            task=task,
        )
        return wire.result_from_wire(self.request("POST", "/v1/generate", payload))

    def enqueue_training(self, user_id: str, force: bool = False) -> EnqueueResult:
        body = self.request("POST", f"/v1/users/{user_path(user_id)}/train", {"force": force})
        return wire.enqueue_from_wire(body)

    def job(self, job_id: int) -> JobInfo:
        return wire.job_from_wire(self.request("GET", f"/v1/jobs/{int(job_id)}"))


def _given(**values: object) -> dict[str, object]:
    """The arguments that were given (None means the server's default, as in-process)."""
    return {k: v for k, v in values.items() if v is not None}


_clients: dict[str, RemoteClient] = {}
_clients_lock = threading.Lock()


def configured() -> str | None:
    """``PERSONALIZE_SERVER`` when it is set and not blank."""
    value = os.environ.get(ENV, "").strip()
    return value or None


def default_remote() -> RemoteClient | None:
    """The client of ``PERSONALIZE_SERVER`` (one per value), or None when it is not set: run in-process."""
    value = configured()
    if value is None:
        return None
    with _clients_lock:
        if value not in _clients:
            try:
                server = ServerSettings.model_validate(parse_server(value))
            except (ValueError, ValidationError) as exc:
                raise InvalidInputError(
                    f"{ENV} is neither a server URL nor the server section as JSON: {exc}"
                ) from None
            if server.api_key is None and os.environ.get(f"{ENV}__API_KEY"):
                server = server.model_copy(update={"api_key": SecretStr(os.environ[f"{ENV}__API_KEY"])})
            _clients[value] = RemoteClient.from_settings(server)
        return _clients[value]


__all__ = ["RemoteClient", "configured", "default_remote", "user_path"]
