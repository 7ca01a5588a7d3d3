"""A real uvicorn server on loopback, in a thread of the test process, for tests that speak HTTP.

Starlette's TestClient decodes ``%`` in paths twice, so ids holding ``%``, ``/`` or ``..`` are tested against a real
server; the same helper serves the OpenAI-client, fuzz and client-mode tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import FAST_LORA, free_port

from personalize import Personalizer, Settings
from personalize.server.app import create_app


def server_settings(home: Path, model_dir: Path, **server: object) -> Settings:
    """The suite's tiny-model settings with a ``server`` section (API keys, caps)."""
    return Settings(
        home=home, model=str(model_dir), auto_train=False, lora=FAST_LORA, server=server or {}, _env_file=None
    )


@contextmanager
def serving(target: Personalizer | Any) -> Iterator[str]:
    """Serve ``create_app(personalizer)`` (or an app made already) on 127.0.0.1 until the block ends; yields the
    base URL."""
    import uvicorn

    app = create_app(target) if isinstance(target, Personalizer) else target
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
