"""Lost-worker detection: a dead local pid or (for another host) a stale heartbeat; never a live local worker."""

import os
import subprocess
import sys
import time

from conftest import movie_items

from personalize import Personalizer
from personalize.adapters.store import temp_prefix
from personalize.jobs.store import Claim, Jobs, worker_identity


def test_stale_heartbeats_reclaim_remote_workers_but_not_a_live_local_one(client):
    for user in ("remote", "local"):
        client.add_items(user, movie_items(3, prefix=user))
    jobs = Jobs(client.store, stale_after_s=0.2)
    remote, local = jobs.create("remote"), jobs.create("local")
    assert jobs.claim(remote.id, worker="another-host:4242")[0] is Claim.CLAIMED
    assert jobs.claim(local.id, worker=worker_identity())[0] is Claim.CLAIMED  # this live process
    time.sleep(0.5)  # both heartbeats are now older than stale_after
    assert jobs.recover_stale() == [remote.id]
    assert jobs.get(remote.id).state == "queued" and jobs.get(local.id).state == "running"


def test_a_dead_local_worker_is_reclaimed_at_once(client):
    client.add_items("gone", movie_items(3))
    jobs = Jobs(client.store, stale_after_s=3600)
    job = jobs.create("gone")
    host = worker_identity().rsplit(":", 1)[0]
    assert jobs.claim(job.id, worker=f"{host}:999999999")[0] is Claim.CLAIMED  # no such pid
    assert jobs.recover_stale() == [job.id]


def _dead_local_worker() -> str:
    """``host:pid`` of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{worker_identity().rsplit(':', 1)[0]}:{child.pid}"


def test_a_redelivery_counts_as_an_attempt(settings):
    """JOB_MAX_ATTEMPTS=1: a job whose worker was killed once is failed when its message comes back, not retried."""
    with Personalizer(settings, job_max_attempts=1) as p:
        p.add_items("once", movie_items(3))
        job = p.jobs.create("once")
        assert p.jobs.claim(job.id, worker=_dead_local_worker())[0] is Claim.CLAIMED  # attempt 1, then kill -9
        assert p.run_training_job(job.id) == "gone"  # the redelivered message: what the worker's task runs
        final = p.jobs.get(job.id)
        assert (final.state, final.attempts) == ("failed", 1) and "lost after 1 attempt(s)" in final.error
        assert p.adapters("once") == []


def test_redeliveries_retry_up_to_max_attempts(client):
    client.add_items("twice", movie_items(3))
    jobs = Jobs(client.store, stale_after_s=3600, max_attempts=2)
    job = jobs.create("twice")
    assert jobs.claim(job.id, worker=_dead_local_worker())[0] is Claim.CLAIMED
    claim, info = jobs.claim(job.id, worker=_dead_local_worker())  # redelivered once: attempt 2 of 2
    assert claim is Claim.CLAIMED and info.attempts == 2
    assert jobs.claim(job.id)[0] is Claim.GONE and jobs.get(job.id).state == "failed"


def test_stale_adapter_temp_folders_are_removed_by_recovery(client):
    client.add_user("saver")
    folder = client.adapter_store.user_root("saver")
    folder.mkdir(parents=True)
    host = worker_identity().rsplit(":", 1)[0]
    dead = folder / f".v0001.tmp-{_dead_local_worker().replace(':', '-')}-abc123"  # killed mid-save
    live = folder / f"{temp_prefix('v0002')}xyz789"  # a save under way in this live process
    remote = folder / ".v0003.tmp-otherhost-4242-qq11"  # another machine's save, recent
    legacy = folder / ".v0004.tmp-k2j3h4"  # an older name without a writer
    ancient = folder / ".v0005.tmp-9f8e7d"
    for path in (dead, live, remote, legacy, ancient):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(ancient, (hour_ago, hour_ago))
    assert host in live.name and str(os.getpid()) in live.name
    client.recover_jobs()  # what a worker runs when it starts, and every job_recover_every_s
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (live, remote, legacy))
