"""Dense retrieval: the query's MiniLM embedding against the user's own Chroma collection."""

from __future__ import annotations

from personalize.retrieval.base import register_retriever
from personalize.retrieval.embedding import Embedder
from personalize.retrieval.vectorstore import VectorStore


class DenseRetriever:
    name = "dense"

    def __init__(self, vectors: VectorStore, embedder: Embedder) -> None:
        self.vectors = vectors
        self.embedder = embedder
        self._last: tuple[str, object] | None = None

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        return [(h.id, h.score) for h in self.vectors.query(user_id, self._embedding(query), k)]

    def _embedding(self, query: str):  # noqa: ANN202
        """The query is embedded once: retrieval asks again with a larger k when it skips vectors with no SQL row."""
        last = self._last
        if last is not None and last[0] == query:
            return last[1]
        embedding = self.embedder.embed_one(query)
        self._last = (query, embedding)
        return embedding


register_retriever(
    "dense",
    "Embedding similarity (MiniLM) in the user's own Chroma collection",
    lambda ctx: DenseRetriever(ctx.vectors, ctx.embedder),
)
