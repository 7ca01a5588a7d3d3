"""Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) read from peft's files for the fast decoder.

Why: peft serves these by full forward passes, one per new token with no KV cache (``adapters.cache.
greedy_by_forward``: its ``generate`` drops prefix tuning's prefix under transformers 5 and misplaces virtual tokens
in left-padded batches), so an answer after a 700-token prompt costs 30 prefills. At serving time each of them is a
fixed tensor, which the fast decoder can put where peft's forward puts it, once:

- prompt tuning and P-tuning: ``prompt_embeddings`` (n, hidden) are input embeddings of n virtual tokens before the
  prompt, at positions 0..n-1 (peft saves P-tuning's encoder *output*, and serves that tensor as it is);
- prefix tuning: ``prompt_embeddings`` (n, layers * 2 * kv_heads * head_dim) are each layer's keys and values of n
  cache positions before the prompt, not rotated, and the prompt's positions start at n (as the cache length makes
  them in transformers).

Adapters stay in peft's format; a folder this reader does not cover raises ``DirectReadUnsupported`` with why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.cpu.adapter_files import read_adapter_config, read_adapter_tensors
from personalize.errors import DirectReadUnsupported

EMBEDDING_TYPES = ("PROMPT_TUNING", "P_TUNING")
PREFIX_TYPES = ("PREFIX_TUNING",)


@dataclass(frozen=True)
class VirtualTokens:
    """One prompt-learning adapter as the decoder places it: ``embeds`` (n, hidden) before the prompt, or per
    layer ``keys``/``values`` (kv_heads, n, head_dim) in the cache before it."""

    count: int
    embeds: Any | None = None
    keys: tuple[Any, ...] = ()
    values: tuple[Any, ...] = ()

    @property
    def is_prefix(self) -> bool:
        return self.embeds is None


@dataclass(frozen=True)
class DecoderShape:
    """What a decoder's layout needs an adapter to match."""

    hidden: int
    layers: int
    kv_heads: int
    head_dim: int


def read_virtual_tokens(folder: Path, shape: DecoderShape, config: dict[str, Any] | None = None) -> VirtualTokens:
    """The virtual tokens of the prompt-learning adapter saved in ``folder`` (``config``: its adapter_config.json,
    where the caller read it already), as fp32 tensors in ``shape``'s layout."""
    config = read_adapter_config(folder) if config is None else config
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in EMBEDDING_TYPES + PREFIX_TYPES:
        raise DirectReadUnsupported(f"{peft_type or 'unknown'} adapters are not virtual tokens")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise DirectReadUnsupported("virtual tokens for an encoder-decoder model")
    tensors = read_adapter_tensors(folder)
    if set(tensors) != {"prompt_embeddings"}:
        raise DirectReadUnsupported(f"tensors the fast decoder does not place: {sorted(tensors)}")
    table = tensors["prompt_embeddings"].float()
    count = int(config.get("num_virtual_tokens") or 0)
    if table.dim() != 2 or count < 1 or table.shape[0] != count:
        raise DirectReadUnsupported(f"prompt_embeddings of shape {tuple(table.shape)} for {count} virtual tokens")
    if peft_type in EMBEDDING_TYPES:
        if table.shape[1] != shape.hidden:
            raise DirectReadUnsupported(f"virtual tokens of width {table.shape[1]}, the model's is {shape.hidden}")
        return VirtualTokens(count, embeds=table.contiguous())
    width = shape.layers * 2 * shape.kv_heads * shape.head_dim
    if table.shape[1] != width:
        raise DirectReadUnsupported(
            f"a prefix of width {table.shape[1]}, the decoder's layers x 2 x kv heads x head dim is {width}"
        )
    # as peft: view (n, layers * 2, kv heads, head dim), permute to (layers * 2, kv heads, n, head dim);
    # slot 2i is layer i's keys, 2i + 1 its values
    per_slot = table.view(count, shape.layers * 2, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 3)
    keys = tuple(per_slot[2 * i].contiguous() for i in range(shape.layers))
    values = tuple(per_slot[2 * i + 1].contiguous() for i in range(shape.layers))
    return VirtualTokens(count, keys=keys, values=values)


__all__ = ["DecoderShape", "VirtualTokens", "read_virtual_tokens"]
