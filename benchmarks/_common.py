"""Small helpers shared by the benchmark scripts: tables, percentiles, the machine line, the rerun line."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# benchmarks/kernels.py would shadow the hub's ``kernels`` package that transformers imports (an ImportError while
# loading the model): once this module is imported, search the scripts' own folder last, however many times a script
# put it on the path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE] + [str(_HERE)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        out = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_pressure() -> str:
    """Linux PSI 'some' line: the share of time at least one runnable task waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"
    parts = dict(p.split("=") for p in first.split()[1:])
    return f"avg60={parts.get('avg60')}% avg300={parts.get('avg300')}%"


def machine_line() -> str:
    import torch

    return (
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), python "
        f"{platform.python_version()}, torch {torch.__version__} with {torch.get_num_threads()} threads"
    )


def rerun_line(script: str, args: Sequence[str]) -> str:
    return "rerun: " + shlex.join(["python", script, *args])


class Clock:
    """Wall and process-CPU time of a block; cpu/wall near the thread count means the CPUs were ours."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def contention_note() -> str | None:
    """A warning when other processes already kept the CPUs busy: torch's threads then wait on each other."""
    import os

    import torch

    cpus = os.cpu_count() or 1
    one_minute = float(loadavg().split()[0]) if loadavg() != "n/a" else 0.0
    if one_minute < cpus:
        return None
    return (
        f"note: the 1-minute load average was {one_minute:.1f} on {cpus} CPUs at the start: other processes were "
        f"running, so these timings are slower and noisier than on an idle machine. torch used "
        f"{torch.get_num_threads()} thread(s); when the CPUs are oversubscribed, --torch-threads 1 avoids its "
        "threads waiting on each other (small decoding steps suffer most)."
    )


def footer(script: str, args: Sequence[str], load_start: str, started: float, home_hint: str | None) -> list[str]:
    """The closing lines every benchmark prints: the machine and its load, then how to rerun it."""
    import time

    elapsed = time.perf_counter() - started
    line = rerun_line(script, args)
    if home_hint:
        line += f"   (add --home DIR to {home_hint})"
    return [
        f"{machine_line()}; load average at start {load_start}, at end {loadavg()}; CPU pressure {cpu_pressure()}; "
        f"whole run {elapsed:.0f} s",
        line,
    ]
