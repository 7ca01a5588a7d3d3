"""Retrieval benchmark: ingest throughput, query latency (dense vs BM25) and embedding throughput against a floor.

    python benchmarks/retrieval.py            # users of 10 to 10,000 items (8 min on 2 quiet cores, 11 busy)
    python benchmarks/retrieval.py --quick    # 10 and 100 items, fewer queries (~1 minute)
    python benchmarks/retrieval.py --only bm25 --bm25-items 10000   # the BM25 index against the scan (~1 minute)
    python benchmarks/retrieval.py --only embedding --torch-threads 1   # the embedder against its floor and ST

Everything runs in a fresh temporary home folder (SQLite + embedded Chroma), deleted at the end. Items are synthetic
movie-like titles ("The Silent River (1987) (Drama, Thriller)") drawn with a fixed seed; queries are short
free-text requests over the same vocabulary. Nothing here asserts a time: it prints what it measured.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Clock, cpu_pressure, loadavg, machine_line, median, pct, rerun_line, table
from tqdm import tqdm

from personalize.personalizer import Personalizer
from personalize.retrieval.bert_forward import length_sorted_batches
from personalize.retrieval.bm25 import BM25Index, ScanBM25Index
from personalize.settings import Settings

FULL_SIZES = (10, 100, 1_000, 10_000)
QUICK_SIZES = (10, 100)
# how many users of each size are ingested (small ones are cheap, so take a median over several)
INGEST_REPEATS = {10: 5, 100: 3, 1_000: 1, 10_000: 1}


def words(text: str) -> list[str]:
    return text.split()


ADJ = words(
    "Silent Broken Last Midnight Golden Hidden Lost Dark Burning Frozen Crimson Electric Savage Quiet Wild Endless "
    "Secret Final Iron Velvet Hollow Distant Bright Forgotten Little Strange Bitter Lucky"
)
NOUN = words(
    "River Empire Garden Machine Kingdom Horizon Shadow Station Heart Island Signal Storm Mirror Frontier Planet "
    "Detective Summer Winter Harbor Circus Orchard Protocol Legacy Voyage Dragon Robot Witness Highway Letter "
    "Sister Soldier Wedding Game Code Ghost"
)
PLACES = words("Paris Tokyo Mars Berlin Texas Venice Alaska Cairo Brooklyn Mumbai Havana Lagos Oslo Sicily")
GENRES = words(
    "Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy Film-Noir Horror Musical Mystery "
    "Romance Sci-Fi Thriller War Western IMAX"
)
WHO = words("sister friends kids parents roommate partner grandfather cousins")
DAY = words("Friday Sunday night weekend holiday")
FEEL = words("gripping clumsy gorgeous predictable moving tense silly haunting overlong sharp")


def movie_title(rng: random.Random) -> str:
    a, n, n2, p = rng.choice(ADJ), rng.choice(NOUN), rng.choice(NOUN), rng.choice(PLACES)
    title = rng.choice(
        (f"The {a} {n}", f"{n} of the {n2}", f"{a} {n} in {p}", f"The {n}'s {n2}", f"{a} {n} {rng.randint(2, 4)}")
    )
    genres = ", ".join(sorted(rng.sample(GENRES, rng.randint(1, 3))))
    return f"{title} ({rng.randint(1930, 2024)}) ({genres})"


def make_items(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"id": f"m{i}", "text": movie_title(rng)} for i in range(n)]


def make_queries(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, nn, g, p = rng.choice(ADJ).lower(), rng.choice(NOUN).lower(), rng.choice(GENRES).lower(), rng.choice(PLACES)
        out.append(
            rng.choice(
                (
                    f"a {a} {g} movie about a {nn}",
                    f"something like The {rng.choice(ADJ)} {rng.choice(NOUN)}",
                    f"{g} films set in {p}",
                    f"{nn} {g} from the {rng.randrange(1930, 2030, 10)}s",
                    f"what should I watch tonight if I loved {movie_title(rng)}?",
                )
            )
        )
    return out


def make_reviews(n: int, seed: int) -> list[str]:
    """Longer texts (~60 tokens) for the embedding benchmark."""
    rng = random.Random(seed)
    return [
        f"I watched {movie_title(rng)} with my {rng.choice(WHO)} last {rng.choice(DAY)}. The "
        f"{rng.choice(NOUN).lower()} scenes were {rng.choice(FEEL)} and the ending felt {rng.choice(FEEL)}, although "
        f"the middle part dragged a little. I would recommend it to anyone who enjoys {rng.choice(GENRES).lower()} "
        f"films set in {rng.choice(PLACES)}."
        for _ in range(n)
    ]


class Timed:
    """Wrap an instance's method so the seconds spent in it are summed (only inside this benchmark)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.seconds = 0.0
        inner: Callable[..., Any] = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(obj, name, wrapper)


# -- embedding throughput against a matmul floor ------------------------------------------------------------------


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """fp32 n x n matmul rate (GFLOP/s, 2 n^3 flops each) with torch's default thread count; 2 warm-up products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def encoder_facts(st_model: Any) -> dict[str, int]:
    """Non-embedding parameter count (the transformer layers; no embedding tables, no pooler) and shapes."""
    named = st_model.named_parameters()
    params = sum(p.numel() for name, p in named if "embeddings." not in name and "pooler" not in name)
    cfg = st_model[0].auto_model.config if hasattr(st_model[0], "auto_model") else st_model[0].model.config
    return {"params": params, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def token_counts(
    tokenizer: Any, texts: list[str], max_len: int, batches: Callable[[list[int]], list[list[int]]]
) -> tuple[list[int], int]:
    """Real tokens per text ([CLS]/[SEP] included) and the padded tokens the model computes on, each batch padded
    to its longest text; ``batches`` groups text indices as that path does."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    return lengths, sum(len(b) * max(lengths[i] for i in b) for b in batches(lengths))


def st_batches(texts: list[str], batch: int) -> Callable[[list[int]], list[list[int]]]:
    """sentence-transformers' batches: sorted by character length (longest first), ``batch`` texts each."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return lambda _lengths: [order[s : s + batch] for s in range(0, len(order), batch)]


QUERY_FLOOR_TARGET = 0.6  # issue 17: one query's embedding at least 0.6 of its FLOP floor
INGEST_FLOOR_TARGET = 0.8  # issue 17: ingest embedding at least 0.8 of the floor, on titles and on reviews
RETRIEVE_OVER_EMBED_TARGET = 1.5  # issue 17: a dense retrieve at most 1.5x its own query embedding (10,000 items)
ST_BATCH = 64  # sentence-transformers' batch size before issue 17


def flop_model(facts: dict[str, int]) -> Callable[[list[int]], float]:
    """The floor's FLOPs for texts of these token counts: 2 P per token + 4 layers len hidden for attention."""

    def flops(lengths: list[int]) -> float:
        return float(sum(n * (2 * facts["params"] + 4 * facts["layers"] * n * facts["hidden"]) for n in lengths))

    return flops


def embedding_bench(p: Personalizer, rounds: int, n_short: int, n_long: int, n_single: int, seed: int) -> str:
    """Embedder.embed (the lean forward) against sentence-transformers' encode, rows interleaved and rotated."""
    import torch

    emb = p.embedder
    st = emb.model
    facts = encoder_facts(st)
    flops = flop_model(facts)
    max_len = int(st.max_seq_length)
    batch = emb.batch_size
    short = [movie_title(random.Random(seed + 7 + i)) for i in range(n_short)]
    long = make_reviews(n_long, seed + 8)
    single = short[:n_single]
    paths: dict[str, Callable[[list[str]], Any]] = {
        "lean": emb.embed,
        "st": emb.reference_embed,
    }

    threads = torch.get_num_threads()
    configs: dict[str, dict[str, Any]] = {}
    plan = [
        ("titles", short, batch, ST_BATCH, INGEST_FLOOR_TARGET),
        ("reviews", long, batch, ST_BATCH, INGEST_FLOOR_TARGET),
        ("one query at a time", single, 1, 1, QUERY_FLOOR_TARGET),
    ]
    for what, texts, lean_bs, st_bs, target in plan:
        for path, bs in (("lean", lean_bs), ("st", st_bs)):
            grouping = (
                (lambda lengths, bs=bs: length_sorted_batches(lengths, emb.batch_tokens, bs))
                if path == "lean"
                else st_batches(texts, bs)
            )
            lengths, padded = token_counts(st.tokenizer, texts, max_len, grouping)
            configs[f"{what}|{path}"] = dict(
                what=what, path=path, texts=texts, bs=bs, lengths=lengths, padded=padded, flops=flops(lengths),
                target=target, wall=[], ratio=[], cpu=[], mm=[], calls=[], batches=len(grouping(lengths)),
            )  # fmt: skip

    for path in paths.values():
        path(short[:8])  # warm-up
    mm_rates = []
    total = rounds * sum(len(c["texts"]) for c in configs.values())
    with tqdm(total=total, desc="embedding", unit="text", file=sys.stderr) as bar:
        for r in range(rounds):
            names = list(configs)
            names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order every round
            for name in names:
                c = configs[name]
                embed = paths[c["path"]]
                rate_before = matmul_gflops()
                with Clock() as clock:
                    if c["bs"] == 1:
                        for t in c["texts"]:
                            t0 = time.perf_counter()
                            embed([t])
                            c["calls"].append(time.perf_counter() - t0)
                    else:
                        embed(c["texts"])
                rate = (matmul_gflops() + rate_before) / 2  # the matmul rate around this very measurement
                c["mm"].append(rate)
                mm_rates.append(rate)
                c["wall"].append(clock.wall)
                c["ratio"].append(c["flops"] / clock.wall / 1e9 / rate)
                c["cpu"].append(clock.cpu / clock.wall)
                bar.update(len(c["texts"]))

    mm = median(mm_rates)
    rows = []
    for c in configs.values():
        wall = median(c["wall"])
        n_tok = sum(c["lengths"])
        ratio = median(c["ratio"])
        st_wall = median(configs[f"{c['what']}|st"]["wall"])
        lean = c["path"] == "lean"
        rows.append(
            [
                c["what"],
                "Embedder.embed (lean)" if lean else "sentence-transformers",
                f"{len(c['texts']) / c['batches']:.1f}",
                len(c["texts"]),
                f"{n_tok / len(c['texts']):.1f}",
                f"{c['padded'] / n_tok:.2f}",
                f"{len(c['texts']) / wall:,.0f}",
                f"{pct(c['calls'], 50) * 1000:.2f} / {pct(c['calls'], 95) * 1000:.2f}" if c["calls"] else "-",
                f"{c['flops'] / wall / 1e9:.1f}",
                f"{median(c['mm']):.1f}",
                f"{ratio:.2f}",
                f"{st_wall / wall:.2f}x" if lean else "1.00x",
                f">= {c['target']}: {'met' if ratio >= c['target'] else 'NOT met'}" if lean else "-",
                f"{median(c['cpu']):.2f}",
            ]
        )
    head = (
        f"Embedding: Embedder.embed (lean BERT forward, length-sorted batches of at most {emb.batch_tokens} padded "
        f"tokens) against today's "
        f"sentence-transformers encode (batches of {ST_BATCH}) on the same texts (all-MiniLM-L6-v2, "
        f"{facts['layers']} layers, hidden {facts['hidden']}, {facts['params'] / 1e6:.2f}M non-embedding "
        f"parameters); fp32 1024x1024 matmul rate with {threads} thread(s) in this run: median {mm:.1f} GFLOP/s "
        f"(min {min(mm_rates):.1f}, max {max(mm_rates):.1f})"
    )
    tab = table(
        [
            "texts",
            "path",
            "texts/batch",
            "n",
            "tokens/text",
            "padded/real",
            "texts/s",
            "per call p50 / p95 ms",
            "GFLOP/s",
            "matmul GFLOP/s",
            "achieved/floor",
            "speed-up",
            "target",
            "cpu/wall",
        ],
        rows,
    )
    note = (
        f"floor: FLOPs per real token = 2 x {facts['params']:,} (= {2 * facts['params'] / 1e6:.1f} MFLOP) + "
        "attention 4 x layers x seq_len x hidden per token (seq_len = that text's own token count); achieved/floor "
        "= achieved useful GFLOP/s / matmul GFLOP/s of the same row (1.0 would be matmul speed on every flop; "
        "padding, softmax, layer norms, GELU and python overhead are what is lost). tokens include [CLS]/[SEP]; "
        "padded/real is the extra work from padding each batch to its longest text. Median of "
        f"{rounds} round(s), the rows interleaved and their order rotated each round; the matmul rate is measured "
        "right before and after every row. speed-up = the sentence-transformers row's wall time / this row's. "
        "cpu/wall = process CPU seconds per wall second (near the thread count = the CPUs were ours; lower = "
        "other processes took them)."
    )
    return "\n".join([head, tab, note])


def batch_size_bench(p: Personalizer, sizes: list[int], n_short: int, n_long: int, rounds: int, seed: int) -> str:
    """How INGEST_BATCH_TOKENS was chosen: the lean path's texts/s per token budget on titles and reviews,
    interleaved, as a fraction of the best budget for that corpus."""
    emb = p.embedder
    corpora = {
        "titles": [movie_title(random.Random(seed + 17 + i)) for i in range(n_short)],
        "reviews": make_reviews(n_long, seed + 18),
    }
    walls: dict[tuple[str, int], list[float]] = {(c, b): [] for c in corpora for b in sizes}
    kept = emb.batch_size, emb.batch_tokens
    emb.batch_size = 1 << 20  # only the token budget binds
    try:
        for r in range(rounds):
            for ci, (corpus, texts) in enumerate(corpora.items()):
                order = sizes if (r + ci) % 2 == 0 else sizes[::-1]
                for bs in order:
                    emb.batch_tokens = bs
                    with Clock() as c:
                        emb.embed(texts)
                    walls[(corpus, bs)].append(c.wall)
    finally:
        emb.batch_size, emb.batch_tokens = kept
    rows = []
    for corpus, texts in corpora.items():
        rates = {bs: len(texts) / median(walls[(corpus, bs)]) for bs in sizes}
        best = max(rates.values())
        rows.append([corpus, *(f"{rates[bs]:,.0f} ({rates[bs] / best:.2f})" for bs in sizes)])
    return (
        "Ingest batch size (Embedder.embed, length-sorted, at most N padded tokens per batch): texts/s (fraction "
        "of the best budget), "
        f"{len(corpora['titles'])} titles / {len(corpora['reviews'])} reviews, median of {rounds} rounds, "
        "budgets interleaved; the default "
        f"(personalize.retrieval.embedding.INGEST_BATCH_TOKENS) is {kept[1]}\n"
        + table(["corpus", *(f"{b} tokens" for b in sizes)], rows)
    )


# -- ingest and query ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes 10 and 100, 10 queries, 1 embedding round")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"items per user (default {list(FULL_SIZES)})")
    parser.add_argument("--queries", type=int, help="timed queries per user size and retriever (default 50)")
    parser.add_argument("--embed-rounds", type=int, help="rounds of the embedding benchmark (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, help="Settings.torch_threads (default: torch's own)")
    parser.add_argument("--bm25-items", type=int, default=10_000, help="documents in the BM25 index comparison")
    parser.add_argument("--only", choices=["bm25", "embedding"], help="run only this part")
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    n_queries = args.queries or (10 if args.quick else 50)
    rounds = args.embed_rounds or (1 if args.quick else 3)
    resolved = ["--sizes", *map(str, sizes), "--queries", str(n_queries), "--embed-rounds", str(rounds)]
    resolved += ["--seed", str(args.seed)]
    if args.torch_threads:
        resolved += ["--torch-threads", str(args.torch_threads)]
    if args.quick:
        resolved = ["--quick", *resolved]
    resolved += ["--bm25-items", str(args.bm25_items)]
    if args.only:
        resolved += ["--only", args.only]

    home = Path(tempfile.mkdtemp(prefix="personalize-bench-retrieval-"))
    load_start = loadavg()
    started = time.perf_counter()
    out: list[str] = []
    try:
        if args.only in (None, "bm25"):
            out.append(bm25_bench(args.bm25_items, n_queries, args.seed))
        if args.only != "bm25":
            settings = Settings(home=home, database_url=None, chroma=None, torch_threads=args.torch_threads)
            with Personalizer(settings) as p:
                if args.only == "embedding":
                    out += embedding_parts(p, rounds, args.seed, args.quick)
                else:
                    out += run(p, sizes, n_queries, rounds, args.seed, args.quick)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    elapsed = time.perf_counter() - started
    out.append(
        f"{machine_line()}; load average at start {load_start}, at end {loadavg()}; CPU pressure {cpu_pressure()}; "
        f"whole run {elapsed:.0f} s"
    )
    out.append(rerun_line("benchmarks/retrieval.py", resolved))
    print("\n\n".join(out))


BM25_QUERY_TARGET = 10.0  # issue 17: the index at least 10x the scan per query at 10,000 items


def bm25_bench(n_items: int, n_queries: int, seed: int) -> str:
    """The inverted BM25 index against the scan (the definition, and the implementation before issue 17) on the
    same documents, queries interleaved: per-query latency, build time, and an update of 10 new items in place
    against a rebuild. Also checks they agree on every top 4."""
    corpora = {
        "titles": [m["text"] for m in make_items(n_items, seed + 7)],
        "reviews": make_reviews(n_items, seed + 8),
    }
    queries = make_queries(max(n_queries, 20), seed + 9)
    rows, agree = [], 0
    for name, docs in corpora.items():
        ids = [f"d{i}" for i in range(len(docs))]
        with Clock() as scan_build:
            scan = ScanBM25Index(ids, docs)
        with Clock() as index_build:
            index = BM25Index(ids, docs)
        lat: dict[str, list[float]] = {"scan": [], "index": []}
        for qi, query in enumerate(queries):
            order = [("scan", scan), ("index", index)]
            for label, which in order if qi % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                top = which.top(query, 4)
                lat[label].append(time.perf_counter() - t0)
                if label == "index":
                    agree += [i for i, _ in top] == [i for i, _ in scan.top(query, 4)]
        extra = [(f"new{i}", docs[i]) for i in range(10)]
        with Clock() as update:
            updated = index.copy()
            updated.add(extra)
        with Clock() as rebuild:
            ScanBM25Index(ids + [i for i, _ in extra], docs + [d for _, d in extra])
        ratio = median(lat["scan"]) / median(lat["index"])
        rows.append(
            [
                name,
                f"{len(docs):,}",
                f"{median(lat['scan']) * 1000:.2f}",
                f"{median(lat['index']) * 1000:.2f}",
                f"{pct(lat['index'], 95) * 1000:.2f}",
                f"{ratio:.1f}x",
                f">= {BM25_QUERY_TARGET:.0f}x: {'met' if ratio >= BM25_QUERY_TARGET else 'NOT met'}",
                f"{scan_build.wall:.2f} / {index_build.wall:.2f}",
                f"{update.wall * 1000:.1f} / {rebuild.wall * 1000:.0f}",
            ]
        )
    checked = len(queries) * len(corpora)
    return (
        f"BM25: inverted index (numpy over the query terms' postings) against the scan, {len(queries)} queries, "
        "interleaved, top 4\n"
        + table(
            [
                "corpus",
                "docs",
                "scan p50 ms",
                "index p50 ms",
                "index p95 ms",
                "speed-up",
                "target",
                "build s scan / index",
                "add 10 ms: in place / rebuild",
            ],
            rows,
        )
        + f"\nthe same top 4 on {agree} of {checked} queries. 'in place' copies the index (what the retriever does, so "
        "readers never see a half-updated one) and indexes the 10 new items; 'rebuild' re-tokenises everything."
    )


def run(p: Personalizer, sizes: list[int], n_queries: int, rounds: int, seed: int, quick: bool) -> list[str]:
    out: list[str] = []
    firsts: list[list[str]] = []

    # one-off costs, timed apart so they do not land in the first measured user
    with Clock() as c:
        _ = p.embedder.model
    firsts.append(["load the embedding model (part of the first dense call or add_items)", f"{c.wall:.2f} s"])
    with Clock() as c:
        p.add_items("warmup", make_items(10, seed + 99))
    firsts.append(["first add_items in the process (SQL migrations, Chroma start), 10 items", f"{c.wall:.2f} s"])

    embed_t = Timed(p.embedder, "embed")
    chroma_t = Timed(p.vectors, "upsert")

    # ingest: users of each size, small sizes several times, interleaved round-robin
    repeats = {n: (min(INGEST_REPEATS.get(n, 1), 3) if quick else INGEST_REPEATS.get(n, 1)) for n in sizes}
    plan = [(n, r) for r in range(max(repeats.values())) for n in sizes if r < repeats[n]]
    ingest: dict[int, list[tuple[float, float, float, float]]] = {n: [] for n in sizes}
    users: dict[int, str] = {}
    with tqdm(total=sum(n for n, _ in plan), desc="ingest", unit="item", file=sys.stderr) as bar:
        for n, r in plan:
            user = f"user-{n}-{r}"
            items = make_items(n, seed + 1000 * r + n)
            embed_t.seconds = chroma_t.seconds = 0.0
            with Clock() as c:
                report = p.add_items(user, items, show_progress=n >= 1000)
            assert report.added == n, report
            ingest[n].append((c.wall, embed_t.seconds, chroma_t.seconds, c.cpu / c.wall))
            users.setdefault(n, user)
            bar.update(n)

    rows = []
    for n in sizes:
        runs = ingest[n]
        wall = median([r[0] for r in runs])
        rows.append(
            [
                f"{n:,}",
                len(runs),
                f"{n / wall:,.1f}",
                f"{wall:.2f}",
                f"{median([r[1] / r[0] for r in runs]):.0%}",
                f"{median([r[2] / r[0] for r in runs]):.0%}",
                f"{median([1 - (r[1] + r[2]) / r[0] for r in runs]):.0%}",
                f"{median([r[3] for r in runs]):.2f}",
            ]
        )
    out.append(
        "Ingest: one Personalizer.add_items call per user (all of the user's items at once)\n"
        + table(["items/user", "users", "items/s", "s/user", "embed", "chroma", "sql+other", "cpu/wall"], rows)
        + "\nitems/s and s/user are medians over the users of that size; embed / chroma / sql+other split each "
        "call's wall time between Embedder.embed, VectorStore.upsert and the rest (SQL upsert, item parsing)."
    )

    # queries: first call per (size, retriever) is the warm-up, reported apart; then interleaved timed queries
    retrievers = ("dense", "bm25")
    for n in sizes:
        for name in retrievers:
            with Clock() as c:
                hits = p.retrieve(users[n], "a dark sci-fi thriller about a robot", k=4, retriever=name)
            assert len(hits) == min(4, n)
            what = "opens the user's Chroma collection" if name == "dense" else "builds the user's BM25 index"
            firsts.append([f"first {name} retrieve, {n:,} items ({what})", f"{c.wall * 1000:.1f} ms"])

    queries = make_queries(n_queries, seed + 5)
    kinds = ("dense", "dense, st embed", "bm25")  # the middle one: today's sentence-transformers encode as the peer
    lat: dict[tuple[int, str], list[float]] = {(n, r): [] for n in sizes for r in kinds}
    embed_part: dict[tuple[int, str], list[float]] = {(n, r): [] for n in sizes for r in kinds[:2]}
    dense = p.retriever("dense")
    with tqdm(total=n_queries * len(sizes) * len(kinds), desc="queries", unit="query", file=sys.stderr) as bar:
        for qi, query in enumerate(queries):
            for si, n in enumerate(sizes):
                shift = (qi + si) % len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    embed_t.seconds = 0.0
                    dense._last = None  # type: ignore[attr-defined]  # every dense call embeds its query
                    p.embedder.lean_enabled = kind != "dense, st embed"
                    t0 = time.perf_counter()
                    p.retrieve(users[n], query, k=4, retriever="bm25" if kind == "bm25" else "dense")
                    lat[(n, kind)].append(time.perf_counter() - t0)
                    p.embedder.lean_enabled = True
                    if kind != "bm25":
                        embed_part[(n, kind)].append(embed_t.seconds)
                    bar.update(1)

    rows = []
    for n in sizes:
        for kind in kinds:
            v = lat[(n, kind)]
            e = embed_part.get((n, kind))
            ratio = pct(v, 50) / pct(e, 50) if e else None
            target = "-"
            if kind == "dense" and ratio is not None:
                met = "met" if ratio <= RETRIEVE_OVER_EMBED_TARGET else "NOT met"
                target = (
                    f"<= {RETRIEVE_OVER_EMBED_TARGET}: {met}"
                    if n == 10_000
                    else f"({RETRIEVE_OVER_EMBED_TARGET} at 10,000)"
                )
            rows.append(
                [
                    f"{n:,}",
                    kind,
                    f"{pct(v, 50) * 1000:.1f}",
                    f"{pct(v, 95) * 1000:.1f}",
                    f"{min(v) * 1000:.1f}",
                    f"{max(v) * 1000:.1f}",
                    f"{pct(e, 50) * 1000:.1f}" if e else "-",
                    f"{ratio:.2f}" if ratio is not None else "-",
                    target,
                ]
            )
    out.append(
        f"Query latency: Personalizer.retrieve(user, query, k=4, retriever=...), {n_queries} queries per row\n"
        + table(
            [
                "items/user",
                "retriever",
                "p50 ms",
                "p95 ms",
                "min ms",
                "max ms",
                "query embed p50 ms",
                "retrieve / embed (p50)",
                "target",
            ],
            rows,
        )
        + "\nafter one warm-up call per row (below); the three rows alternate (rotated) query by query and size by "
        "size. 'dense, st embed' is the same dense retrieve with the query embedded by sentence-transformers' encode "
        "(the path before issue 17). retrieve() also reads the user (SQL) and fetches the hits' items (SQL)."
    )
    out.append("One-off costs (not in the tables above)\n" + table(["what", "time"], firsts))

    out += embedding_parts(p, rounds, seed, quick)
    return out


def embedding_parts(p: Personalizer, rounds: int, seed: int, quick: bool) -> list[str]:
    """The embedding against its floor, the lean path against sentence-transformers, and the batch-size sweep."""
    n_short, n_long = (64, 32) if quick else (128, 64)
    return [
        embedding_bench(p, rounds, n_short=n_short, n_long=n_long, n_single=16 if quick else 32, seed=seed),
        batch_size_bench(p, [128, 256, 512, 1024, 2048], n_short, n_long, rounds, seed),
    ]


if __name__ == "__main__":
    main()
