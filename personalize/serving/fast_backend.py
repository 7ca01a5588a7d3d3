"""The CPU fast serving backend: the fast decoder (8-bit or fp32 weights, per-row LoRA), the plain one as fallback.

Adapters still load through the plain backend's peft cache (LRU); their LoRA matrices are copied into the
decoder's per-row tables, so a batch mixes users' adapters in one pass. Whatever the fast decoder cannot run (an
encoder-decoder model, a method other than LoRA, a LoRA config it does not support) runs on the plain backend,
and the answer's facts say why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from personalize.adapters.methods import unsupported_peft_type_reason
from personalize.cpu.fastpath import FastDecoder, WeightFormat, decoder_for, fast_weights, unsupported_reason
from personalize.results import ServingFacts
from personalize.serving.backend import AdapterRef, DecodeRow, Generated, register_backend
from personalize.serving.hf_backend import HFBackend
from personalize.serving.modeling import LoadedModel

if TYPE_CHECKING:
    from personalize.settings import Settings


class FastBackend:
    """The fast decoder where it applies; ``fp32_only`` keeps fp32 weights (``Settings.decoder == "fast-fp32"``)."""

    def __init__(self, plain: HFBackend, *, fp32_only: bool = False) -> None:
        self.plain = plain
        self.fp32_only = fp32_only
        self.name = "fast-fp32" if fp32_only else "fast"

    def decoder(self, loaded: LoadedModel) -> tuple[FastDecoder | None, str | None]:
        """The fast decoder for ``loaded`` and a note on why it is not the best one, or None and why not."""
        if loaded.is_encoder_decoder:
            return None, "encoder-decoder model"
        reason = unsupported_reason(loaded.model)
        if reason:
            return None, reason
        weights: WeightFormat = "fp32"
        note = None
        if not self.fp32_only:
            weights, note = fast_weights(loaded.model)
        return decoder_for(loaded, weights), note

    def adapters_per_batch(self, loaded: LoadedModel) -> int:
        return self.plain.adapters_per_batch(loaded)

    def evict(self, user_key: str) -> None:
        self.plain.evict(user_key)

    def generate(
        self, loaded: LoadedModel, rows: Sequence[DecodeRow], max_new_tokens: int, facts: ServingFacts
    ) -> list[Generated]:
        facts.setdefault("backend", self.name)
        decoder, why = self.decoder(loaded)
        loras: list[Any] = [None] * len(rows)
        adapters = [row.adapter for row in rows]
        if any(adapters):
            decoder, reason, loras = self._load_adapters(loaded, decoder, adapters, facts)
            why = reason or why
        if decoder is None:
            facts_note = f"fast path not used: {why}" if why else None
            outputs = self.plain.generate(loaded, rows, max_new_tokens, facts)
            if facts_note:
                facts["decoder_note"] = facts_note
            return outputs
        facts["decoder"] = f"fast-{decoder.weights}"
        if why:
            facts["decoder_note"] = why
        tok = loaded.tokenizer
        prompts = [row.prompt_ids for row in rows]
        out = decoder.generate(prompts, max_new_tokens, loaded.eos_ids, loaded.pad_id, loras)
        return [Generated(tok.decode(r, skip_special_tokens=True).strip(), len(r)) for r in out]

    def _load_adapters(
        self,
        loaded: LoadedModel,
        decoder: FastDecoder | None,
        adapters: Sequence[AdapterRef | None],
        facts: ServingFacts,
    ) -> tuple[FastDecoder | None, str | None, list[Any]]:
        """Load each adapter (LRU) and copy its LoRA matrices out, so decoding needs no lock; a row the decoder
        cannot run turns the whole batch over to the plain backend (None and why)."""
        t0 = time.perf_counter()
        for adapter in adapters:  # the allow-list: only methods registered with fast_decoding reach the decoder
            reason = adapter and unsupported_peft_type_reason(adapter.peft_type, "fast_decoding", "the fast decoder")
            if reason:
                return None, reason, [None] * len(adapters)  # the plain backend loads (and times) them
        cache = self.plain.cache_for(loaded)
        loras: list[Any] = [None] * len(adapters)
        hits: list[bool] = []
        why = None
        with cache.lock:
            for row, adapter in enumerate(adapters):
                if adapter is None:
                    continue
                hits.append(cache.ensure_loaded(adapter.user_key, adapter.path))
                if decoder is None:
                    continue
                reason = decoder.lora_unsupported_reason(cache.model, adapter.user_key)
                if reason:
                    decoder, why = None, reason
                else:
                    loras[row] = decoder.lora_weights(cache.model, adapter.user_key, str(adapter.path))
        facts["adapter_cache_hit"] = all(hits)
        facts["adapter_load_s"] = time.perf_counter() - t0
        return decoder, why, loras

    def score_labels(
        self, loaded: LoadedModel, prompts: Sequence[Sequence[int]], labels: Sequence[str], adapter: AdapterRef | None
    ) -> list[list[float]]:
        """Label scoring is one forward pass per prompt: the plain backend's."""
        return self.plain.score_labels(loaded, prompts, labels, adapter)


def _fast(settings: Settings, plain: HFBackend) -> FastBackend:
    return FastBackend(plain)


def _fast_fp32(settings: Settings, plain: HFBackend) -> FastBackend:
    return FastBackend(plain, fp32_only=True)


register_backend("fast", _fast)
register_backend("fast-fp32", _fast_fp32)

__all__ = ["FastBackend"]
