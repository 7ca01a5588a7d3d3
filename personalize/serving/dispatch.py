"""Prepared requests to answers: the backend ``Settings.decoder`` names, concurrent calls coalesced into batches.

The personalizer prepares requests (``serving.requests``) and hands them here; how rows are decoded is the
backend's business. Every backend shares the client's plain backend, so a client holds one adapter cache per base.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from personalize.adapters.cache import AdapterCache
from personalize.results import GenerationResult, ServingFacts
from personalize.serving.backend import DecodeRow, ServingBackend
from personalize.serving.backends import backend_for
from personalize.serving.batching import Coalescer, Request, batched_results
from personalize.serving.hf_backend import HFBackend
from personalize.serving.modeling import LoadedModel
from personalize.serving.requests import PreparedRequest, label_scores, request_result
from personalize.settings import Settings


class Dispatcher:
    """One client's serving: its backend (rebuilt when ``settings.decoder`` changes) and its coalescer."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self.plain = HFBackend(settings().adapter_cache_size, settings().adapter_probe)
        self._backend: tuple[str, ServingBackend] | None = None
        self._coalescer: Coalescer | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> ServingBackend:
        settings = self._settings()
        if self._backend is None or self._backend[0] != settings.decoder:
            self._backend = (settings.decoder, backend_for(settings, self.plain))
        return self._backend[1]

    def cache_for(self, loaded: LoadedModel) -> AdapterCache:
        return self.plain.cache_for(loaded)

    @property
    def coalescer(self) -> Coalescer:
        """Batches concurrent ``generate`` calls (``Settings.batch_window_ms``, ``Settings.max_batch``)."""
        with self._lock:
            if self._coalescer is None:
                settings = self._settings()
                self._coalescer = Coalescer(
                    self._run_batch,
                    max_batch=settings.max_batch,
                    window_s=settings.batch_window_ms / 1000,
                    max_adapters=settings.adapter_cache_size,
                )
            return self._coalescer

    def generate(self, prep: PreparedRequest, max_new_tokens: int) -> GenerationResult:
        """One request: through the coalescer when batching is on (``batch_window_ms``), else straight through."""
        t0 = time.perf_counter()
        if self._settings().batch_window_ms > 0:
            request = Request(prep.built.input_ids, prep.adapter, max_new_tokens, model=prep.loaded)
            text, n_new = self.coalescer.submit(request)
            prep.timings.extra.update(request.facts)
        else:
            row = DecodeRow(prep.built.input_ids, prep.adapter)
            [(text, n_new)] = self.backend.generate(prep.loaded, [row], max_new_tokens, prep.timings.extra)
        prep.timings.generation_s = time.perf_counter() - t0
        return request_result(prep, text, n_new)

    def generate_batch(self, preps: Sequence[PreparedRequest], max_new_tokens: int) -> list[GenerationResult]:
        return batched_results(self.backend, preps, max_new_tokens)

    def score_labels(
        self, prep: PreparedRequest, prompt: str, labels: Sequence[str], calibrate: bool
    ) -> GenerationResult:
        """The most likely label as the answer; every label's log-likelihood in the facts."""
        t0 = time.perf_counter()
        scores = label_scores(self.backend, prep, prompt, labels, calibrate)
        prep.timings.generation_s = time.perf_counter() - t0
        prep.timings.extra["label_log_likelihoods"] = dict(zip(labels, scores, strict=True))
        best = max(range(len(labels)), key=lambda i: scores[i])
        return request_result(prep, labels[best], 0)

    def _run_batch(self, batch: list[Request]) -> None:
        facts = ServingFacts()
        rows = [DecodeRow(r.input_ids, r.adapter) for r in batch]
        model = batch[0].model
        assert model is not None  # the personalizer always says which base a request runs on
        outputs = self.backend.generate(model, rows, batch[0].max_new_tokens, facts)
        for request, output in zip(batch, outputs, strict=True):
            request.result = output
            request.facts = ServingFacts(**facts, batch_size=len(batch))


__all__ = ["Dispatcher"]
