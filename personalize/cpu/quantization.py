"""Weight-only 8-bit linear layers for the CPU: a quarter of fp32's bytes per token, fp32 arithmetic.

Why: decoding one token reads every weight once, and on these CPUs that read, not the arithmetic, sets the speed:
fp32 weights cap the bundled 135M model far below llama.cpp. Storing each weight as an 8-bit code with a scale and
an offset per group of 32 inputs reads 1.25 bytes per weight instead of 4, and the products still run in fp32.

It is exact for the bundled GGUF: its layers are Q4_1 (a 4-bit code, a scale and a minimum per 32 inputs) and its
embedding is Q8_0 (an 8-bit code and a scale per 32), so the codes found here reproduce the very weights the fp32
model holds; only the order of fp32 sums changes. For other fp32 models the error of a weight is at most 1/510 of
its group's range (or 1/254 of its largest magnitude for signed codes), whichever of the two formats fits better.

The products run in a small C kernel (``csrc/qlinear.c``) built at first use with the machine's C compiler and
cached per machine; without a compiler, ``kernel_unavailable_reason`` says why and callers keep fp32 weights.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

from personalize.cpu.kernels import KernelLibrary

GROUP = 32
PREFILL_ROWS = 16  # above this many input rows, dequantise and let the BLAS GEMM run (prefill)


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qlinear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, cint, i64, ptr, cint]
    lib.qlinear.restype = None
    lib.qlinear_dequantize.argtypes = [ptr, ptr, ptr, cint, i64, i64, ptr]
    lib.qlinear_dequantize.restype = None
    lib.qdecode_step.argtypes = [ctypes.POINTER(QDims), ctypes.POINTER(QLayer), ptr, i64, ptr, ptr, ptr, ptr, i64, i64]
    lib.qdecode_step.argtypes += [ptr, ptr]
    lib.qdecode_step.restype = None


KERNEL = KernelLibrary("qlinear.c", "the weight-only kernel", _declare)


def kernel_unavailable_reason() -> str | None:
    """Why the weight-only kernel cannot run here (None when it can); builds it on first call."""
    return KERNEL.unavailable_reason()


@dataclass
class QuantizedLinear:
    """``x @ W.T`` for W (out, in) held as 8-bit codes with a scale (and, unsigned, an offset) per 32 inputs."""

    codes: Any  # (out, in) uint8; signed codes are stored as their int8 bit patterns
    scales: Any  # (out, in / 32) fp32
    offsets: Any | None  # (out, in / 32) fp32, or None for signed codes
    signed: bool
    max_error: float  # the largest |dequantised - original| over the weights

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def nbytes(self) -> int:
        extra = self.offsets.numel() * 4 if self.offsets is not None else 0
        return self.codes.numel() + self.scales.numel() * 4 + extra

    def dequantize(self, out: Any | None = None) -> Any:
        """The fp32 weights (out, in), written into ``out`` when given (a reused buffer: a fresh one costs a page
        fault per 4 KiB, which is most of the time of a dequantisation)."""
        import torch

        lib = _require()
        if out is None:
            out = torch.empty(self.out_features, self.in_features)
        lib.qlinear_dequantize(
            self.codes.data_ptr(),
            self.scales.data_ptr(),
            self.offsets.data_ptr() if self.offsets is not None else None,
            int(self.signed),
            self.out_features,
            self.in_features,
            out.data_ptr(),
        )
        return out.view(self.out_features, self.in_features)

    def __call__(self, x: Any, out: Any | None = None, accumulate: bool = False) -> Any:
        """``x @ W.T`` for fp32 x (..., in); written into ``out`` (..., out) when given, added to it if
        ``accumulate`` (a residual connection without another pass over memory)."""
        import torch

        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous() or rows.dtype != torch.float32:
            rows = rows.float().contiguous()
        if rows.shape[0] > PREFILL_ROWS:
            product = rows @ self.dequantize(_scratch(self.out_features * self.in_features)).t()
            if out is None:
                return product.view(*lead, self.out_features)
            flat = out.view(-1, self.out_features)
            if accumulate:
                flat += product
            else:
                flat.copy_(product)
            return out
        if out is None:
            out = torch.empty(*lead, self.out_features)
            accumulate = False
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        _require().qlinear(
            rows.data_ptr(),
            rows.shape[0],
            self.in_features,
            self.codes.data_ptr(),
            self.scales.data_ptr(),
            self.offsets.data_ptr() if self.offsets is not None else None,
            int(self.signed),
            self.out_features,
            out.data_ptr(),
            int(accumulate),
        )
        return out


_SCRATCH = threading.local()


def _scratch(size: int) -> Any:
    """A per-thread fp32 buffer of ``size`` elements, viewed as needed (prefill dequantises every layer into it)."""
    import torch

    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _SCRATCH.buffer = torch.empty(size)
    return buffer[:size]


class QMatrix(ctypes.Structure):
    """``qmatrix`` of csrc/qlinear.c: one QuantizedLinear's buffers."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("is_signed", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
    ]

    @classmethod
    def of(cls, q: QuantizedLinear) -> QMatrix:
        offsets = q.offsets.data_ptr() if q.offsets is not None else None
        return cls(q.codes.data_ptr(), q.scales.data_ptr(), offsets, int(q.signed), q.out_features, q.in_features)


class QLayer(ctypes.Structure):
    """``qlayer`` of csrc/qlinear.c: a decoder layer's norms, fused projections and KV cache."""

    _fields_ = [
        ("ln1", ctypes.c_void_p),
        ("ln2", ctypes.c_void_p),
        ("qkv", QMatrix),
        ("o", QMatrix),
        ("gate_up", QMatrix),
        ("down", QMatrix),
        ("cache_k", ctypes.c_void_p),
        ("cache_v", ctypes.c_void_p),
    ]


class QDims(ctypes.Structure):
    """``qdims`` of csrc/qlinear.c."""

    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("n_kv", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("inter", ctypes.c_int64),
        ("n_layers", ctypes.c_int64),
        ("max_rank", ctypes.c_int64),
        ("eps", ctypes.c_float),
    ]


def decode_step(
    dims: QDims,
    layers: Any,
    final_norm: Any,
    x: Any,
    positions: Any,
    cos_table: Any,
    sin_table: Any,
    offset: int,
    valid: Any,
    lora_table: Any | None,
) -> None:
    """One new token per row through every layer, in C (``qdecode_step``): ``x`` (B, hidden) goes in as the
    embeddings and comes out as the final normed hidden state. Every tensor must be contiguous fp32 (positions and
    the LoRA table int64, valid bool); ``layers`` is a ``QLayer`` array whose caches are (B, n_kv, T, head_dim)."""
    batch, total = valid.shape
    _require().qdecode_step(
        ctypes.byref(dims),
        layers,
        final_norm.data_ptr(),
        batch,
        x.data_ptr(),
        positions.data_ptr(),
        cos_table.data_ptr(),
        sin_table.data_ptr(),
        total,
        offset,
        valid.data_ptr(),
        lora_table.data_ptr() if lora_table is not None else None,
    )


def _require() -> ctypes.CDLL:
    return KERNEL.require()


def quantize(weight: Any) -> QuantizedLinear:
    """8-bit codes for fp32 ``weight`` (out, in), in whichever format reproduces it more closely: unsigned codes
    with a per-group minimum (exact for GGUF Q4_1/Q4_0 weights) or signed codes without one (exact for Q8_0)."""
    import torch

    w = weight.detach().float()
    out_features, in_features = w.shape
    if in_features % GROUP:
        raise ValueError(f"in_features {in_features} is not a multiple of {GROUP}")
    groups = w.reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = ((high - low) / 255.0).clamp(min=1e-30)
    unsigned = torch.round((groups - low) / step).clamp(0, 255)
    unsigned_error = float((unsigned * step + low - groups).abs().max())
    magnitude = torch.maximum(high.abs(), low.abs())
    scale = (magnitude / 127.0).clamp(min=1e-30)
    signed = torch.round(groups / scale).clamp(-127, 127)
    signed_error = float((signed * scale - groups).abs().max())
    if signed_error <= unsigned_error:
        codes = signed.to(torch.int8).view(torch.uint8).reshape(out_features, in_features).contiguous()
        return QuantizedLinear(codes, scale.squeeze(-1).contiguous(), None, True, signed_error)
    codes = unsigned.to(torch.uint8).reshape(out_features, in_features).contiguous()
    return QuantizedLinear(codes, step.squeeze(-1).contiguous(), low.squeeze(-1).contiguous(), False, unsigned_error)


__all__ = [
    "GROUP",
    "QDims",
    "QLayer",
    "QMatrix",
    "QuantizedLinear",
    "decode_step",
    "kernel_unavailable_reason",
    "quantize",
]
