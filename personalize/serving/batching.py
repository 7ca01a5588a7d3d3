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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One caller's prompt: encoded ids, its adapter (name, folder) or None, and how many tokens to make."""

    input_ids: Sequence[int]
    adapter: Any
    max_new_tokens: int
    result: tuple[str, int] | None = None
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    model: Any = None  # the LoadedModel it runs on (plain or task-adapted base): a batch shares one


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


__all__ = ["Coalescer", "Request"]
