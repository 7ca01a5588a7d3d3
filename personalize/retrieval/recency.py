"""Recency: the user's latest items, whatever the query."""

from __future__ import annotations

from personalize.data.store import Store
from personalize.retrieval.base import register_retriever


class RecencyRetriever:
    """The user's latest items (by timestamp, then insertion order); the score is the rank from newest."""

    name = "recency"

    def __init__(self, store: Store) -> None:
        self.store = store

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        items = self.store.items(user_id)
        latest = list(reversed(items))[:k]
        return [(item.id, 1.0 / (rank + 1)) for rank, item in enumerate(latest)]


register_retriever(
    "recency",
    "The user's latest items (by timestamp, then insertion order), whatever the query",
    lambda ctx: RecencyRetriever(ctx.store),
)
