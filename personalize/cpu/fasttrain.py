"""A fast LoRA training step for Llama-family causal LMs on the CPU: the same loss, gradients and adapter as peft's,
with fewer passes over memory.

Why: a training step of the bundled 135M model through Hugging Face and peft spends about half its time outside the
big matrix products: a module call and an autograd node per elementwise op (RMSNorm alone is six), LoRA's rank-8
products (BLAS runs such thin products at a tenth of its rate), torch's serial per-element dropout RNG, attention on
padded dense blocks, the output layer's skinny products, and a private deep copy of the base model per user.

Here the forward pass is written once, functionally, over the base model's own frozen weights (shared, never
copied). RMSNorm, rotary, SwiGLU, LoRA's update, causal attention with grouped key/value heads and the output layer
are autograd functions whose forward and backward passes are single C calls (``csrc/trainops.c``); the last layer
computes its queries, attention output and MLP only for the positions the loss reads. The LoRA parameters, their
initialisation and the saved format are peft's own (``get_peft_model`` on a skeleton of the model that shares its
weights), and LoRA's dropout masks are drawn from torch's generator exactly as ``nn.Dropout`` draws them (the
kernel replays torch's mt19937; ``dropout_matches_torch`` checks it once per process), in the order peft draws
them, so a seeded run gives the plain path's adapter up to fp32 summation order. Without a C compiler every function
has a torch path. Anything else it does not handle is reported by ``unsupported_reason`` and training falls back to
peft's own forward.

In bf16 (``LoraSettings.precision``, where ``cpu.precision`` finds bf16 paying), the frozen base's projections, forward
and backward, multiply in bf16 on a bf16 copy of their weights made once per loaded model (``bf16_copy``), as peft's
step under autocast does; LoRA's products, norms, attention, the output layer, the weights and the optimizer state
stay fp32.
"""

from __future__ import annotations

import copy
import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from personalize.adapters.methods import unsupported_peft_type_reason
from personalize.adapters.peft_utils import strip_tuner_layers
from personalize.adapters.trainers import Trainer, register_trainer
from personalize.cpu.fastpath import _rotate, _sdpa_has_gqa
from personalize.cpu.fastpath import unsupported_reason as decoder_unsupported_reason
from personalize.cpu.kernels import KernelLibrary

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN_PROJECTIONS + MLP_PROJECTIONS


def unsupported_reason(model: Any, target_modules: Sequence[str], is_encoder_decoder: bool = False) -> str | None:
    """Why the fast training step cannot train LoRA on ``target_modules`` of ``model`` (None when it can)."""
    if is_encoder_decoder:
        return "encoder-decoder models"
    reason = decoder_unsupported_reason(model)
    if reason:
        return reason
    extra = sorted(set(target_modules) - set(PROJECTIONS))
    if extra:
        return f"LoRA on {extra} (the fast step covers {', '.join(PROJECTIONS)})"
    return None


def shared_skeleton(model: Any) -> Any:
    """A copy of ``model``'s modules whose parameters are new ``Parameter`` objects on the same storage: peft can
    wrap it and mark what trains without touching the shared model's modules or flags, and no weight is copied (a
    deep copy costs ~0.4 s and 540 MB per user). Tied weights stay tied (one new Parameter per shared one). peft
    layers that an in-place ``AdapterCache`` put on the model are taken out of the copy."""
    import torch

    memo: dict[int, Any] = {id(b): b for b in model.buffers()}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
    return strip_tuner_layers(copy.deepcopy(model, memo))


@dataclass(frozen=True)
class FrozenWeight:
    """A frozen base weight W (out, in) and, when the base computes in bf16, its bf16 copy: the products below run
    in that copy's precision and return fp32."""

    fp32: Any
    bf16: Any | None = None

    def forward(self, x: Any) -> Any:
        """``x @ W.T`` (differentiable in x)."""
        if self.bf16 is None:
            return x @ self.fp32.t()
        return (x.to(self.bf16.dtype) @ self.bf16.t()).float()

    def backward(self, dy: Any) -> Any:
        """``dy @ W``: the gradient of ``forward``'s input."""
        if self.bf16 is None:
            return dy @ self.fp32
        return (dy.to(self.bf16.dtype) @ self.bf16).float()


def bf16_copy(weight: Any, copies: dict[int, Any]) -> Any:
    """``weight`` in bf16, kept in ``copies`` (a ``LoadedModel.bf16_weights``) by storage and version: every user's
    step shares one copy of the base (~270 MB for the 135M model), and a weight changed in place gets a new one."""
    import torch

    key = weight.data_ptr()
    version = weight._version
    cached = copies.get(key)
    if cached is None or cached[0] != version or cached[1].shape != weight.shape:
        cached = (version, weight.detach().to(torch.bfloat16).contiguous())
        copies[key] = cached
    return cached[1]


@dataclass
class _Lora:
    """One projection's LoRA update as peft holds it: dropout module, A (r, in), B (out, r) and scaling."""

    dropout: Any
    a: Any
    b: Any
    scaling: float

    def project(self, x: Any, weight: FrozenWeight, mask: Any | None, scale: float) -> Any:
        """``x @ W.T + scaling * (dropout(x) @ A.T) @ B.T`` for the frozen W, the dropout given as its byte mask and
        scale (``dropout_mask``): one autograd function in C where the kernels built (the update written into the
        product, and in the backward pass LoRA's share of the input gradient added into the product's), else
        torch's ``addmm``."""
        import torch

        if _lib() is None:
            xm = x if mask is None else x * (mask.float() * scale)  # torch's dropout: x * (noise / (1 - p))
            return torch.addmm(weight.forward(x), xm @ self.a.t(), (self.b * self.scaling).t())
        return _Functions.get().lora.apply(x, weight, self.a, self.b, float(self.scaling), mask, scale)


@dataclass
class _Layer:
    ln1: Any
    ln2: Any
    weights: dict[str, FrozenWeight]  # projection name -> frozen base weight (out, in)
    loras: dict[str, _Lora]


def _lora_of(module: Any, adapter: str) -> _Lora | None:
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or adapter not in lora_a:
        return None
    if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
        raise ValueError("the fast training step covers plain LoRA (no DoRA, no LoRA biases)")
    return _Lora(
        module.lora_dropout[adapter], lora_a[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]
    )


def _weight_of(module: Any, bf16_copies: dict[int, Any] | None) -> FrozenWeight:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = base.weight.detach()
    return FrozenWeight(weight, None if bf16_copies is None else bf16_copy(weight, bf16_copies))


class FastLoraForward:
    """The training loss of a peft-wrapped Llama-family model, computed functionally (see the module doc)."""

    def __init__(self, peft_model: Any, adapter: str = "default", bf16_copies: dict[int, Any] | None = None) -> None:
        """``bf16_copies`` (a ``LoadedModel.bf16_weights``): the frozen projections compute in bf16 from copies
        kept there; None: in fp32."""
        import torch

        config = peft_model.peft_config.get(adapter)
        if config is None:
            raise ValueError(f"the model has no adapter {adapter!r} to train")
        reason = unsupported_peft_type_reason(config.peft_type, "fast_training", "the fast training step")
        if reason:  # an allow-list: a method without lora_A/lora_B would otherwise train nothing, silently
            raise ValueError(f"fast training step not applicable: {reason}")
        base = peft_model.get_base_model()
        config = base.config
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.embed = base.model.embed_tokens.weight.detach()
        self.norm = base.model.norm.weight.detach()
        self.lm_head = base.lm_head.weight.detach()
        self.rotary = base.model.rotary_emb
        self.layers: list[_Layer] = []
        for layer in base.model.layers:
            modules = {p: getattr(layer.self_attn, p) for p in ATTN_PROJECTIONS}
            modules |= {p: getattr(layer.mlp, p) for p in MLP_PROJECTIONS}
            loras = {name: lora for name, m in modules.items() if (lora := _lora_of(m, adapter)) is not None}
            self.layers.append(
                _Layer(
                    layer.input_layernorm.weight.detach(),
                    layer.post_attention_layernorm.weight.detach(),
                    {name: _weight_of(m, bf16_copies) for name, m in modules.items()},
                    loras,
                )
            )
        self.precision = "fp32" if bf16_copies is None else "bf16"
        self.torch = torch

    def _project(self, layer: _Layer, name: str, x: Any, rows: _Rows | None = None) -> Any:
        """``x @ W.T`` plus the layer's LoRA update. With ``rows`` (the last layer), the output is for the picked
        rows only; the dropout mask is still drawn for every row, as peft draws it, so later masks stay the same."""
        lora = layer.loras.get(name)
        mask, scale = (None, 1.0) if lora is None else dropout_mask(rows.full_shape(x) if rows else x.shape, lora)
        if rows is not None:
            x = rows.pick(x)
            mask = rows.pick(mask) if mask is not None else None
        weight = layer.weights[name]
        return weight.forward(x) if lora is None else lora.project(x, weight, mask, scale)

    def loss(self, batch: dict[str, Any]) -> Any:
        """Mean cross-entropy over the output tokens of a left-padded batch from ``training._collate`` (the loss
        of ``training._loss``)."""
        torch = self.torch
        fn = torch.nn.functional
        input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch["position_ids"]
        n, seq = input_ids.shape
        k = int((labels != -100).sum(dim=1).max())  # the outputs are the last k positions (left padding)
        cos, sin = self.rotary(self.embed[:1].unsqueeze(0), position_ids)  # (B, S, D)
        cos, sin = cos.contiguous(), sin.contiguous()
        real = batch["attention_mask"].to(torch.uint8).contiguous()  # (B, S): 1 for a token, 0 for padding
        mask = None
        if _lib() is None:  # torch's attention takes the mask whole
            mask = torch.ones(seq, seq, dtype=torch.bool).tril().unsqueeze(0) & real.bool().unsqueeze(1)
            mask = (mask | torch.eye(seq, dtype=torch.bool)).unsqueeze(1)  # a padded row attends to itself: no NaN
        x = self.embed[input_ids].reshape(n * seq, -1)
        # Only positions seq-k-1 .. seq-2 feed the loss (position t predicts token t + 1): the last layer computes
        # its queries, attention output and MLP for those rows alone (its keys and values still see every row).
        last_rows = _Rows(n, seq, seq - k - 1, seq - 1)
        for index, layer in enumerate(self.layers):
            rows = last_rows if index == len(self.layers) - 1 else None
            x = self._layer(layer, x, cos, sin, (real, mask), n, seq, rows)
        logits = lm_head(rms_norm(x, self.norm, self.eps), self.lm_head)
        return fn.cross_entropy(logits, labels[:, -k:].reshape(-1), ignore_index=-100)

    def _layer(
        self, layer: _Layer, x: Any, cos: Any, sin: Any, masks: tuple[Any, Any], n: int, seq: int, rows: _Rows | None
    ) -> Any:
        fn = self.torch.nn.functional
        real, mask = masks
        heads, kv, dim = self.n_heads, self.n_kv, self.head_dim
        y = rms_norm(x, layer.ln1, self.eps)
        q = self._project(layer, "q_proj", y, rows)
        key = self._project(layer, "k_proj", y).view(n, seq, kv, dim)
        v = self._project(layer, "v_proj", y).view(n, seq, kv, dim)
        q_len = seq if rows is None else rows.stop - rows.start
        q_cos, q_sin = (cos, sin) if rows is None else (rows.pick_positions(cos), rows.pick_positions(sin))
        q, key = rotary(q.view(n, q_len, heads, dim), q_cos, q_sin), rotary(key, cos, sin)
        q_offset = 0 if rows is None else rows.start
        if _lib() is not None:
            attn = _Functions.get().attention.apply(q, key, v, real, q_offset).view(n * q_len, heads * dim)
        else:
            keys, values = key.transpose(1, 2), v.transpose(1, 2)
            gqa = {"enable_gqa": True} if _sdpa_has_gqa() else {}
            if not gqa and kv != heads:  # torch < 2.5: repeat the shared key/value heads, as the decoder does
                keys, values = (t.repeat_interleave(heads // kv, dim=1) for t in (keys, values))
            attn = fn.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask[:, :, q_offset : q_offset + q_len], **gqa
            )
            attn = attn.transpose(1, 2).reshape(n * q_len, heads * dim)
        if rows is not None:
            x = rows.pick(x)
        x = x + self._project(layer, "o_proj", attn, rows)
        y = rms_norm(x, layer.ln2, self.eps)
        gate = self._project(layer, "gate_proj", y, rows)
        up = self._project(layer, "up_proj", y, rows)
        return x + self._project(layer, "down_proj", swiglu(gate, up), rows)


@dataclass(frozen=True)
class _Rows:
    """Positions ``start..stop`` of each of ``n`` sequences of ``seq``, in a (n * seq, ...) tensor of rows."""

    n: int
    seq: int
    start: int
    stop: int

    def full_shape(self, x: Any) -> tuple[int, ...]:
        """The shape ``x`` would have with every row: it already may (then it is unchanged) or hold picked rows."""
        return (self.n * self.seq, *x.shape[1:])

    def pick(self, t: Any) -> Any:
        if t.shape[0] != self.n * self.seq:
            return t  # already picked
        return t.view(self.n, self.seq, *t.shape[1:])[:, self.start : self.stop].reshape(-1, *t.shape[1:])

    def pick_positions(self, t: Any) -> Any:
        """(n, seq, ...) -> (n, stop - start, ...), contiguous."""
        return t[:, self.start : self.stop].contiguous()


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, f32, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64
    signatures = {
        "mt_dropout": [ptr, i64, u64, ptr],
        "rmsnorm_fwd": [i64, i64, ptr, ptr, f32, ptr, ptr],
        "rmsnorm_bwd": [i64, i64, ptr, ptr, ptr, ptr, ptr],
        "rope": [i64, i64, i64, ptr, ptr, ptr, f32, ptr],
        "swiglu_fwd": [i64, ptr, ptr, ptr],
        "swiglu_bwd": [i64, ptr, ptr, ptr, ptr, ptr],
        "lora_rows_dot": [i64, i64, i64, ptr, ptr, f32, ptr, ptr],
        "lora_rank_update": [i64, i64, i64, ptr, ptr, ptr, f32, ctypes.c_int, ptr],
        "lora_outer_sum": [i64, i64, i64, ptr, ptr, ptr, f32, ptr],
        "lm_head_fwd": [i64, i64, i64, ptr, ptr, ptr],
        "attn_fwd": [i64, i64, i64, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr, ptr, ptr],
        "attn_bwd": [i64, i64, i64, i64, i64, i64, i64, f32] + [ptr] * 10,
        "lm_head_bwd": [i64, i64, i64, ptr, ptr, ctypes.c_int, ptr, ptr],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None


KERNEL = KernelLibrary("trainops.c", "the training kernels", _declare)


def _lib() -> ctypes.CDLL | None:
    return KERNEL.load()


def _loaded_lib() -> ctypes.CDLL:
    """``_lib()`` on the paths that run only once it has returned the library (the kernels are chosen only then)."""
    return cast(ctypes.CDLL, KERNEL.load())


def _ptr(t: Any) -> int:
    return t.data_ptr()


class _Functions:
    """The autograd functions, made on first use (``torch`` is imported lazily across the package)."""

    _made: _Functions | None = None

    def __init__(self) -> None:
        import torch

        self.rms_norm = _rms_norm_fn(torch)
        self.rotary = _rotary_fn(torch)
        self.swiglu = _swiglu_fn(torch)
        self.lora = _lora_fn(torch)
        self.lm_head = _lm_head_fn(torch)
        self.attention = _attention_fn(torch)

    @classmethod
    def get(cls) -> _Functions:
        if cls._made is None:
            cls._made = cls()
        return cls._made


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``w * (x * rsqrt(mean(x^2) + eps))`` over the last dim of a (rows, d) x, as Hugging Face's; the frozen w
    gets no gradient."""
    return _Functions.get().rms_norm.apply(x, weight, eps)


def rotary(x: Any, cos: Any, sin: Any) -> Any:
    """Rotary position embedding of x (B, S, heads, D) with cos/sin (B, S, D), half-split (``rotate_half``)."""
    return _Functions.get().rotary.apply(x, cos, sin)


def lm_head(h: Any, weight: Any) -> Any:
    """``h @ weight.T`` for the few output rows of a step (weight: the frozen (vocab, d) output layer)."""
    if _lib() is None or h.shape[0] > 256:
        return h @ weight.t()
    return _Functions.get().lm_head.apply(h, weight)


def swiglu(gate: Any, up: Any) -> Any:
    """``silu(gate) * up``."""
    return _Functions.get().swiglu.apply(gate, up)


def dropout_mask(shape: Sequence[int], lora: _Lora) -> tuple[Any | None, float]:
    """The byte mask (1 = kept) and scale ``1 / (1 - p)`` that peft's dropout would apply to an input of ``shape``
    now, drawn from torch's generator exactly as ``nn.Dropout`` draws it (in C where ``dropout_matches_torch``,
    else by torch's own ``bernoulli_``); (None, 1.0) when it drops nothing."""
    import torch

    module = lora.dropout
    if not isinstance(module, torch.nn.Dropout) or not module.training or float(module.p) == 0.0:
        return None, 1.0
    keep = 1 - float(module.p)
    scale = float(torch.ones((), dtype=torch.float32) / keep)  # torch: noise.div_(1 - p), in fp32
    if not dropout_matches_torch():
        return torch.empty(tuple(shape)).bernoulli_(keep).to(torch.uint8), scale
    state = torch.random.get_rng_state()
    mask = torch.empty(tuple(shape), dtype=torch.uint8)
    _loaded_lib().mt_dropout(_ptr(state), mask.numel(), _threshold(keep), _ptr(mask))
    torch.random.set_rng_state(state)
    return mask, scale


_DROPOUT_CHECK: bool | None = None


def dropout_matches_torch() -> bool:
    """Whether the C dropout draws exactly torch's masks here (checked once per process, on a private generator):
    where it does not (another torch, no compiler), dropout stays torch's own."""
    global _DROPOUT_CHECK
    if _DROPOUT_CHECK is None:
        import torch

        lib = _lib()
        if lib is None:
            _DROPOUT_CHECK = False
            return False
        gen = torch.Generator().manual_seed(1234)
        torch.empty(37).bernoulli_(0.5, generator=gen)  # start mid-block
        state = gen.get_state()
        expected = torch.empty(3000).bernoulli_(0.95, generator=gen)
        after = gen.get_state()
        mask = torch.empty(3000, dtype=torch.uint8)
        lib.mt_dropout(_ptr(state), 3000, _threshold(0.95), _ptr(mask))
        _DROPOUT_CHECK = bool(torch.equal(mask.float(), expected)) and bool(torch.equal(state, after))
    return _DROPOUT_CHECK


def _threshold(keep: float) -> int:
    """``u < keep`` for a 53-bit uniform u = m / 2^53 is ``m < ceil(keep * 2^53)``."""
    return math.ceil(keep * 2**53)


def _rms_norm_fn(torch: Any) -> Any:
    class RMSNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, eps: float) -> Any:
            lib = _lib()
            if lib is None:
                rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                y = weight * (x * rstd)
            else:
                x = x.contiguous()
                rows, d = x.shape
                y, rstd = torch.empty_like(x), torch.empty(rows, 1)
                lib.rmsnorm_fwd(rows, d, _ptr(x), _ptr(weight), eps, _ptr(y), _ptr(rstd))
            ctx.save_for_backward(x, rstd, weight)
            return y

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            x, rstd, weight = ctx.saved_tensors
            lib = _lib()
            if lib is None:
                g = dy * weight
                xhat = x * rstd
                return rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True)), None, None
            dy = dy.contiguous()
            dx = torch.empty_like(x)
            lib.rmsnorm_bwd(x.shape[0], x.shape[1], _ptr(dy), _ptr(x), _ptr(weight), _ptr(rstd), _ptr(dx))
            return dx, None, None

    return RMSNormFn


def _rotate_half_t(torch: Any, x: Any) -> Any:
    """The transpose of ``rotate_half``: cat(x2, -x1)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _rope(torch: Any, x: Any, cos: Any, sin: Any, sign: float) -> Any:
    lib = _lib()
    if lib is None:
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        return _rotate(x, c, s) if sign > 0 else x * c + _rotate_half_t(torch, x * s)
    x = x.contiguous()
    batch, seq, heads, dim = x.shape
    out = torch.empty_like(x)
    lib.rope(batch * seq, heads, dim, _ptr(x), _ptr(cos), _ptr(sin), sign, _ptr(out))
    return out


def _rotary_fn(torch: Any) -> Any:
    class RotaryFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, cos: Any, sin: Any) -> Any:
            ctx.save_for_backward(cos, sin)
            return _rope(torch, x, cos, sin, 1.0)

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            cos, sin = ctx.saved_tensors
            return _rope(torch, dy, cos, sin, -1.0), None, None

    return RotaryFn


def _swiglu_fn(torch: Any) -> Any:
    class SwiGLUFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            lib = _lib()
            gate, up = gate.contiguous(), up.contiguous()
            ctx.save_for_backward(gate, up)
            if lib is None:
                return torch.nn.functional.silu(gate) * up
            out = torch.empty_like(gate)
            lib.swiglu_fwd(gate.numel(), _ptr(gate), _ptr(up), _ptr(out))
            return out

        @staticmethod
        def backward(ctx: Any, dm: Any) -> Any:
            gate, up = ctx.saved_tensors
            lib = _lib()
            if lib is None:
                sig = torch.sigmoid(gate)
                return dm * up * sig * (1 + gate * (1 - sig)), dm * gate * sig
            dm = dm.contiguous()
            dgate, dup = torch.empty_like(gate), torch.empty_like(up)
            lib.swiglu_bwd(gate.numel(), _ptr(dm), _ptr(gate), _ptr(up), _ptr(dgate), _ptr(dup))
            return dgate, dup

    return SwiGLUFn


def _maybe_ptr(t: Any | None) -> int | None:
    return None if t is None else t.data_ptr()


def _lora_fn(torch: Any) -> Any:
    class LoraProjectionFn(torch.autograd.Function):
        """y = x @ W.T + s * (xm @ A.T) @ B.T, xm = x with its dropout mask applied; W frozen."""

        @staticmethod
        def forward(
            ctx: Any, x: Any, weight: FrozenWeight, a: Any, b: Any, scaling: float, mask: Any, scale: float
        ) -> Any:
            lib = _loaded_lib()
            x = x.contiguous()
            rows, rank = x.shape[0], a.shape[0]
            y = weight.forward(x)
            h = torch.empty(rows, rank)
            lib.lora_rows_dot(rows, a.shape[1], rank, _ptr(x), _maybe_ptr(mask), scale, _ptr(a.detach()), _ptr(h))
            bs_t = (b.detach() * scaling).t().contiguous()  # (r, out)
            lib.lora_rank_update(rows, b.shape[0], rank, _ptr(h), _ptr(bs_t), None, 1.0, 1, _ptr(y))
            ctx.save_for_backward(x, a, b, h, bs_t, mask)
            ctx.weight, ctx.scaling, ctx.scale = weight, scaling, scale
            return y

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            x, a, b, h, bs_t, mask = ctx.saved_tensors
            lib = _loaded_lib()
            rows, rank, n_in, n_out = x.shape[0], a.shape[0], a.shape[1], b.shape[0]
            dy = dy.contiguous()
            dh = torch.empty(rows, rank)
            lib.lora_rows_dot(rows, n_out, rank, _ptr(dy), None, 1.0, _ptr(bs_t), _ptr(dh))  # dY @ (s B)
            g_b = torch.empty(rank, n_out)
            lib.lora_outer_sum(rows, n_out, rank, _ptr(h), _ptr(dy), None, 1.0, _ptr(g_b))  # h.T @ dY
            da = torch.empty(rank, n_in)
            lib.lora_outer_sum(rows, n_in, rank, _ptr(dh), _ptr(x), _maybe_ptr(mask), ctx.scale, _ptr(da))
            dx = None
            if ctx.needs_input_grad[0]:
                dx = ctx.weight.backward(dy)  # the base product's share, then LoRA's added in place: no extra sum
                lib.lora_rank_update(
                    rows, n_in, rank, _ptr(dh), _ptr(a.detach()), _maybe_ptr(mask), ctx.scale, 1, _ptr(dx)
                )
            db = (g_b.t() * ctx.scaling).contiguous()
            return dx, None, da, db, None, None, None

    return LoraProjectionFn


def _lm_head_fn(torch: Any) -> Any:
    class LmHeadFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, h: Any, weight: Any) -> Any:
            h = h.contiguous()
            rows, d = h.shape
            logits = torch.empty(rows, weight.shape[0])
            _loaded_lib().lm_head_fwd(rows, d, weight.shape[0], _ptr(h), _ptr(weight), _ptr(logits))
            ctx.save_for_backward(weight)
            ctx.rows = rows
            return logits

        @staticmethod
        def backward(ctx: Any, dlogits: Any) -> Any:
            (weight,) = ctx.saved_tensors
            dlogits = dlogits.contiguous()
            threads = max(1, torch.get_num_threads())
            vocab, d = weight.shape
            scratch = torch.zeros(threads, ctx.rows, d)
            dh = torch.empty(ctx.rows, d)
            _loaded_lib().lm_head_bwd(ctx.rows, d, vocab, _ptr(dlogits), _ptr(weight), threads, _ptr(scratch), _ptr(dh))
            return dh, None

    return LmHeadFn


def _attention_fn(torch: Any) -> Any:
    class AttentionFn(torch.autograd.Function):
        """Causal attention with grouped key/value heads and left padding (csrc/trainops.c ``attn_fwd``): q (B, Lq,
        H, D) at positions q_offset.., k and v (B, L, KV, D), real (B, L) uint8; out (B, Lq, H, D)."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, real: Any, q_offset: int) -> Any:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            batch, lq, heads, dim = q.shape
            length, kv_heads = k.shape[1], k.shape[2]
            out = torch.empty_like(q)
            lse = torch.empty(batch, heads, lq)
            scale = dim**-0.5
            _loaded_lib().attn_fwd(
                batch, lq, length, heads, kv_heads, dim, q_offset, scale, *map(_ptr, (q, k, v, real, out, lse))
            )
            ctx.save_for_backward(q, k, v, real, out, lse)
            ctx.q_offset, ctx.scale = q_offset, scale
            return out

        @staticmethod
        def backward(ctx: Any, dout: Any) -> Any:
            q, k, v, real, out, lse = ctx.saved_tensors
            dout = dout.contiguous()
            batch, lq, heads, dim = q.shape
            length, kv_heads = k.shape[1], k.shape[2]
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            tensors = (q, k, v, real, out, lse, dout, dq, dk, dv)
            _loaded_lib().attn_bwd(
                batch, lq, length, heads, kv_heads, dim, ctx.q_offset, ctx.scale, *map(_ptr, tensors)
            )
            return dq, dk, dv, None, None

    return AttentionFn


def _fast_step(loaded: Any, peft_config: Any, precision: str = "fp32") -> tuple[Any, Any]:
    """The peft model over a weight-sharing skeleton of the base, and the fused step's loss (the frozen base in
    ``precision``)."""
    from peft import get_peft_model

    model = get_peft_model(shared_skeleton(loaded.model), peft_config)
    copies = loaded.bf16_weights if precision == "bf16" else None
    return model, FastLoraForward(model, bf16_copies=copies).loss


def _fast_step_unsupported(loaded: Any, settings: Any) -> str | None:
    """Why the fast step cannot train ``settings`` (None: it can); only LoRA's settings reach it (the method
    allow-list runs first), but a settings class without target modules is refused, not guessed at."""
    modules = getattr(settings, "target_modules", None)
    if modules is None:
        return f"{type(settings).__name__} names no target modules"
    if getattr(settings, "use_dora", False):
        return "DoRA (the fast step covers plain LoRA)"
    return unsupported_reason(loaded.model, modules, loaded.is_encoder_decoder)


register_trainer(Trainer("fast", _fast_step_unsupported, _fast_step, autocast=False))
