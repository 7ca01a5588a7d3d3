"""An import is all or nothing per file: a bad item in a later user stores nothing of the earlier ones (issue 18,
class 3), on SQLite and on PostgreSQL, and a value the database itself refuses is one error that never prints it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from personalize import Personalizer, Settings
from personalize.cli import app
from personalize.data.items import ProfileItem
from personalize.data.store import Store, upgrade_database
from personalize.errors import ImportIncompleteError, InvalidInputError, StoreBusyError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECRET = "zebracorn-private-words"
BAD_TEXTS = {"surrogate": f"{SECRET} \ud800", "nul": f"{SECRET} \x00"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, home) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{home / 'personalize.db'}"
    url = request.getfixturevalue("postgres_url")
    upgrade_database(url)
    return url


@pytest.fixture
def env(home, tiny_model_dir, database_url, monkeypatch) -> Settings:
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("PERSONALIZE_DATABASE_URL", database_url)
    monkeypatch.setenv("PERSONALIZE_AUTO_TRAIN", "false")
    return Settings(_env_file=None)


def _write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json escapes the surrogate and the NUL


def _state(settings: Settings) -> tuple[list[str], dict[str, list[tuple[str, str]]], dict[str, int]]:
    with Personalizer(settings) as p:
        users = [u.user_id for u in p.users()]
        items = {u: [(i.id, i.text) for i in p.items(u)] for u in users}
        vectors = {u: p.vectors.count(u) for u in ["a", "b"]}
    return users, items, vectors


@pytest.mark.parametrize("bad", sorted(BAD_TEXTS))
def test_bad_second_user_leaves_the_store_unchanged(env, tmp_path, bad):
    run = CliRunner()
    first = tmp_path / "first.jsonl"
    _write_jsonl(first, [{"user_id": "a", "id": "1", "text": "original text"}])
    assert run.invoke(app, ["users", "import", str(first)], catch_exceptions=False).exit_code == 0
    before = _state(env)

    second = tmp_path / "second.jsonl"
    rows = [
        {"user_id": "a", "id": "1", "text": "edited text"},
        {"user_id": "a", "id": "2", "text": "a new item"},
        {"user_id": "b", "id": "1", "text": BAD_TEXTS[bad]},
    ]
    _write_jsonl(second, rows)
    result = run.invoke(app, ["users", "import", str(second)], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "line 3" in result.output and "text" in result.output and SECRET not in result.output
    assert _state(env) == before == (["a"], {"a": [("1", "original text")]}, {"a": 1, "b": 0})


def test_import_users_validates_every_user_before_the_first_write(client):
    users = {
        "a": [{"id": "1", "text": "fine"}],
        "b": [{"id": "1", "text": "fine"}, {"id": "2", "text": "x", "fields": {"when": float("inf")}}],
    }
    with pytest.raises(InvalidInputError, match="user 'b'.*item '2': fields"):
        client.import_users(users)
    assert client.count_users() == 0 and client.vectors.count("a") == 0
    reports = client.import_users({"a": users["a"], "b": users["b"][:1]})
    assert [(r.user_id, r.added) for r in reports] == [("a", 1), ("b", 1)]


def test_a_backend_failure_midway_stores_nothing_of_the_file(settings):
    with Personalizer(settings) as holder, Personalizer(settings) as importer:
        holder.add_items("a", [{"id": "1", "text": "already here"}])  # holds the embedded Chroma folder's lock
        users = {"a": [{"id": "1", "text": "changed"}, {"id": "2", "text": "new"}], "b": [{"id": "1", "text": "new"}]}
        with pytest.raises(ImportIncompleteError, match=r"nothing of the file's 2 user\(s\) was stored") as err:
            importer.import_users(users)
        assert "is being written by process" in str(err.value)  # the cause, StoreBusyError, in the same line
        assert isinstance(err.value.__context__, StoreBusyError)
        assert importer.store.has_user("b") is False  # one transaction: b is not stored ...
        assert [(i.id, i.text) for i in importer.items("a")] == [("1", "already here")]  # ... and a is unchanged


@pytest.mark.postgres
def test_a_value_postgres_refuses_is_one_error_without_the_text(postgres_url):
    upgrade_database(postgres_url)
    store = Store(postgres_url)
    with pytest.raises(InvalidInputError, match="refused the write") as err:
        store.upsert_items("u", [ProfileItem("1", f"{SECRET}\x00")])  # past every check: only SQL can refuse it
    assert SECRET not in str(err.value)
    assert store.count_users() == 0
