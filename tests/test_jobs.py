"""Lost-worker detection: a dead local pid or (for another host) a stale heartbeat; never a live local worker."""

import time

from conftest import movie_items

from personalize.jobs import Claim, Jobs, worker_identity


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
