"""The one place that turns a user id into names: a Chroma collection name and a folder name.

User ids are arbitrary strings (slashes, ``..``, spaces, unicode, hundreds of characters). The derived name is a
readable ASCII prefix for humans plus a SHA-256 of the exact id for uniqueness, so two ids that differ only in case,
unicode normal form or a trailing character never share a collection or a folder, and no name can escape a parent
folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from personalize.data.checks import check_unicode
from personalize.errors import InvalidInputError

MAX_USER_ID_CHARS = 1024
_UNSAFE = re.compile(r"[^a-z0-9]+")


def validate_user_id(user_id: object) -> str:
    """A user id is any non-blank string every backend can store (no lone surrogates, no NUL)."""
    if not isinstance(user_id, str):
        raise InvalidInputError(f"user_id must be a string, got {type(user_id).__name__}", "user_id")
    if not user_id or not user_id.strip():
        raise InvalidInputError("user_id must not be empty", "user_id")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise InvalidInputError(f"user_id is at most {MAX_USER_ID_CHARS} characters, got {len(user_id)}", "user_id")
    return check_unicode(user_id, "user_id")


def user_key(user_id: str) -> str:
    """A stable name made only of ``[a-z0-9-]``, 3..63 characters, unique per exact user id."""
    validate_user_id(user_id)
    digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:40]
    slug = _UNSAFE.sub("-", user_id.lower()).strip("-")[:16].strip("-")
    return f"u-{slug}-{digest}" if slug else f"u-{digest}"


def collection_name(user_id: str) -> str:
    return user_key(user_id)


def user_dir(root: Path, user_id: str) -> Path:
    """The user's folder under ``root``; guaranteed to stay inside it."""
    path = (root / user_key(user_id)).resolve()
    if path.parent != root.resolve():
        raise InvalidInputError(f"user id {user_id!r} does not map to a folder under {root}")
    return path


EVAL_PREFIX = "eval/"


def eval_user_id(task: str, split: str, user: str) -> str:
    """Evaluation users are namespaced: the dev and test profiles of one person differ (no leakage)."""
    return f"{EVAL_PREFIX}{task}/{split}/{user}"


def parse_eval_user_id(user_id: str) -> tuple[str, str, str] | None:
    """``(task, split, user)`` of an ``eval_user_id``, or ``None`` for any other user id."""
    if not user_id.startswith(EVAL_PREFIX):
        return None
    parts = user_id[len(EVAL_PREFIX) :].split("/", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None
