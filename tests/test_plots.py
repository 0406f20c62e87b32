"""Sweep plots from real Optuna studies and a real MLflow store (no Ray), and the one-line refusals
of `kdsweep dashboard` (its served pages are checked in Chromium: tests/test_browser.py)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from sweeps import tags
from sweeps.cli import app
from sweeps.plots import CONTOUR_PARAMS, REPORT, log_sweep_plots, plan_plots
from sweeps.tracking import Tracker

optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG = b"\x89PNG\r\n\x1a\n"
OPTUNA_PLOTS = {"optimization_history", "param_importances", "parallel_coordinate", "slice", "contour"}


def store(tmp_path: Path) -> tuple[Tracker, str]:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_sweep(tracker.experiment_id("plots"), "plots", {})
    for trial_id in ("t1", "t2"):
        run = tracker.open_child(parent, "trial", tags.TRIAL_ID, trial_id, trial_id, {}, {})
        for epoch in (1, 2, 3):
            tracker.log_metrics(run, {"val_acc": 0.5 + 0.1 * epoch}, epoch)
    return tracker, parent


def downloaded(tracker: Tracker, parent: str, tmp_path: Path) -> Path:
    """The parent run's plots/ folder, downloaded; every PNG in it checked to be one."""
    local = Path(tracker.client.download_artifacts(parent, "plots", str(tmp_path / "download")))
    for png in local.glob("*.png"):
        assert png.read_bytes()[:8] == PNG, png
    return local


def names(paths: list[str]) -> set[str]:
    return {Path(p).stem for p in paths if p.endswith(".png")}


def single_objective_study(trials: int = 6) -> optuna.Study:
    study = optuna.create_study(study_name="sweep-a", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(trials):
        trial = study.ask()
        x = trial.suggest_float("method.T", 1, 10)
        if trial.number % 2:  # a conditional parameter, as in a define-by-run space
            trial.suggest_float("recipe.lr", 0.01, 0.1)
        study.tell(trial, 1 - abs(x - 4) / 10)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    return study


def test_single_objective_plots_and_one_offline_report(tmp_path) -> None:
    tracker, parent = store(tmp_path)
    paths = log_sweep_plots(tracker, parent, single_objective_study())
    assert {f.path for f in tracker.client.list_artifacts(parent, "plots")} == set(paths)
    assert names(paths) == OPTUNA_PLOTS | {"learning_curves"}
    assert f"plots/{REPORT}" in paths and sum(p.endswith(".html") for p in paths) == 1
    local = downloaded(tracker, parent, tmp_path)
    report = (local / REPORT).read_text()
    # plotly.js embedded once, nothing fetched from a network (the report must render offline)
    assert len(re.findall(r"\* plotly\.js v\d", report)) == 1
    assert not re.search(r"<script[^>]+src=", report)
    for name in OPTUNA_PLOTS | {"learning_curves"}:
        assert f"<section id='{name}'>" in report
    assert "method.T" in report and "recipe.lr" in report and "val_acc_best" in report
    assert '"t1"' in report and '"t2"' in report  # learning curves from the trial runs' MLflow metrics
    assert "pareto" not in report and "Not drawn" not in report


def test_multi_objective_study_gets_a_pareto_front_and_named_targets(tmp_path) -> None:
    tracker, parent = store(tmp_path)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(6):
        trial = study.ask()
        width, lr = trial.suggest_int("student.width", 4, 32), trial.suggest_float("recipe.lr", 0.01, 0.1, log=True)
        study.tell(trial, [1 - 1 / width - lr, width * 100.0])
    paths = log_sweep_plots(tracker, parent, study, target_names=["val_acc_best", "cost_params"])
    assert names(paths) == OPTUNA_PLOTS | {"pareto_front", "learning_curves"}
    report = (downloaded(tracker, parent, tmp_path) / REPORT).read_text()
    assert "<section id='pareto_front'>" in report and "cost_params" in report
    # the other plots show accuracy, the first objective
    plans, skipped = plan_plots(study, ["val_acc_best", "cost_params"])
    assert not skipped
    trial = study.trials[0]
    for name in OPTUNA_PLOTS:
        kwargs = plans[name][1]
        assert kwargs["target_name"] == "val_acc_best" and kwargs["target"](trial) == trial.values[0]
    assert plan_plots(study)[0]["pareto_front"][1]["target_names"] == ["val_acc_best", "objective 1"]


def test_a_study_without_completed_trials_logs_learning_curves_and_says_why(tmp_path, caplog) -> None:
    tracker, parent = store(tmp_path)
    with caplog.at_level(logging.INFO, logger="kdsweep"):
        paths = log_sweep_plots(tracker, parent, optuna.create_study(study_name="empty"))
    assert sorted(paths) == ["plots/learning_curves.png", f"plots/{REPORT}"]
    report = (downloaded(tracker, parent, tmp_path) / REPORT).read_text()
    for name in OPTUNA_PLOTS:
        assert f"{name}: no completed trials" in report
        assert f"plot {name} not drawn: no completed trials" in caplog.text


def test_nothing_to_draw_logs_nothing(tmp_path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_sweep(tracker.experiment_id("plots"), "plots", {})
    assert log_sweep_plots(tracker, parent, optuna.create_study()) == []
    assert tracker.client.list_artifacts(parent) == []


def test_one_completed_trial_skips_importances_and_contour(tmp_path) -> None:
    tracker, parent = store(tmp_path)
    paths = log_sweep_plots(tracker, parent, single_objective_study(trials=1))
    assert names(paths) == {"optimization_history", "parallel_coordinate", "slice", "learning_curves"}
    report = (downloaded(tracker, parent, tmp_path) / REPORT).read_text()
    assert "param_importances: needs at least 2 completed trials (the study has 1)" in report
    assert "contour: needs at least 2 varying parameters (the study has 0)" in report


def test_parameters_that_never_vary_get_no_importances() -> None:
    study = optuna.create_study()
    for value in (0.1, 0.2, 0.3):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"method.T": 4.0, "method.kl_reduction": "mean"},
            distributions={"method.T": optuna.distributions.FloatDistribution(1, 10),
                           "method.kl_reduction": optuna.distributions.CategoricalDistribution(["mean", "sum"])}))
    plans, skipped = plan_plots(study)
    assert skipped == {"param_importances": "no parameter varies among the completed trials",
                       "contour": "needs at least 2 varying parameters (the study has 0)"}
    assert set(plans) == {"optimization_history", "parallel_coordinate", "slice"}


def test_contour_draws_the_most_important_parameters() -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(24):
        trial = study.ask()
        x = {f"p{i}": trial.suggest_float(f"p{i}", 0, 1) for i in range(7)}
        study.tell(trial, 10 * math.sin(3 * x["p5"]) + 5 * x["p6"] + 0.01 * x["p0"])
    contour = plan_plots(study)[0]["contour"][1]["params"]
    assert len(contour) == CONTOUR_PARAMS and set(contour[:2]) == {"p5", "p6"}, contour


# `kdsweep dashboard`: a sweep whose study is missing or damaged is refused in one line, exit 2.

def dashboard_workspace(tmp_path: Path, study: bytes | None) -> Path:
    """A tracking store with sweep `s` whose storage folder holds `study` as its study file (none if None)."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_sweep(tracker.experiment_id("x"), "s", {tags.STORAGE: str(tmp_path / "storage")})
    (tmp_path / "storage" / "s").mkdir(parents=True)
    if study is not None:
        (tmp_path / "storage" / "s" / "study.db").write_bytes(study)
    return tmp_path / "mlflow.db"


@pytest.mark.parametrize(("study", "expect"), [
    (None, "sweep 's' has no Optuna study at"),
    (b"not a database" * 100, "cannot be read ((sqlite3.DatabaseError) file is not a database)"),
    (b"", "cannot be read ((sqlite3.OperationalError) no such table"),
], ids=["missing", "garbage", "empty-file"])
def test_dashboard_refuses_a_missing_or_damaged_study(tmp_path, study, expect) -> None:
    db = dashboard_workspace(tmp_path, study)
    before = None if study is None else (tmp_path / "storage" / "s" / "study.db").read_bytes()
    result = CliRunner().invoke(app, ["dashboard", "s", "--tracking-uri", f"sqlite:///{db}"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expect in lines[0], lines[0]
    if before is not None:
        assert (tmp_path / "storage" / "s" / "study.db").read_bytes() == before


def test_dashboard_refuses_a_study_of_another_name_and_an_unknown_sweep(tmp_path) -> None:
    db = dashboard_workspace(tmp_path, None)
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path / 'storage' / 's' / 'study.db'}")
    for args, expect in ((["s"], "holds no Optuna study named 's'"), (["nope"], "no sweep named 'nope'")):
        result = CliRunner().invoke(app, ["dashboard", *args, "--tracking-uri", f"sqlite:///{db}"])
        assert result.exit_code == 2 and expect in result.output and "Traceback" not in result.output, result.output
