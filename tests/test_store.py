import json

import pytest
from sqlalchemy import inspect

from personalize.data.ingest import read_jsonl, read_lamp_questions
from personalize.data.items import make_item
from personalize.data.schema import Base
from personalize.data.store import Store, redact_url, upgrade_database
from personalize.errors import InvalidInputError, MalformedFileError, UnknownUserError


def _exercise_store(store: Store) -> None:
    items = [make_item("1", "first", timestamp="2021-01-02"), make_item("2", "second", {"k": 1}, "out", 1600000000)]
    report = store.upsert_items("u/1", items)
    assert (report.added, report.updated, report.unchanged, report.data_version) == (2, 0, 0, 1)
    again = store.upsert_items("u/1", items)
    assert (again.added, again.updated, again.unchanged, again.data_version) == (0, 0, 2, 1)
    changed = store.upsert_items("u/1", [make_item("2", "second, edited")])
    assert (changed.updated, changed.data_version) == (1, 2)
    assert store.count_items("u/1") == 2 and store.count_users() == 1
    info = store.get_user("u/1")
    assert info.n_items == 2 and info.data_version == 2
    stored = {i.id: i for i in store.items("u/1")}
    assert stored["2"].text == "second, edited" and stored["1"].timestamp.year == 2021
    assert [u.user_id for u in store.list_users(search="u/")] == ["u/1"]
    assert store.list_users(search="%") == []  # LIKE wildcards are escaped
    with pytest.raises(UnknownUserError):
        store.get_user("nobody")
    deleted = store.delete_user("u/1")
    assert deleted.items == 2 and store.count_users() == 0


def test_sqlite_store_upserts_idempotently(tmp_path):
    _exercise_store(Store(f"sqlite:///{tmp_path / 'db.sqlite'}"))


@pytest.mark.postgres
def test_postgres_store_upserts_idempotently(postgres_url):
    upgrade_database(postgres_url)
    _exercise_store(Store(postgres_url))


@pytest.mark.postgres
def test_migrations_match_models_on_postgres(postgres_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade_database(postgres_url)
    store = Store(postgres_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrations_match_models_on_sqlite(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.count_users()  # the embedded database migrates itself
    with store.engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) >= {"users", "items", "adapters", "training_jobs", "eval_runs"}
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_unmigrated_server_database_gives_clear_error(postgres_url):
    from personalize.errors import DatabaseUnavailableError

    with pytest.raises(DatabaseUnavailableError, match="personalize db upgrade"):
        Store(postgres_url).count_users()


def test_unreachable_database_error_hides_password():
    from personalize.errors import DatabaseUnavailableError

    store = Store("postgresql+psycopg://admin:s3cret-pw@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailableError) as err:
        store.count_users()
    assert "s3cret-pw" not in str(err.value) and "***" in str(err.value)
    assert "s3cret-pw" not in redact_url(store.url)


def test_jsonl_malformed_line_stores_nothing(tmp_path, client):
    path = tmp_path / "items.jsonl"
    good = {"user_id": "a", "id": "1", "text": "hello"}
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(MalformedFileError, match="line 2"):
        read_jsonl(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"user_id": "a", "id": "2", "text": ""}) + "\n")
    with pytest.raises(MalformedFileError, match="line 2.*non-empty text"):
        read_jsonl(path)
    path.write_text(json.dumps({**good, "colour": "red"}) + "\n")
    with pytest.raises(MalformedFileError, match="unknown field"):
        read_jsonl(path)
    assert client.count_users() == 0


def test_add_items_rejects_bad_items_and_keeps_previous_state(client):
    client.add_items("a", [{"id": "1", "text": "kept"}])
    with pytest.raises(InvalidInputError):
        client.add_items("a", [{"id": "2", "text": "fine"}, {"id": "3", "text": "   "}])
    assert [i.id for i in client.items("a")] == ["1"]


def test_lamp_questions_profiles_are_imported(tmp_path, client):
    questions = [
        {
            "id": "q1",
            "user_id": "u1",
            "input": "What is the score of ... review: great",
            "profile": [
                {"id": "p1", "text": "loved it", "score": "5", "date": "2019-05-01"},
                {"id": "p2", "text": "hated it", "score": "1", "date": "2019-06-01"},
            ],
        },
        {"id": "q2", "input": "...", "profile": [{"id": "p3", "text": "meh", "score": "3"}]},
    ]
    path = tmp_path / "dev_questions.json"
    path.write_text(json.dumps(questions))
    users = read_lamp_questions(path, "lamp-3")
    assert sorted(users) == ["q2", "u1"]
    for user_id, items in users.items():
        client.add_items(user_id, items)
    items = client.items("u1")
    assert [i.output for i in items] == ["5", "1"] and items[0].task == "lamp-3"
    assert items[0].fields == {"text": "loved it", "score": "5"}
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(MalformedFileError):
        read_lamp_questions(path, "lamp-3")
