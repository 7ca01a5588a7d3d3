"""`personalize serve`: the HTTP API over one Personalizer, on a real uvicorn server on loopback (tiny model, real
SQLite and Chroma): the endpoints, JSON errors with stable codes, API keys scoped to tenants with hostile ids,
busy and catch-all errors, readiness and metrics."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from conftest import movie_items
from http_server import server_settings, serving
from typer.testing import CliRunner

from personalize import Personalizer
from personalize.errors import InvalidInputError
from personalize.server.app import create_app
from personalize.server.auth import check_bind
from personalize.settings import ApiKey

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOSTILE_IDS = ["a/b", "a%2Fb", "50%", "%", "..", ".", "../..", "ü/../x", "a b?c#d&e=f", "x/items", "x/train", "名前"]
KEYS = [
    {"key": "admin-key", "name": "admin"},
    {"key": "acme-key", "name": "acme", "prefix": "acme/"},
    {"key": "bob-key", "name": "bob", "users": ["bob", "b/o/b"]},
]


def path(user_id: str) -> str:
    return quote(user_id, safe="").replace(".", "%2E")


class Api:
    def __init__(self, url: str, p: Personalizer, app: object) -> None:
        self.url, self.p, self.app = url, p, app

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    """An open server (no keys: loopback only)."""
    settings = server_settings(tmp_path_factory.mktemp("server") / "home", tiny_model_dir, max_new_tokens=16)
    with Personalizer(settings) as p:
        app = create_app(p)
        with serving(app) as url:
            yield Api(url, p, app)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_model_dir):
    """A server with an unscoped key, a tenant key (prefix acme/) and a key for two users."""
    settings = server_settings(tmp_path_factory.mktemp("keyed") / "home", tiny_model_dir, api_keys=KEYS)
    with Personalizer(settings) as p:
        app = create_app(p)
        with serving(app) as url:
            yield Api(url, p, app)


def test_items_user_generate_retrieve_forget_round_trip(api):
    c = api.client()
    added = c.post("/v1/users/alice/items", json={"items": movie_items(6)})
    assert added.status_code == 200 and added.json()["added"] == 6 and added.json()["user_id"] == "alice"
    again = c.post("/v1/users/alice/items", json={"items": movie_items(6)}).json()
    assert again["unchanged"] == 6 and again["added"] == 0  # upserting the same items changes nothing
    user = c.get("/v1/users/alice").json()
    assert user["n_items"] == 6 and user["user_id"] == "alice"

    result = c.post("/v1/generate", json={"user_id": "alice", "prompt": "A film?", "method": "rag", "k": 3}).json()
    assert result["method"] == "rag" and len(result["retrieved"]) == 3
    assert set(result["retrieved_ids"]) <= {str(i) for i in range(6)}
    assert result["timings"]["generation_s"] > 0 and isinstance(result["text"], str) and "notes" in result
    hits = c.post("/v1/users/alice/retrieve", json={"query": "Sci-Fi", "k": 2}).json()["items"]
    assert len(hits) == 2 and hits[0]["item"]["text"].startswith("Film")

    report = c.delete("/v1/users/alice").json()
    assert report["items"] == 6 and report["collection"] is True
    gone = c.get("/v1/users/alice")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_user"


@pytest.mark.parametrize("user_id", HOSTILE_IDS)
def test_hostile_ids_are_one_user_each_end_to_end(api, user_id):
    c = api.client()
    items = movie_items(3, prefix=user_id[:3])
    assert c.post(f"/v1/users/{path(user_id)}/items", json={"items": items}).status_code == 200
    assert c.get(f"/v1/users/{path(user_id)}").json()["user_id"] == user_id
    hits = c.post(f"/v1/users/{path(user_id)}/retrieve", json={"query": "Film", "k": 10}).json()["items"]
    assert sorted(h["id"] for h in hits) == sorted(i["id"] for i in items)
    result = c.post("/v1/generate", json={"user_id": user_id, "prompt": "hi", "method": "rag", "max_new_tokens": 2})
    assert result.status_code == 200 and result.json()["user_id"] == user_id
    assert c.delete(f"/v1/users/{path(user_id)}").json()["items"] == 3
    assert c.get(f"/v1/users/{path(user_id)}").status_code == 404


def test_an_id_with_a_slash_and_its_percent_encoded_spelling_are_two_users(api):
    c = api.client()
    c.post(f"/v1/users/{path('t/u')}/items", json={"items": movie_items(2)})
    c.post(f"/v1/users/{path('t%2Fu')}/items", json={"items": movie_items(1)})
    assert c.get(f"/v1/users/{path('t/u')}").json()["n_items"] == 2
    assert c.get(f"/v1/users/{path('t%2Fu')}").json()["n_items"] == 1
    c.delete(f"/v1/users/{path('t/u')}")
    assert c.get(f"/v1/users/{path('t%2Fu')}").json()["n_items"] == 1


def error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "field"} <= set(body["error"])
    assert "Traceback" not in response.text
    return body["error"]


def test_errors_are_json_with_a_stable_code_and_the_field(api):
    c = api.client()
    c.post("/v1/users/erin/items", json={"items": movie_items(2)})
    unknown = c.post("/v1/generate", json={"user_id": "nobody", "prompt": "hi"})
    assert unknown.status_code == 404 and error(unknown)["code"] == "unknown_user"
    cases = [
        ({"user_id": "erin", "prompt": "hi\x00"}, "invalid_input", "prompt"),
        ({"user_id": "erin", "prompt": "   "}, "empty_prompt", "prompt"),
        ({"user_id": "erin", "prompt": "hi", "k": -1}, "invalid_input", "k"),
        ({"user_id": "erin", "prompt": "hi", "method": "magic"}, "invalid_input", "method"),
        ({"user_id": "erin", "prompt": "hi", "retriever": "nope"}, "invalid_input", "retriever"),
        ({"user_id": "erin", "prompt": "hi", "max_new_tokens": 17}, "invalid_input", "max_new_tokens"),  # cap 16
        ({"user_id": "erin", "prompt": "hi", "max_new_tokens": 0}, "invalid_input", "max_new_tokens"),
        ({"user_id": "erin", "prompt": 5}, "invalid_input", "prompt"),
        ({"user_id": "", "prompt": "hi"}, "invalid_input", "user_id"),
        ({"prompt": "hi"}, "invalid_input", "user_id"),
    ]
    for body, code, field in cases:
        response = c.post("/v1/generate", json=body)
        assert response.status_code == 422, body
        assert (error(response)["code"], error(response)["field"]) == (code, field), body
    bad_item = c.post("/v1/users/erin/items", json={"items": [{"id": "1"}]})
    assert bad_item.status_code == 422 and error(bad_item)["field"] == "items[0].text"
    bool_id = c.post("/v1/users/erin/items", json={"items": [{"id": True, "text": "x"}]})
    assert bool_id.status_code == 422 and error(bool_id)["field"].startswith("items[0].id")
    nul_text = c.post("/v1/users/erin/items", json={"items": [{"id": "1", "text": "a\x00"}]})
    assert nul_text.status_code == 422 and error(nul_text)["code"] == "invalid_input"
    assert c.get("/v1/users/erin").json()["n_items"] == 2  # refused imports stored nothing
    broken = c.post("/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and error(broken)["code"] == "invalid_input"
    assert error(c.get("/v1/nothing-here"))["code"] == "not_found"
    assert error(c.put("/v1/generate"))["code"] == "method_not_allowed"
    job = c.get("/v1/jobs/987654")
    assert job.status_code == 404 and error(job)["code"] == "unknown_job"
    assert c.get("/v1/jobs/99999999999999999999999").status_code == 422


def test_busy_is_503_with_retry_after(api):
    limiter = api.app.state.limiter
    c = api.client()
    c.post("/v1/users/fay/items", json={"items": movie_items(2)})
    held = 0
    while limiter._slots.acquire(blocking=False):
        held += 1
    try:
        busy = c.post("/v1/generate", json={"user_id": "fay", "prompt": "hi"})
        assert busy.status_code == 503 and error(busy)["code"] == "server_busy"
        assert busy.headers["Retry-After"] == "1"
    finally:
        for _ in range(held):
            limiter._slots.release()
    assert c.post("/v1/generate", json={"user_id": "fay", "prompt": "hi", "max_new_tokens": 1}).status_code == 200


def test_an_unexpected_failure_is_500_json_without_a_traceback(api, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(api.p, "generate", boom)
    api.client().post("/v1/users/gus/items", json={"items": movie_items(1)})
    response = api.client().post("/v1/generate", json={"user_id": "gus", "prompt": "hi"})
    assert response.status_code == 500 and error(response)["code"] == "server_error"
    assert "secret" not in response.text and "RuntimeError" not in response.text


def test_train_queues_a_job_that_reads_back(api):
    c = api.client()
    c.post("/v1/users/hal/items", json={"items": movie_items(4)})
    queued = c.post("/v1/users/hal/train")
    assert queued.status_code == 202 and queued.json()["queued"] is True
    job = c.get(f"/v1/jobs/{queued.json()['job_id']}").json()
    assert job["user_id"] == "hal" and job["state"] == "queued"
    again = c.post("/v1/users/hal/train", json={"force": False}).json()
    assert again["queued"] is False and again["job_id"] == job["id"]


def test_metrics_count_requests_methods_adapter_cache_and_batches(api):
    c = api.client()
    c.post("/v1/users/ivy/items", json={"items": movie_items(4)})
    api.p.train("ivy")
    for _ in range(2):  # the first loads the adapter, the second finds it cached
        assert c.post("/v1/generate", json={"user_id": "ivy", "prompt": "hi", "method": "peft", "max_new_tokens": 2})
    text = c.get("/metrics").text
    assert 'personalize_generations_total{method="peft"} 2.0' in text
    assert 'personalize_adapter_cache_total{result="miss"} 1.0' in text
    assert 'personalize_adapter_cache_total{result="hit"} 1.0' in text
    assert "personalize_batch_size_count" in text and "personalize_generation_seconds_bucket" in text
    assert 'personalize_http_requests_total{route="/v1/generate",status="200",verb="POST"}' in text
    assert 'route="/v1/users/{user_id:path}/items"' in text  # routes by template: no user id in a label
    assert "ivy" not in text


def test_health_readiness_models_and_the_published_schema(api):
    c = api.client()
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert set(ready.json()["checks"]) == {"model", "database", "broker"}
    models = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert "personalize" in models and "personalize:rag+peft" in models
    schema = c.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/users/{user_id}/items" in schema["paths"]


def test_readyz_is_503_naming_what_is_down(tmp_path, tiny_model_dir):
    from starlette.testclient import TestClient

    settings = server_settings(tmp_path / "home", tiny_model_dir).model_copy(
        update={"broker_url": "redis://127.0.0.1:1/0", "model": str(tmp_path / "not-loaded-yet")}
    )
    with Personalizer(settings) as p:
        response = TestClient(create_app(p, preload=False)).get("/readyz")
    checks = response.json()["checks"]
    assert response.status_code == 503 and response.json()["ready"] is False
    assert not checks["broker"]["ok"] and not checks["model"]["ok"] and checks["database"]["ok"]


def test_without_api_keys_it_binds_loopback_only():
    check_bind("127.0.0.1", [])
    with pytest.raises(InvalidInputError, match="without API keys") as refused:
        check_bind("0.0.0.0", [])
    assert refused.value.field == "host"
    check_bind("0.0.0.0", [ApiKey(key="k")])

    from personalize.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env={"PERSONALIZE_SERVER__API_KEYS": "[]"})
    assert result.exit_code == 2 and "without API keys" in result.output


def test_a_missing_or_unknown_key_is_401(keyed):
    for client in (keyed.client(), keyed.client("wrong-key"), keyed.client("admin-ke"), keyed.client("admin-keyy")):
        response = client.get("/v1/users/acme%2Fa")
        assert response.status_code == 401 and error(response)["code"] == "unauthorized"
    basic = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Basic YWRtaW4ta2V5"})
    assert basic.status_code == 401
    assert httpx.get(f"{keyed.url}/v1/models", headers={"X-API-Key": "acme-key"}).status_code == 200
    assert keyed.client().get("/healthz").status_code == 200  # probes need no key


OTHER_TENANT = ["globex/y", "acme", "ACME/x", "acme%2Fx", " acme/x", "acm", "bob"]


@pytest.mark.parametrize("victim", OTHER_TENANT)
def test_a_tenant_key_never_reads_or_forgets_another_tenants_user(keyed, victim):
    admin, acme = keyed.client("admin-key"), keyed.client("acme-key")
    assert admin.post(f"/v1/users/{path(victim)}/items", json={"items": movie_items(2)}).status_code == 200
    job = admin.post(f"/v1/users/{path(victim)}/train").json()["job_id"]
    attempts = [
        acme.get(f"/v1/users/{path(victim)}"),
        acme.delete(f"/v1/users/{path(victim)}"),
        acme.post(f"/v1/users/{path(victim)}/items", json={"items": movie_items(1, prefix="evil")}),
        acme.post(f"/v1/users/{path(victim)}/retrieve", json={"query": "Film"}),
        acme.post(f"/v1/users/{path(victim)}/train"),
        acme.post("/v1/generate", json={"user_id": victim, "prompt": "hi"}),
        acme.post(
            "/v1/chat/completions",
            json={"model": "personalize", "user": victim, "messages": [{"role": "user", "content": "hi"}]},
        ),
        acme.get(f"/v1/jobs/{job}"),
    ]
    for response in attempts:
        assert response.status_code == 403 and error(response)["code"] == "forbidden", response.request.url
    assert admin.get(f"/v1/users/{path(victim)}").json()["n_items"] == 2  # untouched
    assert admin.delete(f"/v1/users/{path(victim)}").status_code == 200


def test_scoped_keys_act_for_their_own_users_only(keyed):
    acme, bob = keyed.client("acme-key"), keyed.client("bob-key")
    # ids are opaque: "acme/../globex/y" is a user of acme's, never globex/y
    for user_id in ["acme/x", "acme/../globex/y", "acme/%2F.."]:
        assert acme.post(f"/v1/users/{path(user_id)}/items", json={"items": movie_items(2)}).status_code == 200
        assert acme.get(f"/v1/users/{path(user_id)}").json()["user_id"] == user_id
    assert acme.get(f"/v1/users/{path('globex/y')}").status_code == 403
    assert keyed.client("admin-key").get(f"/v1/users/{path('globex/y')}").status_code == 404
    assert acme.get(f"/v1/users/{path('acme/never-added')}").status_code == 404  # own scope: the truth
    for user_id in ["bob", "b/o/b"]:
        assert bob.post(f"/v1/users/{path(user_id)}/items", json={"items": movie_items(1)}).status_code == 200
    assert bob.get(f"/v1/users/{path('bobby')}").status_code == 403
    assert bob.get(f"/v1/users/{path('acme/x')}").status_code == 403
    assert acme.delete(f"/v1/users/{path('acme/../globex/y')}").json()["items"] == 2


def test_the_serve_command_answers_on_loopback(tmp_path, tiny_model_dir):
    """`personalize serve` as a process: ready once the model is loaded, hostile ids intact, stopped by SIGTERM."""
    import os
    import subprocess
    import sys
    import time

    from conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        "PERSONALIZE_HOME": str(tmp_path / "home"),
        "PERSONALIZE_MODEL": str(tiny_model_dir),
        "PERSONALIZE_AUTO_TRAIN": "false",
        "PERSONALIZE_TORCH_THREADS": "1",
    }
    env.pop("PERSONALIZE_SERVER", None)
    cmd = [sys.executable, "-m", "personalize.cli", "serve", "--port", str(port), "--log-level", "warning"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        user = "tenant/../ü%2F"
        c = httpx.Client(base_url=url, timeout=60)
        assert c.post(f"/v1/users/{path(user)}/items", json={"items": movie_items(2)}).json()["user_id"] == user
        assert c.post("/v1/generate", json={"user_id": user, "prompt": "hi", "max_new_tokens": 2}).status_code == 200
        assert c.delete(f"/v1/users/{path(user)}").json()["items"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in log.read_text()
