"""The profile item as the library passes it around (independent of SQL rows)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from personalize.data.checks import check_id, check_json, check_string, check_unicode, short
from personalize.errors import InvalidInputError
from personalize.tasks.registry import get_task

MAX_ITEM_ID_CHARS = 512


@dataclass(frozen=True)
class ProfileItem:
    """One thing a user wrote or rated: text for retrieval, optional fields, label and time."""

    id: str
    text: str
    fields: dict[str, Any] | None = None
    output: str | None = None
    timestamp: datetime | None = None
    task: str | None = None

    def content_hash(self) -> str:
        payload = json.dumps(
            [self.text, self.fields, self.output, self.timestamp.isoformat() if self.timestamp else None, self.task],
            sort_keys=True,
            ensure_ascii=False,
            default=str,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def item_chars(item: ProfileItem) -> int:
    """An item's size for ``Settings.max_item_chars``: characters of its text, output, and fields' keys and strings."""
    return len(item.text) + len(item.output or "") + _json_chars(item.fields)


def _json_chars(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _json_chars(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_json_chars(v) for v in value) + len(value)
    return 0 if value is None else len(str(value))  # numbers and booleans, as JSON would write them (roughly)


@dataclass(frozen=True)
class UserInfo:
    user_id: str
    n_items: int
    data_version: int
    created_at: datetime
    updated_at: datetime
    tasks: list[str] = field(default_factory=list)


def parse_timestamp(value: object, field: str = "timestamp") -> datetime | None:
    """Accept datetimes, dates, ISO strings (``YYYY-MM-DD`` as LaMP writes them) and Unix seconds.

    Every failure is an ``InvalidInputError`` naming ``field``: NaN, infinities and instants outside years 1-9999
    would otherwise escape as ValueError or OverflowError."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(f"{field} {value} is not a number of Unix seconds")
    try:
        if isinstance(value, datetime):
            return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(float(value), UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        raise InvalidInputError(f"{field} {short(value)} is outside the years 1-9999") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInputError(f"{field} {short(value)} is not ISO 8601 (YYYY-MM-DD[THH:MM:SS])") from None
        return parse_timestamp(parsed, field)
    raise InvalidInputError(f"{field} of type {type(value).__name__} is not supported")


def _check_output(value: object, where: str) -> str | None:
    """A label: a string, or a number written as text (LaMP's scores are sometimes numbers)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidInputError(f"{where}: output must be a string or a number, got {type(value).__name__}")
    if not isinstance(value, str):
        value = str(check_json(value, f"{where}: output"))
    return check_unicode(value, f"{where}: output")


def make_item(
    id: object,
    text: object,
    fields: object = None,
    output: object = None,
    timestamp: object = None,
    task: object = None,
) -> ProfileItem:
    """Validate loose input (from JSON, CLI or Python) into a ``ProfileItem``; every error names the field."""
    if id is None or (isinstance(id, str) and not id.strip()):
        raise InvalidInputError("an item needs a non-empty id")
    item_id = check_id(id, "item id", MAX_ITEM_ID_CHARS)
    where = f"item {item_id!r}"
    if not isinstance(text, str) or not text.strip():
        got = "" if isinstance(text, str) else f", got {type(text).__name__}"
        raise InvalidInputError(f"{where} needs a non-empty text{got}")
    check_unicode(text, f"{where}: text")
    if fields is not None and not isinstance(fields, dict):
        raise InvalidInputError(f"{where}: fields must be an object, got {type(fields).__name__}")
    checked_fields: dict[str, Any] | None = None
    if fields is not None:
        checked_fields = check_json(fields, f"{where}: fields")
    checked_output = _check_output(output, where)
    task_name: str | None = None
    if task is not None:
        task_name = check_string(task, f"{where}: task")
        get_task(task_name)
    return ProfileItem(
        item_id, text, checked_fields, checked_output, parse_timestamp(timestamp, f"{where}: timestamp"), task_name
    )
