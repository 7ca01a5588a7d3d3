"""Generation benchmark: where the time of Personalizer.generate goes, method "none" against "rag".

    python benchmarks/generate.py                       # 5 repeats, 32 new tokens (5 min on 2 quiet cores, 13 busy)
    python benchmarks/generate.py --quick               # 1 repeat
    python benchmarks/generate.py --home /tmp/gen-home  # keep the dequantised model cache for the next run
    python benchmarks/generate.py --threads 1 2         # also compare torch thread counts, interleaved

The first load of the bundled model dequantises its GGUF and caches safetensors under the home folder (1-2
minutes); that and the other one-off costs are reported apart. The sample users (personalize/data/sample_users.jsonl)
are ingested, then two (user, prompt) pairs are generated with "none" and "rag" interleaved, greedy decoding.
Nothing here asserts a time: it prints what it measured.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import Clock, footer, loadavg, median, table
from tqdm import tqdm

import personalize
from personalize.data.ingest import read_jsonl
from personalize.personalizer import Personalizer
from personalize.results import GenerationResult
from personalize.serving.modeling import BUNDLED_CACHE_NAME, load_model
from personalize.settings import BUNDLED_MODEL, Settings

SAMPLE_USERS = Path(personalize.__file__).resolve().parent / "data" / "sample_users.jsonl"
RATING = (
    "What score would this user give the following movie on a scale of 1 to 5? Just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. movie: "
)
PAIRS = (  # (user, prompt): a rating question (the users' task) and a free-form request
    ("sci-fi fan", RATING + "Dune (2021) (Adventure, Sci-Fi)"),
    ("romance fan", "Recommend a movie for tonight and explain why in two sentences."),
)
METHODS = ("none", "rag")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--home", type=Path, help="home folder to use and keep (default: a temporary one)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, help="timed calls per (prompt, method) (default 5; --quick 1)")
    parser.add_argument("--retriever", choices=("dense", "bm25", "recency"), default="dense")
    parser.add_argument("--torch-threads", type=int, help="Settings.torch_threads (default: torch's own)")
    parser.add_argument(
        "--threads", type=int, nargs="+", help="compare these torch thread counts, interleaved (e.g. --threads 1 2)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    resolved = ["--max-new-tokens", str(args.max_new_tokens), "--repeats", str(repeats)]
    resolved += ["--retriever", args.retriever]
    if args.torch_threads:
        resolved += ["--torch-threads", str(args.torch_threads)]
    if args.threads:
        resolved += ["--threads", *map(str, args.threads)]
    if args.quick:
        resolved = ["--quick", *resolved]
    if args.home:
        resolved += ["--home", str(args.home)]

    home = args.home or Path(tempfile.mkdtemp(prefix="personalize-bench-generate-"))
    load_start = loadavg()
    started = time.perf_counter()
    settings = Settings(
        home=home, database_url=None, chroma=None, retriever=args.retriever, torch_threads=args.torch_threads
    )
    try:
        with Personalizer(settings) as p:
            out = run(p, repeats, args.max_new_tokens, args.threads)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    out += footer(
        "benchmarks/generate.py",
        resolved,
        load_start,
        started,
        None if args.home else "keep the home folder and reuse its model cache next time",
    )
    print("\n\n".join(out))


def run(p: Personalizer, repeats: int, max_new_tokens: int, threads: list[int] | None) -> list[str]:
    out: list[str] = []
    firsts: list[list[str]] = []
    spec = p.settings.model

    with Clock() as c:
        _ = p.embedder.model
    firsts.append(["load the embedding model", f"{c.wall:.2f} s"])
    users = read_jsonl(SAMPLE_USERS)
    with Clock() as c:
        added = sum(p.add_items(user, items).added for user, items in users.items())
    n_items = sum(len(v) for v in users.values())
    what = f"ingest the sample users ({len(users)} users, {n_items} items, {added} new), incl. SQL setup"
    firsts.append([what, f"{c.wall:.2f} s"])

    cache_dir = p.settings.models_dir / BUNDLED_CACHE_NAME
    had_cache = spec == BUNDLED_MODEL and cache_dir.is_dir()
    with Clock() as c:
        loaded = p.model
    if spec == BUNDLED_MODEL and not had_cache:
        firsts.append([f"load {spec}: dequantise the GGUF and cache it, then load", f"{c.wall:.2f} s"])
        with Clock() as c:
            again = load_model(spec, p.settings.models_dir)  # a second, throwaway load shows the cached cost
        del again
        gc.collect()
        firsts.append([f"load {spec} from its safetensors cache (what later processes pay)", f"{c.wall:.2f} s"])
    else:
        firsts.append([f"load {spec} ({'from its cache' if had_cache else 'not bundled'})", f"{c.wall:.2f} s"])
    n_params = sum(t.numel() for t in loaded.model.parameters())

    for method in METHODS:  # the first call of each method is the warm-up
        user, prompt = PAIRS[0]
        with Clock() as c:
            p.generate(user, prompt, method=method, max_new_tokens=max_new_tokens)
        firsts.append([f"first generate, method={method} (warm-up, not in the tables)", f"{c.wall:.2f} s"])

    import torch

    default_threads = torch.get_num_threads()
    thread_counts = threads or [default_threads]
    Key = tuple[int, int, str]  # (threads, pair index, method)
    results: dict[Key, list[Call]] = {(t, i, m): [] for t in thread_counts for i in range(len(PAIRS)) for m in METHODS}
    total = repeats * len(results)
    with tqdm(total=total, desc="generate", unit="call", file=sys.stderr) as bar:
        for r in range(repeats):
            for i, (user, prompt) in enumerate(PAIRS):
                for ti, n_threads in enumerate(thread_counts):
                    torch.set_num_threads(n_threads)
                    order = METHODS if (r + i + ti) % 2 == 0 else METHODS[::-1]
                    for method in order:
                        with Clock() as c:
                            res = p.generate(user, prompt, method=method, max_new_tokens=max_new_tokens)
                        results[(n_threads, i, method)].append(Call(res, c.cpu / c.wall))
                        bar.update(1)
            if threads:
                thread_counts = thread_counts[1:] + thread_counts[:1]  # rotate which thread count goes first
    torch.set_num_threads(default_threads)

    headers = [
        "calls",
        "retrieval ms",
        "prompt ms",
        "generation s",
        "other ms",
        "total s",
        "total min-max s",
        "prompt tok",
        "new tok",
        "new tok/s",
        "cpu/wall",
    ]
    group = ["threads"] if threads else []
    rows = []
    for t in sorted({k[0] for k in results}):
        for m in METHODS:
            calls = [c for (tt, _, mm), cs in results.items() if tt == t and mm == m for c in cs]
            rows.append([m, *([t] if threads else []), *summary(calls)])
    out.append(
        f"Personalizer.generate(user, prompt, method=..., max_new_tokens={max_new_tokens}), model {spec} "
        f"({n_params / 1e6:.0f}M parameters, fp32), retriever {p.settings.retriever}, k={p.settings.k}: "
        "medians over all timed calls\n" + table(["method", *group, *headers], rows)
    )
    rows = []
    for i, (user, prompt) in enumerate(PAIRS):
        for t in sorted({k[0] for k in results}):
            for m in METHODS:
                short = prompt if len(prompt) <= 40 else "..." + prompt[-37:]
                rows.append([f"{user}: {short}", m, *([t] if threads else []), *summary(results[(t, i, m)])])
    out.append("Per (user, prompt)\n" + table(["user: prompt", "method", *group, *headers], rows))
    threads_note = (
        f" Thread counts {threads} are switched with torch.set_num_threads between calls, interleaved and rotated."
        if threads
        else f" torch used {default_threads} threads."
    )
    out.append(
        "how measured: each timed call's GenerationResult.timings (retrieval = Personalizer.retrieve, prompt = "
        "build_prompt incl. tokenising, generation = model.generate incl. the prefill of the prompt tokens, other = "
        "total minus the three: SQL user lookup, checks); new tok/s = new_tokens / generation_s per call, so it "
        f"includes the prefill. {repeats} repeat(s) of every (user, prompt, method); none and rag alternate, their "
        "order flipping each call, after one warm-up call per method (below). Greedy decoding stops at EOS, so "
        "new tok can be below max_new_tokens. total min-max shows the spread over the repeats; cpu/wall = process "
        "CPU seconds per wall second during the call (with 2 threads, well below 2 means other processes had the "
        "CPUs)." + threads_note
    )
    out.append("One-off costs\n" + table(["what", "time"], firsts))
    return out


@dataclass
class Call:
    result: GenerationResult
    cpu_per_wall: float


def summary(calls: list[Call]) -> list[object]:
    rs = [c.result for c in calls]
    t = [x.timings for x in rs]
    other = [x.total_s - x.retrieval_s - x.prompt_s - x.generation_s for x in t]
    return [
        len(calls),
        f"{median([x.retrieval_s for x in t]) * 1000:.1f}",
        f"{median([x.prompt_s for x in t]) * 1000:.1f}",
        f"{median([x.generation_s for x in t]):.2f}",
        f"{median(other) * 1000:.1f}",
        f"{median([x.total_s for x in t]):.2f}",
        f"{min(x.total_s for x in t):.2f}-{max(x.total_s for x in t):.2f}",
        f"{median([x.prompt_tokens for x in rs]):.0f}",
        f"{median([x.new_tokens for x in rs]):.0f}",
        f"{median([x.new_tokens / x.timings.generation_s for x in rs]):.2f}",
        f"{median([c.cpu_per_wall for c in calls]):.2f}",
    ]


if __name__ == "__main__":
    main()
