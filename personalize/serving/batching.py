"""Concurrent ``generate`` calls share batched forward passes.

Why: decoding one token reads every weight of the model, whatever the batch size, so on a CPU a batch of 8 rows
costs little more than one row. When several threads call ``Personalizer.generate`` at once, the first becomes the
leader: it waits ``window_s`` for others to arrive, takes up to ``max_batch`` waiting requests with the same
``max_new_tokens`` and runs them as one batch (each row with its own user's adapter); then leadership passes to
any thread still waiting. Greedy results are the same as one request at a time (the batch tests check this).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from personalize.results import GenerationResult, ServingFacts
from personalize.serving.backend import AdapterRef, DecodeRow, ServingBackend
from personalize.serving.modeling import LoadedModel
from personalize.serving.requests import PreparedRequest, request_result


@dataclass
class Request:
    """One caller's prompt: encoded ids, its adapter or None, and how many tokens to make."""

    input_ids: Sequence[int]
    adapter: AdapterRef | None
    max_new_tokens: int
    result: tuple[str, int] | None = None
    error: BaseException | None = None
    facts: ServingFacts = field(default_factory=lambda: ServingFacts())
    done: bool = False
    model: LoadedModel | None = None  # the base it runs on (plain or task-adapted): a batch shares one


RunBatch = Callable[[list[Request]], None]  # fills result (or raises) for every request of the batch


class Coalescer:
    """Groups concurrent requests into batches run by one of the waiting threads (no background thread)."""

    def __init__(self, run_batch: RunBatch, max_batch: int = 8, window_s: float = 0.002, max_adapters: int = 8) -> None:
        self.run_batch = run_batch
        self.max_batch = max(1, max_batch)
        self.max_adapters = max(1, max_adapters)  # distinct adapters per batch: the adapter cache must hold them
        self.window_s = max(0.0, window_s)
        self._cond = threading.Condition()
        self._pending: list[Request] = []
        self._leading = False
        self.batches = 0
        self.requests = 0

    def submit(self, request: Request) -> tuple[str, int]:
        """Run ``request`` (in a batch with whatever else is waiting) and return its (text, new tokens)."""
        with self._cond:
            self._pending.append(request)
            self.requests += 1
            while not request.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                self._cond.release()
                try:
                    self._lead_one_batch()
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _lead_one_batch(self) -> None:
        if self.window_s:
            time.sleep(self.window_s)  # let concurrent callers join this batch
        with self._cond:
            first = self._pending[0]
            batch: list[Request] = []
            adapters: set[Any] = set()
            for r in self._pending:
                if len(batch) == self.max_batch:
                    break
                if r.max_new_tokens != first.max_new_tokens or r.model is not first.model:
                    continue
                if r.adapter is not None and r.adapter not in adapters:
                    if len(adapters) == self.max_adapters:
                        continue
                    adapters.add(r.adapter)
                batch.append(r)
            taken = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in taken]
            self.batches += 1
        try:
            self.run_batch(batch)
        except BaseException as exc:  # every caller of the batch gets the error, none hangs
            for r in batch:
                r.error = exc
        finally:
            for r in batch:
                r.done = True


def batched_results(
    backend: ServingBackend, preps: Sequence[PreparedRequest], max_new_tokens: int
) -> list[GenerationResult]:
    """Serve prepared requests in batched forward passes (``Personalizer.generate_batch``): one base per batch and
    at most as many distinct adapters as a batch may hold; results in the requests' order."""
    results: dict[int, GenerationResult] = {}
    for chunk in _batches(preps, backend):
        t0 = time.perf_counter()
        facts = ServingFacts()
        rows = [DecodeRow(preps[i].built.input_ids, preps[i].adapter) for i in chunk]
        outputs = backend.generate(preps[chunk[0]].loaded, rows, max_new_tokens, facts)
        for i, (text, n_new) in zip(chunk, outputs, strict=True):
            preps[i].timings.generation_s = time.perf_counter() - t0
            preps[i].timings.extra.update(facts)
            preps[i].timings.extra["batch_size"] = len(chunk)
            results[i] = request_result(preps[i], text, n_new)
    return [results[i] for i in range(len(preps))]


def _batches(preps: Sequence[PreparedRequest], backend: ServingBackend) -> Iterator[list[int]]:
    order = list(range(len(preps)))
    while order:
        loaded = preps[order[0]].loaded
        capacity = backend.adapters_per_batch(loaded)
        chunk: list[int] = []
        names: set[str] = set()
        for i in list(order):
            ref = preps[i].adapter
            if preps[i].loaded is not loaded:
                continue
            if ref is not None and ref.name not in names and len(names) >= capacity:
                continue
            if ref is not None:
                names.add(ref.name)
            chunk.append(i)
            order.remove(i)
        yield chunk


__all__ = ["Coalescer", "Request", "batched_results"]
