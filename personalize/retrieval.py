"""Retrievers over one user's items: dense (Chroma + MiniLM), BM25 (LaMP's baseline) and recency.

A retriever is one small class registered by name; ``RETRIEVERS`` is the registry that settings and the per-call
``retriever=`` argument select from. Every retriever searches only the asking user's items.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from personalize.checks import short
from personalize.embedding import Embedder
from personalize.errors import InvalidInputError
from personalize.items import ProfileItem
from personalize.store import Store
from personalize.vectorstore import VectorStore

_TOKEN = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class RetrievedItem:
    id: str
    score: float
    item: ProfileItem


class Retriever(Protocol):
    name: str

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        """Return up to ``k`` (item id, score) pairs, best first."""
        ...


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (LaMP splits on whitespace; dropping punctuation helps short items match)."""
    return _TOKEN.findall(text.lower())


class BM25Index:
    """Okapi BM25 (k1=1.5, b=0.75) with Lucene's non-negative idf, over one user's documents."""

    def __init__(self, ids: Sequence[str], docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.ids = list(ids)
        self.k1, self.b = k1, b
        self.doc_terms = [Counter(tokenize(d)) for d in docs]
        self.doc_len = [sum(c.values()) for c in self.doc_terms]
        self.avg_len = (sum(self.doc_len) / len(self.doc_len)) if self.doc_len else 0.0
        df: Counter[str] = Counter()
        for terms in self.doc_terms:
            df.update(terms.keys())
        n = len(self.ids)
        self.idf = {t: math.log(1.0 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        q_terms = [t for t in set(tokenize(query)) if t in self.idf]
        out = []
        for terms, length in zip(self.doc_terms, self.doc_len, strict=True):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_len) if self.avg_len else self.k1
            s = 0.0
            for t in q_terms:
                f = terms.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out

    def top(self, query: str, k: int) -> list[tuple[str, float]]:
        scored = sorted(zip(self.ids, self.scores(query), strict=True), key=lambda p: (-p[1], p[0]))
        return scored[:k]


class BM25Retriever:
    name = "bm25"

    def __init__(self, store: Store, doc_text, cache_users: int = 64) -> None:  # noqa: ANN001
        self.store = store
        self.doc_text = doc_text
        self._cache: OrderedDict[str, tuple[int, BM25Index]] = OrderedDict()
        self._cache_users = cache_users
        self._lock = threading.Lock()

    def _index(self, user_id: str) -> BM25Index:
        version = self.store.data_version(user_id)
        with self._lock:
            cached = self._cache.get(user_id)
            if cached and cached[0] == version:
                self._cache.move_to_end(user_id)
                return cached[1]
        items = self.store.items(user_id)
        index = BM25Index([i.id for i in items], [self.doc_text(i) for i in items])
        with self._lock:
            self._cache[user_id] = (version, index)
            while len(self._cache) > self._cache_users:
                self._cache.popitem(last=False)
        return index

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        return self._index(user_id).top(query, k)

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._cache.pop(user_id, None)


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


class RecencyRetriever:
    """The user's latest items (by timestamp, then insertion order); the score is the rank from newest."""

    name = "recency"

    def __init__(self, store: Store) -> None:
        self.store = store

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        items = self.store.items(user_id)
        latest = list(reversed(items))[:k]
        return [(item.id, 1.0 / (rank + 1)) for rank, item in enumerate(latest)]


RETRIEVER_NAMES = ("dense", "bm25", "recency")


def check_retriever(name: str) -> str:
    if name not in RETRIEVER_NAMES:
        raise InvalidInputError(f"unknown retriever {short(name)}; choose one of {', '.join(RETRIEVER_NAMES)}")
    return name
