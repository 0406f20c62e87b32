"""The MLflow UI and optuna-dashboard in a real browser: the session's small real sweep
(tests/sweep_cli.py), `kdsweep ui` and `kdsweep dashboard` on 127.0.0.1, headless Chromium.

Chromium is Debian's (`make test` installs it); Playwright drives it through its bundled driver.
Screenshots are kept in test-artifacts/browser/ at the repository root.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from sweeps.cli.dashboard import open_study_read_only, study_path
from sweeps.plots import REPORT
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(args: list[str], work: Path, log_name: str, ready_url: str, stop: signal.Signals,
             ) -> Iterator[subprocess.Popen]:
    """`kdsweep ARGS` in its own process in `work`, once `ready_url` answers (at most 90 s); stopped
    with `stop` sent to its process group on exit."""
    log_path = work / log_name
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args],
                                  cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True,  # its own group: its workers stop with it
                                  # Ctrl-C as in a terminal, even under a shell that ran these tests in
                                  # the background (which starts them with SIGINT ignored)
                                  preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=5):
                        break
                except OSError:
                    assert server.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"kdsweep {args[0]} did not answer within 90 s"
                    time.sleep(1)
            yield server
        finally:
            if server.poll() is None:
                os.killpg(server.pid, stop)
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def ui(sweep) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with _serving(["ui", "--port", str(port)], sweep["work"], "ui.log", f"{url}/health", signal.SIGTERM):
        yield url


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dashboard_shows_the_sweeps_study_and_its_trials(chromium, sweep, page) -> None:
    study_file = study_path(sweep["parent"])
    study = optuna.load_study(study_name=NAME, storage=open_study_read_only(study_file, NAME))
    trials = study.get_trials()
    assert len(trials) == TRIALS
    before = _sha256(study_file)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with _serving(["dashboard", NAME, "--port", str(port)], sweep["work"], "dashboard.log",
                  f"{url}/api/studies", signal.SIGINT) as server:  # SIGINT: Ctrl-C, as a user stops it
        try:
            page.goto(url, timeout=WAIT_MS)
            page.get_by_role("link").filter(has_text=NAME).click()  # the study, from the dashboard's list
            page.get_by_role("link", name="Trials (List)").click()
            expect(page.get_by_role("listitem").filter(has_text=f"{len(trials)} Trials")).to_be_visible(
                timeout=WAIT_MS)
            for trial in trials:
                entry = page.get_by_role("button").filter(has_text=f"Trial {trial.number}")
                expect(entry).to_contain_text(trial.state.name.capitalize(), timeout=WAIT_MS)
            expect(page.get_by_role("button").filter(has_text=f"Trial {study.best_trial.number}")).to_contain_text(
                "Best Trial", timeout=WAIT_MS)
        finally:
            _screenshot(page, "optuna_dashboard_trials.png")
    assert server.returncode == 0, (sweep["work"] / "dashboard.log").read_text()[-3000:]
    assert _sha256(study_file) == before  # read-only: serving never changed the study


def test_parent_run_report_draws_parallel_coordinates(chromium, sweep, ui, page) -> None:
    parent = sweep["parent"]
    assert {f.path for f in sweep["tracker"].client.list_artifacts(parent.info.run_id, "plots")} >= {
        f"plots/{REPORT}", "plots/parallel_coordinate.png"}
    study = optuna.load_study(study_name=NAME, storage=open_study_read_only(study_path(parent), NAME))
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    blocked: list[str] = []  # the report must render offline: nothing but the UI itself is fetched

    def loopback_only(route) -> None:
        if route.request.url.startswith(("http://127.0.0.1", "blob:", "data:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", loopback_only)
    page.goto(f"{ui}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts/plots/{REPORT}",
              timeout=WAIT_MS)
    try:
        report = page.frame_locator("iframe.mlflow-html-iframe")  # the MLflow UI's HTML artifact view
        plot = report.locator("#parallel_coordinate")
        expect(plot.locator("text.gtitle")).to_have_text("Parallel Coordinate Plot", timeout=WAIT_MS)
        _close_assistant(page)
        plot.scroll_into_view_if_needed()  # for the screenshot
        for param in SPEC["search"]:  # one axis per searched parameter, drawn by plotly as SVG
            label = plot.locator("g.xtick text").filter(has_text=re.compile(f"^{re.escape(param)}$"))
            expect(label).to_have_count(1, timeout=WAIT_MS)
        # one line per completed trial of the study
        expect(plot.locator("g.trace.scatter path.js-line")).to_have_count(len(completed), timeout=WAIT_MS)
    finally:
        _screenshot(page, "report_parallel_coordinate.png")
    assert not [u for u in blocked if "plot" in u], blocked
