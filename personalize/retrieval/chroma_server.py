"""A local Chroma server (``chroma run``): the way several processes share one vector store (two processes writing
one embedded Chroma folder corrupt it). The scale-out tests and the load benchmark start theirs here."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def chroma_server(path: Path, log: Path, start_timeout_s: float = 60.0) -> Iterator[str]:
    """A local Chroma server (``chroma run``) over ``path`` on a free port; yields its URL and stops it on exit."""
    port = free_port()
    exe = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    with Path(log).open("wb") as out:
        proc = subprocess.Popen(
            [exe, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + start_timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"chroma server did not start: {Path(log).read_text()[-2000:]}") from None
            time.sleep(0.3)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


__all__ = ["chroma_server", "free_port"]
