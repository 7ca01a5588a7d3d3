"""Local ``celery -A workers worker`` processes: started by the evaluation runner (``eval run --workers N``), the
scale-out tests and the benchmarks, each in its own process group so that stopping it stops its pool too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
