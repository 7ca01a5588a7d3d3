"""Serving benchmark: per-user LoRA adapters on the bundled model, loaded on demand and served batched.

    python benchmarks/serve.py                        # 8 users, 3 interleaved repeats (~5-10 minutes on 2 cores)
    python benchmarks/serve.py --quick                # 1 repeat
    python benchmarks/serve.py --home /tmp/serve-home # keep the model cache and the adapters for the next run

The first load of the bundled model dequantises its GGUF and caches safetensors under the home folder (1-2
minutes); that, ingesting and training are reported apart as one-off costs. Each of 8 users gets 16 synthetic
movie-rating items and an adapter (epochs 1, capped at 1 step of 4 pairs: training costs ~10-40 s per 300 tokens on
2 cores, and serving speed does not depend on how well an adapter was trained; reused when the home already holds an
adapter trained on the user's current items). Then:

(a) adapter load time, both paths taking turns on each user: peft's ``AdapterCache`` (the plain decoder's) cold (evict
    the user's adapter, then ``ensure_loaded`` reads it from its folder again) and warm (a cache hit), and the fast
    decoder's direct read into its LoRA tables (``FastBackend.tables_for``, probe included) cold and warm; median over
    users and rounds, and the cold ratio against its target (>= 10x);
(b) 8 requests from the 8 users, each with its own adapter (method "peft"), served in one
    ``Personalizer.generate_batch`` call (peft's mixed-adapter batch) versus one at a time with
    ``Personalizer.generate`` (``set_adapter`` per user), interleaved over the repeats; and whether the greedy texts
    are the same both ways, against the target (>= 5x);
(c) 32 users (32 adapter names over the 8 folders) in batches of 8 through the fast backend, whose table cache holds 8,
    against one request at a time: the cache and batching together;
(d) a profile of one decoding step, batch 1 against batch 8, with and without adapters, and the weight-only matrix
    products alone: where a batched step's time goes.
Nothing here asserts a time: it prints what it measured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Clock, contention_note, footer, loadavg, median, table
from tqdm import tqdm

from personalize.data.naming import user_key as adapter_name
from personalize.personalizer import Personalizer
from personalize.results import GenerationResult
from personalize.serving.fast_backend import FastBackend
from personalize.serving.modeling import BUNDLED_CACHE_NAME
from personalize.settings import BUNDLED_MODEL, LoraSettings, Settings

GENRES = ("Action", "Adventure", "Comedy", "Drama", "Fantasy", "Horror", "Romance", "Sci-Fi", "Thriller", "War")
N_USERS = 8
N_ITEMS = 16
BASE_MODE = "batched, no adapter (ref.)"
FREE = "In two or three sentences, tell me why someone might enjoy the movie {title} and who should watch it."
RATING = (
    "What score would this user give the following movie on a scale of 1 to 5? Just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. movie: {title}"
)


def user_items(user: int, n: int) -> list[dict]:
    """``n`` synthetic rating items, different per user: "Title N (Genre, Genre)" -> score."""
    items = []
    for i in range(n):
        a, b = GENRES[(i + user) % len(GENRES)], GENRES[(3 * i + 2 * user + 1) % len(GENRES)]
        text = f"Title {100 * user + i} ({a}, {b})"
        score = str(1 + (7 * i + 3 * user) % 5)
        fields = {"text": text, "score": score}
        items.append({"id": f"m{i}", "text": text, "fields": fields, "output": score, "task": "movielens-rating"})
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 round of adapter loads")
    parser.add_argument("--home", type=Path, help="home folder to use and keep (default: a temporary one)")
    parser.add_argument("--repeats", type=int, help="interleaved batched/one-at-a-time repeats (default 3; --quick 1)")
    parser.add_argument("--rounds", type=int, help="cold/warm adapter-load rounds over the users (default 3; quick 1)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=1, help="LoraSettings.max_steps per adapter (default 1)")
    parser.add_argument("--train-batch", type=int, default=4, help="LoraSettings.batch_size (default 4)")
    parser.add_argument(
        "--prompts", choices=("free", "rating"), default="free", help="free-form requests or rating questions"
    )
    parser.add_argument("--torch-threads", type=int, help="Settings.torch_threads (default: torch's own)")
    parser.add_argument("--no-reference", action="store_true", help="skip the batched method-none reference row")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 3)
    resolved = ["--repeats", str(repeats), "--rounds", str(rounds), "--max-new-tokens", str(args.max_new_tokens)]
    resolved += ["--prompts", args.prompts, "--train-steps", str(args.train_steps), "--train-batch"]
    resolved += [str(args.train_batch)]
    if args.torch_threads:
        resolved += ["--torch-threads", str(args.torch_threads)]
    if args.no_reference:
        resolved += ["--no-reference"]
    if args.quick:
        resolved = ["--quick", *resolved]
    if args.home:
        resolved += ["--home", str(args.home)]

    if args.torch_threads:  # Personalizer sets it too; set here so the notes below see it
        import torch

        torch.set_num_threads(args.torch_threads)
    home = args.home or Path(tempfile.mkdtemp(prefix="personalize-bench-serve-"))
    load_start = loadavg()
    note = contention_note()
    started = time.perf_counter()
    settings = Settings(
        home=home,
        database_url=None,
        chroma=None,
        auto_train=False,
        adapter_cache_size=N_USERS,
        torch_threads=args.torch_threads,
        lora=LoraSettings(epochs=1, max_steps=args.train_steps, batch_size=args.train_batch),
    )
    try:
        with Personalizer(settings) as p:
            template = FREE if args.prompts == "free" else RATING
            out = run(p, repeats, rounds, args.max_new_tokens, template, not args.no_reference)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    out += footer(
        "benchmarks/serve.py",
        resolved,
        load_start,
        started,
        None if args.home else "keep the home folder, its model cache and adapters, for the next run",
    )
    if note:
        out.insert(0, note)
    print("\n\n".join(out))


def run(p: Personalizer, repeats: int, rounds: int, max_new_tokens: int, template: str, reference: bool) -> list[str]:
    out: list[str] = []
    firsts: list[list[str]] = []
    spec = p.settings.model
    users = [f"serve-user-{i}" for i in range(N_USERS)]

    cache_dir = p.settings.models_dir / BUNDLED_CACHE_NAME
    had_cache = spec == BUNDLED_MODEL and cache_dir.is_dir()
    with Clock() as c:
        loaded = p.model
    how = "from its cache" if had_cache else "dequantise the GGUF, cache it, load"
    firsts.append([f"load {spec} ({how if spec == BUNDLED_MODEL else 'not bundled'})", f"{c.wall:.2f} s"])
    n_params = sum(t.numel() for t in loaded.model.parameters())
    with Clock() as c:
        added = sum(p.add_items(u, user_items(i, N_ITEMS)).added for i, u in enumerate(users))
    firsts.append([f"ingest {N_USERS} users x {N_ITEMS} items ({added} new), incl. the embedder", f"{c.wall:.2f} s"])

    train_times, reused = [], 0
    for u in tqdm(users, desc="train adapters", unit="user", file=sys.stderr):
        current = p.current_adapter(u)
        if current is not None and current.data_version == p.user(u).data_version:
            reused += 1
            continue
        with Clock() as c:
            p.train(u)
        train_times.append(c.wall)
    if train_times:
        lora = p.settings.lora
        what = (
            f"train one adapter (Personalizer.train, {N_ITEMS} items, epochs 1, max_steps {lora.max_steps}, batch "
            f"{lora.batch_size}), median of {len(train_times)}"
        )
        firsts.append([what, f"{median(train_times):.2f} s"])
    if reused:
        firsts.append([f"adapters reused from the home folder: {reused} of {N_USERS}", "-"])
    adapters = {u: p.current_adapter(u) for u in users}
    paths = {u: Path(a.path) for u, a in adapters.items() if a is not None}
    size = median([sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for path in paths.values()])

    # (a) adapter loads
    with Clock() as c:
        cache = p.adapter_cache
    firsts.append(["AdapterCache: private copy of the base model", f"{c.wall:.2f} s"])
    cache.clear()
    with Clock() as c:
        cache.ensure_loaded(adapter_name(users[0]), paths[users[0]])
    firsts.append(["first adapter into an empty cache (PeftModel.from_pretrained wraps the base)", f"{c.wall:.3f} s"])
    for u in users[1:]:
        cache.ensure_loaded(adapter_name(u), paths[u])
    backend = p.serving.backend
    decoder = backend.decoder(loaded)[0] if isinstance(backend, FastBackend) else None
    tables = backend.tables_for(loaded, decoder) if isinstance(backend, FastBackend) and decoder else None
    if tables is not None:  # the probe's base forward, once per decoder (a one-off, like wrapping the base above)
        with Clock() as c:
            tables.get(adapter_name(users[0]), paths[users[0]])
        firsts.append(
            ["first adapter read into the fast decoder's tables (incl. the probe's base pass)", f"{c.wall:.3f} s"]
        )
    cold, warm, activate, direct_cold, direct_warm = [], [], [], [], []
    with tqdm(total=rounds * len(users), desc="adapter loads", unit="user", file=sys.stderr) as bar:
        for _ in range(rounds):
            for u in users:  # the two paths take turns on each user
                name = adapter_name(u)
                cache.evict(name)  # the other 7 stay loaded: the PeftModel stays, load_adapter adds one
                t0 = time.perf_counter()
                cache.ensure_loaded(name, paths[u])
                t1 = time.perf_counter()
                cache.ensure_loaded(name, paths[u])
                t2 = time.perf_counter()
                cache.activate(name, paths[u])
                t3 = time.perf_counter()
                cold.append(t1 - t0)
                warm.append(t2 - t1)
                activate.append(t3 - t2)
                if tables is not None:
                    tables.evict(name)
                    t0 = time.perf_counter()
                    tables.get(name, paths[u])
                    t1 = time.perf_counter()
                    tables.get(name, paths[u])
                    direct_cold.append(t1 - t0)
                    direct_warm.append(time.perf_counter() - t1)
                bar.update(1)
    rows = [
        ["peft cold: evicted, ensure_loaded reads the folder", len(cold), *(f"{x * 1000:.2f}" for x in stats(cold))],
        ["peft warm: ensure_loaded, cache hit", len(warm), *(f"{x * 1000:.3f}" for x in stats(warm))],
        ["peft activate, cache hit (+ set_adapter)", len(activate), *(f"{x * 1000:.3f}" for x in stats(activate))],
    ]
    if direct_cold:
        rows += [
            ["fast decoder cold: evicted, read into its tables", len(direct_cold)]
            + [f"{x * 1000:.2f}" for x in stats(direct_cold)],
            ["fast decoder warm: cache hit", len(direct_warm)] + [f"{x * 1000:.3f}" for x in stats(direct_warm)],
        ]
    swap = (
        f"\ncold swap, peft / fast decoder's direct read: {median(cold) / median(direct_cold):.1f}x (target >= 10x, "
        "median over median, measured in turns on the same users)"
        if direct_cold
        else "\n(no fast decoder here: the direct read was not measured)"
    )
    out.append(
        f"(a) adapter loads of {N_USERS} users' adapters (rank {p.settings.lora.rank}, {size / 1e6:.1f} MB "
        f"each on disk), {rounds} round(s) over the users\n"
        + table(["load", "n", "median ms", "min ms", "max ms"], rows)
        + swap
    )

    # (b) batched versus one at a time
    requests = [
        (u, template.format(title=f"Title {900 + i} ({GENRES[i]}, {GENRES[-1 - i]})")) for i, u in enumerate(users)
    ]
    with Clock() as c:
        p.generate_batch(requests[:2], method="peft", max_new_tokens=4)
        p.generate(*requests[0], method="peft", max_new_tokens=4)
    firsts.append(["warm-up: a batch of 2 and one request, 4 new tokens each (not timed below)", f"{c.wall:.2f} s"])
    runs: dict[str, list[tuple[float, float, list[GenerationResult]]]] = {}

    def batched() -> list[GenerationResult]:
        return p.generate_batch(requests, method="peft", max_new_tokens=max_new_tokens)

    def one_at_a_time() -> list[GenerationResult]:
        return [p.generate(u, q, method="peft", max_new_tokens=max_new_tokens) for u, q in requests]

    def base_batched() -> list[GenerationResult]:
        return p.generate_batch(requests, method="none", max_new_tokens=max_new_tokens)

    modes = [("batched", batched), ("one at a time", one_at_a_time)]
    if reference:
        modes.append((BASE_MODE, base_batched))
    runs = {name: [] for name, _ in modes}
    with tqdm(total=len(modes) * repeats, desc="serve 8 requests", unit="run", file=sys.stderr) as bar:
        for r in range(repeats):
            shift = r % len(modes)  # rotate which mode goes first
            for name, fn in modes[shift:] + modes[:shift]:
                with Clock() as c:
                    results = fn()
                runs[name].append((c.wall, c.cpu, results))
                bar.update(1)
    single_rate = median([len(requests) / w for w, _, _ in runs["one at a time"]])

    rows = []
    for name, _ in modes:
        walls = [w for w, _, _ in runs[name]]
        cpus = [cpu / w for w, cpu, _ in runs[name]]
        tokens = [sum(r.new_tokens for r in rs) for _, _, rs in runs[name]]
        wall = median(walls)
        rate = median([len(requests) / w for w in walls])
        rows.append(
            [
                name,
                len(walls),
                f"{wall:.2f}",
                f"{min(walls):.2f}-{max(walls):.2f}",
                f"{rate:.2f}",
                f"{median(tokens):.0f}",
                f"{median([t / w for t, w in zip(tokens, walls, strict=True)]):.1f}",
                f"{median(cpus):.2f}",
                f"{rate / single_rate:.2f}x",
            ]
        )
    batched_rate = median([len(requests) / w for w, _, _ in runs["batched"]])
    texts = {name: [[r.text for r in rs] for _, _, rs in runs[name]] for name, _ in modes}
    all_texts = texts["batched"] + texts["one at a time"]
    same = all(t == all_texts[0] for t in all_texts)
    out.append(
        f"(b) {len(requests)} requests from {len(requests)} users, each with its own adapter (method peft, greedy, "
        f"max_new_tokens {max_new_tokens}), on {spec} ({n_params / 1e6:.0f}M parameters, fp32); {repeats} "
        "repeat(s), the modes taking turns to go first\n"
        + table(["mode", "runs", "median s", "range s", "req/s", "new tok", "new tok/s", "cpu/wall", "vs one"], rows)
        + f"\nspeed-up of batched over one at a time: {batched_rate / single_rate:.2f}x (target >= 5x; median req/s "
        "over median req/s)\n"
        f"texts identical, batched vs one at a time (every repeat): {'yes' if same else 'NO'}"
    )
    if not same:
        diffs = []
        for i, (u, _) in enumerate(requests):
            b, s = texts["batched"][0][i], texts["one at a time"][0][i]
            if b != s:
                diffs.append([u, clip(b), clip(s)])
        out.append("Differing texts (first repeat)\n" + table(["user", "batched", "one at a time"], diffs))
    if decoder is not None and isinstance(backend, FastBackend):
        out.append(many_users(backend, loaded, [q for _, q in requests], list(paths.values()), max_new_tokens, repeats))
        out.append(
            profile_step(
                decoder, [backend.tables_for(loaded, decoder).get(adapter_name(u), paths[u])[0] for u in users]
            )
        )
    sample = runs["batched"][0][2][0]
    out.append(f"sample answer ({sample.user_id}, {sample.new_tokens} new tokens): {clip(sample.text, 160)}")
    out.append(
        "how measured: (a) wall time of AdapterCache.ensure_loaded right after evicting that user's adapter (cold: "
        "reads the adapter folder, from the OS page cache after the first round, adds the LoRA layers and loads "
        "the weights while the other 7 adapters stay loaded), then again (warm: a cache hit), then activate (a hit "
        "plus set_adapter, what generate pays per request); (b) wall time of the whole call(s) for the 8 requests, "
        "incl. the SQL user and adapter lookups, prompt building and decoding; new tok = the GenerationResult."
        "new_tokens summed (to each row's EOS; a batch decodes until its longest row ends); req/s = 8 / wall; "
        "cpu/wall = process CPU time over wall time (near the thread count when the CPUs were ours); vs one = req/s "
        f"over the req/s of one at a time. The row {BASE_MODE!r} is a reference: the same 8 requests in one batch "
        "with method none (base model, no LoRA), which shows what peft's per-row adapter routing costs (its texts "
        "differ, as no adapter is used). peft's cold load is mostly peft walking the model's modules in "
        "Python (inject_adapter, set_peft_model_state_dict), not reading the 3.7 MB; the fast decoder's cold read is "
        "safetensors into its tables plus the probe (what the adapter adds to its projections on the probe input)."
    )
    out.append("One-off costs\n" + table(["what", "time"], firsts))
    return out


def many_users(
    backend: FastBackend, loaded: Any, questions: list[str], folders: list[Path], max_new_tokens: int, repeats: int
) -> str:
    """(c) 32 users (32 adapter names over the 8 folders) in batches of 8 through the fast backend, its table cache
    holding 8: every batch reads its 8 adapters cold; against the same backend one request at a time (warm)."""
    from personalize.results import ServingFacts
    from personalize.serving.backend import AdapterRef, DecodeRow

    def encode(q: str) -> list[int]:
        return list(
            loaded.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    prompts = [encode(q) for q in questions]
    refs = [AdapterRef(f"many-{i}", folders[i % len(folders)], 1) for i in range(32)]
    rows = [DecodeRow(prompts[i % len(prompts)], ref) for i, ref in enumerate(refs)]

    def batched() -> int:
        return sum(
            g.new_tokens
            for k in range(0, 32, 8)
            for g in backend.generate(loaded, rows[k : k + 8], max_new_tokens, ServingFacts())
        )

    def single() -> int:
        return sum(backend.generate(loaded, [row], max_new_tokens, ServingFacts())[0].new_tokens for row in rows[:8])

    single()  # warm: the 8 single requests' adapters are in the cache
    results: dict[str, list[tuple[float, int, int]]] = {
        "32 users, batches of 8 (cold reads)": [],
        "8 users, one at a time (warm)": [],
    }
    for _ in range(repeats):
        for name, fn, n in (
            ("32 users, batches of 8 (cold reads)", batched, 32),
            ("8 users, one at a time (warm)", single, 8),
        ):
            with Clock() as c:
                tokens = fn()
            results[name].append((c.wall, tokens, n))
    rate = {name: median([n / w for w, _, n in runs]) for name, runs in results.items()}
    single_rate = rate["8 users, one at a time (warm)"]
    body = [
        [
            name,
            len(runs),
            f"{median([w for w, _, _ in runs]):.2f}",
            f"{rate[name]:.2f}",
            f"{median([t / w for w, t, _ in runs]):.1f}",
            f"{rate[name] / single_rate:.2f}x",
        ]
        for name, runs in results.items()
    ]
    return (
        "(c) cache and batching together: 32 users' adapters (32 names over the 8 adapter folders) in 4 batches of 8 "
        "through the fast backend (its table cache holds 8: each batch reads its adapters cold), against one request "
        "at a time on the same backend\n" + table(["mode", "runs", "median s", "req/s", "new tok/s", "vs one"], body)
    )


def profile_step(decoder: Any, loras: list[Any]) -> str:
    """Where a decoding step's time goes, batch 1 against batch 8: the whole step (prefill taken out) with and
    without adapters, and the weight-only matrix products alone (the layers' and the output layer's)."""
    import torch

    prompt = list(range(1000, 1040))
    hidden, inter = decoder.config.hidden_size, decoder.inter

    def timed(fn: Any, *args: Any) -> float:
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(*args)
            walls.append(time.perf_counter() - t0)
        return median(walls)

    def layer_products(x: Any, y: Any) -> None:
        for layer in decoder.layers:
            layer.qkv(x), layer.o(x), layer.gate_up(x), layer.down(y)

    rows, step = [], {}
    for batch in (1, 8):
        for with_lora in (False, True):
            lora = loras[:batch] if with_lora else None
            short = timed(decoder.generate, [prompt] * batch, 1, [], 0, lora)
            long = timed(decoder.generate, [prompt] * batch, 17, [], 0, lora)
            step[(batch, with_lora)] = (long - short) / 16
        matmuls = timed(layer_products, torch.randn(batch, hidden), torch.randn(batch, inter))
        head = timed(decoder.lm_head, torch.randn(batch, hidden))
        whole = step[(batch, False)]
        rows.append(
            [
                f"batch {batch}",
                f"{whole * 1e3:.1f}",
                f"{step[(batch, True)] * 1e3:.1f}",
                f"{matmuls * 1e3:.1f}",
                f"{head * 1e3:.1f}",
                f"{(whole - matmuls - head) * 1e3:.1f}",
            ]
        )
    ratio = step[(8, True)] / step[(1, True)]
    return (
        "(d) profile: one decoding step of the fast decoder (ms; the median of 3 over 16 steps, prefill taken out), "
        "and its weight-only matrix products alone (layers, output layer), batch 1 against batch 8\n"
        + table(["batch", "step", "step, adapters", "layer matmuls", "output layer", "rest of step"], rows)
        + f"\na batched step (8 rows, 8 adapters) costs {ratio:.2f}x a single one; 8 requests batched can be at most "
        f"{8 / ratio:.1f}x one at a time"
    )


def stats(values: list[float]) -> tuple[float, float, float]:
    return median(values), min(values), max(values)


def clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


if __name__ == "__main__":
    main()
