"""The plain serving backend: Hugging Face ``generate`` on the base, users' adapters through peft (an LRU per base).

The reference every faster path is checked against, and the fallback where a fast path does not apply (an
encoder-decoder model, an adapter method it cannot run).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from personalize.adapters.cache import AdapterCache, batching_of, generate_batch, greedy_by_forward
from personalize.adapters.methods import is_prompt_learning
from personalize.results import ServingFacts
from personalize.serving.backend import AdapterRef, DecodeRow, Generated, register_backend
from personalize.serving.modeling import LoadedModel
from personalize.serving.scoring import candidate_log_likelihoods

if TYPE_CHECKING:
    from personalize.settings import Settings


class HFBackend:
    """Greedy decoding with ``model.generate``; one ``AdapterCache`` per base (plain or task-adapted) and peft type
    (peft keeps one type per model: LoRA and IA3 adapters cannot share one)."""

    name = "plain"

    def __init__(self, adapter_cache_size: int = 8, probe: bool = True) -> None:
        self.adapter_cache_size = adapter_cache_size
        self.probe = probe
        self._caches: dict[tuple[str, str], AdapterCache] = {}

    def cache_for(self, loaded: LoadedModel, peft_type: str = "LORA") -> AdapterCache:
        """The user adapters of ``peft_type`` loaded on ``loaded`` (each cache over its own copy of the base)."""
        key = (loaded.name, peft_type)
        if key not in self._caches:
            self._caches[key] = AdapterCache(loaded, capacity=self.adapter_cache_size, probe=self.probe)
        return self._caches[key]

    def adapters_per_batch(self, loaded: LoadedModel) -> int:
        return self.cache_for(loaded).capacity

    def evict(self, user_key: str) -> None:
        for cache in self._caches.values():
            cache.evict_user(user_key)

    def generate(
        self, loaded: LoadedModel, rows: Sequence[DecodeRow], max_new_tokens: int, facts: ServingFacts
    ) -> list[Generated]:
        facts["decoder"] = "plain"
        facts.setdefault("backend", self.name)
        adapters = [row.adapter for row in rows]
        if not any(adapters) and len(rows) == 1:
            return [generate_text(loaded, rows[0].prompt_ids, max_new_tokens)]
        types = {a.peft_type for a in adapters if a is not None}
        if len(types) > 1:  # rows of several methods: each method's rows (and the base rows with LoRA's) apart
            return self._by_peft_type(loaded, rows, max_new_tokens, facts)
        peft_type = next(iter(types), "LORA")
        dora = any(a is not None and a.dora for a in adapters)
        facts["adapter_batching"] = batching_of(peft_type, dora) if len(rows) > 1 else "single"
        cache = self.cache_for(loaded, peft_type)
        with cache.lock:
            t0 = time.perf_counter()
            if len(rows) == 1:
                adapter = adapters[0]
                assert adapter is not None
                hits = [cache.activate(adapter.name, adapter.path)]
            else:
                hits = [cache.ensure_loaded(a.name, a.path) for a in adapters if a is not None]
            facts.setdefault("adapter_cache_hit", all(hits))  # a fast backend that fell back recorded it first
            facts.setdefault("adapter_load_s", time.perf_counter() - t0)
            if len(rows) == 1:
                if is_prompt_learning(peft_type):
                    return [Generated(*greedy_by_forward(loaded, cache.model, rows[0].prompt_ids, max_new_tokens))]
                return [generate_text(loaded, rows[0].prompt_ids, max_new_tokens, model=cache.model)]
            names = [a.name if a else None for a in adapters]
            outputs = generate_batch(cache, [row.prompt_ids for row in rows], names, max_new_tokens)
            return [Generated(text, n) for text, n in outputs]

    def _by_peft_type(
        self, loaded: LoadedModel, rows: Sequence[DecodeRow], max_new_tokens: int, facts: ServingFacts
    ) -> list[Generated]:
        """A batch whose rows use adapters of several methods: each method's rows as a batch of their own."""
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.adapter.peft_type if row.adapter else "LORA", []).append(i)
        out: list[Generated] = [Generated("", 0)] * len(rows)
        batching = []
        for indices in groups.values():
            part: ServingFacts = {}
            outputs = self.generate(loaded, [rows[i] for i in indices], max_new_tokens, part)
            for i, generated in zip(indices, outputs, strict=True):
                out[i] = generated
            batching.append(part.get("adapter_batching", "single"))
            facts.setdefault("adapter_cache_hit", part.get("adapter_cache_hit", True))
        facts["adapter_batching"] = "by method: " + ", ".join(f"{t} {b}" for t, b in zip(groups, batching, strict=True))
        return out

    def score_labels(
        self, loaded: LoadedModel, prompts: Sequence[Sequence[int]], labels: Sequence[str], adapter: AdapterRef | None
    ) -> list[list[float]]:
        if adapter is None:
            return [candidate_log_likelihoods(loaded, ids, labels) for ids in prompts]
        cache = self.cache_for(loaded, adapter.peft_type)
        with cache.lock:
            cache.activate(adapter.name, adapter.path)
            return [candidate_log_likelihoods(loaded, ids, labels, model=cache.model) for ids in prompts]


def generate_text(loaded: LoadedModel, input_ids: Sequence[int], max_new_tokens: int, model: Any = None) -> Generated:
    """Greedy decoding of one prompt; the new text and how many tokens were generated."""
    import torch

    tok = loaded.tokenizer
    ids = torch.tensor([input_ids], dtype=torch.long)
    with torch.inference_mode():
        out = (model or loaded.model).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **loaded.greedy(max_new_tokens)
        )
    new = out[0] if loaded.is_encoder_decoder else out[0, ids.shape[1] :]
    return Generated(tok.decode(new, skip_special_tokens=True).strip(), int(new.shape[0]))


def _plain(settings: Settings, plain: HFBackend) -> HFBackend:
    return plain


register_backend("plain", _plain)

__all__ = ["HFBackend", "generate_text"]
