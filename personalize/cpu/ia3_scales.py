"""(IA)^3 adapters read from peft's files for the fast decoder: per-projection vectors that rescale an output (keys,
values) or an input (the MLP's, before its down projection).

Why: peft serves IA3 on the plain path (``generate`` with the adapter's layers wrapped around the base's), about
twice the fast decoder's time per answer. The vectors are a few hundred floats per layer; the decoder multiplies
them into its torch steps per row, so one batch mixes users of IA3 with the other methods. As peft computes them:
an output scale multiplies the projection's output (the base's plus any resident LoRA's), an input scale multiplies
the input before the projection (so before its LoRA too).

The fused projections read one input for several outputs (q/k/v; gate/up), so only ``o_proj`` and ``down_proj``
take input scales; a folder with others, or with tensors this reader does not place, raises
``DirectReadUnsupported``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.cpu.adapter_files import read_adapter_config, read_adapter_tensors
from personalize.errors import DirectReadUnsupported

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_SCALED = ("o_proj", "down_proj")  # projections with an input of their own (not fused with another)
_IA3_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.ia3_l$")


@dataclass(frozen=True)
class IA3Scales:
    """One IA3 adapter: per (layer, projection) a vector scaling its output, or (``inputs``) its input."""

    outputs: dict[tuple[int, str], Any] = field(default_factory=dict)
    inputs: dict[tuple[int, str], Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.outputs or self.inputs)


def read_ia3_scales(folder: Path, n_layers: int, config: dict[str, Any] | None = None) -> IA3Scales:
    """The scaling vectors of the IA3 adapter saved in ``folder`` (``config``: its adapter_config.json, where the
    caller read it already), fp32, flattened."""
    config = read_adapter_config(folder) if config is None else config
    if str(config.get("peft_type", "")).upper() != "IA3":
        raise DirectReadUnsupported("not an IA3 adapter")
    if config.get("modules_to_save"):
        raise DirectReadUnsupported("adapters that save whole modules")
    feedforward = config.get("feedforward_modules") or []
    feedforward = {feedforward} if isinstance(feedforward, str) else set(feedforward)
    outputs: dict[tuple[int, str], Any] = {}
    inputs: dict[tuple[int, str], Any] = {}
    for key, tensor in read_adapter_tensors(folder).items():
        match = _IA3_KEY.match(key)
        if match is None or match[2] not in PROJECTIONS or int(match[1]) >= n_layers:
            raise DirectReadUnsupported(f"a tensor the fast decoder does not place: {key}")
        slot = (int(match[1]), match[2])
        if match[2] in feedforward:
            if match[2] not in INPUT_SCALED:
                raise DirectReadUnsupported(f"an input scale on {match[2]} (a fused projection)")
            inputs[slot] = tensor.float().flatten().contiguous()
        else:
            outputs[slot] = tensor.float().flatten().contiguous()
    return IA3Scales(outputs, inputs)


__all__ = ["IA3Scales", "read_ia3_scales"]
