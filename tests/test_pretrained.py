"""Pretrained teachers and student initialisation, through real Ray Tune, Optuna and MLflow: a
teacher from a checkpoint file trains no epoch; the champion of one sweep teaches the next;
bad files fail at the command line with one line, exit 2 and nothing written."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kd_core.checkpoints import sha256_file
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.train import fit
from sweeps import tags
from sweeps.sources import teacher_stage
from sweeps.spec import parse_spec
from sweeps.tracking import Tracker
from tests.test_checkpoints import payload_file

TEACHER = {"name": "convnet", "args": {"width": 8, "depth": 1}}
SPEC = {
    "name": "pretrained",
    "teacher": {"arch": TEACHER, "checkpoint": "teacher.pt"},
    "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
    "method": {"name": "kd"},
    "recipe": {"name": "digits", "epochs": 2},
    "search": {"method.T": {"low": 1.0, "high": 8.0}},
    "sweep": {"num_trials": 2, "max_concurrent": 2, "scheduler": {"type": "none"}},
    "tracking": {"registered_model": "first_student"},
}


def kdsweep(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def trained_teacher(digits, num_classes: int = 10) -> dict:
    torch.manual_seed(0)
    model = build_model(TEACHER["name"], num_classes, 1, TEACHER["args"])
    if num_classes == 10:
        fit(model_distiller(model), digits, build_recipe("digits", {"epochs": 2}))
    return model.state_dict()


def model_distiller(model):
    from kd_core.distillers import DISTILLERS

    ce = DISTILLERS.get("ce")
    return ce(model, [], ce.make_params({}))


def write_spec(work: Path, spec: dict, name: str = "spec.yaml") -> None:
    (work / name).write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, digits) -> dict:
    work = tmp_path_factory.mktemp("pretrained")
    torch.save({"model": trained_teacher(digits), "epoch": 2}, work / "teacher.pt")  # RepDistiller's wrapper
    write_spec(work, SPEC)
    first = kdsweep(work, "run", "spec.yaml", "--name", "first")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    second_spec = copy.deepcopy(SPEC)
    second_spec.update(name="second", teacher={"model_uri": "models:/first_student@champion"},
                       student={"arch": {"name": "convnet", "args": {"width": 2, "depth": 1}}},
                       tracking={"registered_model": "second_student"})
    write_spec(work, second_spec, "second.yaml")
    second = kdsweep(work, "run", "second.yaml", "--name", "second")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    return {"work": work, "tracker": Tracker(f"sqlite:///{work / 'mlflow.db'}")}


def stage_runs(tracker: Tracker, sweep: str, role: str) -> list:
    (parent,) = tracker.find_sweeps(sweep)
    return tracker.children(parent.info.run_id, role)


def test_a_checkpoint_teacher_is_evaluated_not_trained(sweeps) -> None:
    tracker, work = sweeps["tracker"], sweeps["work"]
    (teacher,) = stage_runs(tracker, "first", "teacher")
    assert teacher.info.status == "FINISHED"
    assert teacher.data.params["method"] == "pretrained"
    assert teacher.data.params["weights_sha256"] == sha256_file(work / "teacher.pt")
    assert "train_loss" not in teacher.data.metrics  # no training epoch at all
    assert 0.5 < teacher.data.metrics["test_acc"] <= 1
    assert [m.step for m in tracker.client.get_metric_history(teacher.info.run_id, "val_acc")] == [0]
    trials = stage_runs(tracker, "first", "trial")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.tags[tags.lineage("teacher")[0]] == teacher.info.run_id for r in trials)
    (parent,) = tracker.find_sweeps("first")
    assert parent.data.metrics["teacher_test_acc"] == teacher.data.metrics["test_acc"]


def test_the_champion_of_one_sweep_teaches_the_next(sweeps) -> None:
    tracker = sweeps["tracker"]
    (teacher,) = stage_runs(tracker, "second", "teacher")
    assert teacher.data.params["weights"] == "models:/first_student/1"  # pinned, not the moving alias
    assert teacher.data.params["arch"] == "convnet(depth=1,width=4)"  # taken from the model
    (first,) = tracker.find_sweeps("first")
    assert teacher.data.metrics["test_acc"] == pytest.approx(first.data.metrics["best_test_acc"])
    trials = stage_runs(tracker, "second", "trial")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)


def test_a_changed_file_changes_the_stage_key(tmp_path, digits, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(trained_teacher(digits), "teacher.pt")
    before = teacher_stage(parse_spec(copy.deepcopy(SPEC))).key
    torch.save({k: v + 1 for k, v in trained_teacher(digits).items()}, "teacher.pt")
    after = teacher_stage(parse_spec(copy.deepcopy(SPEC))).key
    assert before != after
    stage = teacher_stage(parse_spec(copy.deepcopy(SPEC)))
    assert stage.recipe is None and stage.init["sha256"] == sha256_file("teacher.pt")


def test_a_student_starts_from_its_init_checkpoint(tmp_path, digits, monkeypatch) -> None:
    from sweeps.pipeline import new_model
    from sweeps.space import resolve_trial

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    start = build_model("convnet", 100, 1, {"width": 4, "depth": 1})  # another class count: a new head
    torch.save({"state_dict": start.state_dict()}, "student.pt")
    torch.save(trained_teacher(digits), "teacher.pt")
    spec = parse_spec({**copy.deepcopy(SPEC), "student": {**SPEC["student"], "init_checkpoint": "student.pt"}})
    plan = resolve_trial(spec, {"method.T": 2.0})
    model = new_model(plan.student_arch, digits, 0, plan.student_init)
    torch.testing.assert_close(model.stem[0][0].weight, start.stem[0][0].weight)
    assert model.num_classes == 10


@pytest.mark.parametrize("case", ["classes", "truncated", "payload", "missing", "keys"])
def test_bad_checkpoints_fail_before_anything_is_written(tmp_path, digits, case, monkeypatch) -> None:
    """In process (the real-process path is the same `user_errors` as tests/test_cli_errors.py's)."""
    from typer.testing import CliRunner

    from sweeps.cli import app

    marker = None
    if case == "classes":
        torch.save(trained_teacher(digits, num_classes=100), tmp_path / "teacher.pt")
        expected = "100 classes in the checkpoint, 10 in the data"
    elif case == "truncated":
        torch.save(trained_teacher(digits), tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
        (tmp_path / "teacher.pt").write_bytes(data[: len(data) // 3])
        expected = "unreadable or truncated"
    elif case == "payload":
        path, marker = payload_file(tmp_path)
        path.rename(tmp_path / "teacher.pt")
        expected = "refused, it holds a pickled object"
    elif case == "missing":
        expected = "teacher.pt: no such file"
    else:
        torch.save(build_model("convnet", 10, 1, {"width": 16, "depth": 1}).state_dict(), tmp_path / "teacher.pt")
        expected = "shape mismatch"
    write_spec(tmp_path, SPEC)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    done = CliRunner().invoke(app, ["run", "spec.yaml"])
    assert done.exit_code == 2, done.output[-3000:]
    assert expected in " ".join(done.output.split())
    assert isinstance(done.exception, SystemExit) and "Traceback" not in done.output  # exit 2, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no storage
    assert marker is None or not marker.exists()
