"""``create_app``: the FastAPI app over one ``Personalizer`` (one model, one adapter cache, one coalescer), and
``serve``, which runs it under uvicorn.

``/healthz`` says the process answers; ``/readyz`` that the model is loaded and the database and the broker are
reachable (503 with what is not); ``/metrics`` is Prometheus' text format. The OpenAPI schema is ``/openapi.json``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from personalize import __version__
from personalize.personalizer import Personalizer
from personalize.server import chat, routes
from personalize.server.auth import check_bind
from personalize.server.errors import install_error_handlers
from personalize.server.metrics import Metrics, install_metrics
from personalize.serving.modeling import is_loaded
from personalize.settings import ServerSettings


def create_app(personalizer: Personalizer, *, preload: bool = True) -> FastAPI:
    """The app; ``preload`` loads the model when the server starts, so the first request does not wait for it."""
    server = personalizer.settings.server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if preload:
            await run_in_threadpool(lambda: personalizer.model)
        yield

    app = FastAPI(
        title="personalize",
        version=__version__,
        description="Per-user RAG and LoRA adapters over one loaded model; OpenAI-compatible chat.",
        lifespan=lifespan,
    )
    app.state.personalizer = personalizer
    app.state.server_settings = server
    app.state.api_keys = list(server.api_keys)
    app.state.limiter = routes.Limiter(server.max_concurrent, server.retry_after_s)
    app.state.metrics = metrics = Metrics()
    install_error_handlers(app, server.retry_after_s)
    install_metrics(app, metrics)
    app.include_router(routes.router)
    app.include_router(chat.router)

    @app.get("/healthz", summary="The process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded, database and broker reachable")
    def readyz() -> JSONResponse:
        checks = readiness(personalizer)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    def prometheus() -> Response:
        return metrics.render()

    return app


def readiness(p: Personalizer) -> dict[str, dict[str, Any]]:
    """Each check as ``{"ok": bool, "detail": str}``; none raises."""
    settings = p.settings
    loaded = is_loaded(settings.model, settings.models_dir)
    checks = {"model": {"ok": loaded, "detail": settings.model if loaded else "not loaded yet"}}
    checks["database"] = _check(lambda: f"{p.count_users()} users")
    checks["broker"] = _check(lambda: _ping_broker(p))
    return checks


def _check(probe: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "detail": probe()}
    except Exception as exc:
        return {"ok": False, "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _ping_broker(p: Personalizer) -> str:
    from personalize.jobs.queue import describe_broker

    with p.celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
    return describe_broker(p.settings)


def serve(
    personalizer: Personalizer, host: str | None = None, port: int | None = None, log_level: str = "info"
) -> None:
    """Run the app under uvicorn until interrupted; without API keys only on loopback."""
    import uvicorn

    settings: ServerSettings = personalizer.settings.server
    host = host or settings.host
    check_bind(host, settings.api_keys)
    uvicorn.run(create_app(personalizer), host=host, port=settings.port if port is None else port, log_level=log_level)
