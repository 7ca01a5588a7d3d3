"""Do SQL, Chroma and the adapter folders agree? ``personalize db check [--repair]`` and ``Personalizer.check``.

SQL is the source of truth, and every write is ordered so that a crash can only leave behind what SQL does not
know about: vectors upserted before an SQL commit that never came, the collection of a user whose rows a dying
``forget`` had already deleted, an adapter folder renamed into place before its row was inserted, the temporary
folder of a killed training. Retrieval already skips vectors without rows; repair removes all of these, re-indexes
items whose vector is missing or was written for another version of the item, and deletes adapter rows whose
folder is gone. While it runs, writers wait (an SQL lock taken by every ``add_items`` too), so an import in flight
is never mistaken for a crash's leftovers.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from personalize.adapters.format import read_metadata
from personalize.adapters.store import TEMP_MARK
from personalize.data.items import ProfileItem
from personalize.data.naming import user_key
from personalize.data.schema import Adapter, Item, TrainingJob, User, utcnow
from personalize.errors import BrokerUnavailableError
from personalize.retrieval.vectorstore import vector_metadata

if TYPE_CHECKING:
    from personalize.personalizer import Personalizer

_KEY = re.compile(r"^u-(?:[a-z0-9-]{1,16}-)?[0-9a-f]{40}$")  # what naming.user_key makes
_VERSION = re.compile(r"^v\d{4,}$")
_TEMP = re.compile(r"^\.v\d{4,}" + re.escape(TEMP_MARK))  # adapter_store's temporary save folders


@dataclass
class ConsistencyReport:
    """What disagrees between the stores (and, with ``repaired``, what was fixed)."""

    users: int = 0
    items: int = 0
    vectors: int = 0
    orphan_vectors: dict[str, int] = field(default_factory=dict)  # user id -> vectors without an SQL row
    unindexed_items: dict[str, int] = field(default_factory=dict)  # user id -> items with no or a stale vector
    orphan_collections: list[str] = field(default_factory=list)  # collections of no SQL user
    missing_adapters: list[str] = field(default_factory=list)  # adapter rows whose folder is gone
    orphan_adapter_folders: list[str] = field(default_factory=list)  # adapter folders with no row
    stale_temp_folders: list[str] = field(default_factory=list)  # left by a killed training
    orphan_user_folders: list[str] = field(default_factory=list)  # user files of no SQL user
    lost_jobs: list[int] = field(default_factory=list)  # running jobs whose worker is gone
    wal_truncated: bool = True
    repaired: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        counts = [sum(self.orphan_vectors.values()), sum(self.unindexed_items.values()), len(self.lost_jobs)]
        lists = [self.orphan_collections, self.missing_adapters, self.orphan_adapter_folders]
        lists += [self.stale_temp_folders, self.orphan_user_folders]
        return sum(counts) + sum(len(x) for x in lists)

    def lines(self) -> list[str]:
        """One line per kind of problem, for the command line."""
        verb = "repaired" if self.repaired else "found"
        out = [f"{self.users} users, {self.items} items in SQL, {self.vectors} vectors in Chroma"]
        for name, per_user in (
            ("vectors without an SQL row", self.orphan_vectors),
            ("unindexed items", self.unindexed_items),
        ):
            if per_user:
                out.append(f"{verb}: {sum(per_user.values())} {name} ({len(per_user)} users)")
        for name, values in (
            ("collections of no user", self.orphan_collections),
            ("adapter rows whose folder is gone", self.missing_adapters),
            ("adapter folders with no row", self.orphan_adapter_folders),
            ("temporary adapter folders of killed trainings", self.stale_temp_folders),
            ("user folders of no user", self.orphan_user_folders),
            ("running jobs whose worker is gone", self.lost_jobs),
        ):
            if values:
                out.append(
                    f"{verb}: {len(values)} {name}: " + ", ".join(map(str, values[:5])) + (" ..." * (len(values) > 5))
                )
        if not self.wal_truncated:
            out.append("the SQLite WAL could not be truncated: a reader held it; run again")
        out += [f"note: {n}" for n in self.notes]
        out.append(
            "consistent" if not self.problems else ("repaired" if self.repaired else "inconsistent: run with --repair")
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems}


def pause_writers(session: Session) -> None:
    """Hold the lock every item write takes (SQLite's write lock; PostgreSQL: ``users`` against inserts and
    updates) until ``session`` ends: ``add_items`` writes Chroma while it holds it, so none is half-way meanwhile."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE users SET id = id WHERE 1 = 0"))
    else:
        session.execute(text("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE"))


def check_stores(p: Personalizer, repair: bool = False) -> ConsistencyReport:
    """Compare (and with ``repair`` reconcile) SQL, Chroma and the adapter and user folders of ``p``."""
    report = ConsistencyReport(repaired=repair)
    if repair:
        p.vectors.lock_for_writing()  # StoreBusyError now, before anything is changed, if another process writes
    now = utcnow()
    with p.store.session() as s:
        if repair:
            pause_writers(s)
        users = dict(s.execute(select(User.id, User.external_id)).tuples().all())
        report.users = len(users)
        keys = {user_key(uid): pk for pk, uid in users.items()}
        running = s.scalars(select(TrainingJob).where(TrainingJob.state == "running")).all()
        report.lost_jobs = sorted(j.id for j in running if p.jobs._is_stale(j, now))
        training = {j.user_pk for j in running if j.id not in report.lost_jobs}  # their folders are in use
        for pk, uid in users.items():
            _check_vectors(p, s, pk, uid, report, repair)
        report.orphan_collections = [n for n in p.vectors.collection_names() if _KEY.match(n) and n not in keys]
        _check_adapters(p, s, keys, training, report, repair)
        report.orphan_user_folders = [str(f) for f in _unknown_folders(p.settings.users_dir, keys)]
        if repair:
            for name in report.orphan_collections:
                p.vectors.delete_collection(name)
            for folder in report.orphan_adapter_folders + report.stale_temp_folders + report.orphan_user_folders:
                shutil.rmtree(folder, ignore_errors=True)
    report.wal_truncated = p.store.scrub_wal()
    if repair and report.lost_jobs:
        try:
            requeued = p.recover_jobs()
            report.notes.append(f"requeued training jobs {requeued}" if requeued else "lost jobs were failed")
        except BrokerUnavailableError as exc:
            report.notes.append(str(exc))
    return report


def lost_jobs(p: Personalizer, job_ids: list[int]) -> set[int]:
    """Which of these jobs are marked running but their worker is gone (dead pid on this host, or no heartbeat
    for ``job_stale_after_s``): they stay running until a worker starts (or ``db check --repair``) requeues them."""
    if not job_ids:
        return set()
    now = utcnow()
    with p.store.session() as s:
        query = select(TrainingJob).where(TrainingJob.id.in_(job_ids), TrainingJob.state == "running")
        return {j.id for j in s.scalars(query) if p.jobs._is_stale(j, now)}


def _check_vectors(p: Personalizer, s: Session, pk: int, uid: str, report: ConsistencyReport, repair: bool) -> None:
    """One user's items against their collection: vectors without rows, rows without (current) vectors."""
    stored = dict(s.execute(select(Item.item_id, Item.content_hash).where(Item.user_pk == pk)).tuples().all())
    indexed = p.vectors.entries(uid)
    report.items += len(stored)
    report.vectors += len(indexed)
    orphans = [i for i in indexed if i not in stored]
    unindexed = [i for i, h in stored.items() if i not in indexed or indexed[i] not in ("", h)]
    if orphans:
        report.orphan_vectors[uid] = len(orphans)
    if unindexed:
        report.unindexed_items[uid] = len(unindexed)
    if not repair:
        return
    p.vectors.delete_ids(uid, orphans)
    for start in range(0, len(unindexed), 500):
        rows = s.scalars(select(Item).where(Item.user_pk == pk, Item.item_id.in_(unindexed[start : start + 500])))
        items = [ProfileItem(r.item_id, r.text, r.fields, r.output, r.timestamp, r.task) for r in rows]
        matrix = np.asarray(p.indexer.embed(items))
        p.vectors.upsert(uid, [i.id for i in items], matrix, [vector_metadata(i) for i in items])


def _check_adapters(
    p: Personalizer, s: Session, keys: dict[str, int], training: set[int], report: ConsistencyReport, repair: bool
) -> None:
    """Adapter rows against folders; folders of users now training are left alone (a rename may be under way)."""
    registered: set[Path] = set()
    for row, uid in s.execute(select(Adapter, User.external_id).join(User)).tuples().all():
        path = Path(row.path)
        registered.add(path.resolve())
        if read_metadata(path) is None:
            report.missing_adapters.append(f"{uid} v{row.version}: {row.path}")
            if repair:
                s.execute(delete(Adapter).where(Adapter.id == row.id))
    root = p.adapter_store.root
    report.orphan_adapter_folders += [str(f) for f in _unknown_folders(root, keys)]
    for key, pk in keys.items():
        folder = root / key
        if pk in training or not folder.is_dir():
            continue
        for child in folder.iterdir():
            if _TEMP.match(child.name):
                report.stale_temp_folders.append(str(child))
            elif _VERSION.match(child.name) and child.resolve() not in registered:
                report.orphan_adapter_folders.append(str(child))


def _unknown_folders(root: Path, keys: dict[str, int]) -> list[Path]:
    """Folders under ``root`` named like a user key that is no SQL user's."""
    if not root.is_dir():
        return []
    return sorted(f for f in root.iterdir() if f.is_dir() and _KEY.match(f.name) and f.name not in keys)
