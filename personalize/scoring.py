"""Scoring a label set by likelihood: log p(label | prompt) for every candidate in one batched forward pass.

For tasks with a fixed label set (ratings, tags, [1]/[2]) this is the stable alternative to free generation: the
answer is always a valid label, and it costs one forward pass per query instead of a decoding loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from personalize.modeling import LoadedModel


def candidate_log_likelihoods(
    loaded: LoadedModel, prompt_ids: Sequence[int], candidates: Sequence[str], model: Any = None
) -> list[float]:
    """Sum of token log-probabilities of each candidate after the prompt (right-padded batch, fp32)."""
    import torch

    tok = loaded.tokenizer
    model = model or loaded.model
    cand_ids = [tok(c, add_special_tokens=False).input_ids for c in candidates]
    pad = loaded.pad_id
    with torch.inference_mode():
        if loaded.is_encoder_decoder:
            enc = torch.tensor([list(prompt_ids)] * len(candidates))
            width = max(len(c) for c in cand_ids)
            labels = torch.tensor([c + [-100] * (width - len(c)) for c in cand_ids])
            logits = model(input_ids=enc, attention_mask=torch.ones_like(enc), labels=labels).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            out = []
            for row, ids in enumerate(cand_ids):
                out.append(float(sum(logp[row, t, tid] for t, tid in enumerate(ids))))
            return out
        n = len(prompt_ids)
        if all(len(c) == 1 for c in cand_ids):  # one-token labels (ratings, [1]/[2] often): one pass of the prompt
            ids = torch.tensor([list(prompt_ids)])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **_keep(model, 1)).logits
            logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
            return [float(logp[c[0]]) for c in cand_ids]
        rows = [list(prompt_ids) + c for c in cand_ids]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        keep = width - n + 1  # only the positions that predict candidate tokens go through the output layer
        logits = model(input_ids=ids, attention_mask=mask, **_keep(model, keep)).logits
        logits = logits[:, -keep:] if logits.shape[1] != keep else logits
        logp = torch.log_softmax(logits[:, : width - n].float(), dim=-1)
        out = []
        for row, c in enumerate(cand_ids):
            out.append(float(sum(logp[row, t, tid] for t, tid in enumerate(c))))
        return out


def _keep(model: Any, n: int) -> dict[str, int]:
    """``logits_to_keep`` where the model supports it (recent causal LMs): the output layer runs on n positions."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
