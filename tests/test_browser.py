"""The MLflow UI in a real browser: the session's small real sweep (tests/sweep_cli.py), `kdsweep ui`
on 127.0.0.1, headless Chromium.

Chromium is Debian's (`make test` installs it); Playwright drives it through its bundled driver.
Screenshots are kept in test-artifacts/browser/ at the repository root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.sweep_cli import MODEL, NAME, SPEC, TRIALS

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
# Without the background-networking flags Chromium keeps calling Google services, which a
# closed network refuses; only loopback traffic is needed.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:  # CI must prove the browser check, so a missing browser fails
        pytest.fail("Chromium not found: run `make test`, which installs Debian's chromium package")
    return path


@pytest.fixture(scope="module")
def sweep(digits_sweep) -> dict:
    """The session's small digits sweep (tests/sweep_cli.py) and its child runs' names."""
    tracker, parent = digits_sweep["tracker"], digits_sweep["parent"]
    children = sorted(r.info.run_name for r in tracker.children(parent.info.run_id))
    return {**digits_sweep, "children": children}


@pytest.fixture(scope="module")
def ui(sweep) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(sweep["work"] / "ui.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "ui", "--port", str(port)],
                                  cwd=sweep["work"], env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own group: its workers stop with it
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5):
                        break
                except OSError:
                    assert server.poll() is None, (sweep["work"] / "ui.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "the MLflow UI did not answer within 90 s"
                    time.sleep(1)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


@pytest.fixture
def page(chromium) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


def _screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


def _close_assistant(page: Page) -> None:
    """MLflow 3's assistant panel takes a third of the width; close it when it is open."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.is_visible():
        close.click()


def test_experiment_page_lists_parent_and_child_runs(chromium, sweep, ui, page) -> None:
    parent = sweep["parent"]
    # the trials, the teacher, the CE-only baseline and the confirmation runs
    assert len(sweep["children"]) == TRIALS + 2 + SPEC["sweep"]["confirm"]["top_k"] * SPEC["sweep"]["confirm"]["seeds"]
    page.goto(f"{ui}/#/experiments/{parent.info.experiment_id}/runs", timeout=WAIT_MS)
    try:
        name_cell = page.locator('[role="gridcell"][col-id*="Run Name"]', has_text=NAME)
        expect(name_cell).to_be_visible(timeout=WAIT_MS)
        _close_assistant(page)
        name_cell.get_by_role("button").click()  # child runs are nested under the parent, collapsed
        for child in sweep["children"]:
            expect(page.get_by_role("link", name=child, exact=True)).to_be_visible(timeout=WAIT_MS)
        expect(page.get_by_text(f"{len(sweep['children']) + 1} matching runs")).to_be_visible(timeout=WAIT_MS)
    finally:
        _screenshot(page, "experiment_runs.png")


def test_registered_model_shows_champion_alias(chromium, sweep, ui, page) -> None:
    version = sweep["parent"].data.tags["kdsweep.model_version"]
    page.goto(f"{ui}/#/models/{MODEL}", timeout=WAIT_MS)
    try:
        expect(page.get_by_role("heading", name=MODEL)).to_be_visible(timeout=WAIT_MS)
        _close_assistant(page)
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
        expect(row).to_contain_text("champion", timeout=WAIT_MS)
    finally:
        _screenshot(page, "registered_model.png")
