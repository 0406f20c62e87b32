"""A multi-objective sweep (val accuracy vs student latency) on digits: a Pareto front whose
students carry their latency (and size) figures, each pullable. Real Ray Tune, Optuna and MLflow.
The front itself (params, flops or latency alike) and the latency measurement are unit-tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from kd_core.cost import LatencyProtocol, latency_ms, measure_costs
from kd_core.models import build_model
from sweeps.results import TrialSummary, pareto_front
from sweeps.spec.settings import SweepSettings
from sweeps.tracking import Tracker


def summary(trial_id: str, acc: float, cost: float, status: str = "FINISHED") -> TrialSummary:
    return TrialSummary(trial_id, status, 3, {"val_acc_best": acc, "cost_params": cost}, {})


def test_pareto_front_keeps_only_undominated_trials() -> None:
    trials = [summary("a", 0.90, 100), summary("b", 0.95, 200), summary("c", 0.94, 300),
              summary("d", 0.97, 400), summary("e", 0.90, 150), summary("f", 0.99, 50, status="KILLED")]
    assert [t.trial_id for t in pareto_front(trials, "cost_params")] == ["a", "b", "d"]


def test_latency_is_the_median_of_timed_passes_on_the_stated_batch() -> None:
    model = build_model("convnet", 10, 1, {"width": 2, "depth": 1}).train()
    example = torch.randn(3, 1, 8, 8)
    calls: list[int] = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    assert latency_ms(model, example, LatencyProtocol(batch_size=5, warmup=2, repeats=7)) > 0
    assert calls == [5] * 9  # warm-up and timed passes, all on the stated batch size
    assert model.training  # the mode is restored
    costs = measure_costs(model, example, LatencyProtocol(repeats=3))
    assert set(costs) == {"cost_params", "cost_flops", "cost_latency"}
    assert costs["cost_params"] == sum(p.numel() for p in model.parameters())


def test_latency_can_be_an_objective_with_a_stated_protocol() -> None:
    settings = SweepSettings(objectives=["accuracy", "latency"], scheduler={"type": "none"})
    assert settings.cost == "latency"
    assert settings.latency.model_dump() == {"batch_size": 1, "warmup": 10, "repeats": 50}
    with pytest.raises(ValueError, match=r"params \| flops \| latency"):
        SweepSettings(objectives=["latency"])


def test_multi_objective_sweep_reports_and_exports_a_pareto_front(tmp_path) -> None:
    spec = {
        "name": "pareto",
        "teacher": {"arch": {"name": "convnet", "args": {"width": 16, "depth": 1}},
                    "recipe": {"name": "digits", "epochs": 3}},
        "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
        "recipe": {"name": "digits", "epochs": 4},
        "search": {"student.args.width": {"type": "int", "low": 1, "high": 12},
                   "method.T": {"low": 2.0, "high": 6.0}},
        "sweep": {"num_trials": 6, "max_concurrent": 2, "objectives": ["accuracy", "latency"],
                  # A batch large enough that compute, not Python overhead, sets the time.
                  "latency": {"batch_size": 128, "warmup": 3, "repeats": 15},
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
    assert len(front) >= 1  # how many depends on measured times, so no more is asserted
    costs = [row["cost"] for row in front]
    accuracies = [row["val_acc"] for row in front]
    assert costs == sorted(costs) and accuracies == sorted(accuracies)  # faster ones are less accurate
    assert all(row["cost_name"] == "latency" and row["cost_unit"].startswith("ms") for row in front)
    assert all(row["cost"] == row["costs"]["latency_ms"] > 0 and row["costs"]["params"] > 0 for row in front)

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = tracker.find_sweeps("pareto")
    trials = {r.data.tags["kdsweep.trial_id"]: r for r in tracker.children(parent.info.run_id, "trial")}
    for row in front:  # the reported figures are the trial's measured ones
        metrics = trials[row["trial_id"]].data.metrics
        assert (metrics["cost_latency"], metrics["cost_params"]) == (row["cost"], row["costs"]["params"])
    best = trials[parent.data.tags["kdsweep.best_trial_id"]]  # the parent carries the best trial's record
    assert {f"best.{k}": v for k, v in best.data.params.items()}.items() <= parent.data.params.items()
    assert parent.data.metrics["best_cost_latency"] == best.data.metrics["cost_latency"]

    cheapest = front[0]["trial_id"]
    pulled = subprocess.run([*cli, "pull", "pareto", "--to", "cheap", "--trial", cheapest], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    meta = json.loads((tmp_path / "cheap" / "student.json").read_text())
    assert meta["trial_id"] == cheapest and meta["num_params"] == front[0]["costs"]["params"]
    assert {"student.onnx", "student.pt2", "student_state_dict.pt"} <= {p.name for p in (tmp_path / "cheap").iterdir()}
    refused = subprocess.run([*cli, "pull", "pareto", "--to", "x", "--trial", "nope"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "not on the Pareto front" in refused.stderr
