"""The retriever seam: the ``Retriever`` protocol, what a hit is, and the registry that names retrievers.

A retriever is one module of this package: a class with a ``name`` and ``search(user_id, query, k)`` (and, where it
keeps per-user state such as a cache, a ``forget(user_id)`` hook), and one ``register_retriever`` call that gives
its name, a one-line description and a factory from a ``RetrieverContext``. ``Personalizer.retriever(name)`` builds
it from ``RETRIEVERS``, the registry that settings and the per-call ``retriever=`` argument select from, and
``Personalizer.forget`` calls every built retriever's ``forget``. Every retriever searches only the asking user's
items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from personalize.data.checks import short
from personalize.data.items import ProfileItem
from personalize.errors import InvalidInputError

if TYPE_CHECKING:
    from personalize.data.store import Store
    from personalize.retrieval.embedding import Embedder
    from personalize.retrieval.vectorstore import VectorStore


@dataclass(frozen=True)
class RetrievedItem:
    id: str
    score: float
    item: ProfileItem


class Retriever(Protocol):
    """Searches one user's items. A retriever that keeps per-user state also has ``forget(user_id)``
    (see ``ForgetsUsers``), which ``Personalizer.forget`` calls."""

    name: str

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        """Return up to ``k`` (item id, score) pairs of ``user_id``'s items, best first."""
        ...


@runtime_checkable
class ForgetsUsers(Protocol):
    """The optional hook of a retriever: drop whatever it keeps about ``user_id`` (a cache, an index)."""

    def forget(self, user_id: str) -> None: ...


@runtime_checkable
class SearchesAtVersion(Protocol):
    """The optional hook of a retriever that keeps a per-user index: search given the user's data version, which
    the request already resolved, instead of reading it again to check the index is fresh."""

    def search_at(self, user_id: str, query: str, k: int, data_version: int) -> list[tuple[str, float]]: ...


@dataclass(frozen=True)
class RetrieverContext:
    """What a retriever factory may use: the SQL store, the vector store, the embedder, the text an item is
    searched by (its task's retrieval text) and, for rerankers, the language model (loaded on first use) and how many
    first-stage candidates they rerank."""

    store: Store
    vectors: VectorStore
    embedder: Embedder
    doc_text: Callable[[ProfileItem], str]
    language_model: Callable[[], Any] | None = None
    rerank_candidates: int = 20


@dataclass(frozen=True)
class RetrieverSpec:
    name: str
    description: str
    factory: Callable[[RetrieverContext], Retriever]


RETRIEVERS: dict[str, RetrieverSpec] = {}


def register_retriever(
    name: str, description: str, factory: Callable[[RetrieverContext], Retriever], *, replace: bool = False
) -> RetrieverSpec:
    """Add a retriever to the registry under ``name`` (listed in registration order); a name already taken is an
    error unless ``replace``."""
    if not isinstance(name, str) or not name or name != name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"a retriever name is a non-empty word, got {name!r}")
    if not isinstance(description, str) or not description.strip() or "\n" in description.strip():
        raise ValueError(f"retriever {name!r} needs a one-line description")
    if not callable(factory):
        raise ValueError(f"retriever {name!r} needs a factory that builds it from a RetrieverContext")
    if name in RETRIEVERS and not replace:
        raise ValueError(f"retriever {name!r} is already registered")
    spec = RetrieverSpec(name, description.strip(), factory)
    RETRIEVERS[name] = spec
    return spec


def unregister_retriever(name: str) -> None:
    """Remove ``name`` from the registry (a no-op when it is not there)."""
    RETRIEVERS.pop(name, None)


def retriever_names() -> tuple[str, ...]:
    return tuple(RETRIEVERS)


def check_retriever(name: str) -> str:
    if not isinstance(name, str) or name not in RETRIEVERS:
        raise InvalidInputError(f"unknown retriever {short(name)}; choose one of {', '.join(RETRIEVERS)}", "retriever")
    return name


def get_retriever_spec(name: str) -> RetrieverSpec:
    return RETRIEVERS[check_retriever(name)]
