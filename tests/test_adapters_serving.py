"""Per-user adapters through Personalizer: training in process, serving with peft / rag+peft, batching, forget."""

import threading
import time

import torch
from conftest import movie_items

from personalize import Personalizer
from personalize.data.naming import user_key as adapter_name
from personalize.jobs.store import Claim

PROMPT = "Which film should I watch tonight?"


def _rated(n: int, prefix: str = "") -> list[dict]:
    return [{**item, "output": str(1 + i % 5)} for i, item in enumerate(movie_items(n, prefix))]


def test_train_writes_a_peft_adapter_and_enqueue_is_a_noop_when_data_is_unchanged(client):
    client.add_items("alice", _rated(12))
    adapter = client.train("alice")
    assert adapter.version == 1 and adapter.n_items == 12 and adapter.size_bytes > 0
    assert adapter.data_version == client.user("alice").data_version
    files = {p.name for p in __import__("pathlib").Path(adapter.path).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "personalize.json"} <= files
    result = client.enqueue_training("alice")
    assert not result.queued and result.job_id is None and "up to date" in result.message
    [job] = client.training_jobs("alice")
    assert job.state == "done" and job.progress == 1.0 and job.adapter_id == adapter.id and job.loss is not None

    client.add_items("alice", _rated(14))  # two new items: a new data version
    assert client.train("alice").version == 2
    assert [a.version for a in client.adapters("alice")] == [1, 2]


def test_peft_and_rag_peft_use_the_adapter_and_fall_back_without_one(client):
    client.add_items("alice", _rated(12))
    client.add_items("bob", _rated(3))
    fallback = client.generate("bob", PROMPT, method="rag+peft", max_new_tokens=3)
    assert fallback.method == "rag" and "no adapter yet" in fallback.notes[0]
    assert client.generate("bob", PROMPT, method="peft", max_new_tokens=3).method == "none"

    client.train("alice")
    peft = client.generate("alice", PROMPT, method="peft", max_new_tokens=4)
    assert peft.method == "peft" and peft.retrieved == [] and peft.timings.extra["adapter_version"] == 1
    assert peft.timings.extra["adapter_cache_hit"] is False
    both = client.generate("alice", PROMPT, method="rag+peft", max_new_tokens=4)
    assert both.method == "rag+peft" and len(both.retrieved) == 4 and both.timings.extra["adapter_cache_hit"] is True
    # the adapter really changes the model, and the shared base model stays untouched
    ids = torch.tensor([client.model.tokenizer("a test sentence").input_ids])
    cache = client.adapter_cache
    with torch.no_grad():
        base = client.model.model(ids).logits
        with cache.lock:
            cache.activate(adapter_name("alice"), __import__("pathlib").Path(client.current_adapter("alice").path))
            tuned = cache.model(ids).logits
    assert not torch.allclose(base, tuned)
    assert torch.equal(base, client.model.model(ids).logits)


def test_generate_batch_equals_one_at_a_time_with_mixed_adapters(client):
    for user in ("u1", "u2", "u3"):
        client.add_items(user, _rated(8, prefix=user))
    client.add_items("no-adapter", _rated(2))
    for user in ("u1", "u2", "u3"):
        client.train(user)
    requests = [("u1", PROMPT), ("no-adapter", "Hi"), ("u2", "Tell me more about films"), ("u3", PROMPT)]
    batched = client.generate_batch(requests, method="peft", max_new_tokens=5)
    single = [client.generate(u, p, method="peft", max_new_tokens=5) for u, p in requests]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.method for r in batched] == ["peft", "none", "peft", "peft"]
    assert batched[0].timings.extra["batch_size"] == 4


def test_adapter_cache_is_bounded_lru(settings):
    # the peft cache serves the plain decoder (the fast one reads adapters into its own LRU: test_adapter_swap.py)
    with Personalizer(settings.model_copy(update={"adapter_cache_size": 2, "decoder": "plain"})) as client:
        for user in ("a", "b", "c"):
            client.add_items(user, _rated(6, prefix=user))
            client.train(user)
        for user in ("a", "b", "c"):
            client.generate(user, PROMPT, method="peft", max_new_tokens=1)
        assert client.adapter_cache.names() == [adapter_name("b"), adapter_name("c")]
        assert client.adapter_cache.evictions == 1


def test_two_jobs_of_one_user_never_train_at_once(client):
    client.add_items("alice", _rated(6))
    first, second = client.jobs.create("alice"), client.jobs.create("alice")
    assert client.jobs.claim(first.id)[0] is Claim.CLAIMED
    assert client.jobs.claim(second.id)[0] is Claim.BUSY
    assert client.jobs.claim(first.id)[0] is Claim.DUPLICATE  # a redelivered message for a live job
    with client.store.session() as s:  # the first job's worker died (a pid that does not exist on this host)
        from personalize.data.schema import TrainingJob

        s.get(TrainingJob, first.id).worker = f"{__import__('socket').gethostname()}:999999999"
    assert client.jobs.claim(second.id)[0] is Claim.CLAIMED
    assert client.jobs.get(first.id).state == "failed"


def test_forget_during_training_leaves_nothing_and_writes_no_adapter(settings, home):
    slow = settings.lora.model_copy(update={"epochs": 200})
    with Personalizer(settings.model_copy(update={"lora": slow})) as client:
        client.add_items("victim", _rated(16))
        job = client.jobs.create("victim")
        outcome: list[str] = []
        thread = threading.Thread(target=lambda: outcome.append(client.run_training_job(job.id)))
        thread.start()
        deadline = time.time() + 60
        while (info := client.jobs.get(job.id)) is None or info.progress == 0:
            assert time.time() < deadline and thread.is_alive()
            time.sleep(0.2)
        report = client.forget("victim")
        thread.join(60)
        assert outcome == ["cancelled"] and report.jobs == 1
        assert not client.adapter_store.user_root("victim").exists()
        assert not list(client.adapter_store.root.rglob("*")) if client.adapter_store.root.exists() else True


def test_retrain_is_queued_when_items_grow(settings):
    auto = settings.model_copy(update={"auto_train": True, "train_min_items": 5})
    with Personalizer(auto) as client:
        assert client.add_items("alice", _rated(3)).training is None
        report = client.add_items("alice", _rated(6))
        assert report.training.startswith("training queued")
        assert client.enqueue_training("alice").message.startswith("already queued")
        assert [j.state for j in client.training_jobs("alice")] == ["queued"]
