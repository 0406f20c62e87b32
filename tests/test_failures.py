"""Failed trials: a NaN loss or an exception ends a trial FAILED with a reason, retries resume
from the last checkpoint, and the sweep goes on. Real Ray Tune, Optuna and MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from sweeps import tags
from sweeps.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent


def test_failed_trials_are_recorded_and_the_sweep_finishes(tmp_path) -> None:
    flaky = str(tmp_path / "flaky-marker")
    spec = {
        "name": "failures",
        "plugins": ["tests.plugins.faulty"],
        "teacher": {"arch": {"name": "convnet", "args": {"width": 8, "depth": 1}},
                    "recipe": {"name": "digits", "epochs": 2}},
        "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
        "method": {"name": "kd"},
        "recipe": {"name": "digits", "epochs": 3},
        "search": {
            "method.name": {"choices": ["kd", "test_nan", "test_raise"]},
            "method.marker": {"choices": ["", flaky], "when": {"method.name": "test_raise"}},
            "recipe.lr": {"low": 0.02, "high": 0.1},
        },
        "sweep": {"num_trials": 4, "max_concurrent": 2, "max_failures": 1, "scheduler": {"type": "none"},
                  "checkpoint_interval": 0,  # every epoch: the retry resumes from epoch 1's checkpoint
                  "initial_points": [{"method.name": "kd"}, {"method.name": "test_nan"},
                                     {"method.name": "test_raise", "method.marker": ""},
                                     {"method.name": "test_raise", "method.marker": flaky}]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", "spec.yaml", "--name", "failures"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = tracker.find_sweeps("failures")
    assert parent.info.status == "FINISHED"
    trials = tracker.children(parent.info.run_id, "trial")
    assert len(trials) == 4  # retried trials reopen their run
    by_kind = {(r.data.params["method"], r.data.params.get("method.marker", "")): r for r in trials}
    nan, broken = by_kind[("test_nan", "")], by_kind[("test_raise", "")]
    assert nan.info.status == "FAILED" and "non-finite loss" in nan.data.tags[tags.END_REASON]
    assert broken.info.status == "FAILED" and "RuntimeError: injected failure" in broken.data.tags[tags.END_REASON]
    recovered = by_kind[("test_raise", flaky)]
    assert recovered.info.status == "FINISHED" and tags.END_REASON not in recovered.data.tags
    steps = [m.step for m in tracker.client.get_metric_history(recovered.info.run_id, "val_acc")]
    assert steps == [1, 2, 3]  # resumed from the epoch-1 checkpoint, no step logged twice
    assert by_kind[("kd", "")].info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 2
