"""Load benchmark of the server mode (issue 6): PostgreSQL + a Chroma server + Redis + Celery workers.

    python benchmarks/load.py                      # 1,000 users x 100 items, 8 vs 1 client threads, 1 vs 2 workers
    python benchmarks/load.py --users 50 --quick   # a small smoke run (~3 minutes)
    python benchmarks/load.py --home /tmp/load-home  # keep the home (and its bundled-model cache) for the next run

(a) ingest: ``--users`` users x ``--items`` synthetic items each, through ``Personalizer.add_items`` into PostgreSQL
    (a fresh database, dropped at the end) and a Chroma server this script starts (``chroma run``): items/s, with the
    embedding share of the time.
(b) retrieval after ingest: ``--queries`` random (user, query) pairs, dense and BM25: latency p50/p95.
(c) concurrent ``generate`` (bundled model, method ``rag``, mixed users, ``--max-new-tokens``): ``--requests``
    requests from 1 client thread, then from ``--threads`` threads, then 1 again (interleaved, to see drift):
    requests/s and latency p50/p95.
(d) training throughput: ``--train-users`` users trained through real ``celery -A workers worker`` processes on
    Redis, with 1 worker and then with 2 (each one torch thread): users/minute.
Nothing here asserts a time: it prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from _common import contention_note, footer, loadavg, pct, table
from tqdm import tqdm

from personalize.data.store import upgrade_database
from personalize.jobs.worker_process import start_worker, stop_worker
from personalize.personalizer import Personalizer
from personalize.settings import LoraSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "space",
    "western",
    "noir",
    "heist",
    "comedy",
    "romance",
    "war",
    "drama",
    "thriller",
    "horror",
    "documentary",
    "musical",
    "animated",
    "family",
    "robot",
    "detective",
    "vampire",
    "pirate",
    "samurai",
    "dragon",
    "island",
    "city",
    "desert",
    "winter",
    "summer",
    "ocean",
    "train",
]
PROMPT = "Which film should I watch tonight, and why?"


def user_items(user: int, n: int, rng: random.Random) -> list[dict]:
    """``n`` synthetic movie items with varied words, so BM25 and dense retrieval both have work to do."""
    items = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(4)).title()
        score = str(1 + (7 * i + 3 * user) % 5)
        items.append({"id": f"m{i}", "text": f"{words} {user}-{i} ({rng.choice(WORDS)})", "output": score})
    return items


@contextlib.contextmanager
def chroma_server(folder: Path) -> Iterator[str]:
    """A Chroma server (``chroma run``) on a free port, stopped on exit (the library's launcher)."""
    from personalize.retrieval.chroma_server import chroma_server as server

    with server(folder, folder.parent / "chroma.log") as url:
        yield url


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database for this run, migrated, dropped on exit."""
    from sqlalchemy import create_engine, text

    name = f"personalize_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade_database(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def ingest(p: Personalizer, users: int, items: int) -> list[list[str]]:
    rng = random.Random(0)
    embed_s = 0.0
    embedder = p.embedder
    original = embedder.embed

    def timed_embed(texts, show_progress=False):  # noqa: ANN001, ANN202 (count the embedding share of the time)
        nonlocal embed_s
        t0 = time.perf_counter()
        try:
            return original(texts, show_progress=show_progress)
        finally:
            embed_s += time.perf_counter() - t0

    embedder.embed = timed_embed
    t0 = time.perf_counter()
    try:
        for u in tqdm(range(users), desc="ingest", unit="user"):
            p.add_items(f"load-{u}", user_items(u, items, rng))
    finally:
        embedder.embed = original
    wall = time.perf_counter() - t0
    total = users * items
    return [
        ["items", f"{total:,}"],
        ["wall s", f"{wall:.1f}"],
        ["items/s", f"{total / wall:.1f}"],
        ["users/s", f"{users / wall:.2f}"],
        ["embedding share of the time", f"{embed_s / wall:.0%}"],
    ]


def query_latency(p: Personalizer, users: int, queries: int) -> list[list[str]]:
    rng = random.Random(1)
    rows = []
    for retriever in ("dense", "bm25"):
        times = []
        for _ in tqdm(range(queries), desc=f"query {retriever}", unit="q"):
            user = f"load-{rng.randrange(users)}"
            query = " ".join(rng.choice(WORDS) for _ in range(3))
            t0 = time.perf_counter()
            p.retrieve(user, query, k=4, retriever=retriever)
            times.append(time.perf_counter() - t0)
        rows.append([retriever, queries, f"{pct(times, 50) * 1e3:.1f}", f"{pct(times, 95) * 1e3:.1f}"])
    return rows


def concurrent_generate(
    p: Personalizer, users: int, requests: int, threads: int, max_new_tokens: int
) -> list[list[str]]:
    rng = random.Random(2)
    p.generate("load-0", PROMPT, method="rag", max_new_tokens=2)  # warm up the model and the embedder

    def run(n_threads: int) -> list[str]:
        picks = [f"load-{rng.randrange(users)}" for _ in range(requests)]
        latencies: list[float] = []
        lock = threading.Lock()
        it = iter(picks)

        def client() -> None:
            while True:
                with lock:
                    user = next(it, None)
                if user is None:
                    return
                t0 = time.perf_counter()
                p.generate(user, PROMPT, method="rag", max_new_tokens=max_new_tokens)
                with lock:
                    latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        pool = [threading.Thread(target=client) for _ in range(n_threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - t0
        return [
            f"{n_threads} thread(s)",
            requests,
            f"{requests / wall:.2f}",
            f"{pct(latencies, 50):.2f}",
            f"{pct(latencies, 95):.2f}",
        ]

    return [run(1), run(threads), run(1)]


def train_throughput(p: Personalizer, env: dict[str, str], n_users: int, items: int, log_dir: Path) -> list[list[str]]:
    rng = random.Random(3)
    rows = []
    for n_workers in (1, 2):
        users = [f"train-{n_workers}w-{i}" for i in range(n_users)]
        for i, user in enumerate(users):
            p.add_items(user, user_items(10_000 + i, items, rng))
        workers = [start_worker(env, log_dir / f"worker-{n_workers}-{k}.log", f"w{k}@%h") for k in range(n_workers)]
        try:
            for k in range(n_workers):  # every worker consumes before the jobs are sent
                log = log_dir / f"worker-{n_workers}-{k}.log"
                wait_until(lambda log=log: "ready." in log.read_text(), 300)
            t0 = time.perf_counter()
            for user in users:
                p.enqueue_training(user)
            with tqdm(total=n_users, desc=f"train, {n_workers} worker(s)", unit="user") as bar:
                done = 0
                while done < n_users:
                    time.sleep(1)
                    now = sum(1 for u in users if p.current_adapter(u) is not None)
                    bar.update(now - done)
                    done = now
                    failed = [j for j in p.training_jobs() if j.state == "failed"]
                    if failed:
                        raise RuntimeError(f"training failed: {failed[0].error}")
            wall = time.perf_counter() - t0
        finally:
            for w in workers:
                stop_worker(w)
        rows.append([f"{n_workers}", n_users, f"{wall:.1f}", f"{n_users / wall * 60:.2f}"])
    return rows


def wait_until(predicate, timeout: float) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--train-users", type=int, default=4)
    parser.add_argument("--train-items", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="fewer queries, requests and training users")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--home", type=Path, help="home folder to use and keep (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.requests, args.train_users = 50, 8, 2
    resolved = ["--users", str(args.users), "--items", str(args.items), "--queries", str(args.queries)]
    resolved += ["--requests", str(args.requests), "--threads", str(args.threads), "--max-new-tokens"]
    resolved += [str(args.max_new_tokens), "--train-users", str(args.train_users), "--train-items"]
    resolved += [str(args.train_items)]
    if args.home:
        resolved += ["--home", str(args.home)]

    import redis

    redis.Redis.from_url(args.redis).flushdb()
    home = args.home or Path(tempfile.mkdtemp(prefix="personalize-bench-load-"))
    home.mkdir(parents=True, exist_ok=True)
    load_start, note, started = loadavg(), contention_note(), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="personalize-load-run-"))
    out: list[str] = []
    try:
        with fresh_postgres(args.postgres) as db_url, chroma_server(work / "chroma") as chroma_url:
            lora = LoraSettings(epochs=1, max_items=args.train_items)
            settings = Settings(
                home=home,
                database_url=db_url,
                chroma=chroma_url,
                broker_url=args.redis,
                auto_train=False,
                torch_threads=1,
                lora=lora,
                _env_file=None,
            )
            with Personalizer(settings) as p:
                out.append(
                    f"(a) ingest through PostgreSQL + a Chroma server, one client process, "
                    f"{args.users:,} users x {args.items} items\n"
                    + table(["what", "value"], ingest(p, args.users, args.items))
                )
                print(out[-1], flush=True)
                rows = query_latency(p, args.users, args.queries)
                out.append(
                    f"(b) retrieval latency after ingest, k=4, random users among {args.users:,}\n"
                    + table(["retriever", "queries", "p50 ms", "p95 ms"], rows)
                )
                print(out[-1], flush=True)
                rows = concurrent_generate(p, args.users, args.requests, args.threads, args.max_new_tokens)
                out.append(
                    f"(c) concurrent generate: bundled model, method rag, {args.max_new_tokens} new tokens, mixed "
                    f"users; 1 thread, {args.threads} threads, 1 thread again\n"
                    + table(["clients", "requests", "req/s", "p50 s", "p95 s"], rows)
                )
                print(out[-1], flush=True)
                env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
                env.update(
                    PERSONALIZE_HOME=str(home),
                    PERSONALIZE_DATABASE_URL=db_url,
                    PERSONALIZE_CHROMA=chroma_url,
                    PERSONALIZE_BROKER_URL=args.redis,
                    PERSONALIZE_TORCH_THREADS="1",
                    PERSONALIZE_LORA__EPOCHS="1",
                    PERSONALIZE_LORA__MAX_ITEMS=str(args.train_items),
                )
                rows = train_throughput(p, env, args.train_users, args.train_items, work)
                out.append(
                    f"(d) training through Celery workers on Redis: {args.train_users} users x {args.train_items} "
                    "items, 1 epoch, each worker 1 torch thread (wall from the first job sent to the last adapter)\n"
                    + table(["workers", "users", "wall s", "users/min"], rows)
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    out += footer("benchmarks/load.py", resolved, load_start, started, None if args.home else "keep the model cache")
    if note:
        out.insert(0, note)
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
