"""The scale-out topology without Docker, and its faults (issue 6).

PostgreSQL and Redis of this machine, a Chroma server started here (`chroma run`), two `celery -A workers worker`
processes each with its own home folder (as on two machines) sharing one adapter store, and a client: train ->
generate goes through all of them. Then a broker restart with jobs queued, and 4 + 2 concurrent ingesting processes.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    FAST_LORA,
    REDIS_URL,
    free_port,
    movie_items,
    need_service,
    start_worker,
    stop_process,
    wait_for,
)

from personalize import Personalizer, Settings

pytestmark = pytest.mark.slow


def _rated(n: int, prefix: str) -> list[dict]:
    return [{**item, "output": str(1 + i % 5)} for i, item in enumerate(movie_items(n, prefix))]


def _app_env(**values: str) -> dict[str, str]:
    """The process environment with PERSONALIZE_* settings (the same variables docker-compose.yml sets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
    env.update({f"PERSONALIZE_{k.upper()}": v for k, v in values.items()})
    return env


def _worker_env(home: Path, model: Path, **values: str) -> dict[str, str]:
    defaults = {"lora__epochs": "2", "lora__batch_size": "4", "lora__max_length": "64", "torch_threads": "1"}
    defaults["job_stale_after_s"] = "20"
    return _app_env(home=str(home), model=str(model), **{**defaults, **values})


def _migrate(database_url: str, home: Path) -> None:
    """The compose file's one-shot migration service: `personalize db upgrade` in its own process."""
    env = _app_env(home=str(home), database_url=database_url)
    done = subprocess.run([sys.executable, "-m", "personalize.cli", "db", "upgrade"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def _redis_db(n: int) -> str:
    need_service("127.0.0.1", 6379, "Redis")
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + f"/{n}"
    redis.Redis.from_url(url).flushdb()
    return url


def test_postgres_redis_chroma_server_and_two_workers_train_and_serve(
    tmp_path, postgres_url, chroma_server, tiny_model_dir
):
    broker = _redis_db(11)
    _migrate(postgres_url, tmp_path / "migrate-home")
    shared_adapters = tmp_path / "shared-adapters"  # the one shared adapter volume of the compose file
    common = {"database_url": postgres_url, "chroma": chroma_server, "broker_url": broker}
    common["adapters_dir"] = str(shared_adapters)
    client_settings = Settings(
        home=tmp_path / "client-home", model=str(tiny_model_dir), auto_train=False, _env_file=None, **common
    )
    users = [f"topology-{n}" for n in range(6)]
    logs = [tmp_path / f"worker-{n}.log" for n in (1, 2)]
    workers = []
    with Personalizer(client_settings) as client:
        for user in users:
            client.add_items(user, _rated(10, prefix=f"{user}-"))
        try:
            for n, log in enumerate(logs, start=1):
                env = _worker_env(tmp_path / f"worker-{n}-home", tiny_model_dir, **common)
                workers.append(start_worker(env, log, hostname=f"w{n}@%h"))
            for log in logs:  # both consume before any job is sent, so the jobs spread over both
                wait_for(lambda log=log: "ready." in log.read_text(), 120, "the workers to start", log)
            assert all(client.enqueue_training(u).queued for u in users)
            wait_for(lambda: all(client.current_adapter(u) for u in users), 300, "six adapters", logs[0])
        finally:
            for worker in workers:
                stop_process(worker)
        jobs = client.training_jobs()
        assert len(jobs) == 6 and {j.state for j in jobs} == {"done"} and {j.attempts for j in jobs} == {1}
        assert len({j.worker for j in jobs}) == 2, "both workers trained"
        for user in users:
            adapter = client.current_adapter(user)
            assert Path(adapter.path).is_relative_to(shared_adapters.resolve())
            result = client.generate(user, "Recommend a film", method="rag+peft", retriever="dense", max_new_tokens=3)
            assert result.method == "rag+peft" and result.timings.extra["adapter_version"] == 1
            assert len(result.retrieved) == 4 and all(r.id.startswith(f"{user}-") for r in result.retrieved)
        # the client's home holds no Chroma folder: vectors live in the server, rows in PostgreSQL
        assert not any(p.name == "chroma.sqlite3" for p in client_settings.home.rglob("*"))


class _PrivateRedis:
    """A redis-server of our own on a free port, with an append-only file, so the test can stop and restart it."""

    def __init__(self, folder: Path, persistent: bool = True) -> None:
        self.persistent = persistent
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            message = "redis-server is not installed; the broker-restart test starts its own"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:  # what a cache-style Redis does: a restart empties it
            args += ["--appendonly", "no", "--save", ""]
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start: {(self.folder / 'redis.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def queued(self, queue: str = "personalize-training") -> int:
        import redis

        return redis.Redis.from_url(self.url).llen(queue)


def test_broker_restart_with_jobs_queued_loses_none_and_runs_none_twice(tmp_path, settings):
    broker = _PrivateRedis(tmp_path / "redis")
    broker.start()
    users = ["r1", "r2", "r3", "r4"]
    log = tmp_path / "worker.log"
    worker = None
    client_settings = settings.model_copy(update={"broker_url": broker.url})
    try:
        with Personalizer(client_settings) as client:
            for user in users:
                client.add_items(user, _rated(12, prefix=f"{user}-"))
            assert all(client.enqueue_training(u).queued for u in users[:2])
            assert broker.queued() == 2
            broker.stop()  # restarted with two jobs queued and no worker yet
            broker.start()
            assert broker.queued() == 2, "the append-only file kept the queued messages"
            env = _worker_env(settings.home, Path(settings.model), broker_url=broker.url, lora__epochs="20")
            worker = start_worker(env, log)
            wait_for(lambda: any(j.state == "running" for j in client.training_jobs()), 120, "training to start", log)
            assert all(client.enqueue_training(u).queued for u in users[2:])
            assert broker.queued() >= 1, "jobs wait in the queue behind the one training"
            broker.stop()  # restarted again while a job trains and two more wait in the queue
            time.sleep(3)
            broker.start()
            wait_for(lambda: all(client.current_adapter(u) for u in users), 400, "four adapters", log)
            jobs = client.training_jobs()
            assert len(jobs) == 4 and {j.state for j in jobs} == {"done"}, [(j.user_id, j.state) for j in jobs]
            assert {j.attempts for j in jobs} == {1}, "no job ran twice"
            assert all([a.version for a in client.adapters(u)] == [1] for u in users)
            assert "Connection to broker lost" in log.read_text()  # the worker saw the restart and reconnected
    finally:
        if worker is not None:
            stop_process(worker)
        broker.stop()


def test_a_broker_that_loses_its_queue_on_restart_loses_no_job(tmp_path, settings):
    """No persistence: the restart drops the queued messages; the running worker's periodic check finds the broker
    queue empty while SQL still has old queued jobs, and sends them again."""
    broker = _PrivateRedis(tmp_path / "redis", persistent=False)
    broker.start()
    users = ["l1", "l2", "l3"]
    log = tmp_path / "worker.log"
    worker = None
    try:
        with Personalizer(settings.model_copy(update={"broker_url": broker.url})) as client:
            for user in users:
                client.add_items(user, _rated(12, prefix=f"{user}-"))
            env = _worker_env(
                settings.home,
                Path(settings.model),
                broker_url=broker.url,
                lora__epochs="20",
                job_stale_after_s="3",
                job_recover_every_s="2",
            )
            worker = start_worker(env, log)
            wait_for(lambda: "ready." in log.read_text(), 120, "the worker to start", log)
            assert client.enqueue_training(users[0]).queued
            wait_for(lambda: client.training_jobs()[0].state == "running", 120, "training to start", log)
            assert all(client.enqueue_training(u).queued for u in users[1:])
            assert broker.queued() == 2
            broker.stop()
            broker.start()
            assert broker.queued() == 0, "the restart dropped the queued messages"
            wait_for(lambda: all(client.current_adapter(u) for u in users), 400, "three adapters", log)
            jobs = client.training_jobs()
            assert {j.state for j in jobs} == {"done"} and {j.attempts for j in jobs} == {1}
            assert all([a.version for a in client.adapters(u)] == [1] for u in users)
            assert "requeued training jobs" in log.read_text()
    finally:
        if worker is not None:
            stop_process(worker)
        broker.stop()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_four_processes_ingest_different_users_and_two_the_same_user(
    tmp_path, postgres_url, chroma_server, tiny_model_dir
):
    _migrate(postgres_url, tmp_path / "migrate-home")
    env = _app_env(home=str(tmp_path / "home"), database_url=postgres_url, chroma=chroma_server)
    files = []
    for n in range(4):
        user = f"solo-{n}"
        files.append(_write_jsonl(tmp_path / f"{user}.jsonl", [{"user_id": user, **i} for i in movie_items(300, user)]))
    shared = movie_items(450, "shared-")  # two overlapping halves of one user's items, at the same time
    files.append(_write_jsonl(tmp_path / "shared-a.jsonl", [{"user_id": "shared", **i} for i in shared[:300]]))
    files.append(_write_jsonl(tmp_path / "shared-b.jsonl", [{"user_id": "shared", **i} for i in shared[150:]]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "personalize.cli", "users", "import", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in files
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]

    settings = Settings(
        home=tmp_path / "reader",
        database_url=postgres_url,
        chroma=chroma_server,
        model=str(tiny_model_dir),
        _env_file=None,
    )
    expected = {f"solo-{n}": {f"solo-{n}{i}" for i in range(300)} for n in range(4)}
    expected["shared"] = {f"shared-{i}" for i in range(450)}
    with Personalizer(settings) as p:
        for user, ids in expected.items():
            rows = p.items(user)
            assert len(rows) == len(ids) and {r.id for r in rows} == ids  # each stored once
            collection = p.vectors._collection(user, create=False)
            assert collection.count() == len(ids)
            for item_id in sorted(ids)[:: len(ids) // 8]:  # a sample, each found by its own text
                text = p.store.items(user, [item_id])[0].text
                assert item_id in [h.id for h in p.retrieve(user, text, k=3, retriever="dense")]
        assert p.user("shared").n_items == 450


def _start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """`personalize serve` in its own process, as the compose file's api service runs it."""
    cmd = [sys.executable, "-m", "personalize.cli", "serve", "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_two_api_replicas_share_users_and_serve_only_the_current_adapter(
    tmp_path, postgres_url, chroma_server, tiny_model_dir
):
    """Two `personalize serve` processes (each its own home, as on two machines) behind one PostgreSQL, Chroma
    server, broker and adapter folder: items written through one are served by the other, and a retrained adapter
    is what both serve on their next request, never the old one after the new one is current."""
    from personalize.remote import RemoteClient

    broker = _redis_db(12)
    _migrate(postgres_url, tmp_path / "migrate-home")
    shared = {"database_url": postgres_url, "chroma": chroma_server, "broker_url": broker}
    shared["adapters_dir"] = str(tmp_path / "shared-adapters")
    apis, urls, logs = [], [], []
    try:
        for n in (1, 2):
            port, log = free_port(), tmp_path / f"api-{n}.log"
            env = _worker_env(tmp_path / f"api-{n}-home", tiny_model_dir, auto_train="false", **shared)
            apis.append(_start_api(env, port, log))
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
        for url, log in zip(urls, logs, strict=True):
            wait_for(lambda url=url: _ready(url), 180, "the API replica to load its model", log)
        first, second = RemoteClient(urls[0]), RemoteClient(urls[1])
        user = "replica/ü 1"
        first.add_items(user, _rated(10, prefix="r1-"))
        assert second.user(user).n_items == 10  # written through one replica, read through the other
        rag = second.generate(user, "Recommend a film", method="rag", retriever="dense", max_new_tokens=2)
        assert rag.method == "rag" and len(rag.retrieved) == 4 and all(r.id.startswith("r1-") for r in rag.retrieved)

        trainer_settings = Settings(
            home=tmp_path / "trainer-home",
            model=str(tiny_model_dir),
            auto_train=False,
            lora=FAST_LORA,
            _env_file=None,
            **shared,
        )
        with Personalizer(trainer_settings) as trainer:  # a third process's view: it trains into the shared store
            assert trainer.train(user).version == 1
            for replica in (first, second):  # both load v1 into their adapter caches
                served = replica.generate(user, "Recommend a film", method="peft", max_new_tokens=2)
                assert served.method == "peft" and served.timings.extra["adapter_version"] == 1
            second.add_items(user, _rated(14, prefix="r1-"))  # new items through the other replica
            assert trainer.train(user).version == 2
        for replica in (first, second):  # the next lookup of each replica serves v2, never v1 again
            for _ in range(2):
                served = replica.generate(user, "Recommend a film", method="peft", max_new_tokens=2)
                assert served.timings.extra["adapter_version"] == 2
        assert first.forget(user).adapters == 2
        assert not list((tmp_path / "shared-adapters").rglob("*.safetensors"))
        first.close()
        second.close()
    finally:
        for proc in apis:
            stop_process(proc)
    for log in logs:
        assert "Traceback" not in log.read_text()
