"""A real `celery -A workers worker` process trains adapters, on the embedded broker and on Redis."""

import os
import signal
from pathlib import Path

import pytest
from conftest import REDIS_URL, movie_items, need_service, start_worker, stop_process, wait_for

from personalize import Personalizer, Settings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _rated(n: int, prefix: str = "") -> list[dict]:
    return [{**item, "output": str(1 + i % 5)} for i, item in enumerate(movie_items(n, prefix))]


def _env(settings: Settings, broker: str | None, epochs: int) -> dict[str, str]:
    env = {
        **os.environ,
        "PERSONALIZE_HOME": str(settings.home),
        "PERSONALIZE_MODEL": settings.model,
        "PERSONALIZE_LORA__EPOCHS": str(epochs),
        "PERSONALIZE_LORA__BATCH_SIZE": "4",
        "PERSONALIZE_LORA__MAX_LENGTH": "64",
        "PERSONALIZE_JOB_STALE_AFTER_S": "20",
        "PERSONALIZE_TORCH_THREADS": "1",
    }
    if broker:
        env["PERSONALIZE_BROKER_URL"] = broker
    return env


@pytest.fixture(params=["embedded", "redis"])
def broker(request) -> str | None:
    if request.param == "embedded":
        return None
    need_service("127.0.0.1", 6379, "Redis")
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(url).flushdb()
    return url


def test_worker_trains_queued_users_and_adapters_serve(settings, broker, tmp_path):
    env = _env(settings, broker, epochs=1)
    client_settings = settings.model_copy(update={"broker_url": broker})
    log = tmp_path / "worker.log"
    with Personalizer(client_settings) as client:
        for user in ("w1", "w2"):
            client.add_items(user, _rated(8, prefix=user))
        results = [client.enqueue_training(u) for u in ("w1", "w2")]
        assert all(r.queued for r in results)
        worker = start_worker(env, log)
        try:
            wait_for(lambda: all(client.current_adapter(u) for u in ("w1", "w2")), 240, "two adapters", log)
            jobs = {j.user_id: j for j in client.training_jobs()}
            assert {j.state for j in jobs.values()} == {"done"} and all(j.attempts == 1 for j in jobs.values())
            assert "up to date" in client.enqueue_training("w1").message
            result = client.generate("w1", "Recommend a film", method="peft", max_new_tokens=3)
            assert result.method == "peft"
        finally:
            stop_process(worker)


def test_worker_killed_mid_training_leaves_no_partial_adapter_and_job_completes(settings, tmp_path):
    env = _env(settings, None, epochs=300)  # long enough to be killed in the middle
    log = tmp_path / "worker.log"
    with Personalizer(settings) as client:
        client.add_items("victim", _rated(12))
        job_id = client.enqueue_training("victim").job_id
        worker = start_worker(env, log)
        try:
            running = wait_for(
                lambda: (j := client.jobs.get(job_id)) and j.state == "running" and j.progress > 0 and j,
                180,
                "training to start",
                log,
            )
            pid = int(running.worker.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)  # the pool process that is training
            # the worker requeues the lost message; the job is reclaimed (dead pid) and finishes, or is failed
            final = wait_for(
                lambda: (j := client.jobs.get(job_id)) and j.state in ("done", "failed") and j,
                400,
                "the job to end after the kill",
                log,
            )
        finally:
            stop_process(worker)
        assert final.attempts >= 2 or final.state == "failed"
        leftovers = [p for p in client.adapter_store.root.rglob("*") if ".tmp-" in p.name]
        assert leftovers == []
        for adapter in client.adapters("victim"):
            assert (Path(adapter.path) / "personalize.json").is_file()
        if final.state == "done":
            assert client.generate("victim", "hi", method="peft", max_new_tokens=2).method == "peft"
