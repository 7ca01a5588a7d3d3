"""Reading users' items from files: our JSONL format and LaMP ``*_questions.json`` profiles.

A file is parsed and validated whole before anything is stored, so a malformed line stores nothing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from personalize.errors import InvalidInputError, MalformedFileError
from personalize.items import ProfileItem, make_item
from personalize.naming import validate_user_id
from personalize.tasks import get_task

MAX_FILE_BYTES = 2 * 1024**3


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InvalidInputError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; split it")


def read_jsonl(path: str | Path) -> dict[str, list[ProfileItem]]:
    """One JSON object per line: ``{"user_id", "id", "text", ["fields", "output", "timestamp", "task"]}``."""
    path = Path(path)
    _check_file(path)
    users: dict[str, list[ProfileItem]] = defaultdict(list)
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MalformedFileError(path, f"line {number}", f"not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise MalformedFileError(path, f"line {number}", "expected a JSON object")
            try:
                user_id = validate_user_id(row.get("user_id"))
                extra = set(row) - {"user_id", "id", "text", "fields", "output", "timestamp", "task"}
                if extra:
                    raise InvalidInputError(f"unknown field(s) {sorted(extra)}")
                item = make_item(
                    row.get("id"),
                    row.get("text"),
                    row.get("fields"),
                    row.get("output"),
                    row.get("timestamp"),
                    row.get("task"),
                )
            except InvalidInputError as exc:
                raise MalformedFileError(path, f"line {number}", str(exc)) from None
            users[user_id].append(item)
    return dict(users)


def lamp_item(task_name: str, raw: dict[str, Any]) -> ProfileItem:
    """A LaMP profile item (task-specific fields, ``id``, optional ``date``) as a ``ProfileItem``."""
    task = get_task(task_name)
    fields = {k: v for k, v in raw.items() if k not in ("id", "date")}
    values = {k: str(v) for k, v in fields.items()}
    text = task.doc_text(values) or " ".join(values.values())
    output = values.get(task.output_field) if task.output_field else None
    return make_item(raw.get("id"), text, fields, output, raw.get("date"), task.name)


def read_lamp_questions(path: str | Path, task_name: str) -> dict[str, list[ProfileItem]]:
    """Profiles from a LaMP questions file; the user is ``user_id`` (time-based) or the question id (user-based)."""
    path = Path(path)
    _check_file(path)
    get_task(task_name)
    try:
        questions = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MalformedFileError(path, f"line {exc.lineno}", f"not JSON ({exc.msg})") from None
    if not isinstance(questions, list):
        raise MalformedFileError(path, "top level", "expected a JSON list of questions")
    users: dict[str, dict[str, ProfileItem]] = defaultdict(dict)
    for n, question in enumerate(questions):
        where = f"question {n}"
        if not isinstance(question, dict) or "profile" not in question:
            raise MalformedFileError(path, where, "expected an object with 'id', 'input' and 'profile'")
        user_id = str(question.get("user_id") or question.get("id") or "")
        try:
            validate_user_id(user_id)
            for raw in question["profile"]:
                if not isinstance(raw, dict):
                    raise InvalidInputError("a profile item must be an object")
                item = lamp_item(task_name, raw)
                users[user_id][item.id] = item
        except InvalidInputError as exc:
            raise MalformedFileError(path, where, str(exc)) from None
    return {user: list(items.values()) for user, items in users.items()}
