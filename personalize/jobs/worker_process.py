"""Local ``celery -A workers worker`` processes: started by the evaluation runner (``eval run --workers N``), the
scale-out tests and the benchmarks, each in its own process group so that stopping it stops its pool too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[2]  # where the ``workers`` package lives


def start_worker(
    env: dict[str, str],
    log: Path,
    name: str | None = None,
    pool: Literal["solo", "prefork"] = "prefork",
    loglevel: str = "INFO",
) -> subprocess.Popen:
    """Start a worker consuming the training queue with one pool slot; its output is appended to ``log``."""
    from personalize.jobs.queue import QUEUE

    command = [sys.executable, "-m", "celery", "-A", "workers", "worker", f"--pool={pool}"]
    if pool == "prefork":
        command.append("--concurrency=1")
    command += ["-Q", QUEUE, f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
    if name:
        command += ["--hostname", name]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=Path(log).open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_worker(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the worker's process group (a warm shutdown), SIGKILL it after ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


__all__ = ["start_worker", "stop_worker"]


@contextlib.contextmanager
def chroma_server(path: Path, log: Path, start_timeout_s: float = 60.0) -> Iterator[str]:
    """A local Chroma server (``chroma run``) over ``path`` on a free port; yields its URL and stops it on exit.
    For the scale-out tests and the load benchmark: the way several processes share one vector store."""
    import shutil
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
