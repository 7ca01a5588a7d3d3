"""Training benchmark: how fast one user's LoRA adapter trains on the bundled model, against a compute floor.

    python benchmarks/train.py                        # users of 20, 100 and 500 items, at most 3 steps each
    python benchmarks/train.py --quick                # 20 and 100 items, at most 2 steps each
    python benchmarks/train.py --max-steps 0          # no step cap: whole epochs (500 items take ~15+ min on 2 cores)
    python benchmarks/train.py --trainers fast        # only the fast step (default: fast and plain, interleaved)
    python benchmarks/train.py --trainers fast,fast:bf16,plain,plain:bf16  # and each step with a bf16 base
    python benchmarks/train.py --home /tmp/train-home # keep the dequantised model cache for the next run

The first load of the bundled model dequantises its GGUF and caches safetensors under the home folder (1-2
minutes); it is reported apart, as is the first training in the process (it builds or loads the C kernels and
checks the dropout kernel against torch). Each user gets synthetic movie-rating items (task movielens-rating) and
one adapter trained with the default LoRA settings except ``epochs`` (default 1), by calling
``personalize.adapters.training.train_adapter`` on ``training_pairs(items)``, as ``Personalizer.train`` does, once per
trainer (``LoraSettings.trainer``: ``fast`` is personalize.cpu.fasttrain, ``plain`` is peft's own forward), the trainers
and sizes interleaved and the whole set repeated ``--repeat`` times. A fp32 matmul rate is measured before and after
every training run (interleaved, because CPU speed drifts by 15-20% from minute to minute); each run's floor uses
the mean of its two. Nothing here asserts a time: it prints what it measured.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import Clock, contention_note, footer, loadavg, median, table
from tqdm import tqdm

from personalize.adapters.training import TrainResult, train_adapter, training_pairs
from personalize.data.items import ProfileItem, make_item
from personalize.serving.modeling import BUNDLED_CACHE_NAME, get_model, load_model
from personalize.settings import BUNDLED_MODEL, LoraSettings, Settings

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
    """The ``progress`` callback of ``train_adapter``: a timestamp after every optimizer step, the tqdm bar, and
    (with ``probe``) a matmul rate measured right after every step, so each step is compared with the CPU speed of
    its own seconds; the probe's time is taken out of the step times (``resumes``: when the next step began)."""

    def __init__(self, bar: tqdm, probe: Callable[[], float] | None = None) -> None:
        self.bar = bar
        self.probe = probe
        self.ends: list[float] = []
        self.resumes: list[float] = []
        self.rates: list[float] = []

    def __call__(self, fraction: float, loss: float | None) -> None:
        self.ends.append(time.perf_counter())
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}")
        if self.probe is not None:
            self.rates.append(self.probe())
        self.resumes.append(time.perf_counter())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 and 100 items, at most 2 steps each")
    parser.add_argument("--home", type=Path, help="home folder to use and keep (default: a temporary one)")
    parser.add_argument("--sizes", help="comma-separated items per user (default 20,100,500; --quick 20,100)")
    parser.add_argument("--epochs", type=int, default=1, help="LoraSettings.epochs (default 1)")
    parser.add_argument(
        "--max-steps", type=int, help="LoraSettings.max_steps: cap per user, 0 for none (default 3; --quick 2)"
    )
    parser.add_argument(
        "--trainers",
        default="fast,plain",
        help="LoraSettings.trainer values, each optionally :PRECISION (fp32, bf16, auto; default fp32), e.g. "
        "fast,plain,plain:bf16 (default fast,plain)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="times to run every size and trainer (default 2)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n fp32 matmul (default 2048)")
    parser.add_argument(
        "--no-step-probes", action="store_true", help="measure the matmul rate around runs only, not after every step"
    )
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([20, 100] if args.quick else [20, 100, 500])
    max_steps = args.max_steps if args.max_steps is not None else (2 if args.quick else 3)
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    resolved = ["--sizes", ",".join(map(str, sizes)), "--epochs", str(args.epochs), "--max-steps", str(max_steps)]
    resolved += ["--trainers", ",".join(trainers), "--repeat", str(args.repeat)]
    if args.matmul_size != 2048:
        resolved += ["--matmul-size", str(args.matmul_size)]
    if args.torch_threads:
        resolved += ["--torch-threads", str(args.torch_threads)]
    if args.no_step_probes:
        resolved.append("--no-step-probes")
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
    plan = Plan(sizes, args.epochs, max_steps or None, trainers, max(1, args.repeat), args.matmul_size)
    plan.probe_steps = not args.no_step_probes
    try:
        out = run(Settings(home=home, auto_train=False), plan)
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


@dataclass
class Plan:
    sizes: list[int]
    epochs: int
    max_steps: int | None
    trainers: list[str]
    repeat: int
    matmul_n: int
    probe_steps: bool = True


@dataclass
class Run:
    """One measured training run: its step timestamps and the matmul rates around it (and around each step)."""

    items: int
    trainer: str
    repeat: int
    full_steps: int
    result: TrainResult
    wall: float  # the whole train_adapter call, probes excluded
    clock: StepClock
    start: float
    rate_before: float
    rate_after: float

    @property
    def probe_seconds(self) -> float:
        return sum(b - a for a, b in zip(self.clock.ends, self.clock.resumes, strict=True))

    @property
    def train_seconds(self) -> float:
        return self.result.train_seconds - self.probe_seconds

    @property
    def save_seconds(self) -> float:
        """The rest of the call after the last step: writing the adapter (save_pretrained, fsync, rename)."""
        probes = sum(b - a for a, b in zip(self.clock.ends[:-1], self.clock.resumes[:-1], strict=True))
        return self.wall - (self.clock.ends[-1] - self.start - probes)

    @property
    def rate(self) -> float:
        return median([self.rate_before, *self.clock.rates, self.rate_after])

    @property
    def step_times(self) -> list[float]:
        starts = [self.start, *self.clock.resumes[:-1]]
        return [end - begin for begin, end in zip(starts, self.clock.ends, strict=True)]

    def step_rates(self) -> list[float]:
        """The rate around each step: the mean of the probes just before and just after it."""
        if not self.clock.rates:
            return [self.rate] * len(self.clock.ends)
        before = [self.rate_before, *self.clock.rates[:-1]]
        return [(a + b) / 2 for a, b in zip(before, self.clock.rates, strict=True)]

    def step_ratios(self, n_params: int) -> list[float]:
        """Each step after the first (the first also holds the setup) against its own floor at its own rate."""
        times, tokens, rates = self.step_times[1:], self.result.step_tokens[1:], self.step_rates()[1:]
        return [t / floor(n_params, n, r) for t, n, r in zip(times, tokens, rates, strict=True)]

    def run_ratio(self, n_params: int) -> float:
        floors = [floor(n_params, n, r) for n, r in zip(self.result.step_tokens, self.step_rates(), strict=True)]
        return self.train_seconds / sum(floors)


def floor(n_params: int, tokens: int, gflops: float) -> float:
    return 4 * n_params * tokens / (gflops * 1e9)


def trainer_settings(spec: str, **fields: int | None) -> LoraSettings:
    """``fast``, ``plain`` or ``plain:bf16``: the step and the precision (fp32 unless named) a row trains with."""
    trainer, _, precision = spec.partition(":")
    return LoraSettings(trainer=trainer, precision=precision or "fp32", **fields)  # type: ignore[arg-type]


def row_label(result: TrainResult) -> str:
    """The step that ran, with its precision where it is not fp32 (a fallback shows as the step it fell to)."""
    return result.trainer if result.precision == "fp32" else f"{result.trainer}:{result.precision}"


def _train_once(loaded, items: int, lora: LoraSettings, out: Path, desc: str, probe=None):  # noqa: ANN001, ANN202
    pairs = training_pairs(movie_items(items, seed=items))
    full_steps = lora.epochs * math.ceil(len(pairs) / lora.batch_size)
    steps = min(full_steps, lora.max_steps) if lora.max_steps else full_steps
    with tqdm(total=steps, desc=desc, unit="step", file=sys.stderr) as bar:
        clock = StepClock(bar, probe)
        t0 = time.perf_counter()
        result = train_adapter(loaded, pairs, lora, out, progress=clock)
        wall = time.perf_counter() - t0
    probes = sum(b - a for a, b in zip(clock.ends, clock.resumes, strict=True))
    return result, wall - probes, clock, t0


def run(settings: Settings, plan: Plan) -> list[str]:
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

    with Clock() as c:
        rate = matmul_gflops(plan.matmul_n)
    firsts.append([f"first fp32 matmul measurement, {plan.matmul_n}x{plan.matmul_n}, incl. warm-up", f"{c.wall:.2f} s"])
    adapters = Path(tempfile.mkdtemp(prefix="adapters-", dir=settings.resolved_home))
    for trainer in plan.trainers:  # the first training of each kind in a process: kernels built or loaded, checks
        lora = trainer_settings(trainer, epochs=1, max_steps=1)
        result, wall, *_ = _train_once(
            loaded, 8, lora, adapters / f"warm-{trainer.replace(':', '-')}", f"warm-up {trainer}"
        )
        firsts.append(
            [f"first training in the process, trainer {row_label(result)} (1 step, 8 pairs)", f"{wall:.2f} s"]
        )

    runs: list[Run] = []
    for rep in range(plan.repeat):
        for n in plan.sizes:
            for trainer in plan.trainers:
                lora = trainer_settings(trainer, epochs=plan.epochs, max_steps=plan.max_steps)
                per_epoch = math.ceil(len(training_pairs(movie_items(n, seed=n))) / lora.batch_size)
                before = rate
                probe = (lambda: matmul_gflops(plan.matmul_n, reps=3)) if plan.probe_steps else None
                out_dir = adapters / f"user-{n}-{trainer.replace(':', '-')}-{rep}"
                result, wall, clock, t0 = _train_once(loaded, n, lora, out_dir, f"train {n} items, {trainer}", probe)
                rate = matmul_gflops(plan.matmul_n)  # after this run = before the next one
                full = plan.epochs * per_epoch
                runs.append(Run(n, row_label(result), rep, full, result, wall, clock, t0, before, rate))
    shutil.rmtree(adapters, ignore_errors=True)
    out.append(_runs_table(spec, n_params, plan, runs))
    out.append(_summary(n_params, plan, runs))
    out.append(
        "how measured: tokens = TrainResult.n_tokens (non-padding tokens of the forward passes, over all steps); "
        "after every step (the progress callback) a fp32 matmul rate is measured (3 calls of 2048x2048; "
        "--no-step-probes turns it off), and its time is taken out of every figure here; train s = "
        "TrainResult.train_seconds without the probes (from before the base model is wrapped with peft to the last "
        "step; not the save); wall s = the whole train_adapter call without the probes; s/step = median time of "
        "steps 2.. (step 1 also holds the setup: encoding the pairs, wrapping the model with peft); GFLOP/s = "
        "median of the rates measured before, during and after the run; step ratio = median over steps 2.. of "
        "(step time / that step's floor at the mean of the rates measured just before and just after it); run "
        "ratio = train s / the sum of the steps' floors (so setup included). The last column is measured when the "
        "row ran a whole epoch, else estimated as (step 1) + (steps in the epoch - 1) x s/step + save.\n"
        f"floor: 4 x {n_params / 1e6:.1f}M parameters x tokens FLOPs at the measured matmul rate. A forward pass "
        "costs ~2 FLOPs per parameter per token (a multiply and an add per weight); the backward pass costs ~4, "
        "2 for the gradient of the activations and 2 for the gradient of the weights, so full fine-tuning is ~6x. "
        "LoRA freezes the base weights and skips their weight gradients, and its own matrices are tiny (<1% of the "
        "parameters), so ~4x. A ratio is how far training is from running every FLOP at the rate of one large "
        "matmul. Caveats: the floor counts the tied embedding/lm_head matrix (28.3M of the 134.5M parameters of "
        "SmolLM2-135M) for every token, but the embedding is a lookup and the lm_head runs on the output positions "
        "only, so per token the true matmul work is ~20% smaller than this floor; attention scores (~L x d per "
        "token) and padding are not counted (the synthetic items have near-equal lengths, so padding is small); and "
        "the thin matmuls of a 576-wide model can run below the rate of a 2048x2048 one."
    )
    out.append("One-off costs\n" + table(["what", "time"], firsts))
    return out


def _runs_table(spec: str, n_params: int, plan: Plan, runs: list[Run]) -> str:
    rows = []
    for r in runs:
        res = r.result
        step = median(r.step_times[1:]) if len(r.step_times) > 1 else r.step_times[0]
        first = r.step_times[0]
        save = r.save_seconds
        estimate = first + (r.full_steps - 1) * step + save
        ratios = r.step_ratios(n_params)
        rows.append(
            [
                r.items,
                r.trainer,
                r.repeat + 1,
                res.n_pairs,
                f"{res.steps}/{r.full_steps}",
                res.n_tokens,
                f"{r.train_seconds:.1f}",
                f"{r.wall:.1f}",
                f"{step:.2f}",
                f"{save:.2f}",
                f"{res.n_tokens / r.train_seconds:.0f}",
                f"{r.rate:.0f}",
                f"{median(ratios):.2f}" if ratios else "-",
                f"{r.run_ratio(n_params):.2f}",
                f"{estimate:.0f}" + ("" if res.steps == r.full_steps else " (est.)"),
            ]
        )
    headers = ["items", "trainer", "rep", "pairs", "steps", "tokens", "train s", "wall s", "s/step"]
    headers += ["save s", "tok/s", "GFLOP/s", "step ratio", "run ratio"]
    headers.append("s/user, 1 epoch" if plan.epochs == 1 else f"s/user, {plan.epochs} epochs")
    lora = LoraSettings()
    return (
        f"train_adapter on {spec} ({n_params / 1e6:.1f}M parameters, fp32 weights; a :bf16 row computes the "
        f"frozen base in bf16: fast on bf16 weight copies, plain under autocast), default LoRA (rank {lora.rank}, "
        f"targets {','.join(lora.target_modules)}, dropout {lora.dropout}, batch {lora.batch_size}, max_length "
        f"{lora.max_length}) with epochs={plan.epochs}, max_steps={plan.max_steps}; one user per row, synthetic "
        "movielens-rating items\n" + table(headers, rows)
    )


def _summary(n_params: int, plan: Plan, runs: list[Run]) -> str:
    rows = []
    labels = dict.fromkeys(r.trainer for r in runs)
    for n in plan.sizes:
        by_trainer = {t: [r for r in runs if r.items == n and r.trainer == t] for t in labels}
        steps = {
            t: median([median(r.step_times[1:]) for r in rs if len(r.step_times) > 1])
            for t, rs in by_trainer.items()
            if rs
        }
        for trainer, rs in by_trainer.items():
            if not rs:
                continue
            step_ratios = [x for r in rs for x in r.step_ratios(n_params)]
            run_ratios = [r.run_ratio(n_params) for r in rs]
            speedup = steps.get("plain", float("nan")) / steps[trainer] if trainer in steps else float("nan")
            rows.append(
                [
                    n,
                    trainer,
                    len(rs),
                    f"{median(step_ratios):.2f}" if step_ratios else "-",
                    f"{min(step_ratios):.2f}-{max(step_ratios):.2f}" if step_ratios else "-",
                    f"{median(run_ratios):.2f}",
                    f"{speedup:.2f}x",
                ]
            )
    rates = [x for r in runs for x in (r.rate_before, *r.clock.rates)] + ([runs[-1].rate_after] if runs else [])
    spread = f"{min(rates):.0f}-{max(rates):.0f}" if rates else "-"
    return (
        f"summary per size and trainer (matmul rate {spread} GFLOP/s over the run, median {median(rates):.0f}; "
        "speed-up = plain's median s/step over this trainer's)\n"
        + table(["items", "trainer", "runs", "step ratio (median)", "step ratio range", "run ratio", "speed-up"], rows)
    )


if __name__ == "__main__":
    main()
