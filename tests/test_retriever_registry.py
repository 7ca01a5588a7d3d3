"""The retriever registry: a retriever is one class plus ``register_retriever``, used by name everywhere after."""

from __future__ import annotations

import pytest

from personalize import Personalizer
from personalize.data.store import Store
from personalize.errors import InvalidInputError
from personalize.retrieval import (
    BUILTIN_RETRIEVERS,
    RETRIEVERS,
    RetrieverContext,
    check_retriever,
    register_retriever,
    retriever_names,
    unregister_retriever,
)


class Longest:
    """A toy retriever: the user's items, longest text first; remembers whom it was told to forget."""

    name = "longest"
    forgotten: list[str] = []

    def __init__(self, store: Store) -> None:
        self.store = store

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        ranked = sorted(self.store.items(user_id), key=lambda i: (-len(i.text), i.id))[:k]
        return [(i.id, float(len(i.text))) for i in ranked]

    def forget(self, user_id: str) -> None:
        Longest.forgotten.append(user_id)


@pytest.fixture
def longest():
    """``longest`` registered for one test, and gone afterwards."""
    Longest.forgotten = []
    register_retriever("longest", "The user's items, longest text first (a test's toy)", lambda c: Longest(c.store))
    yield Longest
    unregister_retriever("longest")


ALICE = [
    {"id": "short", "text": "A film", "timestamp": "2020-01-01"},
    {"id": "long", "text": "A long review of a film about a chef who opens a restaurant", "timestamp": "2020-01-02"},
    {"id": "mid", "text": "A film about a chef and pasta", "timestamp": "2020-01-03"},
]
BOB = [{"id": "bob-longest", "text": "Bob's item is by far the longest text of all of them, " * 4}]


def test_builtins_are_registered_in_order_and_each_has_a_description():
    assert retriever_names()[:3] == BUILTIN_RETRIEVERS == ("dense", "bm25", "recency")
    for name, spec in RETRIEVERS.items():
        assert spec.name == name
        assert spec.description.strip() and "\n" not in spec.description, name


def test_a_registered_toy_retriever_serves_retrieve_and_rag(client, longest):
    client.add_items("alice", ALICE)
    client.add_items("bob", BOB)
    assert "longest" in retriever_names() and check_retriever("longest") == "longest"
    hits = client.retrieve("alice", "anything", k=2, retriever="longest")
    assert [h.id for h in hits] == ["long", "mid"]  # only alice's items, bob's longer one never
    assert hits[0].item.text.startswith("A long review") and hits[0].score > hits[1].score
    result = client.generate("alice", "Recommend a film", method="rag", k=3, max_new_tokens=2, retriever="longest")
    assert result.method == "rag" and result.retriever == "longest"
    assert result.retrieved_ids == ["long", "mid", "short"]
    assert isinstance(client.retriever("longest"), Longest)
    assert client.retriever("longest") is client.retriever("longest")  # built once per client


def test_a_registered_retriever_can_be_the_default(settings, longest):
    with Personalizer(settings.model_copy(update={"retriever": "longest"})) as p:
        p.add_items("alice", ALICE)
        assert p.retrieve("alice", "anything", k=1)[0].id == "long"
        assert p.generate("alice", "Recommend a film", method="rag", k=1, max_new_tokens=2).retriever == "longest"


def test_forget_calls_every_built_retrievers_forget_hook(client, longest):
    client.add_items("alice", ALICE)
    client.add_items("bob", BOB)
    client.retrieve("alice", "a chef", k=1, retriever="bm25")
    client.retrieve("alice", "anything", k=1, retriever="longest")
    assert "alice" in client.retriever("bm25")._cache
    client.forget("alice")
    assert longest.forgotten == ["alice"]
    assert "alice" not in client.retriever("bm25")._cache
    assert [h.id for h in client.retrieve("bob", "x", k=5, retriever="longest")] == ["bob-longest"]


def test_unknown_retrievers_name_the_registered_ones(client, longest):
    client.add_items("alice", ALICE)
    message = r"unknown retriever 'magic'; choose one of dense, bm25, recency, bm25\+rerank, dense\+rerank, longest"
    with pytest.raises(InvalidInputError, match=message):
        client.retrieve("alice", "x", retriever="magic")
    with pytest.raises(InvalidInputError, match=message):
        client.generate("alice", "x", method="rag", retriever="magic")
    with pytest.raises(InvalidInputError, match="unknown retriever"):
        check_retriever(["not", "a", "name"])


def test_an_unknown_default_says_it_is_the_setting(settings):
    with Personalizer(settings.model_copy(update={"retriever": "magic"})) as p:
        p.add_items("alice", ALICE)
        with pytest.raises(InvalidInputError, match=r"unknown retriever 'magic'.*PERSONALIZE_RETRIEVER"):
            p.retrieve("alice", "x")
        assert p.generate("alice", "x", method="none", max_new_tokens=1).method == "none"  # no retrieval, no check


def test_unregistered_is_unknown_again(client):
    client.add_items("alice", ALICE)
    register_retriever("gone", "Registered and removed at once", lambda c: Longest(c.store))
    unregister_retriever("gone")
    assert "gone" not in retriever_names()
    with pytest.raises(InvalidInputError, match="unknown retriever 'gone'"):
        client.retrieve("alice", "x", retriever="gone")


def test_registration_is_checked(longest):
    with pytest.raises(ValueError, match="already registered"):
        register_retriever("longest", "Again", lambda c: Longest(c.store))
    with pytest.raises(ValueError, match="one-line description"):
        register_retriever("other", "", lambda c: Longest(c.store))
    with pytest.raises(ValueError, match="non-empty word"):
        register_retriever("two words", "A description", lambda c: Longest(c.store))
    spec = register_retriever("longest", "Replaced", lambda c: Longest(c.store), replace=True)
    assert RETRIEVERS["longest"] is spec and spec.description == "Replaced"


def test_a_factory_gets_the_clients_resources(client, longest):
    seen: list[RetrieverContext] = []

    def factory(context: RetrieverContext) -> Longest:
        seen.append(context)
        return Longest(context.store)

    register_retriever("longest", "The user's items, longest text first", factory, replace=True)
    client.add_items("alice", ALICE)
    client.retrieve("alice", "x", k=1, retriever="longest")
    (context,) = seen
    assert context.store is client.store and context.vectors is client.vectors and context.embedder is client.embedder
    assert context.doc_text(client.items("alice")[0]) == "A film"


def test_task_adapter_pairs_take_only_the_built_in_retrievers(longest):
    from personalize.adapters.task_adapters import check_pair_retriever

    assert [check_pair_retriever(name) for name in BUILTIN_RETRIEVERS] == list(BUILTIN_RETRIEVERS)
    with pytest.raises(InvalidInputError, match="task-adapter pairs rank earlier items with dense, bm25, recency"):
        check_pair_retriever("longest")  # registered, but it ranks stored items, not the earlier ones of a pair
    with pytest.raises(InvalidInputError, match="unknown retriever 'magic'"):
        check_pair_retriever("magic")
