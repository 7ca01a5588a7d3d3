"""A property-based fuzz run (schemathesis) of every operation of the published OpenAPI schema, on a real server on
loopback with a tiny model: whatever it is sent, the server never answers 5xx, never with a traceback, and every
error is the documented JSON body. Bounded: a few dozen examples per operation and a deadline for the run.

schemathesis' pytest plugin does not load under pytest 9, so its Python API is driven from ordinary tests.
"""

from __future__ import annotations

import time

import pytest
from conftest import movie_items
from http_server import server_settings, serving

from personalize import Personalizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPERATIONS = [
    ("POST", "/v1/users/{user_id}/items"),
    ("POST", "/v1/users/{user_id}/retrieve"),
    ("POST", "/v1/users/{user_id}/train"),
    ("GET", "/v1/users/{user_id}"),
    ("DELETE", "/v1/users/{user_id}"),
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/generate"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
KNOWN = "fuzz-known-user"  # an id the fuzzer will not draw (nor forget)
EXAMPLES = 30
SECONDS_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_model_dir):
    import schemathesis

    home = tmp_path_factory.mktemp("fuzz") / "home"
    with Personalizer(server_settings(home, tiny_model_dir, max_new_tokens=4)) as p, serving(p) as url:
        for user in (KNOWN, "a", "0", "x"):  # and short ids the fuzzer is likely to send
            p.add_items(user, movie_items(3))
        yield schemathesis.openapi.from_url(f"{url}/openapi.json"), url


def test_the_schema_lists_every_operation_fuzzed(fuzzed):
    schema, _ = fuzzed
    published = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert published == set(OPERATIONS)


def known_user(case, n: int) -> None:
    """Every other body names a user that exists (and a model that does), so the fuzzer reaches the model."""
    if n % 2 == 0 and isinstance(case.body, dict):
        if "messages" in case.body:  # chat: `user` is optional in the schema, required in fact
            case.body.update(user=KNOWN, model="personalize")
        elif isinstance(case.body.get("user_id"), str):
            case.body["user_id"] = KNOWN


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_input_makes_the_server_fail(fuzzed, method, path):
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    schema, url = fuzzed
    operation = schema[path][method]
    deadline = time.monotonic() + SECONDS_PER_OPERATION
    seen = []

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        if time.monotonic() > deadline:
            return
        known_user(case, len(seen))
        response = case.call(base_url=url, timeout=60)
        seen.append(response.status_code)
        assert "Traceback" not in response.text
        case.validate_response(
            response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
        )

    run()
    assert seen, "no example ran"
