"""A new user's first minute. The command line starts without torch, Ray, MLflow or Optuna:
commands import them when they need them, so `kdsweep --help`, usage errors and reading a missing
store start at once. A structural check (which modules are loaded), not a timing one:
benchmarks/cli_startup.py prints the times."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "mlflow", "optuna")

# Runs a command line in-process, then prints which heavy packages it loaded, whatever the exit.
REPORT = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('loaded:', sorted(set({HEAVY!r}) & set(sys.modules))))\n"
    "sys.argv = ['kdsweep', *sys.argv[1:]]\n"
    "from sweeps.cli import main\n"
    "main()\n"
)


def loaded_by(*args: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """The heavy packages a fresh `kdsweep ARGS` process loaded, and the process."""
    done = subprocess.run([sys.executable, "-c", REPORT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert last.startswith("loaded:"), (done.stdout[-2000:], done.stderr[-2000:])
    return ast.literal_eval(last.removeprefix("loaded:").strip()), done


def test_importing_the_command_line_loads_no_heavy_package() -> None:
    code = f"import sys, sweeps.cli; print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"`import sweeps.cli` imports {done.stdout.strip()}"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["status", "--help"], ["cluster", "--help"]])
def test_help_loads_no_heavy_package(args) -> None:
    loaded, done = loaded_by(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout
    assert loaded == [], f"kdsweep {' '.join(args)} imports {loaded}"


def test_usage_error_loads_no_heavy_package() -> None:
    loaded, done = loaded_by("run")  # SPEC missing
    assert done.returncode == 2
    assert "Missing argument" in done.stderr
    assert loaded == []


def test_status_of_a_missing_store_loads_no_heavy_package(tmp_path) -> None:
    loaded, done = loaded_by("status", "--tracking-uri", f"sqlite:///{tmp_path}/missing.db")
    assert done.returncode == 2
    assert "no sweeps recorded" in done.stderr
    assert loaded == []


def test_new_experiments_open_on_their_runs_in_the_mlflow_ui(tmp_path) -> None:
    """The other half of a new user's first minute: the UI opens a sweep's experiment on its runs
    (a model-development experiment), not on GenAI traces; an experiment made without the kind gets it."""
    from sweeps.tracking import EXPERIMENT_KIND, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = tracker.client.get_experiment(tracker.experiment_id("new"))
    assert new.tags["mlflow.experimentKind"] == "custom_model_development" == EXPERIMENT_KIND["mlflow.experimentKind"]
    made_elsewhere = tracker.client.create_experiment("elsewhere")
    assert tracker.experiment_id("elsewhere") == made_elsewhere
    assert tracker.client.get_experiment(made_elsewhere).tags["mlflow.experimentKind"] == "custom_model_development"
