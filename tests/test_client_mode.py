"""The module-level shortcuts (`personalize.generate`, `add_items`, `retrieve`, `forget`) in both modes: in-process,
and with `PERSONALIZE_SERVER` set, against `personalize serve` on loopback. Every test runs in both and expects the
same typed results and the same exception classes."""

from __future__ import annotations

from datetime import datetime

import pytest
from conftest import free_port, movie_items
from http_server import server_settings, serving

import personalize
from personalize import Personalizer
from personalize.data.items import ProfileItem
from personalize.data.store import UpsertReport
from personalize.errors import (
    EmptyPromptError,
    ForbiddenError,
    InvalidInputError,
    ServerUnavailableError,
    UnauthorizedError,
    UnknownUserError,
)
from personalize.remote import RemoteClient
from personalize.results import ForgetReport, GenerationResult, RetrievedRef, Timings
from personalize.retrieval.base import RetrievedItem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_model_dir):
    settings = server_settings(tmp_path_factory.mktemp("client-mode") / "home", tiny_model_dir)
    with Personalizer(settings) as p, serving(p) as url:
        yield p, url


@pytest.fixture(params=["in-process", "server"])
def mode(request, backend, monkeypatch):
    """In-process: the default Personalizer is the served one. Server: PERSONALIZE_SERVER points at it, and
    building a local Personalizer fails the test."""
    p, url = backend
    monkeypatch.setattr(personalize, "_default", p)
    if request.param == "server":
        monkeypatch.setenv("PERSONALIZE_SERVER", url)

        def no_local_personalizer():
            raise AssertionError("client mode must not build a Personalizer")

        monkeypatch.setattr(personalize, "get_default", no_local_personalizer)
    else:
        monkeypatch.delenv("PERSONALIZE_SERVER", raising=False)
    return request.param


def test_add_items_returns_the_upsert_report(mode):
    user = f"{mode}/ann"
    items = [*movie_items(3), ProfileItem("p1", "A typed item", timestamp=datetime(2024, 5, 1, 12, 30))]
    report = personalize.add_items(user, items)
    assert isinstance(report, UpsertReport) and (report.user_id, report.added, report.unchanged) == (user, 4, 0)
    assert all(isinstance(i, ProfileItem) for i in report.changed)
    assert personalize.add_items(user, items).unchanged == 4


def test_retrieve_returns_the_users_items_only(mode):
    user, other = f"{mode}/bo", f"{mode}/bo2"
    personalize.add_items(user, movie_items(4, prefix="own"))
    personalize.add_items(other, movie_items(4, prefix="other"))
    hits = personalize.retrieve(user, "Film", k=10)
    assert len(hits) == 4 and all(isinstance(h, RetrievedItem) and h.id.startswith("own") for h in hits)
    assert isinstance(hits[0].item, ProfileItem) and isinstance(hits[0].item.timestamp, datetime)
    assert personalize.retrieve(user, "Film", k=0) == []


def test_generate_returns_a_generation_result(mode):
    user = f"{mode}/cy"
    personalize.add_items(user, movie_items(5))
    result = personalize.generate(user, "A film?", method="rag", k=2, max_new_tokens=3)
    assert isinstance(result, GenerationResult) and isinstance(result.timings, Timings)
    assert result.method == "rag" and result.new_tokens == 3 and len(result.retrieved) == 2
    assert all(isinstance(r, RetrievedRef) for r in result.retrieved)
    assert result.timings.extra["batch_size"] == 1 and result.user_id == user
    fallback = personalize.generate(user, "A film?", method="peft", max_new_tokens=1)
    assert fallback.method == "none" and fallback.notes  # no adapter yet: says so


def test_forget_returns_the_report_and_the_user_is_gone(mode):
    user = f"{mode}/di"
    personalize.add_items(user, movie_items(3))
    report = personalize.forget(user)
    assert isinstance(report, ForgetReport) and report.items == 3 and report.collection
    with pytest.raises(UnknownUserError) as gone:
        personalize.generate(user, "hi")
    assert gone.value.user_id == user and user in str(gone.value)


@pytest.mark.parametrize("user_id", ["a/b", "50%", "..", "ü/../x", "q?x=1#f", "%2F"])
def test_hostile_user_ids_round_trip(mode, user_id):
    user = f"{user_id}/{mode}" if user_id != ".." else f"{mode}/.."
    personalize.add_items(user, movie_items(2))
    assert personalize.generate(user, "hi", method="rag", max_new_tokens=1).user_id == user
    assert {h.id for h in personalize.retrieve(user, "Film")} == {"0", "1"}
    assert personalize.forget(user).items == 2


def test_errors_are_the_same_classes(mode):
    user = f"{mode}/ed"
    personalize.add_items(user, movie_items(2))
    with pytest.raises(UnknownUserError):
        personalize.retrieve(f"{mode}/nobody", "Film")
    with pytest.raises(EmptyPromptError):
        personalize.generate(user, "  ")
    with pytest.raises(InvalidInputError, match="NUL") as nul:
        personalize.generate(user, "a\x00b")
    assert nul.value.field == "prompt"
    with pytest.raises(InvalidInputError, match="method"):
        personalize.generate(user, "hi", method="magic")
    with pytest.raises(InvalidInputError):
        personalize.add_items(user, [{"id": "x", "text": "nan", "fields": {"v": float("nan")}}])
    with pytest.raises(InvalidInputError):
        personalize.add_items(user, [{"id": "y", "text": "bad\ud800"}])
    with pytest.raises(InvalidInputError):
        personalize.add_items(user, [{"id": 1.5, "text": "float id"}])
    assert personalize.retrieve(user, "Film", k=10) and len(personalize.retrieve(user, "Film", k=10)) == 2


def test_the_server_answers_as_in_process(backend, monkeypatch):
    p, url = backend
    p.add_items("same", movie_items(6))
    local = p.generate("same", "Recommend a film", "rag", k=3, max_new_tokens=6)
    monkeypatch.setenv("PERSONALIZE_SERVER", url)
    remote = personalize.generate("same", "Recommend a film", "rag", k=3, max_new_tokens=6)
    assert (remote.text, remote.retrieved_ids, remote.prompt) == (local.text, local.retrieved_ids, local.prompt)


def test_an_unreachable_server_is_server_unavailable(monkeypatch):
    monkeypatch.setenv("PERSONALIZE_SERVER", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerUnavailableError, match="personalize serve"):
        personalize.generate("anyone", "hi")


def test_the_server_setting_as_json_carries_the_api_key(tmp_path, tiny_model_dir, monkeypatch):
    keys = [{"key": "k-acme", "prefix": "acme/"}]
    with Personalizer(server_settings(tmp_path / "home", tiny_model_dir, api_keys=keys)) as p, serving(p) as url:
        monkeypatch.setenv("PERSONALIZE_SERVER", f'{{"url": "{url}", "api_key": "k-acme"}}')
        assert personalize.add_items("acme/x", movie_items(1)).added == 1
        with pytest.raises(ForbiddenError):
            personalize.add_items("other/x", movie_items(1))
        with pytest.raises(UnauthorizedError):
            RemoteClient(url).forget("acme/x")
        monkeypatch.setenv("PERSONALIZE_SERVER", url)
        monkeypatch.setenv("PERSONALIZE_SERVER__API_KEY", "k-acme")
        assert personalize.forget("acme/x").items == 1


def test_every_error_class_has_its_own_code_and_comes_back_as_itself():
    from personalize import errors
    from personalize.errors import PersonalizeError, ServerError, error_classes
    from personalize.server.wire import error_from_wire

    defined = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, PersonalizeError)]
    assert len({c.code for c in defined}) == len(defined) == len(error_classes())
    for code, cls in error_classes().items():
        exc = error_from_wire({"error": {"code": code, "message": "what to do", "field": "k"}}, 400)
        assert type(exc) is cls and str(exc) == "what to do" and exc.field == "k"
    assert type(error_from_wire({"error": {"code": "from-the-future"}}, 500)) is ServerError
    assert type(error_from_wire("<html>bad gateway</html>", 502)) is ServerError
