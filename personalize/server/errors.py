"""Every error as JSON with a stable code: ``{"error": {"code", "message", "field"}}``, never a traceback.

The status of each library error is stated once, in ``STATUS``, by class (the nearest listed ancestor wins).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personalize.errors import (
    AdapterBaseMismatchError,
    AdapterExistsError,
    AdapterHasNoEffectError,
    BrokerUnavailableError,
    DatabaseUnavailableError,
    EngineUnavailableError,
    ForbiddenError,
    InvalidInputError,
    ModelLoadError,
    PersonalizeError,
    ServerBusyError,
    ServerUnavailableError,
    StoreBusyError,
    TrainingCancelled,
    UnauthorizedError,
    UnknownJobError,
    UnknownUserError,
    VectorStoreUnavailableError,
)
from personalize.server.wire import error_to_wire

log = logging.getLogger("personalize.server")

STATUS: dict[type[PersonalizeError], int] = {
    UnknownUserError: 404,
    UnknownJobError: 404,
    InvalidInputError: 422,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    AdapterExistsError: 409,
    AdapterBaseMismatchError: 409,
    AdapterHasNoEffectError: 409,  # the user's adapter must be retrained: a conflict with the stored state
    TrainingCancelled: 409,
    ServerBusyError: 503,
    StoreBusyError: 503,
    VectorStoreUnavailableError: 503,
    DatabaseUnavailableError: 503,
    BrokerUnavailableError: 503,
    ModelLoadError: 503,
    ServerUnavailableError: 503,
    EngineUnavailableError: 503,
}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def status_for(exc: PersonalizeError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(status: int, code: str, message: str, field: str | None = None, **extra: object) -> JSONResponse:
    body = error_to_wire(code, message, field)
    body["error"].update(extra)
    return JSONResponse(body, status_code=status)


def library_error(exc: PersonalizeError, retry_after_s: int = 1) -> JSONResponse:
    status = status_for(exc)
    extra: dict[str, object] = {"user_id": exc.user_id} if isinstance(exc, UnknownUserError) else {}
    response = error_response(status, exc.code, str(exc), exc.field, **extra)
    if status == 503:
        wait = exc.retry_after_s if isinstance(exc, ServerBusyError) else retry_after_s
        response.headers["Retry-After"] = str(max(0, round(wait)))
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def validation_field(loc: tuple[int | str, ...] | list[int | str]) -> str | None:
    """``("body", "items", 0, "text")`` as ``items[0].text``; the request part (body, path, query) is left out."""
    parts = list(loc)[1:] if loc and loc[0] in ("body", "path", "query", "header") else list(loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def on_library_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PersonalizeError)
        if status_for(exc) >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return library_error(exc, retry_after_s)

    async def on_invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        field = validation_field(first.get("loc", ()))
        what = str(first.get("msg", "invalid request"))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(422, InvalidInputError.code, f"{field or 'request'}: {what}{more}", field)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        response = error_response(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    async def on_anything_else(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "server_error", "internal error: the server's log has the details")

    app.add_exception_handler(PersonalizeError, on_library_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_anything_else)
