import pytest

from personalize.errors import InvalidInputError, UnknownUserError
from personalize.retrieval import BM25Index, tokenize

ITEMS = [
    {"id": "space", "text": "A starship crew explores a distant galaxy and meets aliens", "timestamp": "2020-01-01"},
    {"id": "love", "text": "Two strangers fall in love in Paris during a rainy spring", "timestamp": "2020-02-01"},
    {"id": "cook", "text": "A chef opens a small restaurant that serves pasta and bread", "timestamp": "2020-03-01"},
]


def test_bm25_scores_by_hand():
    index = BM25Index(["a", "b"], ["apple banana", "banana cherry cherry"])
    scores = dict(index.top("cherry", 2))
    assert scores["a"] == 0.0
    # idf = ln(1 + (2 - 1 + 0.5) / (1 + 0.5)) = ln 2; tf=2, len 3, avg 2.5
    import math

    norm = 1.5 * (1 - 0.75 + 0.75 * 3 / 2.5)
    assert scores["b"] == pytest.approx(math.log(2) * 2 * 2.5 / (2 + norm))
    assert tokenize("Hello, World!") == ["hello", "world"]


@pytest.mark.parametrize("retriever", ["dense", "bm25"])
def test_items_are_retrievable_at_once(client, retriever):
    client.add_items("alice", ITEMS)
    hits = client.retrieve("alice", "aliens in outer space galaxy", k=2, retriever=retriever)
    assert hits[0].id == "space"
    assert hits[0].item.text.startswith("A starship")
    assert len(hits) == 2 and hits[0].score >= hits[1].score


def test_recency_returns_latest_first(client):
    client.add_items("alice", ITEMS)
    assert [h.id for h in client.retrieve("alice", "anything", k=2, retriever="recency")] == ["cook", "love"]


def test_updated_item_is_reindexed(client):
    client.add_items("alice", ITEMS)
    client.add_items("alice", [{"id": "cook", "text": "A submarine dives to the ocean floor among whales"}])
    for retriever in ("dense", "bm25"):
        assert client.retrieve("alice", "submarine under the ocean", k=1, retriever=retriever)[0].id == "cook"


def test_users_never_see_each_others_items(client):
    ids = ["bob", "Bob", "bob/", "bo", "bob ", "b\u00f6b", "bo\u0308b"]  # prefixes, case, unicode forms, paths
    for n, user_id in enumerate(ids):
        client.add_items(user_id, [{"id": "shared-id", "text": f"secret number {n} of {user_id}"}])
    for n, user_id in enumerate(ids):
        for retriever in ("dense", "bm25", "recency"):
            hits = client.retrieve(user_id, "secret number", k=10, retriever=retriever)
            assert [h.item.text for h in hits] == [f"secret number {n} of {user_id}"]


def test_retrieve_errors(client):
    with pytest.raises(UnknownUserError):
        client.retrieve("ghost", "x")
    client.add_items("alice", ITEMS)
    with pytest.raises(InvalidInputError, match="unknown retriever"):
        client.retrieve("alice", "x", retriever="magic")
    assert client.retrieve("alice", "x", k=0) == []
