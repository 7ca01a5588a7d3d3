"""Every bad input is one ``PersonalizeError`` naming the field (one line and exit 2 on the CLI), and stores nothing.

The explicit cases are the ones issue 18 found; the hypothesis properties throw random JSON values and strings at
the importers, ``add_items``, ``generate`` and ``retrieve``.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import free_port
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from personalize import Personalizer, Settings
from personalize.cli import app
from personalize.data.ingest import read_jsonl, read_lamp_questions
from personalize.data.items import make_item
from personalize.data.store import Store, upgrade_database
from personalize.errors import DatabaseUnavailableError, InvalidInputError, MalformedFileError, PersonalizeError
from personalize.eval.datasets import read_lamp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNDECODABLE = os.fsdecode(b"caf\xe9")  # how Python hands a non-UTF-8 argv byte to the program: a lone surrogate


@pytest.fixture
def run(home, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("PERSONALIZE_AUTO_TRAIN", "false")
    monkeypatch.delenv("PERSONALIZE_DATABASE_URL", raising=False)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def _one_error_line(result, *needles: str) -> str:
    """Exit 2, no traceback, and an ``error:`` line holding every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- the files ---------------------------------------------------------------------------------------------------


def test_non_utf8_jsonl_names_the_line_and_stores_nothing(run, tmp_path):
    path = tmp_path / "items.jsonl"
    good = json.dumps({"user_id": "a", "id": "1", "text": "fine"}).encode()
    path.write_bytes(good + b"\n" + b'{"user_id": "b", "id": "2", "text": "caf\xe9"}\n')
    _one_error_line(run("users", "import", str(path)), "line 2", "not UTF-8", "0xe9")
    assert "0 users" in run("users", "count").output


def test_non_utf8_lamp_file_names_the_line(run, tmp_path):
    path = tmp_path / "dev_questions.json"
    path.write_bytes(b'[{"id": "q1", "input": "x",\n "profile": [{"id": "p", "text": "caf\xe9", "score": "1"}]}]')
    _one_error_line(run("users", "import", str(path), "--lamp-task", "lamp-3"), "line 2", "not UTF-8")
    with pytest.raises(MalformedFileError, match="line 2.*not UTF-8"):
        read_lamp(path, None, "lamp-3")  # the evaluation's reader says the same


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e300", "-1e300"])
def test_impossible_timestamps_are_refused(run, tmp_path, literal):
    path = tmp_path / "items.jsonl"
    path.write_text(f'{{"user_id": "a", "id": "1", "text": "x", "timestamp": {literal}}}\n')
    _one_error_line(run("users", "import", str(path)), "line 1", "timestamp")


def test_lamp_profile_that_is_not_a_list(run, tmp_path):
    path = tmp_path / "dev_questions.json"
    path.write_text(json.dumps([{"id": "q1", "input": "x", "profile": 5}]))
    _one_error_line(run("users", "import", str(path), "--lamp-task", "lamp-3"), "question 0", "'profile'")


def test_lamp_fields_that_are_not_text_are_refused(tmp_path):
    path = tmp_path / "dev_questions.json"
    for bad in (None, [1, 2], {"a": 1}, True):
        path.write_text(json.dumps([{"id": "q", "input": "x", "profile": [{"id": "p", "text": bad, "score": "1"}]}]))
        with pytest.raises(MalformedFileError, match="'text' must be a string or a number"):
            read_lamp_questions(path, "lamp-3")
    path.write_text(json.dumps([{"id": "q", "input": "x", "profile": [{"id": "p", "text": "t", "date": [2020]}]}]))
    with pytest.raises(MalformedFileError, match="date of type list"):
        read_lamp_questions(path, "lamp-3")
    path.write_text(json.dumps([{"id": [1], "user_id": None, "input": "x", "profile": []}]))
    with pytest.raises(MalformedFileError, match="id must be a string or an integer, got list"):
        read_lamp_questions(path, "lamp-3")


@pytest.mark.parametrize(
    "line",
    [
        "[" * 100_000 + "]" * 100_000,  # json.loads would raise RecursionError
        '{"user_id": "a", "id": ' + "9" * 5000 + ', "text": "x"}',  # int() refuses 5,000 digits
    ],
)
def test_json_python_cannot_parse_is_malformed(tmp_path, line):
    path = tmp_path / "items.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(MalformedFileError, match="line 1"):
        read_jsonl(path)


# -- prompts, queries, user ids, options -------------------------------------------------------------------------


def test_undecodable_arguments_are_one_line(run, tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"user_id": "a", "id": "1", "text": "tomatoes in the garden"}) + "\n")
    run("users", "import", str(path))
    _one_error_line(run("generate", "a", f"hi {UNDECODABLE}", "--max-new-tokens", "2"), "prompt", "surrogate")
    _one_error_line(run("retrieve", "a", UNDECODABLE), "query", "surrogate")
    _one_error_line(run("users", "show", UNDECODABLE), "user_id", "surrogate")
    _one_error_line(run("users", "add", "x\x00y"), "user_id", "NUL")


def test_max_new_tokens_must_be_positive_on_the_cli(run):
    run("users", "add", "a")
    _one_error_line(run("generate", "a", "hi", "--max-new-tokens", "-5"), "max_new_tokens", "-5")
    _one_error_line(run("generate", "a", "hi", "--max-new-tokens", "0"), "max_new_tokens", "got 0")


def test_max_new_tokens_must_be_positive(client):
    client.add_user("b")
    for bad in (0, -1, 4097, 2.5, True, "3"):
        with pytest.raises(InvalidInputError, match="max_new_tokens"):
            client.generate("b", "hi", method="none", max_new_tokens=bad)
    assert client.generate("b", "hi", method="none", max_new_tokens=3).new_tokens == 3


def test_settings_the_cli_cannot_use_are_one_line(run, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_K", "many")
    _one_error_line(run("users", "count"), "PERSONALIZE_K")


# -- items from the API ------------------------------------------------------------------------------------------


def test_api_item_errors_name_the_field_and_store_nothing(client):
    client.add_items("a", [{"id": "kept", "text": "kept"}])
    cases = [
        ({"id": "2"}, "text"),  # was a raw TypeError
        ({"id": "2", "text": "x", "fields": {"blob": b"\x00\x01"}}, "fields"),  # was a SQL StatementError
        ({"id": "2", "text": "x", "fields": {"x": float("nan")}}, "fields"),
        ({"id": "2", "text": "x", "fields": {1: "int key"}}, "fields"),
        ({"id": "2", "text": "a\x00b"}, "text"),  # PostgreSQL refuses NUL mid-transaction
        ({"id": "2", "text": "a\udc80b"}, "text"),  # SQLite cannot encode a lone surrogate
        ({"id": "2", "text": "x", "output": ["5"]}, "output"),
        ({"id": "2", "text": "x", "task": 3}, "task"),
        ({"id": "2", "text": "x", "task": "lamp-99"}, "task"),
    ]
    for raw, field in cases:
        with pytest.raises(InvalidInputError, match=field):
            client.add_items("a", [{"id": "1", "text": "fine"}, raw])
    for items in ("not a list", {"id": "1", "text": "x"}, 5, None):
        with pytest.raises(InvalidInputError, match="items must be a list"):
            client.add_items("a", items)
    assert [i.id for i in client.items("a")] == ["kept"]


@pytest.mark.parametrize("bad_id", [[1, 2], True, False, 1.0, 2.5, {"a": 1}, None, "", "  ", "a\x00"])
def test_ids_that_are_not_strings_or_integers_are_refused(bad_id):
    with pytest.raises(InvalidInputError, match="id"):
        make_item(bad_id, "text")


def test_integer_ids_are_their_decimal_digits(client):
    assert make_item(5, "x").id == "5" and make_item(-12, "x").id == "-12"
    client.add_items("a", [{"id": 7, "text": "seven"}])
    client.add_items("a", [{"id": "7", "text": "seven"}])  # the same item: nothing changes
    assert [(i.id, i.text) for i in client.items("a")] == [("7", "seven")]


# -- databases ---------------------------------------------------------------------------------------------------


def test_db_upgrade_against_a_server_that_is_down(run, monkeypatch):
    url = f"postgresql+psycopg://admin:s3cret@127.0.0.1:{free_port()}/nowhere"
    monkeypatch.setenv("PERSONALIZE_DATABASE_URL", url)
    line = _one_error_line(run("db", "upgrade"), "cannot reach database")
    assert "s3cret" not in line
    with pytest.raises(DatabaseUnavailableError):
        upgrade_database(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [("garbage", "not a SQLAlchemy URL"), ("nosuchdb://x/y", "unknown database dialect"), ("mysql://u@h/d", "driver")],
)
def test_unusable_database_url(run, monkeypatch, url, why):
    monkeypatch.setenv("PERSONALIZE_DATABASE_URL", url)
    _one_error_line(run("db", "upgrade"), "PERSONALIZE_DATABASE_URL", why)
    _one_error_line(run("users", "count"), "PERSONALIZE_DATABASE_URL", why)
    with pytest.raises(InvalidInputError, match="PERSONALIZE_DATABASE_URL"):
        Store(url)


# -- properties --------------------------------------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates included
STRINGS = st.text(ANY_CHAR, max_size=12) | st.sampled_from(["", " ", "\x00", "\ud800", "a\udce9b", "NaN", "2020-13-01"])
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | STRINGS | st.builds(pow, st.just(10), st.just(5000))
)  # str() refuses it
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(STRINGS, inner, max_size=3), max_leaves=6
)
FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ITEM = {"id": "1", "text": "a fine text", "fields": {"k": "v"}, "output": "5", "timestamp": "2020-01-02", "task": None}


def _dumps(value: object) -> str:
    """JSON text of ``value``; a number too long for ``json.dumps`` is skipped (its own test covers files)."""
    try:
        return json.dumps(value)
    except ValueError:
        assume(False)
        raise


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _names(message: str, field: str) -> bool:
    return re.search(rf"(?<![a-z_]){re.escape(field)}(?![a-z_])", message) is not None


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("fuzz-home")
    settings_ = Settings(home=home, model=str(tiny_model_dir), auto_train=False, batch_window_ms=0, _env_file=None)
    with Personalizer(settings_) as p:
        p.add_items("alice", [{"id": "1", "text": "tomatoes grow in the garden"}, {"id": "2", "text": "space opera"}])
        yield p


@FUZZ
@given(field=st.sampled_from(sorted(ITEM)), value=JSON)
def test_add_items_fails_only_by_naming_the_field(fuzz_client, field, value):
    before = fuzz_client.count_items()
    item = {**ITEM, "id": "fuzz", field: value}
    try:
        report = fuzz_client.add_items("fuzzer", [item])
    except PersonalizeError as exc:
        assert _names(str(exc), field), str(exc)
        assert fuzz_client.count_items() == before
        return
    expected = make_item(*(item[k] for k in ("id", "text", "fields", "output", "timestamp", "task")))
    assert report.added + report.updated + report.unchanged == 1
    assert {i.id: i for i in fuzz_client.items("fuzzer")}[expected.id] == expected  # stored as validated


@FUZZ
@given(user_id=STRINGS | JSON)
def test_user_ids_fail_only_by_naming_the_field(fuzz_client, user_id):
    try:
        fuzz_client.add_items(user_id, [{"id": "1", "text": "hello"}])
    except PersonalizeError as exc:
        assert _names(str(exc), "user_id"), str(exc)
        return
    assert fuzz_client.items(user_id)[0].text == "hello"


@FUZZ
@given(
    prompt=STRINGS | JSON, max_new_tokens=st.none() | st.integers(-3, 3) | JSON, k=st.none() | st.integers(-2, 5) | JSON
)
def test_generate_fails_only_by_naming_the_field(fuzz_client, prompt, max_new_tokens, k):
    try:
        result = fuzz_client.generate("alice", prompt, method="rag", k=k, max_new_tokens=max_new_tokens)
    except PersonalizeError as exc:
        assert any(_names(str(exc), f) for f in ("prompt", "max_new_tokens", "k")), str(exc)
        return
    assert isinstance(prompt, str) and (k is None or _is_int(k, 0, 1000))
    assert max_new_tokens is None or (_is_int(max_new_tokens, 1, 4096) and result.new_tokens <= max_new_tokens)


@FUZZ
@given(
    query=STRINGS | JSON,
    k=st.none() | st.integers(-2, 5) | JSON,
    retriever=st.sampled_from(["bm25", "dense", "recency"]),
)
def test_retrieve_fails_only_by_naming_the_field(fuzz_client, query, k, retriever):
    try:
        hits = fuzz_client.retrieve("alice", query, k=k, retriever=retriever)
    except PersonalizeError as exc:
        assert _names(str(exc), "query") or _names(str(exc), "k"), str(exc)
        return
    assert isinstance(query, str) and (k is None or _is_int(k, 0, 1000))
    assert {h.id for h in hits} <= {"1", "2"} and len(hits) <= (2 if k is None else k)


JSONL_FIELDS = ["user_id", *sorted(ITEM)]


@FUZZ
@given(field=st.sampled_from(JSONL_FIELDS), value=JSON)
def test_jsonl_import_fails_only_by_naming_line_and_field(tmp_path, field, value):
    path = tmp_path / "items.jsonl"
    row = {"user_id": "u", **ITEM, field: value}
    path.write_text(json.dumps({"user_id": "u", "id": "0", "text": "first line is fine"}) + "\n" + _dumps(row))
    try:
        users = read_jsonl(path)
    except MalformedFileError as exc:
        assert "line 2" in str(exc) and _names(str(exc), field), str(exc)
        return
    assert sum(len(items) for items in users.values()) == 2


@FUZZ
@given(raw=st.binary(max_size=40) | st.builds(lambda v: _dumps(v).encode(), JSON))
def test_jsonl_import_of_any_bytes_is_stored_or_malformed(tmp_path, raw):
    path = tmp_path / "items.jsonl"
    path.write_bytes(raw)
    try:
        read_jsonl(path)
    except MalformedFileError as exc:
        assert "line " in str(exc)


LAMP_FIELDS = {"user_id": "user_id", "profile": "profile", "p.id": "id", "p.text": "text", "p.score": "score"}


@FUZZ
@given(where=st.sampled_from(sorted(LAMP_FIELDS) + ["p.date"]), value=JSON)
def test_lamp_import_fails_only_by_naming_the_field(tmp_path, where, value):
    item = {"id": "p1", "text": "loved it", "score": "5", "date": "2019-05-01"}
    question = {"id": "q1", "user_id": "u1", "input": "review: x", "profile": [item]}
    if where.startswith("p."):
        item[where[2:]] = value
    else:
        question[where] = value
    path = tmp_path / "dev_questions.json"
    path.write_text(_dumps([{"id": "q0", "input": "x", "profile": []}, question]))
    for reader in (lambda: read_lamp_questions(path, "lamp-3"), lambda: read_lamp(path, None, "lamp-3")):
        try:
            reader()
        except MalformedFileError as exc:
            field = LAMP_FIELDS.get(where, "date")
            assert "question 1" in str(exc) and _names(str(exc), field), str(exc)
