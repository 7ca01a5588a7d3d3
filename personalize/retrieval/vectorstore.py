"""Per-user Chroma collections: one collection per user, never a shared collection filtered by metadata.

Embedded mode (a folder) allows one writing process at a time: two processes writing one PersistentClient folder
silently lose data, so the first write takes an exclusive lock on the folder and a second writer gets
``StoreBusyError`` naming the fix (a Chroma server). Server mode (``http://host:port``) has no such limit.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from personalize.data.crashpoints import crash_point
from personalize.data.naming import collection_name
from personalize.errors import StoreBusyError, VectorStoreUnavailableError

if TYPE_CHECKING:
    from personalize.data.items import ProfileItem

LOCK_FILE = "personalize-writer.lock"


@dataclass(frozen=True)
class Hit:
    id: str
    score: float


def vector_metadata(item: ProfileItem) -> dict[str, str]:
    """What Chroma keeps beside an item's vector: its timestamp, task and content hash (no text); the hash lets a
    repair find vectors of an older version of the item."""
    ts = item.timestamp.isoformat() if item.timestamp else ""
    return {"ts": ts, "task": item.task or "", "h": item.content_hash()}


def _is_uuid(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True


def _all_embeddings(collection: Any, page: int = 5000) -> tuple[list[str], np.ndarray]:
    """Every id and vector of a collection, paged (a user's collection is small enough to scan)."""
    ids: list[str] = []
    rows: list[np.ndarray] = []
    while True:
        got = collection.get(include=["embeddings"], limit=page, offset=len(ids))
        ids += list(got["ids"])
        if len(got["ids"]):
            rows.append(np.asarray(got["embeddings"], dtype=np.float32))
        if len(got["ids"]) < page:
            return ids, (np.concatenate(rows) if rows else np.zeros((0, 0), np.float32))


def _exact_top_k(entries: tuple[list[str], np.ndarray], embedding: np.ndarray, k: int) -> list[Hit]:
    """Cosine top-k by a full scan: the answer the approximate index should have given."""
    ids, vectors = entries
    if not ids:
        return []
    query = np.asarray(embedding, dtype=np.float32).reshape(-1)
    norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
    scores = (vectors @ query) / np.maximum(norms, 1e-12)
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(ids[i], float(scores[i])) for i in order]


def _nearest(collection: Any, embedding: np.ndarray, k: int) -> list[Hit]:
    """Chroma's top ``k`` (it answers fewer when the collection holds fewer); the exact top k when HNSW, being
    approximate after updates and deletes, answers short. Counts the collection only when the answer is short."""
    found = collection.query(query_embeddings=[embedding], n_results=k, include=["distances"])
    hits = [
        Hit(item_id, 1.0 - float(distance))
        for item_id, distance in zip(found["ids"][0], found["distances"][0], strict=True)
    ]
    if len(hits) < k and len(hits) < (n := int(collection.count())):
        return _exact_top_k(_all_embeddings(collection), embedding, min(k, n))
    return hits


class VectorStore:
    """Chroma access by user id; embeddings are always computed by us and passed in.

    Chroma holds only ids, embeddings and small metadata: the item text lives in SQL, the one source of truth.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.is_server = self.location.startswith(("http://", "https://"))
        self._client = None
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()
        # collection handles by user id, for reads: looking one up costs a round trip per query (2 ms embedded).
        # A stale handle (the collection deleted here or by another process) raises NotFoundError: dropped, retried.
        self._handles: dict[str, Any] = {}

    @property
    def client(self):  # noqa: ANN201
        if self._client is None:
            with self._mutex:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def _connect(self):  # noqa: ANN202
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        chroma_settings = ChromaSettings(anonymized_telemetry=False)
        if self.is_server:
            url = urlparse(self.location)
            return chromadb.HttpClient(
                host=url.hostname or "127.0.0.1",
                port=url.port or (443 if url.scheme == "https" else 8000),
                ssl=url.scheme == "https",
                settings=chroma_settings,
            )
        Path(self.location).mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=self.location, settings=chroma_settings)

    # -- the single-writer guard for embedded folders ----------------------------------------------------------

    def _acquire_writer(self) -> None:
        if self.is_server or self._lock_fd is not None:
            return
        with self._mutex:
            if self._lock_fd is not None:
                return
            Path(self.location).mkdir(parents=True, exist_ok=True)
            path = Path(self.location) / LOCK_FILE
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise StoreBusyError(
                    f"the Chroma folder {self.location} is being written by process {holder}; two processes "
                    "writing one embedded Chroma folder silently lose data. Stop the other writer, or run a "
                    f"Chroma server (`chroma run --path {self.location} --port 8000`) and set "
                    "PERSONALIZE_CHROMA=http://127.0.0.1:8000 in every process."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._lock_fd = fd

    def lock_for_writing(self) -> None:
        """Take the embedded folder's writer lock now (``StoreBusyError`` if another process holds it), before a
        change that must not stop half-way; a no-op for a server."""
        self._acquire_writer()

    def close(self) -> None:
        with self._mutex:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._client = None
            self._handles.clear()

    # -- collections -------------------------------------------------------------------------------------------

    def _collection(self, user_id: str, create: bool):  # noqa: ANN202
        name = collection_name(user_id)
        if create:
            return self.client.get_or_create_collection(
                name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
            )
        try:
            return self.client.get_collection(name, embedding_function=None)
        except Exception:  # chroma raises NotFoundError / ValueError depending on version
            return None

    def _find_collection(self, user_id: str):  # noqa: ANN202
        """The user's collection or None when it does not exist; any other failure (a server that cannot be
        reached) raises, where ``_collection`` would read it as "no collection" and let a caller skip a delete."""
        from chromadb.errors import NotFoundError

        try:
            return self.client.get_collection(collection_name(user_id), embedding_function=None)
        except NotFoundError:
            return None
        except Exception as exc:
            if "does not exist" in str(exc):  # older chroma raises ValueError for a missing collection
                return None
            raise VectorStoreUnavailableError(
                f"Chroma at {self.location} cannot be used ({type(exc).__name__}: {str(exc)[:200]}); "
                "nothing was changed, retry when it is back"
            ) from None

    def prepare_delete(self, user_id: str) -> bool:
        """Make sure the user's collection can be deleted before anything else of the user is: take the embedded
        writer lock (``StoreBusyError`` if another process holds it) and reach the store; return whether the
        user has a collection. ``forget`` calls this first, so a busy or unreachable store changes nothing."""
        self.lock_for_writing()
        return self._find_collection(user_id) is not None

    def upsert(
        self,
        user_id: str,
        ids: Sequence[str],
        embeddings: np.ndarray,
        metadatas: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if not ids:
            return
        self._acquire_writer()
        collection = self._collection(user_id, create=True)
        batch = max(1, min(5000, int(self.client.get_max_batch_size())))
        for start in range(0, len(ids), batch):
            end = start + batch
            collection.upsert(
                ids=list(ids[start:end]),
                embeddings=embeddings[start:end],
                metadatas=list(metadatas[start:end]) if metadatas else None,
            )
            crash_point("chroma-batch")

    def query(self, user_id: str, embedding: np.ndarray, k: int) -> list[Hit]:
        """The user's ``k`` nearest items; [] for a user without a collection. Reads through a cached handle; one
        that has gone stale (or finds nothing, which a collection recreated elsewhere would) is looked up again."""
        if k <= 0:
            return []
        for cached in (True, False):
            collection = self._read_handle(user_id, cached)
            if collection is None:
                return []
            try:
                hits = _nearest(collection, embedding, k)
            except Exception:
                if not cached:
                    raise
                self._drop_handle(user_id)
                continue
            if hits or not cached:
                return hits
            self._drop_handle(user_id)
        return []

    def _read_handle(self, user_id: str, cached: bool):  # noqa: ANN202
        """The user's collection for reading, from the handle cache when ``cached``; None when there is none (a
        store that cannot be reached raises ``VectorStoreUnavailableError``, never reads as "no items")."""
        if cached and (handle := self._handles.get(user_id)) is not None:
            return handle
        handle = self._find_collection(user_id)
        if handle is not None:
            with self._mutex:
                self._handles[user_id] = handle
        return handle

    def _drop_handle(self, user_id: str) -> None:
        with self._mutex:
            self._handles.pop(user_id, None)

    def count(self, user_id: str) -> int:
        collection = self._collection(user_id, create=False)
        return 0 if collection is None else int(collection.count())

    def entries(self, user_id: str, page: int = 5000) -> dict[str, str]:
        """Every id of the user's collection with the content hash stored beside it ("" for vectors written before
        hashes were stored); {} when there is no collection. For reconciling with SQL."""
        collection = self._find_collection(user_id)
        out: dict[str, str] = {}
        if collection is None:
            return out
        offset = 0
        while True:
            got = collection.get(include=["metadatas"], limit=page, offset=offset)
            for item_id, meta in zip(got["ids"], got["metadatas"] or [None] * len(got["ids"]), strict=True):
                out[item_id] = str((meta or {}).get("h", ""))
            if len(got["ids"]) < page:
                return out
            offset += page

    def delete_ids(self, user_id: str, ids: Sequence[str]) -> None:
        """Remove some vectors of the user (ones SQL does not hold)."""
        if not ids:
            return
        self._acquire_writer()
        collection = self._collection(user_id, create=True)
        for start in range(0, len(ids), 5000):
            collection.delete(ids=list(ids[start : start + 5000]))

    def collection_names(self) -> list[str]:
        """Names of every collection in this Chroma (folder or server)."""
        names: list[str] = []
        while True:
            page = self.client.list_collections(limit=1000, offset=len(names))
            names += [c if isinstance(c, str) else c.name for c in page]
            if len(page) < 1000:
                return names

    def delete_collection(self, name: str) -> None:
        """Drop a collection by name (one left by a user SQL no longer knows), with its files."""
        self._acquire_writer()
        self.client.delete_collection(name)
        with self._mutex:
            self._handles = {u: h for u, h in self._handles.items() if collection_name(u) != name}
        if not self.is_server:
            self._purge_deleted_files()

    def delete_user(self, user_id: str) -> bool:
        """Drop the user's collection; return whether there was one."""
        if self._collection(user_id, create=False) is None:
            return False
        self._acquire_writer()
        self._drop_handle(user_id)
        self.client.delete_collection(collection_name(user_id))
        if not self.is_server:
            self._purge_deleted_files()
        return True

    def _purge_deleted_files(self) -> None:
        """Chroma leaves a deleted collection's index folder and freed SQLite pages on disk; remove both."""
        root = Path(self.location)
        database = root / "chroma.sqlite3"
        if not database.is_file():
            return
        with closing(sqlite3.connect(database, timeout=30)) as conn:
            live = {row[0] for row in conn.execute("SELECT id FROM segments")}
            conn.execute("VACUUM")
        for child in root.iterdir():
            if child.is_dir() and _is_uuid(child.name) and child.name not in live:
                shutil.rmtree(child, ignore_errors=True)
