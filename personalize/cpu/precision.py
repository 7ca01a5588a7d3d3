"""Which compute precision pays on this CPU: bf16 and fp32 matmul rates, probed once per process.

Our machines differ: with AVX-512 BF16 (or AMX) a bf16 matmul runs about twice as fast as fp32; with AVX2 only it
crawls at about 1 GFLOP/s. So nothing assumes: ``probe()`` times a matmul of the bundled model's widths in each
dtype (a few ms, cached for the process) and ``bf16_pays()`` says whether bf16 is at least ``BF16_MIN_SPEEDUP``
times faster. The shape matters: on an AVX512-BF16 EPYC a 128x128 square gave bf16 only 1.2x fp32 (too small for
its kernels to run full), while 256 rows x 576 x 576, a layer's projection of a short batch, gave 2.1x, and a real
prefill ran 1.5x faster. A tiny screen goes first, so a CPU where bf16 crawls spends under a millisecond on it.
Training then computes the frozen base's forward and backward in bf16 where it pays (the fast LoRA step on bf16
copies of the projections, the plain step under autocast; the trained weights and the optimizer state stay fp32),
and fp32 elsewhere; results record which precision ran.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

BF16_MIN_SPEEDUP = 1.5
Precision = Literal["fp32", "bf16"]


PROBE_SHAPE = (256, 576, 576)  # rows x inner x out: one projection of SmolLM2-135M over a short batch
SCREEN_SHAPE = (64, 64, 64)
CRAWL_FRACTION = 0.1  # bf16 under a tenth of fp32 on the screen crawls (AVX2: ~1 vs ~50 GFLOP/s); AVX512-BF16 ~0.45


@dataclass(frozen=True)
class MatmulRates:
    """GFLOP/s of an (m x k) @ (k x n) matmul in fp32 and in bf16, measured here on one thread."""

    fp32: float
    bf16: float
    shape: tuple[int, int, int]

    @property
    def bf16_speedup(self) -> float:
        return self.bf16 / self.fp32 if self.fp32 > 0 else 0.0


def _rate(dtype: torch.dtype, shape: tuple[int, int, int], budget_s: float) -> float:
    """GFLOP/s of the fastest of a few calls (the fastest is the least disturbed by other processes)."""
    import torch

    m, k, n = shape
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.mm(a, b)  # warm-up: the first call picks kernels and wakes the thread pool
    best, spent = float("inf"), 0.0
    for call in range(20):
        start = time.perf_counter()
        torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if call >= 2 and spent >= budget_s:
            break  # at least 3 calls, as one disturbed call misleads (a crawling bf16 only meets the tiny screen)
    return 2 * m * k * n / best / 1e9


def bf16_crawls(screen: MatmulRates) -> bool:
    """The screen already shows bf16 far slower than fp32 (AVX2 only): timing it at size would only cost time."""
    return screen.bf16 < CRAWL_FRACTION * screen.fp32


@functools.lru_cache(maxsize=1)
def probe(shape: tuple[int, int, int] = PROBE_SHAPE, budget_s: float = 0.004) -> MatmulRates:
    """fp32 and bf16 matmul rates at ``shape`` on one thread (a few ms in all; once per process), after a tiny
    screen; where the screen shows bf16 crawling, the screen's rates are the answer. One thread, because the ratio
    is the core's kernels' and a thread waiting on a busy core made the 2-thread rates swing 10x either way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        screen = MatmulRates(
            _rate(torch.float32, SCREEN_SHAPE, budget_s / 4),
            _rate(torch.bfloat16, SCREEN_SHAPE, budget_s / 4),
            SCREEN_SHAPE,
        )
        if bf16_crawls(screen):
            return screen
        return MatmulRates(_rate(torch.float32, shape, budget_s), _rate(torch.bfloat16, shape, budget_s), shape)
    finally:
        torch.set_num_threads(threads)


def bf16_pays() -> bool:
    """bf16 is at least ``BF16_MIN_SPEEDUP`` times fp32 here (``PERSONALIZE_BF16=0|1`` overrides the probe)."""
    forced = os.environ.get("PERSONALIZE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return probe().bf16_speedup >= BF16_MIN_SPEEDUP


def training_precision(asked: Literal["auto", "fp32", "bf16"]) -> tuple[Precision, str]:
    """The precision a training run computes the frozen base in, and why."""
    if asked != "auto":
        return asked, f"asked for {asked}"
    rates = probe()
    if bf16_pays():
        return "bf16", f"bf16 matmul {rates.bf16:.0f} GFLOP/s vs fp32 {rates.fp32:.0f} ({rates.bf16_speedup:.1f}x)"
    return "fp32", f"bf16 matmul {rates.bf16:.1f} GFLOP/s vs fp32 {rates.fp32:.0f}: bf16 does not pay here"


__all__ = [
    "BF16_MIN_SPEEDUP",
    "PROBE_SHAPE",
    "MatmulRates",
    "Precision",
    "bf16_crawls",
    "bf16_pays",
    "probe",
    "training_precision",
]
