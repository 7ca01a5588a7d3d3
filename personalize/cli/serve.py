"""``personalize serve``: the HTTP API (FastAPI + uvicorn) over one ``Personalizer``.

A plain function: ``personalize.cli.root`` registers it on the root app.
"""

from __future__ import annotations

import typer

from personalize.cli.common import clear_errors
from personalize.personalizer import Personalizer
from personalize.settings import Settings


@clear_errors
def serve(
    host: str | None = typer.Option(None, help="Listen here (default PERSONALIZE_SERVER__HOST, 127.0.0.1)"),
    port: int | None = typer.Option(None, help="Port (default PERSONALIZE_SERVER__PORT, 8000)"),
    log_level: str = typer.Option("info", help="uvicorn's log level"),
) -> None:
    """Serve the API: /v1 (users, items, forget, train, jobs, generate, retrieve), OpenAI-compatible
    /v1/chat/completions, /healthz, /readyz, /metrics. Without API keys it listens on 127.0.0.1 only."""
    from personalize.server.app import serve as run
    from personalize.server.auth import check_bind

    settings = Settings()
    check_bind(host or settings.server.host, settings.server.api_keys)  # before opening or loading anything
    with Personalizer(settings) as p:
        run(p, host, port, log_level)
