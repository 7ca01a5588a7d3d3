"""Training benchmark: how fast one user's LoRA adapter trains on the bundled model, against a compute floor.

    python benchmarks/train.py                        # users of 20, 100 and 500 items, at most 3 steps each
    python benchmarks/train.py --quick                # 20 and 100 items, at most 2 steps each
    python benchmarks/train.py --max-steps 0          # no step cap: whole epochs (500 items take ~30+ min on 2 cores)
    python benchmarks/train.py --home /tmp/train-home # keep the dequantised model cache for the next run

The first load of the bundled model dequantises its GGUF and caches safetensors under the home folder (1-2
minutes); it is reported apart. Each user gets synthetic movie-rating items (task movielens-rating) and one adapter
trained with the default LoRA settings except ``epochs`` (default 1), by calling ``personalize.training.train_adapter``
on ``training_pairs(items)``, as ``Personalizer.train`` does. Training time grows linearly with the steps (a step is
one batch of ``batch_size`` pairs), so on a 2-core CPU the step cap keeps the run within ~10 minutes; the table
extrapolates a whole epoch from the measured setup, step and save times. A fp32 matmul rate is measured before and
after every training run (interleaved, because CPU speed drifts) and gives the floor the training time is compared
with. Nothing here asserts a time: it prints what it measured.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import Clock, contention_note, footer, loadavg, median, table
from tqdm import tqdm

from personalize.items import ProfileItem, make_item
from personalize.modeling import BUNDLED_CACHE_NAME, get_model, load_model
from personalize.settings import BUNDLED_MODEL, LoraSettings, Settings
from personalize.training import TrainResult, train_adapter, training_pairs

GENRES = ("Action", "Adventure", "Comedy", "Drama", "Fantasy", "Horror", "Romance", "Sci-Fi", "Thriller", "War")


def movie_items(n: int, seed: int = 0) -> list[ProfileItem]:
    """``n`` synthetic rating items shaped like the bundled MovieLens sample: "Title N (Genre, Genre)" -> score."""
    items = []
    for i in range(n):
        a, b = GENRES[(i + seed) % len(GENRES)], GENRES[(3 * i + seed + 1) % len(GENRES)]
        text = f"Title {i} ({a}, {b})"
        score = str(1 + (7 * i + seed) % 5)
        fields = {"text": text, "score": score}
        items.append(make_item(id=f"m{i}", text=text, fields=fields, output=score, task="movielens-rating"))
    return items


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """fp32 ``torch.matmul`` of two n x n matrices with torch's threads: the median rate over ``reps`` calls."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    torch.matmul(a, b)  # warm-up: allocation and thread pool start
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return median(rates)


class StepClock:
    """The ``progress`` callback of ``train_adapter``: a timestamp after every optimizer step, and the tqdm bar."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.stamps: list[float] = []

    def __call__(self, fraction: float, loss: float | None) -> None:
        self.stamps.append(time.perf_counter())
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 and 100 items, at most 2 steps each")
    parser.add_argument("--home", type=Path, help="home folder to use and keep (default: a temporary one)")
    parser.add_argument("--sizes", help="comma-separated items per user (default 20,100,500; --quick 20,100)")
    parser.add_argument("--epochs", type=int, default=1, help="LoraSettings.epochs (default 1)")
    parser.add_argument(
        "--max-steps", type=int, help="LoraSettings.max_steps: cap per user, 0 for none (default 3; --quick 2)"
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n fp32 matmul (default 2048)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([20, 100] if args.quick else [20, 100, 500])
    max_steps = args.max_steps if args.max_steps is not None else (2 if args.quick else 3)
    resolved = ["--sizes", ",".join(map(str, sizes)), "--epochs", str(args.epochs), "--max-steps", str(max_steps)]
    if args.matmul_size != 2048:
        resolved += ["--matmul-size", str(args.matmul_size)]
    if args.torch_threads:
        resolved += ["--torch-threads", str(args.torch_threads)]
    if args.quick:
        resolved = ["--quick", *resolved]
    if args.home:
        resolved += ["--home", str(args.home)]

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    home = args.home or Path(tempfile.mkdtemp(prefix="personalize-bench-train-"))
    load_start = loadavg()
    note = contention_note()
    started = time.perf_counter()
    try:
        out = run(Settings(home=home, auto_train=False), sizes, args.epochs, max_steps or None, args.matmul_size)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    out += footer(
        "benchmarks/train.py",
        resolved,
        load_start,
        started,
        None if args.home else "keep the home folder and reuse its model cache next time",
    )
    if note:
        out.insert(0, note)
    print("\n\n".join(out))


def run(settings: Settings, sizes: list[int], epochs: int, max_steps: int | None, matmul_n: int) -> list[str]:
    out: list[str] = []
    firsts: list[list[str]] = []
    spec = settings.model
    cache_dir = settings.models_dir / BUNDLED_CACHE_NAME
    had_cache = spec == BUNDLED_MODEL and cache_dir.is_dir()
    with Clock() as c:
        loaded = get_model(spec, settings.models_dir)
    if spec == BUNDLED_MODEL and not had_cache:
        firsts.append([f"load {spec}: dequantise the GGUF and cache it, then load", f"{c.wall:.2f} s"])
        with Clock() as c:
            again = load_model(spec, settings.models_dir)  # a throwaway second load shows what later processes pay
        del again
        firsts.append([f"load {spec} from its safetensors cache (what later processes pay)", f"{c.wall:.2f} s"])
    else:
        firsts.append([f"load {spec} ({'from its cache' if had_cache else 'not bundled'})", f"{c.wall:.2f} s"])
    n_params = sum(p.numel() for p in loaded.model.parameters())  # tied embedding / lm_head counted once

    lora = LoraSettings(epochs=epochs, max_steps=max_steps)
    with Clock() as c:
        rate = matmul_gflops(matmul_n)
    rates = [rate]
    firsts.append([f"first fp32 matmul measurement, {matmul_n}x{matmul_n}, incl. warm-up", f"{c.wall:.2f} s"])

    adapters = Path(tempfile.mkdtemp(prefix="adapters-", dir=settings.resolved_home))
    runs: list[tuple[int, int, TrainResult, float, float, StepClock]] = []
    for n in sizes:
        items = movie_items(n, seed=n)
        pairs = training_pairs(items)
        full_steps = epochs * math.ceil(len(pairs) / lora.batch_size)
        steps = min(full_steps, max_steps) if max_steps else full_steps
        with tqdm(total=steps, desc=f"train {n} items", unit="step", file=sys.stderr) as bar:
            clock = StepClock(bar)
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = train_adapter(loaded, pairs, lora, adapters / f"user-{n}", progress=clock)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        clock.stamps.insert(0, t0)
        rates.append(matmul_gflops(matmul_n))  # after this run = before the next one
        runs.append((n, full_steps, result, wall, cpu, clock))
    shutil.rmtree(adapters, ignore_errors=True)

    gflops = median(rates)
    rows = []
    for n, full_steps, r, wall, cpu, clock in runs:
        step_times = [b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:], strict=False)]
        step = median(step_times) if step_times else clock.stamps[1] - clock.stamps[0]
        setup = max(0.0, clock.stamps[1] - clock.stamps[0] - step)  # encode, copy the base, wrap it: before step 1
        save = wall - (clock.stamps[-1] - clock.stamps[0])  # save_pretrained, metadata, fsync, rename
        floor = 4 * n_params * r.n_tokens / (gflops * 1e9)
        estimate = setup + full_steps * step + save
        rows.append(
            [
                n,
                r.n_pairs,
                f"{r.steps}/{full_steps}",
                r.n_tokens,
                f"{r.train_seconds:.1f}",
                f"{wall:.1f}",
                f"{cpu / wall:.2f}",
                f"{setup:.1f}",
                f"{step:.1f}",
                f"{save:.2f}",
                f"{r.n_tokens / r.train_seconds:.1f}",
                f"{floor:.1f}",
                f"{r.train_seconds / floor:.2f}",
                f"{estimate:.0f}" + ("" if r.steps == full_steps else " (est.)"),
            ]
        )
    headers = [
        "items",
        "pairs",
        "steps",
        "tokens",
        "train s",
        "wall s",
        "cpu/wall",
        "setup s",
        "s/step",
        "save s",
        "tok/s",
        "floor s",
        "ratio",
        "s/user, 1 epoch" if epochs == 1 else f"s/user, {epochs} epochs",
    ]
    out.append(
        f"train_adapter on {spec} ({n_params / 1e6:.1f}M parameters, fp32), default LoRA (rank {lora.rank}, "
        f"targets {','.join(lora.target_modules)}, batch {lora.batch_size}, max_length {lora.max_length}) with "
        f"epochs={epochs}, max_steps={max_steps}; one user per row, synthetic movielens-rating items\n"
        + table(headers, rows)
    )
    spread = f"{min(rates):.1f}-{max(rates):.1f}"
    out.append(
        f"fp32 matmul rate: median {gflops:.1f} GFLOP/s over {len(rates)} measurements (range {spread}), each the "
        f"median of 5 torch.matmul calls on {matmul_n}x{matmul_n}, taken before the first and after every training "
        "run\n"
        + table(
            ["measured", "GFLOP/s"],
            [["before the first run", f"{rates[0]:.1f}"]]
            + [[f"after {n} items", f"{rate:.1f}"] for (n, *_), rate in zip(runs, rates[1:], strict=True)],
        )
    )
    out.append(
        "how measured: tokens = TrainResult.n_tokens (non-padding tokens of the forward passes, over all steps); "
        "train s = TrainResult.train_seconds (from before the private copy of the base model to the last step; not "
        "the save); wall s = the whole train_adapter call; cpu/wall = this process's CPU time over wall time in the "
        "call (near the thread count when the CPUs were ours, lower when other processes took them); from a "
        "timestamp after every step (the progress callback): s/step = median time of steps 2.., setup = time to "
        "the end of step 1 minus one s/step (encoding "
        "the pairs, copying the base model, wrapping it with peft), save = wall s minus setup and steps; tok/s = "
        "tokens / train s. The last column is measured when the row ran a whole epoch, else estimated as setup + "
        "(steps in the epoch) x s/step + save, since every step is one batch of about equal length.\n"
        f"floor: 4 x {n_params / 1e6:.1f}M parameters x tokens FLOPs at the measured matmul rate. A forward pass "
        "costs ~2 FLOPs per parameter per token (a multiply and an add per weight); the backward pass costs ~4, "
        "2 for the gradient of the activations and 2 for the gradient of the weights, so full fine-tuning is ~6x. "
        "LoRA freezes the base weights and skips their weight gradients, and its own matrices are tiny (<1% of the "
        "parameters), so ~4x. ratio = train s / floor s: how far training is from running every FLOP at the rate "
        "of one large matmul. Caveats: the floor counts the tied embedding/lm_head matrix (28.3M of the 134.5M "
        "parameters of SmolLM2-135M) for every token, but the embedding is a lookup and the lm_head runs on the "
        "output positions only (logits_to_keep), so per token the true matmul work is ~20% smaller than this "
        "floor; attention scores (~L x d per token) and padding are not counted (the synthetic items have near-"
        "equal lengths, so padding is small); and the thin matmuls of a 576-wide model can run below the rate "
        "of a 2048x2048 one. Both sides are measured with the same torch threads in the same minutes, so CPU "
        "contention from other processes largely cancels in the ratio, though not in the seconds."
    )
    out.append("One-off costs\n" + table(["what", "time"], firsts))
    return out


if __name__ == "__main__":
    main()
