"""Adding users' items: validate, embed what changed, and write SQL rows and vectors as one atomic step.

Embeddings are computed before the SQL transaction opens, so a slow embedding never holds a write lock. Vectors
are written inside the transaction, before its commit: a crash between the two leaves vectors without rows, which
retrieval skips and ``check(repair=True)`` removes, never rows that dense retrieval cannot find.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from personalize.data.checks import short
from personalize.data.crashpoints import crash_point
from personalize.data.items import ProfileItem, item_chars, make_item
from personalize.data.naming import validate_user_id
from personalize.data.store import Store, UpsertReport
from personalize.errors import ImportIncompleteError, InvalidInputError, PersonalizeError
from personalize.retrieval.embedding import Embedder
from personalize.retrieval.vectorstore import VectorStore, vector_metadata
from personalize.tasks.registry import get_task

ItemLike = ProfileItem | dict[str, Any]
OnChanged = Callable[[str], "str | None"]  # after a user's items changed: what training was queued, if any


def as_item(value: ItemLike) -> ProfileItem:
    """Validate one item; a ``ProfileItem`` is checked again, since its constructor checks nothing."""
    if isinstance(value, ProfileItem):
        return make_item(value.id, value.text, value.fields, value.output, value.timestamp, value.task)
    if not isinstance(value, dict):
        raise InvalidInputError(f"an item must be a ProfileItem or a dict, got {type(value).__name__}")
    known = ("id", "text", "fields", "output", "timestamp", "task")
    extra = set(value) - set(known) - {"user_id"}
    if extra:
        raise InvalidInputError(f"unknown item field(s) {[short(k) for k in extra]}; known: {sorted(known)}")
    return make_item(*(value.get(k) for k in known))


def as_items(items: object) -> list[ProfileItem]:
    """A list of validated items; a lone item, a string or a mapping in place of a list is refused."""
    if isinstance(items, str | bytes | dict | ProfileItem) or not isinstance(items, Iterable):
        raise InvalidInputError(f"items must be a list of items, got {type(items).__name__}")
    return [as_item(i) for i in items]


def doc_text(item: ProfileItem) -> str:
    """What an item is searched by: its task's retrieval text (LaMP's fields), else its text."""
    task = get_task(item.task) if item.task else get_task("generic")
    return task.doc_text(task.item_values(item)) or item.text


def _progress(items: list, unit: str, show: bool) -> Iterable:
    """A tqdm bar over ``items`` on an interactive stderr when asked, else the items themselves."""
    if not show or len(items) < 2:
        return items
    import sys

    from tqdm import tqdm

    return tqdm(items, unit=unit, disable=not sys.stderr.isatty())


class Indexer:
    """Writes items to SQL and their vectors to the user's collection, atomically per call."""

    def __init__(
        self, store: Store, vectors: VectorStore, embedder: Embedder, max_item_chars: int, on_changed: OnChanged
    ) -> None:
        self.store, self.vectors, self.embedder = store, vectors, embedder
        self.max_item_chars = max_item_chars
        self.on_changed = on_changed

    def check_items(self, items: object) -> list[ProfileItem]:
        """Validate items as ``add_items`` would store them, without writing anything."""
        parsed = as_items(items)
        for item in parsed:
            size = item_chars(item)
            if size > self.max_item_chars:
                raise InvalidInputError(
                    f"item {item.id!r} has {size:,} characters (text, output and fields together); the limit is "
                    f"{self.max_item_chars:,} (PERSONALIZE_MAX_ITEM_CHARS)"
                )
        return parsed

    def add_items(self, user_id: str, items: Iterable[ItemLike], show_progress: bool = False) -> UpsertReport:
        """Upsert items for a user (created if new) and index the changed ones; atomic per call."""
        validate_user_id(user_id)
        parsed = self.check_items(items)
        report = self.store.upsert_items(user_id, parsed, before_commit=self._indexer(user_id, parsed, show_progress))
        crash_point("committed")
        if report.changed:
            report.training = self.on_changed(user_id)
        return report

    def import_users(self, users: Mapping[str, Iterable[ItemLike]], show_progress: bool = False) -> list[UpsertReport]:
        """Add many users' items (one file's worth), all or nothing: every item is validated before the first write,
        and every user's rows go into ONE SQL transaction, committed after each user's vectors are written. A failure
        anywhere (a busy or unreachable vector store, the database) rolls every user back; vectors already written
        for the file are then what a crash leaves (retrieval skips them, ``check(repair=True)`` removes them)."""
        checked: list[tuple[str, list[ProfileItem]]] = []
        for user_id, items in users.items():
            validate_user_id(user_id)
            try:
                checked.append((user_id, self.check_items(items)))
            except InvalidInputError as exc:
                raise InvalidInputError(f"user {short(user_id)}: {exc}") from None
        batches = [
            (u, parsed, self._indexer(u, parsed, False)) for u, parsed in _progress(checked, "users", show_progress)
        ]
        try:
            reports = self.store.upsert_many(batches)
        except PersonalizeError as exc:
            raise ImportIncompleteError(
                f"{exc} (nothing of the file's {len(checked)} user(s) was stored: the import is one transaction; "
                "importing again is safe)"
            ) from None
        crash_point("committed")
        for report in reports:
            if report.changed:
                report.training = self.on_changed(report.user_id)
        return reports

    def _indexer(self, user_id: str, parsed: list[ProfileItem], show_progress: bool) -> Callable[[UpsertReport], None]:
        """Embed the items that changed (before any transaction opens, so a slow embedding never holds a write
        lock), and return the hook that writes their vectors inside the SQL transaction, before its commit."""
        stored = self.store.item_hashes(user_id, [i.id for i in parsed])
        todo = [i for i in parsed if stored.get(i.id) != i.content_hash()]
        vectors = dict(zip([i.id for i in todo], self.embed(todo, show_progress), strict=True))
        crash_point("embedded")

        def index(report: UpsertReport) -> None:
            missing = [i for i in report.changed if i.id not in vectors]  # changed by another writer meanwhile
            vectors.update(zip([i.id for i in missing], self.embed(missing, False), strict=True))
            changed = report.changed
            crash_point("sql-flushed")
            self.vectors.upsert(
                user_id,
                [i.id for i in changed],
                np.stack([vectors[i.id] for i in changed]),
                [vector_metadata(i) for i in changed],
            )
            crash_point("chroma-written")

        return index

    def embed(self, items: Sequence[ProfileItem], show_progress: bool = False) -> np.ndarray:
        return self.embedder.embed([doc_text(i) for i in items], show_progress=show_progress)


__all__ = ["Indexer", "ItemLike", "as_item", "as_items", "doc_text"]
