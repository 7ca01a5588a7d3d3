"""Concurrent generate calls are coalesced into batches, with the same answers as one at a time."""

import threading

import pytest
from conftest import movie_items

from personalize import Personalizer
from personalize.serving.batching import Coalescer, Request


def _submit_all(coalescer: Coalescer, requests: list[Request]) -> list:
    out: list = [None] * len(requests)

    def call(i: int) -> None:
        try:
            out[i] = coalescer.submit(requests[i])
        except Exception as exc:  # noqa: BLE001 (the test inspects it)
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_waiting_requests_share_batches_and_each_gets_its_own_result():
    sizes: list[int] = []

    def run(batch: list[Request]) -> None:
        sizes.append(len(batch))
        assert len({r.max_new_tokens for r in batch}) == 1 and len({r.adapter for r in batch} - {None}) <= 2
        for r in batch:
            r.result = (f"echo {list(r.input_ids)}", r.max_new_tokens)

    coalescer = Coalescer(run, max_batch=4, window_s=0.05, max_adapters=2)
    requests = [Request([i], f"a{i % 3}" if i % 2 else None, 5 if i < 8 else 7) for i in range(10)]
    out = _submit_all(coalescer, requests)
    assert out == [(f"echo {[i]}", 5 if i < 8 else 7) for i in range(10)]
    assert sum(sizes) == 10 and max(sizes) > 1 and max(sizes) <= 4


def test_an_error_reaches_every_caller_of_the_batch_and_nobody_hangs():
    def run(batch: list[Request]) -> None:
        raise RuntimeError("model exploded")

    out = _submit_all(Coalescer(run, window_s=0.05), [Request([i], None, 3) for i in range(5)])
    assert all(isinstance(o, RuntimeError) and "exploded" in str(o) for o in out)


@pytest.mark.parametrize("decoder", ["fast", "plain"])
def test_concurrent_generate_equals_one_at_a_time(settings, decoder):
    settings = settings.model_copy(update={"decoder": decoder, "batch_window_ms": 50.0, "adapter_cache_size": 2})
    with Personalizer(settings) as p:
        users = ["c1", "c2", "c3", "c4"]
        for n, user in enumerate(users):
            p.add_items(user, [{**item, "output": str(1 + (n + i) % 5)} for i, item in enumerate(movie_items(6))])
        for user in users[:3]:  # c4 has no adapter: its peft request falls back to the base model
            p.train(user)
        calls = [(u, m) for u in users for m in ("none", "peft", "rag")]
        sequential = {c: p.generate(c[0], "Pick a film", method=c[1], max_new_tokens=5).text for c in calls}
        results: dict = {}

        def call(c) -> None:  # noqa: ANN001
            results[c] = p.generate(c[0], "Pick a film", method=c[1], max_new_tokens=5)

        threads = [threading.Thread(target=call, args=(c,)) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert {c: r.text for c, r in results.items()} == sequential
        assert max(r.timings.extra["batch_size"] for r in results.values()) > 1
        assert p.serving.coalescer.batches < len(calls) * 2
