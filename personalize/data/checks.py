"""Checks every entry point shares: what a string, an id or a JSON value must be before anything uses or stores it.

The backends refuse some values late, in the middle of a transaction: a lone surrogate (what undecodable bytes
become in a command-line argument) cannot be encoded to UTF-8 for SQLite, Chroma or a tokenizer; PostgreSQL refuses
NUL characters in text; JSON cannot hold bytes, NaN or infinities. Refusing them here, with the field's name, keeps
every bad input to one clear error raised before any write.
"""

from __future__ import annotations

import math
from typing import Any

from personalize.errors import InvalidInputError

MAX_JSON_DEPTH = 32


def short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never echo a whole (possibly huge) input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_unicode(value: str, field: str) -> str:
    """Refuse lone surrogates and NUL characters, which one backend or another cannot store."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{field} holds a lone surrogate ({value[exc.start]!r} at character {exc.start}): not valid Unicode; "
            "was it decoded from bytes that are not UTF-8?",
            field,
        ) from None
    nul = value.find("\x00")
    if nul >= 0:
        raise InvalidInputError(f"{field} must not contain NUL characters (one at character {nul})", field)
    return value


def check_string(value: object, field: str) -> str:
    """A ``str`` that every backend can store."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{field} must be a string, got {type(value).__name__}", field)
    return check_unicode(value, field)


def check_id(value: object, field: str, max_chars: int) -> str:
    """An id: a non-empty string, or an integer (stored as its decimal digits).

    Booleans, floats, lists and objects are refused rather than stringified: ``true`` would become ``"True"`` and
    ``1.0`` would never match ``1``."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInputError(f"{field} must be a string or an integer, got {type(value).__name__}", field)
    if isinstance(value, int):
        if value.bit_length() > 4 * max_chars:  # far more digits than allowed; str() would refuse beyond 4300
            raise InvalidInputError(f"{field} is at most {max_chars} characters", field)
        value = str(value)
    check_unicode(value, field)
    if not value.strip():
        raise InvalidInputError(f"{field} must not be empty", field)
    if len(value) > max_chars:
        raise InvalidInputError(f"{field} is at most {max_chars} characters, got {len(value)}", field)
    return value


def check_int(value: object, field: str, low: int, high: int) -> int:
    """An integer in ``[low, high]`` (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{field} must be an integer, got {type(value).__name__}", field)
    if not low <= value <= high:
        got = value if value.bit_length() < 64 else "a larger number"
        raise InvalidInputError(f"{field} must be between {low} and {high}, got {got}", field)
    return value


def check_json(value: object, field: str, depth: int = 0) -> Any:
    """A JSON-native copy of ``value`` (tuples become lists) that both backends store and read back unchanged."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidInputError(f"{field} is nested more than {MAX_JSON_DEPTH} levels deep", field)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return check_unicode(value, field)
    if isinstance(value, int):
        if value.bit_length() > 10_000:  # beyond what str() and JSON serialisation accept
            raise InvalidInputError(f"{field} holds an integer too large to store", field)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{field} holds {value}, which JSON cannot store", field)
        return value
    if isinstance(value, list | tuple):
        return [check_json(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{field} has a key of type {type(key).__name__}; JSON keys are strings", field)
            check_unicode(key, f"{field} key {short(key)}")
            out[key] = check_json(v, f"{field}[{short(key)}]", depth + 1)
        return out
    raise InvalidInputError(f"{field} holds a value of type {type(value).__name__}, which JSON cannot store", field)
