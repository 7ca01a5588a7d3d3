"""BM25 (LaMP's baseline): Okapi BM25 over one user's items, an index per user cached until their data changes."""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from personalize.items import ProfileItem
from personalize.retrieval.base import register_retriever
from personalize.store import Store

_TOKEN = re.compile(r"\w+", re.UNICODE)


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

    def __init__(self, store: Store, doc_text: Callable[[ProfileItem], str], cache_users: int = 64) -> None:
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


register_retriever(
    "bm25",
    "Okapi BM25 over the user's items (LaMP's baseline); an index per user, rebuilt when their data changes",
    lambda ctx: BM25Retriever(ctx.store, ctx.doc_text),
)
