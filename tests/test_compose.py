"""The docker-compose stack has every service the code needs, configured through the settings the code reads."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from personalize.settings import ServerSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_with_docker_compose():
    exe = shutil.which("docker-compose")
    if exe is None:
        message = "docker-compose is not installed (Debian package docker-compose)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PERSONALIZE_API_KEY": "compose-test-key"}
    result = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    unset = {k: v for k, v in env.items() if k != "PERSONALIZE_API_KEY"}  # the API refuses to start without a key
    refused = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT, env=unset
    )
    assert refused.returncode != 0 and "PERSONALIZE_API_KEY" in refused.stderr


def test_every_service_the_code_needs_is_there(compose):
    services = compose["services"]
    assert {"postgres", "redis", "chroma", "migrate", "worker", "api", "dashboard"} <= set(services)
    for name in ("postgres", "redis", "chroma", "api", "dashboard"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers", "worker"]
    assert "dashboard/app.py" in services["dashboard"]["command"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert (
        services["api"]["command"] == ["personalize", "serve"]
        and "/healthz" in services["api"]["healthcheck"]["test"][-1]
    )
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert {"pgdata", "adapters", "chromadata"} <= set(compose["volumes"])


def test_app_services_use_the_settings_the_code_reads(compose):
    fields = {f"PERSONALIZE_{name.upper()}" for name in Settings.model_fields}
    for name in ("worker", "api", "dashboard", "migrate"):
        env = compose["services"][name]["environment"]
        assert set(env) <= fields, set(env) - fields
        settings = Settings(
            database_url=env["PERSONALIZE_DATABASE_URL"],
            chroma=env["PERSONALIZE_CHROMA"],
            broker_url=env["PERSONALIZE_BROKER_URL"],
            _env_file=None,
        )
        assert settings.resolved_database_url.startswith("postgresql+psycopg://")
        assert settings.chroma_is_server and settings.resolved_broker_url.startswith("redis://")
    raw = compose["services"]["api"]["environment"]["PERSONALIZE_SERVER"]
    server = ServerSettings.model_validate_json(re.sub(r"\$\{PERSONALIZE_API_KEY:\?[^}]*\}", "k", raw))
    assert server.host == "0.0.0.0" and [k.key.get_secret_value() for k in server.api_keys] == ["k"]  # keyed
    for name in ("worker", "api", "dashboard"):  # one shared adapter volume, mounted where the settings point
        service = compose["services"][name]
        assert f"adapters:{service['environment']['PERSONALIZE_ADAPTERS_DIR']}" in service["volumes"]
