"""A fast greedy decoder for Llama-family causal LMs on the CPU, with per-row LoRA adapters read from peft.

Why: Hugging Face ``generate`` on a 135M model spends most of each decoding step in Python (cache objects, logits
processors, masks built per step, a module call per op), and ``F.linear``'s matrix-vector product reads weights at
half the speed of the same product against a transposed contiguous copy. This decoder keeps every weight
transposed and contiguous (``x @ W_t``), fuses q/k/v and gate/up into one matrix each, preallocates a static KV
cache, builds the masks once per call, and runs the output layer only on the last position. Greedy results are the
same tokens as ``model.generate`` up to fp32 summation order.

``weights="q8"`` (the default) holds each linear layer as 8-bit codes with a scale and offset per 32 inputs
(``quantization``): a quarter of fp32's bytes to read per token, fp32 arithmetic, and exactly the weights of the
bundled GGUF (Q4_1 layers, Q8_0 output). Each decoding step then runs in one C call (``quantization.decode_step``:
norms, rotary, cache writes, attention, SwiGLU and LoRA included); the prompt (prefill) still runs here in torch,
with the weights dequantised per layer into a GEMM. ``weights="fp32"`` keeps transposed fp32 copies and runs every
step in torch: the path when no C compiler is at hand (``fast_weights`` says which applies and why).

A base with a task adapter merged into it (``task_adapters.task_model``) is decoded with 8-bit weights as the
*unmerged* base plus the task LoRA as a resident adapter on every row (``resident``): 8-bit codes re-derived from
merged weights are no longer the GGUF's exact weights and changed 1-2 of 30 greedy answers, while base codes plus
``(x @ A_t) @ B_t`` are the merged weights up to fp32 summation order. A row's own adapter is then concatenated with
the resident one (ranks add), so the C step and mixed batches need nothing new.

LoRA adapters stay in peft's format. The decoder reads an adapter folder's ``adapter_model.safetensors`` and
``adapter_config.json`` straight into its tables (``read_lora_pairs``: a few ms, where peft's load walks every module
of the model for hundreds), or, for what that reader does not cover, ``lora_A``/``lora_B``/``scaling`` of an adapter
loaded into a ``PeftModel`` (the ``AdapterCache``); either way the same tensors. It adds ``scale * (x @ A_t) @ B_t``
to the layer's output, per row, so one batch can mix users. Which adapters it takes is an allow-list on their peft
type: only methods registered with ``fast_decoding`` (``adapter_methods``), and as LoRA tables only LoRA's, so an
adapter of another method (which has no ``lora_A``) is never decoded as the base model. IA3 comes as ``IA3Scales``
(``ia3_scales``: per-row vectors on projection outputs and inputs, in the torch steps). Prompt tuning, P-tuning
and prefix tuning come as ``VirtualTokens`` (``virtual_tokens``): cache slots before a row's prompt, filled by the
prefill with their embeddings, or with a prefix's keys and values; decoding steps then need nothing new. Anything
else it does not handle (another architecture, DoRA, LoRA on embeddings, biases) is reported by
``unsupported_reason`` / ``lora_unsupported_reason`` and the caller falls back to the plain path.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

from personalize.adapters.methods import is_prompt_learning, peft_type_name, unsupported_peft_type_reason
from personalize.cpu.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config, read_adapter_tensors
from personalize.cpu.ia3_scales import IA3Scales
from personalize.cpu.quantization import (
    GROUP,
    QDims,
    QLayer,
    QMatrix,
    QuantizedLinear,
    decode_step,
    kernel_unavailable_reason,
    quantize,
)
from personalize.cpu.virtual_tokens import DecoderShape, VirtualTokens
from personalize.errors import DirectReadUnsupported

WeightFormat = Literal["q8", "fp32"]
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot run ``model`` (None when it can)."""
    import torch

    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        return f"architecture {getattr(config, 'model_type', type(model).__name__)!r} is not a Llama-family decoder"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the fast path implements silu)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "linear layers with biases"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "weights are not fp32"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        return f"rope type {rope.get('rope_type')!r}"
    return None


def _not_allowed(peft_config: Any) -> str | None:
    """Why the decoder may not serve an adapter with this peft config as LoRA tables, by its peft type: only
    methods registered with ``fast_decoding`` (``adapter_methods``) pass, on the torch steps and the C step alike,
    and of those only the ones that are not virtual tokens (those are ``VirtualTokens``, never LoRA tables)."""
    peft_type = getattr(peft_config, "peft_type", None)
    reason = unsupported_peft_type_reason(peft_type, "fast_decoding", "the fast decoder")
    if reason is None and is_prompt_learning(peft_type):
        return f"{peft_type_name(peft_type)} adapters are virtual tokens, not LoRA tables"
    if reason is None and peft_type_name(peft_type) != "LORA":
        return f"{peft_type_name(peft_type)} adapters are not LoRA tables"
    return reason


@dataclass
class _Linear:
    """One (possibly fused) fp32 linear layer, held transposed: ``x @ W_t`` with ``W_t`` (in, out) contiguous."""

    w_t: Any

    def __call__(self, x: Any) -> Any:
        return x @ self.w_t


def _make_linear(weights: Sequence[Any], fmt: WeightFormat) -> _Linear | QuantizedLinear:
    import torch

    w = torch.cat([t.detach().float() for t in weights], dim=0)  # (out, in)
    return quantize(w) if fmt == "q8" else _Linear(w.t().contiguous())


def fast_weights(model: Any) -> tuple[WeightFormat, str | None]:
    """The weight format the fast path uses for ``model``: q8 where its C kernel builds here and every layer's
    input width is a multiple of the 32-wide groups, else fp32, with why."""
    reason = kernel_unavailable_reason()
    if reason is None:
        config = model.config
        widths = {config.hidden_size, config.intermediate_size}
        heads = config.num_attention_heads * (getattr(config, "head_dim", None) or 0)
        widths |= {heads} if heads else set()
        if any(w % GROUP for w in widths):
            reason = f"a layer width ({sorted(widths)}) is not a multiple of {GROUP}"
    return ("fp32", f"8-bit weights unavailable ({reason}): fp32 weights") if reason else ("q8", None)


@dataclass
class _Layer:
    ln1: Any
    ln2: Any
    qkv: _Linear | QuantizedLinear
    o: _Linear | QuantizedLinear
    gate_up: _Linear | QuantizedLinear
    down: _Linear | QuantizedLinear


@dataclass
class _LoraPair:
    a_t: Any  # (in, r)
    b_t: Any  # (r, out), scaling folded in


LoraPairs = dict[tuple[int, str], _LoraPair]


@dataclass
class ProjectionInputs:
    """One layer's projection inputs on a prompt (B, S, in): what a LoRA on each projection multiplies."""

    attn_in: Any  # q_proj, k_proj, v_proj
    o_in: Any
    mlp_in: Any  # gate_proj, up_proj
    down_in: Any

    def of(self, proj: str) -> Any:
        if proj in _ATTN:
            return self.attn_in
        if proj in _MLP_IN:
            return self.mlp_in
        return self.o_in if proj == "o_proj" else self.down_in


_PARTS = [("attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")
]


def lora_config_unsupported_reason(config: Any) -> str | None:
    """Why an adapter with this peft config cannot run on the fast path (None when it can)."""
    reason = _not_allowed(config)  # an allow-list: only what the decoder implements, never "no LoRA layers found"
    if reason:
        return reason
    if getattr(config, "use_dora", False):
        return "DoRA adapters"
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        return "LoRA with biases"
    targets = getattr(config, "target_modules", None)
    targets = {targets} if isinstance(targets, str) else set(targets or ())
    if not targets <= set(_PROJECTIONS):
        return f"LoRA on {sorted(targets - set(_PROJECTIONS))}"
    if getattr(config, "modules_to_save", None):
        return "adapters that save whole modules"
    return None


def lora_pairs(peft_model: Any, name: str) -> LoraPairs:
    """Adapter ``name``'s A/B matrices of a loaded ``PeftModel`` per (layer, projection): new tensors, transposed,
    with peft's own scaling folded into B (so they outlive a later ``merge_and_unload`` of the same model)."""
    pairs: LoraPairs = {}
    for index, layer in enumerate(peft_model.get_base_model().model.layers):
        for part, proj in _PARTS:
            module = getattr(layer.self_attn if part == "attn" else layer.mlp, proj)
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or name not in lora_a:
                continue
            a = lora_a[name].weight
            b = module.lora_B[name].weight
            scale = float(module.scaling[name])
            pairs[(index, proj)] = _LoraPair(a.detach().t().contiguous(), (b.detach() * scale).t().contiguous())
    return pairs


# peft's state-dict keys (the adapter name stripped) of LoRA on a Llama-family decoder's projections
_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _direct_config_reason(config: dict[str, Any]) -> str | None:
    """Why ``read_lora_pairs`` cannot read an adapter with this ``adapter_config.json`` (None when it can): what the
    fast decoder does not run at all, and the config fields whose effect peft computes per module."""
    reason = lora_config_unsupported_reason(SimpleNamespace(**config))
    if reason:
        return reason
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "per-module rank or alpha patterns"
    if config.get("fan_in_fan_out"):
        return "fan_in_fan_out weights"
    return None


def lora_scaling(config: dict[str, Any]) -> float:
    """peft's LoRA scaling for this config: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    alpha, rank = config.get("lora_alpha", 8), config.get("r", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_lora_pairs(folder: Path, n_layers: int) -> LoraPairs:
    """The LoRA tables of the adapter saved in ``folder`` (peft's files), read without a ``PeftModel``: the same
    tensors ``lora_pairs`` copies out of peft (transposed, peft's scaling folded into B). Raises
    ``DirectReadUnsupported`` (with why) for a folder it does not cover; an adapter that targets nothing gives {}."""
    config = read_adapter_config(folder)
    reason = _direct_config_reason(config)
    if reason:
        raise DirectReadUnsupported(reason)
    found: dict[tuple[int, str], dict[str, Any]] = {}
    for key, tensor in read_adapter_tensors(folder).items():
        match = _LORA_KEY.match(key)
        if match is None or match[2] not in _PROJECTIONS or int(match[1]) >= n_layers:
            raise DirectReadUnsupported(f"a tensor the fast decoder does not place: {key}")
        found.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    scale = lora_scaling(config)
    pairs: LoraPairs = {}
    for slot, ab in found.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or a.shape[0] != config.get("r", 8) or b.shape[1] != a.shape[0]:
            raise DirectReadUnsupported(f"layer {slot[0]} {slot[1]}: LoRA A/B of unexpected shapes")
        pairs[slot] = _LoraPair(a.float().t().contiguous(), (b.float() * scale).t().contiguous())
    return pairs


def join_lora_pairs(first: LoraPairs, second: LoraPairs) -> LoraPairs:
    """One adapter computing both: where both target a projection, A's columns and B's rows are concatenated, so
    ``(x @ [A1 A2]) @ [B1; B2] = (x @ A1) @ B1 + (x @ A2) @ B2`` with rank r1 + r2."""
    import torch

    joined = dict(first)
    for key, pair in second.items():
        if key in joined:
            head = joined[key]
            pair = _LoraPair(
                torch.cat([head.a_t, pair.a_t], dim=1).contiguous(), torch.cat([head.b_t, pair.b_t]).contiguous()
            )
        joined[key] = pair
    return joined


class FastDecoder:
    """Greedy decoding of a Llama-family model with static caches and transposed weights (see the module doc)."""

    def __init__(self, model: Any, weights: WeightFormat = "q8", resident: LoraPairs | None = None) -> None:
        import torch

        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"fast path not applicable: {reason}")
        self.weights: WeightFormat = weights
        self.gqa = _sdpa_has_gqa()
        self.config = config = model.config
        base = model.model
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.q_out, self.kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.inter = config.intermediate_size
        self.embed = base.embed_tokens.weight.detach()
        self.norm = base.norm.weight.detach()
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    ln1=layer.input_layernorm.weight.detach(),
                    ln2=layer.post_attention_layernorm.weight.detach(),
                    qkv=_make_linear([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], weights),
                    o=_make_linear([attn.o_proj.weight], weights),
                    gate_up=_make_linear([mlp.gate_proj.weight, mlp.up_proj.weight], weights),
                    down=_make_linear([mlp.down_proj.weight], weights),
                )
            )
        self.lm_head = _make_linear([model.lm_head.weight], weights)  # q8 reproduces a GGUF's Q8_0 output exactly
        self.rotary = base.rotary_emb
        self._rope_cache: tuple[Any, Any] | None = None
        self._lora: dict[tuple[str, str], LoraPairs] = {}
        self._lock = threading.Lock()
        self.torch = torch
        # a LoRA every row carries (a task adapter over the unmerged base); None: rows without an adapter have none
        self.resident: LoraPairs | None = resident or None

    # -- rotary tables, grown on demand ----------------------------------------------------------------------------

    def _rope(self, length: int) -> tuple[Any, Any]:
        torch = self.torch
        with self._lock:
            if self._rope_cache is None or self._rope_cache[0].shape[0] < length:
                size = max(length, 512)
                positions = torch.arange(size).unsqueeze(0)
                cos, sin = self.rotary(self.embed[:1].unsqueeze(0), positions)
                self._rope_cache = (cos[0].contiguous(), sin[0].contiguous())
            return self._rope_cache

    # -- LoRA from peft ---------------------------------------------------------------------------------------------

    def lora_unsupported_reason(self, peft_model: Any, name: str) -> str | None:
        """Why adapter ``name`` of ``peft_model`` cannot run on the fast path (None when it can)."""
        config = peft_model.peft_config.get(name)
        return f"adapter {name!r} is not loaded" if config is None else lora_config_unsupported_reason(config)

    def lora_weights(self, peft_model: Any, name: str, source: str) -> LoraPairs:
        """The adapter's A/B matrices per (layer, projection), transposed, scaling folded into B, joined with the
        resident adapter's where there is one; cached by ``(name, source)`` (``source``: the adapter's folder, so a
        retrained adapter is never served stale)."""
        config = peft_model.peft_config.get(name)
        reason = f"adapter {name!r} is not loaded" if config is None else _not_allowed(config)
        if reason:  # an adapter of another method has no lora_A/lora_B: its empty table would decode as the base
            raise ValueError(f"fast path not applicable: {reason}")
        cached = self._lora.get((name, source))
        if cached is not None:
            return cached
        pairs = lora_pairs(peft_model, name)
        if self.resident:
            pairs = join_lora_pairs(self.resident, pairs)
        with self._lock:
            if len(self._lora) >= 64:  # adapters evicted from the cache leave their entries behind; bound them
                self._lora.clear()
            self._lora[(name, source)] = pairs
        return pairs

    @property
    def shape(self) -> DecoderShape:
        return DecoderShape(self.config.hidden_size, len(self.layers), self.n_kv, self.head_dim)

    def last_logits(
        self,
        prompt: Sequence[int],
        lora: LoraPairs | None = None,
        virtual: VirtualTokens | None = None,
        scales: IA3Scales | None = None,
    ) -> Any:
        """The output layer's fp32 logits after ``prompt`` (one row, ``lora``, ``virtual`` or ``scales`` on it, the
        resident adapter where there is one): the adapter probe's full check, on the weights this decoder serves
        with."""
        return self.lm_head(self._probe_forward(prompt, lora, virtual=virtual, scales=scales))[0].float()

    def probe_inputs(self, prompt: Sequence[int]) -> list[ProjectionInputs]:
        """Per layer, the inputs of its projections on ``prompt`` with no user adapter (the resident one on): what
        ``lora_effect`` multiplies, computed once per decoder."""
        record: list[ProjectionInputs] = []
        self._probe_forward(prompt, None, record)
        return record

    def lora_effect(self, inputs: list[ProjectionInputs], lora: LoraPairs) -> float:
        """The largest ``|(x @ A_t) @ B_t|`` of an adapter's projections on the probe's ``inputs``: what it adds to
        the first layer it changes. 0 exactly when it adds nothing anywhere, so the logits stay exactly the base's;
        a millisecond, where ``last_logits`` is a whole forward pass."""
        torch = self.torch
        largest = 0.0
        with torch.inference_mode():
            for (layer, proj), pair in lora.items():
                x = inputs[layer].of(proj)
                largest = max(largest, float(((x @ pair.a_t) @ pair.b_t).abs().max()))
        return largest

    def _probe_forward(
        self,
        prompt: Sequence[int],
        lora: LoraPairs | None,
        record: list[ProjectionInputs] | None = None,
        virtual: VirtualTokens | None = None,
        scales: IA3Scales | None = None,
    ) -> Any:
        """The final normed hidden state after ``prompt`` (1, hidden), one row on fresh caches."""
        torch = self.torch
        slots = virtual.count if virtual is not None else 0
        prompt = [0] * slots + list(prompt)  # the virtual tokens' slots (their ids are never read)
        width = len(prompt)
        cos_table, sin_table = self._rope(width + 1)
        cache_k = [torch.empty(1, self.n_kv, width, self.head_dim) for _ in self.layers]
        cache_v = [torch.empty(1, self.n_kv, width, self.head_dim) for _ in self.layers]
        mask = torch.ones(width, width, dtype=torch.bool).tril()[None, None]
        positions = torch.arange(width).unsqueeze(0)
        groups = _groups([lora or self.resident])
        with torch.inference_mode():
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            placed = [(0, 0, virtual)] if virtual is not None else []
            ia3 = self._ia3_factors([scales])
            return self._forward(
                ids, positions, mask, 0, cos_table, sin_table, cache_k, cache_v, groups, record, placed, ia3
            )

    def _ia3_factors(self, scales: Sequence[IA3Scales | None]) -> list[dict[str, Any]]:
        """Per layer, the (B, 1, width) multipliers of the points IA3 scales (fused outputs "qkv", "o", "gate_up",
        "down"; inputs "o_in", "down_in"), ones where a row has no scale there: built once per call, so a step
        only multiplies. [] when no row has IA3."""
        torch = self.torch
        if not any(scales):
            return []
        hidden, batch = self.config.hidden_size, len(scales)
        q, kv = self.q_out, self.kv_out
        outputs = {
            "qkv": (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)),
            "o": (("o_proj", 0, hidden),),
            "gate_up": (("gate_proj", 0, self.inter), ("up_proj", self.inter, self.inter)),
            "down": (("down_proj", 0, hidden),),
        }
        widths = {"qkv": q + 2 * kv, "o": hidden, "gate_up": 2 * self.inter, "down": hidden}
        inputs = {"o_in": ("o_proj", q), "down_in": ("down_proj", self.inter)}
        per_layer: list[dict[str, Any]] = []
        for layer in range(len(self.layers)):
            found: dict[str, Any] = {}
            for row, row_scales in enumerate(scales):
                if not row_scales:
                    continue
                for point, slices in outputs.items():
                    for proj, start, size in slices:
                        vector = row_scales.outputs.get((layer, proj))
                        if vector is not None:
                            if point not in found:
                                found[point] = torch.ones(batch, 1, widths[point])
                            found[point][row, 0, start : start + size] = vector
                for point, (proj, width) in inputs.items():
                    vector = row_scales.inputs.get((layer, proj))
                    if vector is not None:
                        if point not in found:
                            found[point] = torch.ones(batch, 1, width)
                        found[point][row, 0] = vector
            per_layer.append(found)
        return per_layer

    # -- decoding ---------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_ids: Sequence[int],
        pad_id: int,
        loras: Sequence[dict[tuple[int, str], _LoraPair] | None] | None = None,
        virtual: Sequence[VirtualTokens | None] | None = None,
        scales: Sequence[IA3Scales | None] | None = None,
    ) -> list[list[int]]:
        """Greedy new tokens per prompt (left-padded batch), each cut after its first eos. A row's ``virtual``
        tokens (a prompt-learning adapter) take cache slots before its prompt, counted in its positions; a row's
        IA3 ``scales`` rescale its projections (every step then runs in torch: the C step has no scales)."""
        torch = self.torch
        batch = len(prompts)
        loras = list(loras) if loras is not None else [None] * batch
        if self.resident:  # rows without their own adapter still carry the resident one (theirs already joins it)
            loras = [pairs or self.resident for pairs in loras]
        tokens = list(virtual) if virtual is not None else [None] * batch
        prompts = [[pad_id] * (t.count if t else 0) + list(p) for p, t in zip(prompts, tokens, strict=True)]
        width = max(len(p) for p in prompts)
        placed = [(row, width - len(p), t) for row, (p, t) in enumerate(zip(prompts, tokens, strict=True)) if t]
        total = width + max_new_tokens
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
        real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
        valid = torch.zeros(batch, total, dtype=torch.bool)  # which cache positions each row may attend to
        valid[:, :width] = real
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        cos_table, sin_table = self._rope(int(positions.max()) + max_new_tokens + 1)
        groups = _groups(loras)
        ia3 = self._ia3_factors(scales or [])
        cache_k = [torch.empty(batch, self.n_kv, total, self.head_dim) for _ in self.layers]
        cache_v = [torch.empty(batch, self.n_kv, total, self.head_dim) for _ in self.layers]
        eos = torch.tensor(sorted(set(eos_ids)) or [-1])
        out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        step_in_c = self._c_step(cache_k, cache_v, loras) if self.weights == "q8" and not ia3 else None
        with torch.inference_mode():
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            mask = (causal.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)  # (B, 1, S, S)
            mask |= torch.eye(width, dtype=torch.bool)  # a padded row attends to itself: no all-masked rows (NaN)
            h = self._forward(
                ids, positions, mask, 0, cos_table, sin_table, cache_k, cache_v, groups, None, placed, ia3
            )
            last = positions[:, -1]
            steps = 0
            for step in range(max_new_tokens):
                token = self.lm_head(h).argmax(-1)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                out[:, step] = token
                steps = step + 1
                done |= torch.isin(token, eos)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                last = last + 1
                valid[:, width + step] = True
                if step_in_c is not None:
                    h = self.embed[token]  # a fresh (B, hidden) tensor the C step turns into the final hidden state
                    step_in_c(h, last, cos_table, sin_table, width + step, valid)
                    continue
                h = self._forward(
                    token.unsqueeze(1),
                    last.unsqueeze(1),
                    valid[:, None, None, : width + step + 1],
                    width + step,
                    cos_table,
                    sin_table,
                    cache_k,
                    cache_v,
                    groups,
                    ia3=ia3,
                )
        results = []
        eos_set = set(eos_ids)
        for row in out[:, :steps].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
            results.append(row[:end])
        return results

    def _c_step(self, cache_k: list[Any], cache_v: list[Any], loras: Sequence[dict | None]) -> Any:
        """A function running one decoding step in C (``quantization.decode_step``) on these caches and adapters."""
        layers = (QLayer * len(self.layers))()
        for index, layer in enumerate(self.layers):
            # only q8 weights decode in C, and every projection of q8 weights is a QuantizedLinear
            qkv, o, gate_up, down = (cast(QuantizedLinear, m) for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
            layers[index] = QLayer(
                layer.ln1.data_ptr(),
                layer.ln2.data_ptr(),
                QMatrix.of(qkv),
                QMatrix.of(o),
                QMatrix.of(gate_up),
                QMatrix.of(down),
                cache_k[index].data_ptr(),
                cache_v[index].data_ptr(),
            )
        table, max_rank = self._lora_table(loras)
        dims = QDims(
            self.config.hidden_size,
            self.n_heads,
            self.n_kv,
            self.head_dim,
            self.inter,
            len(self.layers),
            max_rank,
            self.eps,
        )
        norm = self.norm.contiguous()

        def step(x: Any, positions: Any, cos_table: Any, sin_table: Any, offset: int, valid: Any) -> None:
            decode_step(dims, layers, norm, x, positions.contiguous(), cos_table, sin_table, offset, valid, table)

        return step

    def _lora_table(self, loras: Sequence[dict | None]) -> tuple[Any, int]:
        """(n_layers, 7, B, 3) int64: the address of each row's A_t and B_t per (layer, projection), and the rank
        (0 where the row has no adapter there), as ``qdecode_step`` reads them; None when no row has an adapter."""
        torch = self.torch
        if not any(loras):
            return None, 0
        table = torch.zeros(len(self.layers), len(_PROJECTIONS), len(loras), 3, dtype=torch.int64)
        max_rank = 0
        for row, pairs in enumerate(loras):
            for (layer, proj), pair in (pairs or {}).items():
                rank = pair.a_t.shape[1]
                table[layer, _PROJECTIONS.index(proj), row] = torch.tensor(
                    [pair.a_t.data_ptr(), pair.b_t.data_ptr(), rank]
                )
                max_rank = max(max_rank, rank)
        return table, max_rank

    def _forward(
        self,
        ids: Any,
        positions: Any,
        mask: Any,
        offset: int,
        cos_table: Any,
        sin_table: Any,
        cache_k: list[Any],
        cache_v: list[Any],
        groups: list[tuple[Any, dict[tuple[int, str], _LoraPair]]],
        record: list[ProjectionInputs] | None = None,
        placed: Sequence[tuple[int, int, VirtualTokens]] = (),
        ia3: Sequence[dict[str, Any]] = (),
    ) -> Any:
        """Run the decoder stack on ``ids`` (B, S) written at cache positions ``offset..offset+S``; returns the final
        normed hidden state of the last position (B, hidden). ``record`` collects each layer's projection inputs;
        ``placed`` (row, start, virtual tokens) puts a prompt-learning adapter into the row's slots at ``start``:
        embeddings in place of the slots' inputs, or a prefix's keys and values in place of what the slots computed;
        ``ia3`` (``_ia3_factors``, per layer) rescales rows' projection outputs (after any LoRA) and inputs."""
        torch = self.torch
        fn = torch.nn.functional
        batch, seq = ids.shape
        x = self.embed[ids]  # (B, S, H): a new tensor (advanced indexing), so the slots may be written
        for row, start, tokens in placed:
            if tokens.embeds is not None:
                x[row, start : start + tokens.count] = tokens.embeds
        prefixes = [(row, offset + start, tokens) for row, start, tokens in placed if tokens.is_prefix]
        cos = cos_table[positions].unsqueeze(1)  # (B, 1, S, D)
        sin = sin_table[positions].unsqueeze(1)
        end = offset + seq
        for index, layer in enumerate(self.layers):
            y = y_attn = _rms(x, layer.ln1, self.eps)
            qkv = layer.qkv(y)
            if groups:
                _add_lora(
                    qkv,
                    y,
                    groups,
                    index,
                    (
                        ("q_proj", 0, self.q_out),
                        ("k_proj", self.q_out, self.kv_out),
                        ("v_proj", self.q_out + self.kv_out, self.kv_out),
                    ),
                )
            scale = ia3[index] if ia3 else {}
            if "qkv" in scale:
                qkv = qkv * scale["qkv"]
            q = qkv[..., : self.q_out].view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
            k = qkv[..., self.q_out : self.q_out + self.kv_out].view(batch, seq, self.n_kv, self.head_dim)
            v = qkv[..., self.q_out + self.kv_out :].view(batch, seq, self.n_kv, self.head_dim)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            cache_k[index][:, :, offset:end] = k
            cache_v[index][:, :, offset:end] = v
            for row, start, tokens in prefixes:  # a prefix's keys are stored as trained (peft never rotates them)
                cache_k[index][row, :, start : start + tokens.count] = tokens.keys[index]
                cache_v[index][row, :, start : start + tokens.count] = tokens.values[index]
            keys, values = cache_k[index][:, :, :end], cache_v[index][:, :, :end]
            if self.n_kv != self.n_heads and not self.gqa:  # torch < 2.5: repeat the shared key/value heads
                keys = keys.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                values = values.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            gqa = {"enable_gqa": True} if self.gqa else {}
            attn = fn.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **gqa)
            attn = attn.transpose(1, 2).reshape(batch, seq, self.q_out)
            if "o_in" in scale:
                attn = attn * scale["o_in"]
            o = layer.o(attn)
            if groups:
                _add_lora(o, attn, groups, index, (("o_proj", 0, o.shape[-1]),))
            if "o" in scale:
                o = o * scale["o"]
            x = x + o
            y = _rms(x, layer.ln2, self.eps)
            gu = layer.gate_up(y)
            if groups:
                _add_lora(gu, y, groups, index, (("gate_proj", 0, self.inter), ("up_proj", self.inter, self.inter)))
            if "gate_up" in scale:
                gu = gu * scale["gate_up"]
            act = fn.silu(gu[..., : self.inter]) * gu[..., self.inter :]
            if "down_in" in scale:
                act = act * scale["down_in"]
            d = layer.down(act)
            if record is not None:
                record.append(ProjectionInputs(y_attn, attn, y, act))
            if groups:
                _add_lora(d, act, groups, index, (("down_proj", 0, d.shape[-1]),))
            if "down" in scale:
                d = d * scale["down"]
            x = x + d
        return _rms(x[:, -1], self.norm, self.eps)  # only the last position feeds the output layer


def _groups(loras: Sequence[dict | None]) -> list[tuple[Any, dict]]:
    """Rows grouped by adapter: [(row indices, the adapter's pairs)], rows without an adapter left out."""
    import torch

    by_id: dict[int, tuple[list[int], dict]] = {}
    for row, pairs in enumerate(loras):
        if pairs:
            by_id.setdefault(id(pairs), ([], pairs))[0].append(row)
    return [(torch.tensor(rows), pairs) for rows, pairs in by_id.values()]


def _add_lora(out: Any, x: Any, groups: list, layer: int, slices: tuple[tuple[str, int, int], ...]) -> None:
    """out[rows, ..., start:start+size] += (x[rows] @ A_t) @ B_t for every adapter group that targets the slice."""
    for rows, pairs in groups:
        for proj, start, size in slices:
            pair = pairs.get((layer, proj))
            if pair is None:
                continue
            delta = (x[rows] @ pair.a_t) @ pair.b_t
            if len(rows) == out.shape[0]:
                out[..., start : start + size] += delta
            else:
                out[rows, ..., start : start + size] += delta


def _rms(x: Any, weight: Any, eps: float) -> Any:
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _sdpa_has_gqa() -> bool:
    import inspect

    import torch

    try:
        return "enable_gqa" in inspect.signature(torch.nn.functional.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: torch >= 2.5 documents the argument
        return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


_DECODERS: dict[tuple[int, str, str | None], FastDecoder] = {}
_DECODERS_LOCK = threading.Lock()


def get_fast_decoder(model: Any, weights: WeightFormat = "q8") -> FastDecoder:
    """The process-wide fast decoder of ``model`` (built once: it copies the weights into its own layout)."""
    return _cached_decoder((id(model), weights, None), lambda: FastDecoder(model, weights))


def decoder_for(loaded: Any, weights: WeightFormat = "q8") -> FastDecoder:
    """The process-wide fast decoder for a ``LoadedModel``. A merged task-adapted base with 8-bit weights decodes
    as its unmerged base plus the task LoRA as a resident adapter (the module doc); else as ``loaded.model``."""
    merged = getattr(loaded, "merged_lora", None)
    if weights != "q8" or merged is None:
        return get_fast_decoder(loaded.model, weights)
    key = (id(merged.base.model), weights, merged.key)
    return _cached_decoder(key, lambda: FastDecoder(merged.base.model, weights, resident=merged.pairs))


def _cached_decoder(key: tuple[int, str, str | None], build: Any) -> FastDecoder:
    with _DECODERS_LOCK:
        if key not in _DECODERS:
            _DECODERS[key] = build()
        return _DECODERS[key]


__all__ = [
    "FastDecoder",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DirectReadUnsupported",
    "LoraPairs",
    "ProjectionInputs",
    "WeightFormat",
    "decoder_for",
    "fast_weights",
    "get_fast_decoder",
    "join_lora_pairs",
    "lora_config_unsupported_reason",
    "lora_pairs",
    "lora_scaling",
    "read_lora_pairs",
    "unsupported_reason",
]
