"""BM25 (LaMP's baseline): Okapi BM25 over one user's items, an inverted index per user kept up to date in place.

``BM25Index`` holds postings per term in growable arrays and scores a query with numpy over the postings of its
terms only, so a query costs its terms' postings, not a Python loop over every document. Adding or changing items
appends them (a changed or removed item is masked out, and the index compacts itself when masked slots pile up), so
new data never re-tokenises a user's whole profile. ``ScanBM25Index`` is the plain definition (a loop over every
document): the tests hold the index to its scores and ``benchmarks/retrieval.py`` measures both.
"""

from __future__ import annotations

import math
import re
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from personalize.data.items import ProfileItem
from personalize.data.store import Store
from personalize.retrieval.base import register_retriever

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (LaMP splits on whitespace; dropping punctuation helps short items match)."""
    return _TOKEN.findall(text.lower())


def _idf(n: int, df: int) -> float:
    """Lucene's non-negative idf."""
    return math.log(1.0 + (n - df + 0.5) / (df + 0.5))


def _ranked(ids: Sequence[str], scores: Iterable[float], k: int) -> list[tuple[str, float]]:
    """The k best (id, score), ties broken by id: the order both indexes return."""
    return sorted(zip(ids, scores, strict=True), key=lambda p: (-p[1], p[0]))[:k]


class ScanBM25Index:
    """Okapi BM25 (k1=1.5, b=0.75) with Lucene's non-negative idf, by a scan over every document: the definition."""

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
        self.idf = {t: _idf(n, f) for t, f in df.items()}

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
        return _ranked(self.ids, self.scores(query), k)


@dataclass
class _Postings:
    slots: array = field(default_factory=lambda: array("q"))  # the document slots holding the term
    counts: array = field(default_factory=lambda: array("d"))  # its frequency in each


class BM25Index:
    """Okapi BM25 (k1=1.5, b=0.75) with Lucene's non-negative idf, as an inverted index that grows in place.

    Documents live in slots; ``add`` appends (replacing a document of the same id), ``remove`` masks a slot out of
    every statistic (n, document frequencies, average length), so the scores always equal a fresh index's."""

    def __init__(self, ids: Sequence[str] = (), docs: Sequence[str] = (), k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._reset()
        self.add(zip(ids, docs, strict=True))

    def _reset(self) -> None:
        self._postings: dict[str, _Postings] = {}
        self._df: Counter[str] = Counter()
        self._slot_of: dict[str, int] = {}
        self._slot_ids: list[str] = []
        self._slot_terms: list[Counter[str] | None] = []  # None: a removed slot
        self._slot_len = array("d")
        self._alive = bytearray()
        self._total_len = 0.0

    def copy(self) -> BM25Index:
        """An independent index to update while readers keep using this one (term counts are shared: never
        mutated once indexed)."""
        twin = BM25Index(k1=self.k1, b=self.b)
        twin._postings = {t: _Postings(array("q", p.slots), array("d", p.counts)) for t, p in self._postings.items()}
        twin._df = Counter(self._df)
        twin._slot_of = dict(self._slot_of)
        twin._slot_ids = list(self._slot_ids)
        twin._slot_terms = list(self._slot_terms)
        twin._slot_len = array("d", self._slot_len)
        twin._alive = bytearray(self._alive)
        twin._total_len = self._total_len
        return twin

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def ids(self) -> list[str]:
        """The live documents' ids, in slot order."""
        return [self._slot_ids[s] for s in self._live_slots()]

    def add(self, docs: Iterable[tuple[str, str]]) -> None:
        """Index (id, text) pairs; a document whose id is already indexed is replaced."""
        for doc_id, text in docs:
            self._add_terms(doc_id, Counter(tokenize(text)))

    def remove(self, ids: Iterable[str]) -> None:
        """Drop documents (unknown ids are ignored); compacts once removed slots outnumber live ones."""
        for doc_id in ids:
            slot = self._slot_of.pop(doc_id, None)
            if slot is None:
                continue
            terms = self._slot_terms[slot]
            assert terms is not None
            self._df.subtract(terms.keys())
            self._total_len -= self._slot_len[slot]
            self._alive[slot] = 0
            self._slot_terms[slot] = None
        dead = len(self._slot_ids) - len(self._slot_of)
        if dead > 64 and dead > len(self._slot_of):
            self._compact()

    def _add_terms(self, doc_id: str, terms: Counter[str]) -> None:
        if doc_id in self._slot_of:
            self.remove([doc_id])
        slot = len(self._slot_ids)
        self._slot_of[doc_id] = slot
        self._slot_ids.append(doc_id)
        self._slot_terms.append(terms)
        length = float(sum(terms.values()))
        self._slot_len.append(length)
        self._alive.append(1)
        self._total_len += length
        self._df.update(terms.keys())
        for term, count in terms.items():
            postings = self._postings.get(term)
            if postings is None:
                postings = self._postings[term] = _Postings()
            postings.slots.append(slot)
            postings.counts.append(count)

    def _compact(self) -> None:
        """Re-slot the live documents from their kept term counts (no re-tokenising)."""
        live = [(self._slot_ids[s], self._slot_terms[s]) for s in self._live_slots()]
        self._reset()
        for doc_id, terms in live:
            assert terms is not None
            self._add_terms(doc_id, terms)

    def _live_slots(self) -> list[int]:
        return [s for s, alive in enumerate(self._alive) if alive]

    def scores_by_slot(self, query: str) -> np.ndarray:
        """BM25 of every slot (removed slots: -inf), from the postings of the query's terms."""
        n = len(self._slot_of)
        out = np.zeros(len(self._slot_ids))
        alive = np.frombuffer(bytes(self._alive), dtype=np.uint8).astype(bool) if self._slot_ids else out.astype(bool)
        if n:
            lengths = np.frombuffer(self._slot_len, dtype=np.float64)
            avg = self._total_len / n
            norm = self.k1 * (1 - self.b + self.b * lengths / avg) if avg else np.full(len(lengths), self.k1)
            for term in set(tokenize(query)):
                df = self._df.get(term, 0)
                if df <= 0:
                    continue
                postings = self._postings[term]
                slots = np.frombuffer(postings.slots, dtype=np.int64)
                counts = np.frombuffer(postings.counts, dtype=np.float64)
                out[slots] += _idf(n, df) * counts * (self.k1 + 1) / (counts + norm[slots])
        out[~alive] = -np.inf
        return out

    def scores(self, query: str) -> list[float]:
        """Scores of the live documents, in ``ids`` order."""
        by_slot = self.scores_by_slot(query)
        return [float(by_slot[s]) for s in self._live_slots()]

    def top(self, query: str, k: int) -> list[tuple[str, float]]:
        n = len(self._slot_of)
        if n == 0 or k <= 0:
            return []
        by_slot = self.scores_by_slot(query)
        if k < n:  # every slot scoring at least the k-th best, ties included, then the exact order on those
            kth = np.partition(by_slot, len(by_slot) - k)[len(by_slot) - k]
            chosen = np.flatnonzero(by_slot >= kth)
        else:
            chosen = np.flatnonzero(np.isfinite(by_slot))
        return _ranked([self._slot_ids[s] for s in chosen], (float(by_slot[s]) for s in chosen), k)


class BM25Retriever:
    name = "bm25"

    def __init__(self, store: Store, doc_text: Callable[[ProfileItem], str], cache_users: int = 64) -> None:
        self.store = store
        self.doc_text = doc_text
        self._cache: OrderedDict[str, _UserIndex] = OrderedDict()
        self._cache_users = cache_users
        self._lock = threading.Lock()

    def _index(self, user_id: str, version: int | None = None) -> BM25Index:
        version = self.store.data_version(user_id) if version is None else version
        with self._lock:
            cached = self._cache.get(user_id)
            if cached and cached.version == version:
                self._cache.move_to_end(user_id)
                return cached.index
        # build or bring up to date outside the lock; one user's concurrent refreshes may both run, the last wins
        fresh = cached.refreshed(self.store, user_id, version, self.doc_text) if cached else None
        if fresh is None:
            items = self.store.items(user_id)
            fresh = _UserIndex(
                version,
                BM25Index([i.id for i in items], [self.doc_text(i) for i in items]),
                self.store.item_hashes(user_id),
            )
        with self._lock:
            self._cache[user_id] = fresh
            self._cache.move_to_end(user_id)
            while len(self._cache) > self._cache_users:
                self._cache.popitem(last=False)
        return fresh.index

    def search(self, user_id: str, query: str, k: int) -> list[tuple[str, float]]:
        return self._index(user_id).top(query, k)

    def search_at(self, user_id: str, query: str, k: int, data_version: int) -> list[tuple[str, float]]:
        """``search`` with the user's data version known (a resolved request): no SQL unless the index is stale."""
        return self._index(user_id, data_version).top(query, k)

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._cache.pop(user_id, None)


@dataclass
class _UserIndex:
    """One user's index, the data version it reflects, and each indexed item's content hash (to diff against)."""

    version: int
    index: BM25Index
    hashes: dict[str, str]

    def refreshed(
        self, store: Store, user_id: str, version: int, doc_text: Callable[[ProfileItem], str]
    ) -> _UserIndex | None:
        """A copy brought to ``version`` by indexing only the items added or changed since, and dropping removed
        ones; None when most of the profile changed (a fresh build is then as cheap)."""
        current = store.item_hashes(user_id)
        changed = [i for i, h in current.items() if self.hashes.get(i) != h]
        removed = [i for i in self.hashes if i not in current]
        if len(changed) + len(removed) > max(64, len(current) // 2):
            return None
        index = self.index.copy()
        index.remove(removed)
        items = store.items(user_id, changed) if changed else []
        index.add((i.id, doc_text(i)) for i in items)
        return _UserIndex(version, index, current)


register_retriever(
    "bm25",
    "Okapi BM25 over the user's items (LaMP's baseline); an inverted index per user, updated in place as data changes",
    lambda ctx: BM25Retriever(ctx.store, ctx.doc_text),
)
