"""The docker-compose stack has every service the code needs, configured through the settings the code reads."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from personalize.settings import Settings

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
    result = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_every_service_the_code_needs_is_there(compose):
    services = compose["services"]
    assert {"postgres", "redis", "chroma", "migrate", "worker", "dashboard"} <= set(services)
    for name in ("postgres", "redis", "chroma", "dashboard"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers", "worker"]
    assert "dashboard/app.py" in services["dashboard"]["command"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert {"pgdata", "adapters", "chromadata"} <= set(compose["volumes"])


def test_app_services_use_the_settings_the_code_reads(compose):
    fields = {f"PERSONALIZE_{name.upper()}" for name in Settings.model_fields}
    for name in ("worker", "dashboard", "migrate"):
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
    for name in ("worker", "dashboard"):  # one shared adapter volume, mounted where the settings point
        service = compose["services"][name]
        assert f"adapters:{service['environment']['PERSONALIZE_ADAPTERS_DIR']}" in service["volumes"]
