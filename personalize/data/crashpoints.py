"""Named points where a test kills this process outright, to prove a crash at any step of a write is survivable.

``PERSONALIZE_TEST_CRASH_AT=<name>`` makes the process SIGKILL itself when it reaches that point: no ``finally``, no
atexit, no flush, exactly like ``kill -9`` or a lost machine. Unset (always, outside tests) it costs one lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "PERSONALIZE_TEST_CRASH_AT"

# the steps of ``Personalizer.add_items`` and ``forget``, in order
ADD_ITEMS_STEPS = ("embedded", "sql-flushed", "chroma-written", "committed")
FORGET_STEPS = ("forget-sql-deleted", "forget-chroma-deleted")


def crash_point(name: str) -> None:
    """Die here, at once, when the environment names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
