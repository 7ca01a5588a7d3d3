"""End to end: the real `streamlit run dashboard/app.py` on localhost against a seeded database, each page opened in
headless Chromium (Debian's, driven by Playwright) and screenshotted; each must render its title and no exception.

Skips when /usr/bin/chromium or playwright is missing, and fails instead when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from test_dashboard import APP, seed_home

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = [
    ("", "Comparison"),  # the default page, at the root
    ("volume", "By data volume"),
    ("cost", "Cost"),
    ("router", "Router"),
    ("users", "Users"),
    ("jobs", "Jobs"),
]
START_TIMEOUT_S = 120
PAGE_TIMEOUT_MS = 90_000


def _need(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture
def browser():
    _need(Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is missing: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def server(tmp_path: Path, tiny_model_dir: Path):
    home = tmp_path / "home"
    seed_home(home, str(tiny_model_dir))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
    env |= {"PERSONALIZE_HOME": str(home), "PERSONALIZE_MODEL": str(tiny_model_dir), "PERSONALIZE_RETRIEVER": "bm25"}
    log_path = tmp_path / "streamlit.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                APP,
                "--server.headless=true",
                "--server.address=127.0.0.1",
                f"--server.port={port}",
                "--server.fileWatcherType=none",
                "--browser.gatherUsageStats=false",
            ],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


def test_every_page_renders_its_title_and_no_exception(server: str, browser, tmp_path: Path):
    page = browser.new_page(viewport={"width": 1440, "height": 2400})
    shots = tmp_path / "screenshots"
    shots.mkdir()
    for path, title in PAGES:
        page.goto(f"{server}/{path}", wait_until="domcontentloaded")
        page.locator("h1", has_text=title).first.wait_for(timeout=PAGE_TIMEOUT_MS)
        # every seeded page shows a table (and the research pages a chart); then let lazy widgets load
        page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=PAGE_TIMEOUT_MS)
        if path in ("", "volume", "cost", "router"):
            page.locator(".js-plotly-plot").first.wait_for(timeout=PAGE_TIMEOUT_MS)
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=PAGE_TIMEOUT_MS)
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(1500)
        shot = shots / f"{path or 'comparison'}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000, path
        assert page.locator('[data-testid="stException"]').count() == 0, f"{path}: {page.inner_text('body')[:2000]}"
        body = page.inner_text("body")
        assert "Traceback" not in body and "Page not found" not in body, f"{path}: {body[:2000]}"
        if path == "":  # the comparison shows the claims panel and its no-model baseline
            assert "The paper's claims, checked" in body and "no model" in body, body[:2000]
        if os.environ.get("PERSONALIZE_SCREENSHOTS"):
            shutil.copy(shot, Path(os.environ["PERSONALIZE_SCREENSHOTS"]) / shot.name)
    page.close()
