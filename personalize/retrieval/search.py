"""A client's retrievers: built once per name from the registry, searched for hits that SQL still holds.

Vectors left without rows by a crash (until repaired) are skipped and more are fetched, so k items come back
whenever the user has k.
"""

from __future__ import annotations

from personalize.data.store import Store
from personalize.errors import InvalidInputError
from personalize.retrieval.base import (
    ForgetsUsers,
    RetrievedItem,
    Retriever,
    RetrieverContext,
    SearchesAtVersion,
    check_retriever,
    get_retriever_spec,
)


class Retrievers:
    """The registered retrievers of one client, each built on first use with the client's stores."""

    def __init__(self, context: RetrieverContext, store: Store, default: str) -> None:
        self.context, self.store, self.default = context, store, default
        self._built: dict[str, Retriever] = {}

    def name(self, name: str | None) -> str:
        """``name``, or the default, as a registered retriever; an unknown default says where it came from."""
        if name:
            return check_retriever(name)
        try:
            return check_retriever(self.default)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{exc} (the default: settings.retriever, PERSONALIZE_RETRIEVER)") from None

    def get(self, name: str | None = None) -> Retriever:
        name = self.name(name)
        if name not in self._built:
            self._built[name] = get_retriever_spec(name).factory(self.context)
        return self._built[name]

    def forget(self, user_id: str) -> None:
        """Drop the user from every built retriever that keeps per-user state."""
        for built in list(self._built.values()):
            if isinstance(built, ForgetsUsers):
                built.forget(user_id)

    def search(
        self, user_id: str, query: str, k: int, retriever: str | None = None, data_version: int | None = None
    ) -> list[RetrievedItem]:
        """The top k hits that SQL holds; each round that finds too few asks for four times more. ``data_version``
        (a resolved request's) spares a retriever with a per-user index reading it again."""
        found_by = self.get(retriever)
        fetch = k
        while True:
            if data_version is not None and isinstance(found_by, SearchesAtVersion):
                hits = found_by.search_at(user_id, query, fetch, data_version)
            else:
                hits = found_by.search(user_id, query, fetch)
            by_id = {i.id: i for i in self.store.items(user_id, [h[0] for h in hits])} if hits else {}
            found = [RetrievedItem(item_id, score, by_id[item_id]) for item_id, score in hits if item_id in by_id]
            if len(found) >= k or len(hits) < fetch:
                return found[:k]
            fetch *= 4


__all__ = ["Retrievers"]
