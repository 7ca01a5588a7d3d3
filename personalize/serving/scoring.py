"""Scoring a label set by likelihood: log p(label | prompt) for every candidate in one batched forward pass.

For tasks with a fixed label set (ratings, tags, [1]/[2]) this is the stable alternative to free generation: the
answer is always a valid label, and it costs one forward pass per query instead of a decoding loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from personalize.serving.modeling import LoadedModel


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


def median_label(log_likelihoods: Mapping[str, float]) -> str:
    """The median of the label distribution (softmax of the scores over numeric labels in their numeric order): the
    answer that minimises the expected absolute error, where the most likely label (argmax) minimises the error
    rate. On a rating task judged by MAE, a model that puts 40% on 5 and 60% spread over 1-3 answers 3, not 5."""
    from scipy.special import softmax

    try:
        ordered = sorted(log_likelihoods, key=float)
    except ValueError as exc:
        raise ValueError(f"the median decision needs numeric labels, got {sorted(log_likelihoods)}") from exc
    if not ordered:
        raise ValueError("the median decision needs at least one label")
    probs = softmax([log_likelihoods[label] for label in ordered])
    cumulative = 0.0
    for label, prob in zip(ordered, probs, strict=True):
        cumulative += float(prob)
        if cumulative >= 0.5:
            return label
    return ordered[-1]  # float rounding left the total just under 0.5


def _keep(model: Any, n: int) -> dict[str, int]:
    """``logits_to_keep`` where the model supports it (recent causal LMs): the output layer runs on n positions."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
