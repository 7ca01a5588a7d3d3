"""The likelihood reranker (issue 15 part 4): ``bm25+rerank`` and ``dense+rerank`` reorder the first stage's top
candidates by log p(query | item); the real model puts a planted relevant item on top, and the batched scores are
the unbatched ones."""

from __future__ import annotations

import pytest
import torch
from conftest import movie_items

from personalize import Personalizer, Settings
from personalize.retrieval import RETRIEVERS, LikelihoodReranker, RecencyRetriever
from personalize.retrieval.rerank import RERANK_TEMPLATE, query_log_likelihoods

QUERY = "What is the capital of France?"
PLANTED = "Paris is the capital and largest city of France, on the river Seine."
OTHERS = [
    "I baked sourdough bread this weekend with a new starter.",
    "Our football team lost the match on Sunday after extra time.",
    "The new phone has a better camera and a bigger battery.",
    "I planted tomatoes and basil on the balcony in May.",
    "My cat sleeps on the radiator all winter long.",
    "We hiked up the mountain trail and saw two eagles.",
    "The jazz concert downtown was sold out within an hour.",
    "I am learning to knit a scarf for my sister.",
]


def _unbatched(loaded, passage: str, query: str) -> float:
    tok = loaded.tokenizer
    cut = tok.decode(tok(passage, add_special_tokens=False).input_ids)
    prompt = tok(RERANK_TEMPLATE.format(passage=cut), add_special_tokens=False).input_ids
    target = tok(" " + query, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + target])
    with torch.inference_mode():
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits.float(), dim=-1)[0]
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(target)) / len(target))


def test_batched_scores_are_the_unbatched_ones_and_the_order_follows_them(client):
    client.add_items("u", [{"id": str(i), "text": text} for i, text in enumerate([PLANTED, *OTHERS])])
    passages = [PLANTED, *OTHERS]
    scores = query_log_likelihoods(client.model, passages, QUERY, batch_size=3)  # padded batches of unequal rows
    for passage, score in zip(passages, scores, strict=True):
        assert score == pytest.approx(_unbatched(client.model, passage, QUERY), abs=1e-4)
    hits = client.retrieve("u", QUERY, k=4, retriever="bm25+rerank")
    assert len(hits) == 4 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    by_text = dict(zip(passages, scores, strict=True))
    assert [h.score for h in hits] == pytest.approx(sorted(by_text.values(), reverse=True)[:4], abs=1e-4)
    assert {"bm25+rerank", "dense+rerank"} <= set(RETRIEVERS)
    dense = client.retrieve("u", QUERY, k=2, retriever="dense+rerank")
    assert len(dense) == 2 and all(h.item.text in passages for h in dense)
    # a rag method uses it like any retriever, and forget reaches the first stage's per-user index
    result = client.generate("u", QUERY, method="rag", retriever="bm25+rerank", k=2, max_new_tokens=2)
    assert result.retriever == "bm25+rerank" and [r.id for r in result.retrieved] == [h.id for h in hits[:2]]
    client.forget("u")
    client.add_items("u", movie_items(3))
    assert {h.item.text for h in client.retrieve("u", "film", k=3, retriever="bm25+rerank")} <= {
        i["text"] for i in movie_items(3)
    }


@pytest.mark.slow
def test_the_real_model_puts_a_planted_relevant_item_on_top(bundled_home):
    with Personalizer(Settings(home=bundled_home, auto_train=False, _env_file=None)) as p:
        texts = [*OTHERS[:4], PLANTED, *OTHERS[4:]]  # recency puts the planted item in the middle
        items = [{"id": f"n{i}", "text": t, "timestamp": f"2024-01-01T00:00:{i:02d}"} for i, t in enumerate(texts)]
        p.add_items("reader", items)
        first = RecencyRetriever(p.store)
        assert first.search("reader", QUERY, 9)[0][0] != "n4"
        reranker = LikelihoodReranker("recency+rerank", first, p.retrievers.context, candidates=9)
        ranked = reranker.search("reader", QUERY, 3)
        assert ranked[0][0] == "n4", ranked
