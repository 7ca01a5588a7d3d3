"""The C kernels at each instruction-set level this CPU runs, interleaved in one run (issue 17 target 6).

The 8-bit matrix-vector product of the fast decoder (qlinear.c, one row: a decoding step of one request), built at
every level the CPU runs (``avx512``, ``avx2``, ``scalar``; ``personalize.cpu.kernels``) and timed round-robin, so
drift hits every level alike (the training kernels of trainops.c are tested at every level in
tests/test_fasttrain.py). The level ``chosen_isa()`` picks is marked: it must be the fastest the CPU runs.

    python benchmarks/kernels.py [--rounds 5] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import footer, loadavg, median, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (median reported)")
    parser.add_argument("--calls", type=int, default=300, help="kernel calls per timing")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    started, load_start = time.perf_counter(), loadavg()

    import torch

    from personalize.cpu import kernels, quantization
    from personalize.cpu.kernels import KernelLibrary, chosen_isa, supported_isas

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    weights = quantization.quantize(torch.randn(1536, 576))  # SmolLM2-135M's MLP up projection
    x = torch.randn(1, 576)
    reference = x @ weights.dequantize().t()
    libraries = {isa: KernelLibrary("qlinear.c", "the weight-only kernel", quantization.KERNEL.declare, isa=isa)
                 for isa in supported_isas()}  # fmt: skip
    times: dict[str, list[float]] = {isa: [] for isa in libraries}
    for _ in range(args.rounds):
        for isa, library in libraries.items():
            quantization.KERNEL = library
            torch.testing.assert_close(weights(x), reference, rtol=1e-5, atol=1e-4)  # the same answer at each level
            t0 = time.perf_counter()
            for _ in range(args.calls):
                weights(x)
            times[isa].append((time.perf_counter() - t0) / args.calls)
    best = chosen_isa()
    fastest = min(times, key=lambda isa: median(times[isa]))
    rows = [
        [
            isa + (" (chosen)" if isa == best else ""),
            f"{median(times[isa]) * 1e6:.0f}",
            f"{2 * 1536 * 576 / median(times[isa]) / 1e9:.2f}",
            f"{median(times[isa]) / median(times[best]):.2f}x",
        ]
        for isa in libraries
    ]
    print(f"CPU flags seen: {', '.join(sorted(f for f in kernels.cpu_flags() if f.startswith(('avx', 'fma'))))}")
    print("qlinear (8-bit codes, 1536 x 576, one row), median of round-robin rounds:")
    print(table(["level", "us per call", "GFLOP/s", "time vs chosen"], rows))
    verdict = "holds" if fastest == best else f"MISSED: {fastest} was faster"
    print(f"target: the chosen level ({best}) is the fastest this CPU runs: {verdict}")
    for line in footer("benchmarks/kernels.py", sys.argv[1:], load_start, started, None):
        print(line)


if __name__ == "__main__":
    main()
