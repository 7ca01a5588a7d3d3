"""The CPU fast serving backend: the fast decoder (8-bit or fp32 weights, per-row LoRA, IA3 or virtual tokens), the
plain one as fallback.

A LoRA adapter is read from its folder straight into the decoder's per-row tables (``fastpath.read_lora_pairs``,
an LRU of tables per decoder: no ``PeftModel``, no module walk), probed on the decoder itself, so a batch mixes
users' adapters in one pass; IA3's scales (``ia3_scales``) and a prompt-learning adapter's virtual tokens
(``virtual_tokens``) likewise. A LoRA the table reader does not cover loads through the plain backend's peft cache,
its matrices copied out. Whatever the fast decoder cannot run (an encoder-decoder model, a LoRA config or a
folder it does not support) runs on the plain backend, and the answer's facts say why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from personalize.adapters.cache import PROBE_ATOL, TableCache, check_adapter_folder, probe_ids
from personalize.adapters.methods import is_prompt_learning, peft_type_name, unsupported_peft_type_reason
from personalize.cpu.adapter_files import read_adapter_config
from personalize.cpu.fastpath import (
    DirectReadUnsupported,
    FastDecoder,
    LoraPairs,
    WeightFormat,
    decoder_for,
    fast_weights,
    join_lora_pairs,
    read_lora_pairs,
    unsupported_reason,
)
from personalize.cpu.ia3_scales import IA3Scales, read_ia3_scales
from personalize.cpu.virtual_tokens import VirtualTokens, read_virtual_tokens
from personalize.errors import AdapterHasNoEffectError
from personalize.results import ServingFacts
from personalize.serving.backend import AdapterRef, DecodeRow, Generated, register_backend
from personalize.serving.hf_backend import HFBackend
from personalize.serving.modeling import LoadedModel

if TYPE_CHECKING:
    from personalize.settings import Settings

# an adapter adding more than this to a projection's output on the probe changes the logits (by far more than
# PROBE_ATOL): the probe needs no forward pass of its own
CLEAR_EFFECT = 1e-3


class FastBackend:
    """The fast decoder where it applies; ``fp32_only`` keeps fp32 weights (``Settings.decoder == "fast-fp32"``)."""

    def __init__(self, plain: HFBackend, *, fp32_only: bool = False) -> None:
        self.plain = plain
        self.fp32_only = fp32_only
        self.name = "fast-fp32" if fp32_only else "fast"
        self._tables: dict[int, TableCache[LoraPairs]] = {}  # per decoder (id): its users' adapters as tables
        # per decoder: its users' other adapters, likewise (prompt learning: virtual tokens; IA3: scales)
        self._others: dict[int, TableCache[VirtualTokens | IA3Scales]] = {}
        self._probe_base: dict[int, Any] = {}  # per decoder: its logits on the probe with no user adapter

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
        for tables in self._tables.values():
            tables.evict_user(user_key)
        for others in self._others.values():
            others.evict_user(user_key)

    def tables_for(self, loaded: LoadedModel, decoder: FastDecoder) -> TableCache[LoraPairs]:
        """The LRU of ``decoder``'s users' adapters read as tables (as many as the plain backend's peft cache)."""
        key = id(decoder)
        if key not in self._tables:

            def load(name: str, path: Any) -> LoraPairs:
                return self._read_adapter(loaded, decoder, name, path)

            self._tables[key] = TableCache(load, self.plain.adapter_cache_size)
        return self._tables[key]

    def others_for(self, loaded: LoadedModel, decoder: FastDecoder) -> TableCache[VirtualTokens | IA3Scales]:
        """The LRU of ``decoder``'s users' adapters of the other fast-decoded methods: prompt-learning ones read as
        virtual tokens, IA3 as scales."""
        key = id(decoder)
        if key not in self._others:

            def load(name: str, path: Any) -> VirtualTokens | IA3Scales:
                return self._read_other(loaded, decoder, name, path)

            self._others[key] = TableCache(load, self.plain.adapter_cache_size)
        return self._others[key]

    def _read_other(self, loaded: LoadedModel, decoder: FastDecoder, name: str, path: Any) -> VirtualTokens | IA3Scales:
        """One IA3 or prompt-learning adapter as the decoder takes it, refused as the peft cache refuses (the
        probe: its logits on the probe input must move beyond float noise)."""
        check_adapter_folder(path, loaded.name)
        config = read_adapter_config(path)
        found: VirtualTokens | IA3Scales
        if is_prompt_learning(config.get("peft_type")):
            found = read_virtual_tokens(path, decoder.shape, config)
        else:
            found = read_ia3_scales(path, len(decoder.layers), config)
        if self.plain.probe:
            ids = probe_ids(loaded)
            base = self._probe_logits(decoder, ids)
            if isinstance(found, VirtualTokens):
                logits = decoder.last_logits(ids, virtual=found)
            else:
                logits = decoder.last_logits(ids, scales=found)
            change = float((logits - base).abs().max())
            if not change > PROBE_ATOL:
                raise AdapterHasNoEffectError(name, path, change)
        return found

    def _probe_logits(self, decoder: FastDecoder, ids: list[int]) -> Any:
        """The decoder's inputs and logits on the probe with no user adapter (computed once per decoder)."""
        key = id(decoder)
        if key not in self._probe_base:
            self._probe_base[key] = (decoder.probe_inputs(ids), decoder.last_logits(ids))
        return self._probe_base[key][1]

    def _read_adapter(self, loaded: LoadedModel, decoder: FastDecoder, name: str, path: Any) -> LoraPairs:
        """One adapter folder as ``decoder``'s tables (joined with its resident LoRA), refused like the peft cache
        refuses: an incomplete folder, another base, or (``probe``) no change to the logits on the probe input."""
        check_adapter_folder(path, loaded.name)
        own = read_lora_pairs(path, len(decoder.layers))
        pairs = join_lora_pairs(decoder.resident, own) if decoder.resident else own
        if self.plain.probe:
            self._probe(loaded, decoder, name, path, own, pairs)
        return pairs

    def _probe(
        self, loaded: LoadedModel, decoder: FastDecoder, name: str, path: Any, own: LoraPairs, pairs: LoraPairs
    ) -> None:
        """Refuse (``AdapterHasNoEffectError``) an adapter that leaves the decoder's logits on the probe input as
        the base's, like the peft cache. What it adds to its projections on the probe decides in a millisecond when
        it is clearly non-zero (or exactly zero); in between, the logits of a whole forward pass decide."""
        ids = probe_ids(loaded)
        self._probe_logits(decoder, ids)
        inputs, base = self._probe_base[id(decoder)]
        effect = decoder.lora_effect(inputs, own)
        if effect > CLEAR_EFFECT:
            return
        change = float((decoder.last_logits(ids, pairs) - base).abs().max()) if effect > 0 else 0.0
        if not change > PROBE_ATOL:
            raise AdapterHasNoEffectError(name, path, change)

    def generate(
        self, loaded: LoadedModel, rows: Sequence[DecodeRow], max_new_tokens: int, facts: ServingFacts
    ) -> list[Generated]:
        facts.setdefault("backend", self.name)
        decoder, why = self.decoder(loaded)
        loras: list[Any] = [None] * len(rows)
        others: list[VirtualTokens | IA3Scales | None] = [None] * len(rows)
        adapters = [row.adapter for row in rows]
        if any(adapters):
            decoder, reason, loras, others = self._load_adapters(loaded, decoder, adapters, facts)
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
        if any(adapters):  # every row its own adapter (LoRA tables or virtual tokens) in one pass
            facts["adapter_batching"] = "mixed" if len(rows) > 1 else "single"
        tok = loaded.tokenizer
        prompts = [row.prompt_ids for row in rows]
        virtual = [o if isinstance(o, VirtualTokens) else None for o in others]
        scales = [o if isinstance(o, IA3Scales) else None for o in others]
        out = decoder.generate(prompts, max_new_tokens, loaded.eos_ids, loaded.pad_id, loras, virtual, scales)
        return [Generated(tok.decode(r, skip_special_tokens=True).strip(), len(r)) for r in out]

    def _load_adapters(
        self,
        loaded: LoadedModel,
        decoder: FastDecoder | None,
        adapters: Sequence[AdapterRef | None],
        facts: ServingFacts,
    ) -> tuple[FastDecoder | None, str | None, list[Any], list[VirtualTokens | IA3Scales | None]]:
        """Read each adapter into the decoder's tables (LRU): LoRA tables, a prompt-learning adapter's virtual
        tokens, or IA3's scales; where the LoRA reader does not cover one, load it into peft (LRU) and copy its
        matrices out, so decoding needs no lock. A row the decoder cannot run turns the whole batch over to the plain
        backend (None and why)."""
        t0 = time.perf_counter()
        nothing: list[Any] = [None] * len(adapters)
        for adapter in adapters:  # the allow-list: only methods registered with fast_decoding reach the decoder
            reason = adapter and unsupported_peft_type_reason(adapter.peft_type, "fast_decoding", "the fast decoder")
            if reason:
                return None, reason, nothing, nothing  # the plain backend loads (and times) them
        loras: list[Any] = [None] * len(adapters)
        others: list[VirtualTokens | IA3Scales | None] = [None] * len(adapters)
        hits: list[bool] = []
        why = None
        for row, adapter in enumerate(adapters):
            if adapter is None:
                continue
            if peft_type_name(adapter.peft_type) != "LORA":
                if decoder is None:
                    return None, why, nothing, nothing
                try:
                    others[row], hit = self.others_for(loaded, decoder).get(adapter.name, adapter.path)
                except DirectReadUnsupported as exc:  # peft's own path serves it, saying why
                    return None, f"{adapter.peft_type} adapter not read: {exc}", nothing, nothing
                hits.append(hit)
                continue
            if decoder is not None:
                try:
                    loras[row], hit = self.tables_for(loaded, decoder).get(adapter.name, adapter.path)
                    hits.append(hit)
                    continue
                except DirectReadUnsupported:
                    pass  # peft reads it below
            cache = self.plain.cache_for(loaded)
            with cache.lock:
                hits.append(cache.ensure_loaded(adapter.name, adapter.path))
                if decoder is None:
                    continue
                reason = decoder.lora_unsupported_reason(cache.model, adapter.name)
                if reason:
                    decoder, why = None, reason
                else:
                    loras[row] = decoder.lora_weights(cache.model, adapter.name, str(adapter.path))
        facts["adapter_cache_hit"] = all(hits)
        facts["adapter_load_s"] = time.perf_counter() - t0
        if decoder is None:
            return None, why, nothing, nothing
        return decoder, why, loras, others

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
