"""A likelihood reranker over a first-stage retriever (UPR, Sachan et al. 2022; the query-dependent half of Q-PEFT).

``bm25+rerank`` and ``dense+rerank`` retrieve the top ``rerank_candidates`` (20) of the user's items with the first
stage, score each by the language model's mean log-likelihood of the query given the item (the question an item
would make the model ask), and keep the top k. Every rag method can use them (``retriever="bm25+rerank"``).
The model is the plain base (zero-shot): reranking asks what a passage makes likely, not how the task is answered.

No reranker adapter is trained here: issue 15's optional Q-PEFT adapter (one small LoRA on pooled item-to-query
pairs) is not built; the note says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from personalize.retrieval.base import ForgetsUsers, Retriever, RetrieverContext, get_retriever_spec, register_retriever

RERANK_TEMPLATE = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
MAX_PASSAGE_TOKENS = 256
MAX_QUERY_TOKENS = 64


class LikelihoodReranker:
    """The first stage's top ``candidates`` items, reordered by log p(query | item) under the language model."""

    def __init__(self, name: str, first: Retriever, context: RetrieverContext, candidates: int) -> None:
        if context.language_model is None:
            raise ValueError(f"retriever {name!r} needs a language model in its RetrieverContext")
        self.name = name
        self.first = first
        self.context = context
        self.candidates = candidates
        self._model: Callable[[], Any] = context.language_model

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        hits = self.first.search(user_id, query, max(k, self.candidates))
        if len(hits) <= 1:
            return hits[:k]
        by_id = {item.id: item for item in self.context.store.items(user_id, [h[0] for h in hits])}
        ids = [h[0] for h in hits if h[0] in by_id]
        passages = [self.context.doc_text(by_id[i]) for i in ids]
        scores = query_log_likelihoods(self._model(), passages, query)
        ranked = sorted(zip(ids, scores, strict=True), key=lambda pair: -pair[1])
        return ranked[:k]

    def forget(self, user_id: str) -> None:
        if isinstance(self.first, ForgetsUsers):
            self.first.forget(user_id)


def query_log_likelihoods(loaded: Any, passages: Sequence[str], query: str, batch_size: int = 8) -> list[float]:
    """Mean log-probability of the query's tokens after each passage's prompt (``RERANK_TEMPLATE``), fp32,
    right-padded batches; passages and the query are cut to ``MAX_PASSAGE_TOKENS`` / ``MAX_QUERY_TOKENS``."""
    import torch

    tok = loaded.tokenizer
    query_ids = tok(" " + query.strip(), add_special_tokens=False).input_ids[:MAX_QUERY_TOKENS] or [loaded.pad_id]
    rows = []
    for passage in passages:
        cut = tok.decode(tok(passage, add_special_tokens=False).input_ids[:MAX_PASSAGE_TOKENS])
        rows.append(tok(RERANK_TEMPLATE.format(passage=cut), add_special_tokens=False).input_ids)
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            prompts = rows[start : start + batch_size]
            full = [p + query_ids for p in prompts]
            width = max(len(r) for r in full)
            ids = torch.tensor([r + [loaded.pad_id] * (width - len(r)) for r in full])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in full])
            logp = torch.log_softmax(loaded.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, prompt in enumerate(prompts):
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(query_ids))
                targets = torch.tensor(query_ids)
                out.append(float(logp[row, positions, targets].mean()))
    return out


def _reranked(first: str) -> Callable[[RetrieverContext], Retriever]:
    def build(context: RetrieverContext) -> Retriever:
        return LikelihoodReranker(
            f"{first}+rerank", get_retriever_spec(first).factory(context), context, context.rerank_candidates
        )

    return build


for _first in ("bm25", "dense"):
    register_retriever(
        f"{_first}+rerank",
        f"{_first}'s top candidates reranked by the model's log-likelihood of the query given each item (UPR)",
        _reranked(_first),
    )

__all__ = ["LikelihoodReranker", "query_log_likelihoods"]
