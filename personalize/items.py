"""The profile item as the library passes it around (independent of SQL rows)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from personalize.errors import InvalidInputError

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


@dataclass(frozen=True)
class UserInfo:
    user_id: str
    n_items: int
    data_version: int
    created_at: datetime
    updated_at: datetime
    tasks: list[str] = field(default_factory=list)


def parse_timestamp(value: object) -> datetime | None:
    """Accept datetimes, dates, ISO strings (``YYYY-MM-DD`` as LaMP writes them) and Unix seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC).replace(tzinfo=None)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise InvalidInputError(f"timestamp {value!r} is not ISO 8601 (YYYY-MM-DD[THH:MM:SS])") from exc
        return parse_timestamp(parsed)
    raise InvalidInputError(f"timestamp of type {type(value).__name__} is not supported")


def make_item(
    id: object,
    text: object,
    fields: object = None,
    output: object = None,
    timestamp: object = None,
    task: object = None,
) -> ProfileItem:
    """Validate loose input (from JSON, CLI or Python) into a ``ProfileItem`` with a clear error."""
    if id is None or (isinstance(id, str) and not id.strip()):
        raise InvalidInputError("an item needs a non-empty id")
    item_id = str(id)
    if len(item_id) > MAX_ITEM_ID_CHARS:
        raise InvalidInputError(f"item id is at most {MAX_ITEM_ID_CHARS} characters, got {len(item_id)}")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"item {item_id!r} needs a non-empty text")
    if fields is not None and not isinstance(fields, dict):
        raise InvalidInputError(f"item {item_id!r}: fields must be an object, got {type(fields).__name__}")
    if output is not None and not isinstance(output, str):
        output = str(output)
    if task is not None and not isinstance(task, str):
        raise InvalidInputError(f"item {item_id!r}: task must be a string")
    return ProfileItem(item_id, text, fields, output, parse_timestamp(timestamp), task)
