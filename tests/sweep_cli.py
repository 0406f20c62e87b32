"""Sweeps run through the command line in their own process, as a user runs them; and the small
real digits sweep that tests/test_e2e.py and tests/test_browser.py both read (one run of it per
test session: the `digits_sweep` fixture in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sweeps.tracking import Tracker

NAME = "e2e"
EPOCHS = 4
TRIALS = 4
MODEL = "e2e_student"
SPEC = {
    "name": "e2e_spec",
    "teacher": {"arch": {"name": "convnet", "args": {"width": 16, "depth": 1}},
                "recipe": {"name": "digits", "epochs": 3}},
    "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
    "method": {"name": "kd"},
    "recipe": {"name": "digits", "epochs": EPOCHS},
    "search": {
        "method.T": {"low": 1.0, "high": 8.0},
        "method.w_kd": {"low": 0.1, "high": 1.0},
        "method.kl_reduction": {"choices": ["batchmean", "mean"]},
        "recipe.lr": {"low": 0.02, "high": 0.2, "log": True},
    },
    "sweep": {"num_trials": TRIALS, "max_concurrent": 2, "confirm": {"top_k": 2, "seeds": 2},
              "sampler": {"type": "tpe", "seed": 1, "n_startup_trials": 2},
              "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}},
    "tracking": {"experiment": "e2e", "registered_model": MODEL},
}


def kdsweep(*args: str, cwd: Path, timeout: float = 900, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
    """The command line in its own process, as a user runs it: without MLFLOW_TRACKING_URI (the
    sweep's store is `cwd`/mlflow.db), with `env` added."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def run_spec(work: Path, spec: dict[str, Any], name: str, *, timeout: float = 900,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Write `spec` to `work`/spec.yaml (key order kept: `when` conditions depend on it), run it as
    sweep `name`, assert it exits 0; the work folder, tracking URI, tracker, parent run, stdout and
    stderr (the progress lines: a run piped to a file prints one line per finished trial)."""
    (work / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    done = kdsweep("run", "spec.yaml", "--name", name, cwd=work, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    tracker = Tracker(uri)
    (parent,) = tracker.find_sweeps(name)
    return {"work": work, "uri": uri, "tracker": tracker, "parent": parent, "stdout": done.stdout,
            "stderr": done.stderr}


def run_digits_sweep(work: Path) -> dict[str, Any]:
    """SPEC run as sweep NAME in `work` (`run_spec`)."""
    return run_spec(work, SPEC, NAME)
