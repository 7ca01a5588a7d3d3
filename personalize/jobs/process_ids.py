"""Which process holds something: ``host:pid`` names, and whether such a process is alive on this host.

Low-level (standard library only): the job table (``jobs``) names the worker of a running job with it, and the
adapter store checks the writer of a temporary save folder with it.
"""

from __future__ import annotations

import os
import socket


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def local_pid_alive(worker: str | None) -> bool | None:
    """Whether ``worker`` (``host:pid``) is a live process of this host; None when it is not of this host."""
    if not worker or ":" not in worker:
        return None
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["local_pid_alive", "worker_identity"]
