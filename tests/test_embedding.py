"""The lean BERT forward gives sentence-transformers' embeddings (issue 17), on the real bundled MiniLM."""

from __future__ import annotations

import random

import numpy as np
import pytest

from personalize.retrieval.bert_forward import BertMeanEncoder, length_sorted_batches
from personalize.retrieval.embedding import Embedder, get_embedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "a dark sci-fi thriller about a robot",
    "The Silent River (1987) (Drama, Thriller)",
    "  leading and trailing spaces  ",
    "",
    "Ünïcödé café, naïve 東京 🎬",
    "word " * 400,  # past max_seq_length: truncated at 256 tokens
    "I watched The Broken Harbor with my sister last Friday. The storm scenes were gripping and the ending felt "
    "predictable, although the middle part dragged a little.",
]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    embedder = get_embedder()
    _ = embedder.model
    return embedder


def test_the_bundled_embedder_runs_the_lean_forward(embedder):
    assert BertMeanEncoder.from_sentence_transformer(embedder.model) is not None
    assert embedder._lean is not None


def test_one_query_embeds_as_sentence_transformers_does(embedder):
    for text in TEXTS:
        lean = embedder.embed_one(text)
        reference = embedder.reference_embed([text])[0]
        assert lean.shape == reference.shape == (embedder.dimension,)
        assert float(lean @ reference) > 1 - 1e-5
        assert abs(float(np.linalg.norm(lean)) - 1) < 1e-5


def test_a_length_sorted_batch_embeds_as_sentence_transformers_does_in_the_callers_order(embedder):
    rng = random.Random(0)
    texts = [rng.choice(TEXTS) + " " + " ".join(rng.choices(TEXTS[0].split(), k=rng.randint(0, 40))) for _ in range(70)]
    lean = embedder.embed(texts)  # 70 texts: three batches of mixed lengths, padded within each
    reference = embedder.reference_embed(texts)
    assert lean.shape == reference.shape
    assert _min_cosine(lean, reference) > 1 - 1e-5  # row by row: the callers' order is restored


def test_batches_group_similar_lengths_within_the_token_budget_and_cover_every_index_once():
    lengths = [3, 50, 7, 50, 1, 20, 9, 300]
    batches = length_sorted_batches(lengths, max_tokens=100, max_texts=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [[lengths[i] for i in b] for b in batches] == [[300], [50, 50], [20, 9, 7], [3, 1]]
    assert all(len(b) * lengths[b[0]] <= 100 for b in batches[1:])  # a longer text than the budget goes alone


def test_a_model_that_is_not_a_mean_pooled_bert_keeps_sentence_transformers(embedder):
    pipeline = list(embedder.model)
    assert BertMeanEncoder.from_sentence_transformer(pipeline[:2]) is None  # no Normalize: not the same function
