"""Which compute precision pays on this CPU: bf16 and fp32 matmul rates, probed once per process.

Our machines differ: with AVX-512 BF16 (or AMX) a bf16 matmul runs about twice as fast as fp32; with AVX2 only it
crawls at about 1 GFLOP/s. So nothing assumes: ``probe()`` times a small square matmul in each dtype (a few ms,
cached for the process) and ``bf16_pays()`` says whether bf16 is at least ``BF16_MIN_SPEEDUP`` times faster.
Training then runs the frozen base's forward and backward under bf16 autocast where it pays (the LoRA weights and
the optimizer state stay fp32), and fp32 elsewhere; results record which precision ran.
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


@dataclass(frozen=True)
class MatmulRates:
    """GFLOP/s of a square matmul in fp32 and in bf16, measured here with the threads torch uses."""

    fp32: float
    bf16: float
    size: int

    @property
    def bf16_speedup(self) -> float:
        return self.bf16 / self.fp32 if self.fp32 > 0 else 0.0


def _rate(dtype: torch.dtype, size: int, budget_s: float) -> float:
    """GFLOP/s of the fastest of a few calls (the fastest is the least disturbed by other processes)."""
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: the first call picks kernels and wakes the thread pool
    best, spent = float("inf"), 0.0
    for _ in range(20):
        start = time.perf_counter()
        torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent >= budget_s:
            break
    return 2 * size**3 / best / 1e9


@functools.lru_cache(maxsize=1)
def probe(size: int = 128, budget_s: float = 0.003) -> MatmulRates:
    """fp32 and bf16 matmul rates (a few ms in all; once per process). A slow bf16 path stops after one call."""
    import torch

    fp32 = _rate(torch.float32, size, budget_s)
    bf16 = _rate(torch.bfloat16, size, budget_s)
    return MatmulRates(fp32, bf16, size)


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


__all__ = ["BF16_MIN_SPEEDUP", "MatmulRates", "Precision", "bf16_pays", "probe", "training_precision"]
