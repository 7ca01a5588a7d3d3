"""API keys and their scopes: which users a request may act for.

Keys come from ``Settings.server.api_keys``. With none set the server asks for no key (and ``serve`` binds loopback
only). A key scoped to a list of ids or a prefix may act for those users only: any other user id is 403, whether
that user exists or not, so a tenant learns nothing of another tenant's users.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from personalize.errors import ForbiddenError, InvalidInputError, UnauthorizedError
from personalize.settings import ApiKey

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the matching key, or None when the server asks for no key."""

    key: ApiKey | None

    @property
    def name(self) -> str:
        return "anonymous" if self.key is None else (self.key.name or "key")

    def check_user(self, user_id: str) -> None:
        """Raise ``ForbiddenError`` unless this caller may act for ``user_id``."""
        if self.key is not None and not self.key.allows(user_id):
            raise ForbiddenError(f"this API key ({self.name}) is not scoped to that user")


def presented_key(request: Request) -> str | None:
    """``Authorization: Bearer KEY`` (what the OpenAI client sends), or ``X-API-Key: KEY``."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.headers.get("x-api-key")


def find_key(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """The key equal to ``presented``, compared in constant time against every key."""
    found = None
    given = presented.encode("utf-8", "surrogatepass")
    for key in keys:
        if hmac.compare_digest(key.key.get_secret_value().encode("utf-8"), given):
            found = key
    return found


def authenticate(request: Request) -> Caller:
    """The FastAPI dependency of every ``/v1`` route: 401 without a known key (when keys are set)."""
    keys: list[ApiKey] = request.app.state.api_keys
    if not keys:
        return Caller(None)
    presented = presented_key(request)
    if not presented:
        raise UnauthorizedError("this server needs an API key: send Authorization: Bearer KEY")
    key = find_key(keys, presented)
    if key is None:
        raise UnauthorizedError("unknown API key")
    return Caller(key)


def check_bind(host: str, keys: list[ApiKey]) -> None:
    """Refuse to listen beyond loopback without API keys."""
    if not keys and host not in LOOPBACK_HOSTS:
        raise InvalidInputError(
            f"refusing to listen on {host} without API keys: anyone who reaches it could read and forget every user; "
            "set PERSONALIZE_SERVER__API_KEYS (or listen on 127.0.0.1)",
            "host",
        )
