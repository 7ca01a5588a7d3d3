"""HTTP load benchmark: `personalize serve` on loopback under 1, 8 and 32 concurrent clients, beside the same
requests in process (the floor), interleaved round by round within each level.

    python benchmarks/http_load.py                      # 8 users with adapters, 48 requests per level and path
    python benchmarks/http_load.py --requests 16 --levels 1,8 --home /tmp/http-home   # quicker; keep the home

Each of 8 users gets 16 synthetic movie-rating items and a LoRA adapter (one training step: serving speed does not
depend on how well an adapter was trained). Every request is ``POST /v1/generate`` for a user picked round-robin,
method ``peft`` (each row its own adapter, so concurrent requests make mixed-adapter batches through the
coalescer), 8 new tokens. The in-process floor sends the same requests to a ``Personalizer`` from the same number of
threads (its own copy of the home, so no two processes share one embedded Chroma folder). Bounded in count
(``--requests``) and time (``--max-seconds`` per level and path). The two paths alternate in ``--rounds`` rounds
per level (this machine's speed drifts from minute to minute). Prints req/s, p50 and p95 latency and the error
count (which must be 0); nothing asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import contention_note, footer, loadavg, pct, table

from personalize.personalizer import Personalizer
from personalize.retrieval.chroma_server import free_port
from personalize.settings import BUNDLED_MODEL, LoraSettings, Settings

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "War")
PROMPT = "Rate the film Blade Runner (1982) from 1 to 5."
N_USERS = 8


def _settings(home: Path) -> Settings:
    lora = LoraSettings(epochs=1, max_steps=1, batch_size=4, max_length=96)
    return Settings(home=home, model=BUNDLED_MODEL, auto_train=False, lora=lora, _env_file=None)


def _prepare(home: Path) -> list[str]:
    """Users with items and an adapter each (reused when the home has them already)."""
    users = [f"http-user-{n}" for n in range(N_USERS)]
    with Personalizer(_settings(home)) as p:
        for n, user in enumerate(users):
            items = [
                {"id": f"{user}-{i}", "text": f"Film {i} ({GENRES[(n + i) % len(GENRES)]})", "output": str(1 + i % 5)}
                for i in range(16)
            ]
            p.add_items(user, items)
            if not p.adapter_is_current(user, p.current_adapter(user)):
                p.train(user)
    return users


def _start_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {"PERSONALIZE_HOME": str(home), "PERSONALIZE_AUTO_TRAIN": "false", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "personalize.cli", "serve", "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


@dataclass
class PathRecord:
    """What one path (in-process or http) measured at one level, summed over its interleaved rounds."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0

    def row(self, clients: int, name: str) -> list[str]:
        rps = len(self.latencies) / self.wall_s if self.wall_s else float("nan")
        p50, p95 = 1000 * pct(self.latencies, 50), 1000 * pct(self.latencies, 95)
        return [
            str(clients),
            name,
            str(len(self.latencies)),
            f"{rps:.2f}",
            f"{p50:.0f}",
            f"{p95:.0f}",
            str(self.errors),
        ]


def _drive(send, users: list[str], clients: int, requests: int, budget_s: float, record: PathRecord) -> None:  # noqa: ANN001
    """``requests`` calls of ``send(user)`` from ``clients`` threads, added to ``record``; no call starts once the
    path has used ``budget_s`` in all."""
    deadline = time.perf_counter() + budget_s - record.wall_s

    def one(n: int) -> None:
        if time.perf_counter() > deadline:
            return
        t0 = time.perf_counter()
        try:
            send(users[n % len(users)])
            record.latencies.append(time.perf_counter() - t0)
        except Exception:  # counted, never hidden: the table shows them
            record.errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(requests)))
    record.wall_s += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="Keep the model cache, users and adapters here")
    parser.add_argument("--levels", default="1,8,32", help="Concurrent clients per level, comma-separated")
    parser.add_argument("--requests", type=int, default=48, help="Requests per level and path")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="Stop a level's path after this long")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--rounds", type=int, default=4, help="Split each level's requests into this many rounds, alternating the paths"
    )
    args = parser.parse_args()
    load_start, started = loadavg(), time.perf_counter()
    home = args.home or Path(tempfile.mkdtemp(prefix="http-load-"))
    print(f"home {home}; preparing {N_USERS} users with adapters (first run: dequantise the model, train) ...")
    users = _prepare(home)
    floor_home = Path(tempfile.mkdtemp(prefix="http-load-floor-"))
    shutil.copytree(home, floor_home, dirs_exist_ok=True)
    port = free_port()
    server = _start_server(home, port, home / "http-load-server.log")
    payload = {"prompt": PROMPT, "method": "peft", "max_new_tokens": args.max_new_tokens}
    rows = []
    try:
        with Personalizer(_settings(floor_home)) as p, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            http.timeout = httpx.Timeout(600.0)

            def over_http(user: str) -> None:
                response = http.post("/v1/generate", json={**payload, "user_id": user})
                if response.status_code != 200:
                    raise RuntimeError(response.text[:200])

            def in_process(user: str) -> None:
                p.generate(user, PROMPT, method="peft", max_new_tokens=args.max_new_tokens)

            for send in (over_http, in_process):  # warm: model loaded, adapters in the caches
                for user in users:
                    send(user)
            paths = {"in-process": in_process, "http": over_http}
            for clients in [int(c) for c in args.levels.split(",")]:
                records = {name: PathRecord() for name in paths}
                per_round = max(clients, args.requests // args.rounds)
                for round_no in range(max(1, args.requests // per_round)):  # interleaved: the machine drifts
                    order = list(paths) if round_no % 2 == 0 else list(reversed(paths))
                    for name in order:
                        _drive(paths[name], users, clients, per_round, args.max_seconds, records[name])
                for name, record in records.items():
                    rows.append(record.row(clients, name))
                    print(f"  {clients} clients, {name}: {' '.join(rows[-1][2:])} (requests req/s p50 p95 errors)")
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(floor_home, ignore_errors=True)
    print()
    print(
        f"POST /v1/generate, method peft, {args.max_new_tokens} new tokens, {N_USERS} users with adapters; "
        f"load {loadavg()}"
    )
    print(table(["clients", "path", "requests", "req/s", "p50 ms", "p95 ms", "errors"], rows))
    note = contention_note()
    if note:
        print(note)
    print("\n".join(footer("benchmarks/http_load.py", sys.argv[1:], load_start, started, "reuse the users")))


if __name__ == "__main__":
    main()
