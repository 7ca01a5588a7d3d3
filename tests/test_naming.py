import unicodedata
from pathlib import Path

import pytest

from personalize.data.naming import collection_name, user_dir, user_key
from personalize.errors import InvalidInputError

HOSTILE = [
    "alice",
    "Alice",
    "ALICE",
    "../../etc/passwd",
    "a/b",
    "a b",
    "a\\b",
    "..",
    ".",
    "ünïcödé",
    unicodedata.normalize("NFC", "café"),
    unicodedata.normalize("NFD", "café"),
    "x" * 500,
    "x" * 499,
    "用户",
    "alice ",
    " alice",
    "a" * 1024,
    "%2e%2e",
    "$(rm -rf /)",
    "'; DROP TABLE users; --",
]


def test_user_keys_are_safe_and_never_collide():
    keys = [user_key(u) for u in HOSTILE]
    assert len(set(keys)) == len(HOSTILE)
    for key in keys:
        assert 3 <= len(key) <= 63
        assert key.replace("-", "").isalnum() and key.isascii() and key[0].isalnum() and key[-1].isalnum()


def test_collection_name_is_stable():
    assert collection_name("a/b") == collection_name("a/b") == user_key("a/b")


def test_user_dir_stays_inside_root(tmp_path: Path):
    for user_id in HOSTILE:
        path = user_dir(tmp_path, user_id)
        assert path.parent == tmp_path.resolve()


@pytest.mark.parametrize("bad", ["", "   ", "a\x00b", "x" * 1025, None, 5])
def test_invalid_user_ids_are_refused(bad):
    with pytest.raises(InvalidInputError):
        user_key(bad)
