"""A multi-objective sweep (val accuracy vs student parameters) on digits: a Pareto front of
at least 3 students, each pullable. Real Ray Tune, Optuna and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from sweeps.results import TrialSummary, pareto_front
from sweeps.tracking import Tracker


def summary(trial_id: str, acc: float, cost: float, status: str = "FINISHED") -> TrialSummary:
    return TrialSummary(trial_id, status, 3, {"val_acc_best": acc, "cost_params": cost}, {})


def test_pareto_front_keeps_only_undominated_trials() -> None:
    trials = [summary("a", 0.90, 100), summary("b", 0.95, 200), summary("c", 0.94, 300),
              summary("d", 0.97, 400), summary("e", 0.90, 150), summary("f", 0.99, 50, status="KILLED")]
    assert [t.trial_id for t in pareto_front(trials, "cost_params")] == ["a", "b", "d"]


def test_multi_objective_sweep_reports_and_exports_a_pareto_front(tmp_path) -> None:
    spec = {
        "name": "pareto",
        "teacher": {"arch": {"name": "convnet", "args": {"width": 16, "depth": 1}},
                    "recipe": {"name": "digits", "epochs": 3}},
        "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
        "recipe": {"name": "digits", "epochs": 4},
        "search": {"student.args.width": {"type": "int", "low": 1, "high": 12},
                   "method.T": {"low": 2.0, "high": 6.0}},
        "sweep": {"num_trials": 6, "max_concurrent": 2, "objectives": ["accuracy", "params"],
                  "scheduler": {"type": "none"},
                  "initial_points": [{"student.args.width": w} for w in (1, 2, 4, 8, 12)]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cli = [sys.executable, "-m", "sweeps.cli"]
    done = subprocess.run([*cli, "run", "spec.yaml", "--name", "pareto"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    shown = subprocess.run([*cli, "best", "pareto", "--pareto", "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    front = json.loads(shown.stdout)
    assert len(front) >= 3
    costs = [row["cost"] for row in front]
    accuracies = [row["val_acc"] for row in front]
    assert costs == sorted(costs) and accuracies == sorted(accuracies)  # cheaper ones are less accurate
    assert all(row["cost_name"] == "params" for row in front)

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = tracker.find_sweeps("pareto")
    trials = {r.data.tags["kdsweep.trial_id"]: r for r in tracker.children(parent.info.run_id, "trial")}
    for row in front:  # the reported cost is the trial's student size
        assert trials[row["trial_id"]].data.metrics["cost_params"] == row["cost"]

    cheapest = front[0]["trial_id"]
    pulled = subprocess.run([*cli, "pull", "pareto", "--to", "cheap", "--trial", cheapest], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    meta = json.loads((tmp_path / "cheap" / "student.json").read_text())
    assert meta["trial_id"] == cheapest and meta["num_params"] == front[0]["cost"]
    refused = subprocess.run([*cli, "pull", "pareto", "--to", "x", "--trial", "nope"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "not on the Pareto front" in refused.stderr
