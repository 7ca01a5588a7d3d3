"""Reading users' items from files: our JSONL format and LaMP ``*_questions.json`` profiles.

A file is parsed and validated whole before anything is stored, so a malformed line stores nothing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from personalize.data.checks import check_id, check_json, short
from personalize.data.items import MAX_ITEM_ID_CHARS, ProfileItem, make_item, parse_timestamp
from personalize.data.naming import MAX_USER_ID_CHARS, validate_user_id
from personalize.errors import InvalidInputError, MalformedFileError
from personalize.tasks.registry import get_task

MAX_FILE_BYTES = 2 * 1024**3


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InvalidInputError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; split it")


def _decode(path: Path, data: bytes, first_line: int = 1) -> str:
    """UTF-8 text (a leading BOM dropped), or ``MalformedFileError`` naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise MalformedFileError(
            path, f"line {line}", f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); re-save it as UTF-8"
        ) from None


def _parse(path: Path, text: str, where: str) -> Any:
    """``json.loads`` whose every failure (syntax, 100,000 nested brackets, a 5,000-digit number) names ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = f"line {exc.lineno}" if where == "file" else where
        raise MalformedFileError(path, line, f"not JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise MalformedFileError(path, where, f"not usable JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def load_json(path: str | Path) -> Any:
    """A whole JSON file (a LaMP questions or outputs file)."""
    path = Path(path)
    _check_file(path)
    return _parse(path, _decode(path, path.read_bytes()), "file")


def read_jsonl(path: str | Path) -> dict[str, list[ProfileItem]]:
    """One JSON object per line: ``{"user_id", "id", "text", ["fields", "output", "timestamp", "task"]}``."""
    path = Path(path)
    _check_file(path)
    users: dict[str, list[ProfileItem]] = defaultdict(list)
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = _decode(path, raw, number)
            if not line.strip():
                continue
            row = _parse(path, line, f"line {number}")
            if not isinstance(row, dict):
                raise MalformedFileError(path, f"line {number}", "expected a JSON object")
            try:
                user_id = validate_user_id(row.get("user_id"))
                extra = set(row) - {"user_id", "id", "text", "fields", "output", "timestamp", "task"}
                if extra:
                    raise InvalidInputError(f"unknown field(s) {[short(k) for k in sorted(extra)]}")
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


def _scalar(value: object, field: str) -> str:
    """A LaMP field that goes into an item's text or label: a string or a number, never a list or null."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidInputError(f"{field} must be a string or a number, got {type(value).__name__}")
    return str(check_json(value, field))


def lamp_item(task_name: str, raw: dict[str, Any]) -> ProfileItem:
    """A LaMP profile item (task-specific fields, ``id``, optional ``date``) as a ``ProfileItem``."""
    task = get_task(task_name)
    if not isinstance(raw, dict):
        raise InvalidInputError(f"a profile item must be an object, got {type(raw).__name__}")
    item_id = check_id(raw.get("id"), "profile item id", MAX_ITEM_ID_CHARS)
    where = f"profile item {item_id!r}"
    fields = check_json({k: v for k, v in raw.items() if k not in ("id", "date")}, f"{where}: fields")
    named = set(task.item_fields) | ({task.output_field} if task.output_field else set())
    values = {k: _scalar(v, f"{where}: {k!r}") for k, v in fields.items() if k in named}
    scalars = [str(v) for v in fields.values() if isinstance(v, str | int | float) and not isinstance(v, bool)]
    text = task.doc_text(values) or " ".join(scalars)
    output = values.get(task.output_field) if task.output_field else None
    timestamp = parse_timestamp(raw.get("date"), f"{where}: date")
    try:
        return make_item(item_id, text, fields, output, timestamp, task.name)
    except InvalidInputError as exc:  # "item 'x' needs a non-empty text": say it is a profile item
        raise InvalidInputError(f"profile {exc}") from None


def lamp_user_id(question: dict[str, Any]) -> str:
    """The user a LaMP question belongs to: ``user_id`` (time-based splits), else the question ``id``."""
    value = question.get("user_id")
    field = "user_id"
    if value is None or value == "":
        value, field = question.get("id"), "id"
    return validate_user_id(check_id(value, field, MAX_USER_ID_CHARS))


def read_lamp_questions(path: str | Path, task_name: str) -> dict[str, list[ProfileItem]]:
    """Profiles from a LaMP questions file; the user is ``user_id`` (time-based) or the question id (user-based)."""
    path = Path(path)
    get_task(task_name)
    questions = load_json(path)
    if not isinstance(questions, list):
        raise MalformedFileError(path, "top level", "expected a JSON list of questions")
    users: dict[str, dict[str, ProfileItem]] = defaultdict(dict)
    for n, question in enumerate(questions):
        where = f"question {n}"
        if not isinstance(question, dict) or "profile" not in question:
            raise MalformedFileError(path, where, "expected an object with 'id', 'input' and 'profile'")
        if not isinstance(question["profile"], list):
            got = type(question["profile"]).__name__
            raise MalformedFileError(path, where, f"'profile' must be a list of items, got {got}")
        try:
            user_id = lamp_user_id(question)
            for raw in question["profile"]:
                item = lamp_item(task_name, raw)
                users[user_id][item.id] = item
        except InvalidInputError as exc:
            raise MalformedFileError(path, where, str(exc)) from None
    return {user: list(items.values()) for user, items in users.items()}
