"""Forgetting a user: SQL rows, the Chroma collection, retrievers' state, cached and stored adapters, files, and
the task adapters trained on their items (marked, and a retrain queued without them).

All or nothing: the Chroma writer lock is taken (or the server reached) before any row is deleted, so a busy or
unreachable vector store raises and changes nothing. A crash after the SQL delete leaves a collection no user owns:
``forget`` again, or ``check(repair=True)``, removes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from personalize.data.crashpoints import crash_point
from personalize.data.naming import user_dir, user_key, validate_user_id
from personalize.errors import UnknownUserError
from personalize.results import ForgetReport

if TYPE_CHECKING:
    from personalize.personalizer import Personalizer


def forget_user(p: Personalizer, user_id: str) -> ForgetReport:
    """Remove everything of a user; the report says what went."""
    validate_user_id(user_id)
    report = ForgetReport(user_id)
    p.vectors.prepare_delete(user_id)
    adapter_paths: list[str] = []
    known = True
    try:
        deleted = p.store.delete_user(user_id)
        report.items, report.adapters, report.jobs = deleted.items, deleted.adapters, deleted.jobs
        report.eval_answers = deleted.eval_answers
        adapter_paths, report.wal_truncated = deleted.adapter_paths, deleted.scrubbed
    except UnknownUserError:
        known = False
    crash_point("forget-sql-deleted")
    report.collection = p.vectors.delete_user(user_id)
    crash_point("forget-chroma-deleted")
    p.retrievers.forget(user_id)
    p.serving.backend.evict(user_key(user_id))
    _forget_in_task_adapters(p, user_id, report)
    folders = [user_dir(p.settings.users_dir, user_id), p.adapter_store.user_root(user_id)]
    folders += [Path(path) for path in adapter_paths if Path(path).exists()]
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)
            report.files.append(str(folder))
    if not report.wal_truncated:  # a reader held the WAL for busy_timeout: try again now the rest is done
        report.wal_truncated = p.store.scrub_wal()
    if not known and not report.collection and not report.files:
        raise UnknownUserError(user_id)
    return report


def _forget_in_task_adapters(p: Personalizer, user_id: str, report: ForgetReport) -> None:
    """Mark every task adapter trained on the user's items and (``task_adapter.retrain_on_forget``) queue a
    retrain without them; a broker that cannot be reached is said in the report, never a failed forget."""
    from personalize.jobs.task_adapter_jobs import queue_task_adapter_retrain

    for info in p.task_adapters.mark_forgotten(user_key(user_id)):
        report.task_adapters.append(info.ref)
        if p.settings.task_adapter.retrain_on_forget:
            report.task_adapter_retrain.append(queue_task_adapter_retrain(p, info))


__all__ = ["forget_user"]
