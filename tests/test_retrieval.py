import pytest

from personalize.data.indexing import doc_text
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


def _corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """Documents over a small vocabulary (so terms repeat, frequencies vary and scores tie), some empty."""
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(60)] + ["Star", "wars", "love", "Paris", "ocean"]
    docs = []
    for i in range(n):
        words = [rng.choice(vocab[: rng.randint(3, len(vocab))]) for _ in range(rng.randint(0, 30))]
        docs.append((f"d{i:04d}", " ".join(words) + (", ." if i % 7 == 0 else "")))
    return docs


QUERIES = ["w1 w2 w3", "star WARS love", "w0", "nothing-matches-here", "w5 w5 w59 paris", "", "ocean w10 w11 w12"]


def _assert_same(index, reference, ks=(1, 3, 10, 1000)):
    assert index.ids == reference.ids
    for query in QUERIES:
        assert index.scores(query) == pytest.approx(reference.scores(query), abs=1e-6, rel=1e-9)
        for k in ks:
            got, want = index.top(query, k), reference.top(query, k)
            assert [i for i, _ in got] == [i for i, _ in want], (query, k)
            assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)


def test_the_inverted_bm25_index_gives_the_scan_definitions_scores_and_order():
    from personalize.retrieval.bm25 import ScanBM25Index

    docs = _corpus(400, seed=3)
    ids, texts = [d for d, _ in docs], [t for _, t in docs]
    _assert_same(BM25Index(ids, texts), ScanBM25Index(ids, texts))
    assert BM25Index().top("w1", 3) == [] and BM25Index(["a"], [""]).top("w1", 3) == [("a", 0.0)]


def test_the_bm25_index_updated_in_place_equals_a_fresh_one():
    """Adds, replacements of a changed item and removals (past the compaction point) keep every statistic (n,
    document frequencies, average length) as a fresh index on the final corpus has them."""
    from personalize.retrieval.bm25 import ScanBM25Index

    docs = dict(_corpus(300, seed=5))
    ids = list(docs)
    index = BM25Index(ids[:100], [docs[i] for i in ids[:100]])
    index.add((i, docs[i]) for i in ids[100:])
    changed = {i: docs[j] for i, j in zip(ids[:40], ids[-40:], strict=True)}  # 40 items get another's text
    index.add(changed.items())
    docs.update(changed)
    removed = ids[50:250]  # more than the live ones left: the index compacts
    index.remove([*removed, "never-there"])
    for i in removed:
        del docs[i]
    before = index.copy()
    index.add([("fresh", "w1 w1 ocean")])
    assert "fresh" not in before.ids  # a copy is independent of later updates
    docs["fresh"] = "w1 w1 ocean"
    order = index.ids  # slot order: survivors, then replacements and additions
    assert sorted(order) == sorted(docs)
    _assert_same(index, ScanBM25Index(order, [docs[i] for i in order]))


def test_adding_items_indexes_only_the_new_and_changed_ones(client):
    """The BM25 retriever over the real store: after a user's data changes, only added or changed items are
    rendered and tokenised again, and its answers equal a fresh retriever's."""
    from personalize.retrieval.bm25 import BM25Retriever

    seen: list[str] = []

    def counting_doc_text(item):
        seen.append(item.id)
        return doc_text(item)

    items = [
        {"id": f"m{i}", "text": f"film number {i} about {'space' if i % 3 else 'love'} and w{i % 7}"} for i in range(60)
    ]
    client.add_items("carol", items)
    retriever = BM25Retriever(client.store, counting_doc_text)
    first = retriever.search("carol", "number 3 love w3", 5)
    assert first[0][0] == "m3"
    assert len(seen) == 60
    seen.clear()
    client.add_items(
        "carol", [{"id": "new", "text": "a submarine film about the ocean"}, {**items[3], "text": "ocean"}]
    )
    client.add_items("carol", items[:2])  # unchanged: the version may move, nothing is re-indexed
    after = retriever.search("carol", "ocean submarine", 3)
    assert sorted(seen) == ["m3", "new"]
    fresh = BM25Retriever(client.store, doc_text)
    assert after == fresh.search("carol", "ocean submarine", 3) and after[0][0] == "new"
    again = retriever.search("carol", "number 3 love w3", 5)
    assert again == fresh.search("carol", "number 3 love w3", 5) and "m3" not in [i for i, _ in again]


def test_the_exact_scan_gives_chromas_answer_on_a_fresh_collection(tmp_path):
    """The fallback used when HNSW answers short must rank exactly as a full, exact cosine search does."""
    import numpy as np

    from personalize.retrieval.vectorstore import VectorStore, _all_embeddings, _exact_top_k

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 16)).astype(np.float32)
    store = VectorStore(str(tmp_path / "chroma"))
    store.upsert("alice", [f"i{n}" for n in range(40)], vectors)
    query = rng.standard_normal(16).astype(np.float32)
    collection = store._collection("alice", create=False)
    exact = _exact_top_k(_all_embeddings(collection, page=7), query, 10)  # paged in several pages
    approximate = store.query("alice", query, 10)
    assert [h.id for h in exact] == [h.id for h in approximate]
    assert np.allclose([h.score for h in exact], [h.score for h in approximate], atol=1e-4)
    assert len(_exact_top_k(_all_embeddings(collection), query, 99)) == 40


def test_a_cached_collection_handle_that_went_stale_is_looked_up_again(tmp_path):
    """Reads keep the user's collection handle; when another client deletes and recreates the collection (a
    forget elsewhere, then new items), the next read must find the new items, never an error or the old ones."""
    import numpy as np

    from personalize.retrieval.vectorstore import VectorStore

    rng = np.random.default_rng(1)
    old, new = rng.standard_normal((6, 16)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    writer, reader = VectorStore(str(tmp_path / "chroma")), VectorStore(str(tmp_path / "chroma"))
    writer.upsert("alice", [f"old{n}" for n in range(6)], old)
    assert {h.id for h in reader.query("alice", old[0], 10)} == {f"old{n}" for n in range(6)}  # k > count: all
    assert "alice" in reader._handles
    assert writer.delete_user("alice")
    assert reader.query("alice", old[0], 4) == []  # gone: the stale handle is dropped, the lookup finds nothing
    assert "alice" not in reader._handles
    writer.upsert("alice", [f"new{n}" for n in range(3)], new)
    reader.query("bob", new[0], 2)  # another user's read changes nothing
    reader._handles["alice"] = writer._collection("alice", create=False)
    assert writer.delete_user("alice")
    writer.upsert("alice", [f"new{n}" for n in range(3)], new)  # recreated: a new collection id
    assert [h.id for h in reader.query("alice", new[1], 1)] == ["new1"]


def test_an_unreachable_chroma_server_is_an_error_not_an_empty_answer():
    import numpy as np

    from personalize.errors import VectorStoreUnavailableError
    from personalize.retrieval.chroma_server import free_port
    from personalize.retrieval.vectorstore import VectorStore

    store = VectorStore(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(VectorStoreUnavailableError, match="cannot be used"):
        store.query("alice", np.ones(16, dtype=np.float32), 4)
