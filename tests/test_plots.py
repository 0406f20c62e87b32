"""Sweep plots from a real Optuna study and a real MLflow store (no Ray)."""

from __future__ import annotations

import optuna

from sweeps import tags
from sweeps.plots import log_sweep_plots
from sweeps.tracking import Tracker

optuna.logging.set_verbosity(optuna.logging.WARNING)


def store(tmp_path) -> tuple[Tracker, str]:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_sweep(tracker.experiment_id("plots"), "plots", {})
    for trial_id in ("t1", "t2"):
        run = tracker.open_child(parent, "trial", tags.TRIAL_ID, trial_id, trial_id, {}, {})
        for epoch in (1, 2, 3):
            tracker.log_metrics(run, {"val_acc": 0.5 + 0.1 * epoch}, epoch)
    return tracker, parent


def logged(tracker: Tracker, parent: str) -> set[str]:
    return {f.path for f in tracker.client.list_artifacts(parent, "plots")}


def test_single_objective_plots(tmp_path) -> None:
    tracker, parent = store(tmp_path)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        x = trial.suggest_float("method.T", 1, 10)
        if trial.number % 2:
            trial.suggest_float("recipe.lr", 0.01, 0.1)
        study.tell(trial, 1 - abs(x - 4) / 10)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    paths = log_sweep_plots(tracker, parent, study)
    assert logged(tracker, parent) == set(paths)
    for name in ("optimization_history", "param_importances", "learning_curves"):
        assert {f"plots/{name}.png", f"plots/{name}.html"} <= set(paths)
    assert not any("pareto" in p for p in paths)
    local = tracker.client.download_artifacts(parent, "plots", str(tmp_path))
    assert (tmp_path / "plots" / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "plots" / "learning_curves.html").read_text()
    assert "plotly" in html and "t1" in html and "t2" in html and local


def test_multi_objective_study_gets_a_pareto_plot(tmp_path) -> None:
    tracker, parent = store(tmp_path)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, cost in ((0.9, 100), (0.95, 200), (0.91, 300)):
        study.add_trial(optuna.trial.create_trial(values=[acc, cost], params={},
                                                  distributions={}))
    assert "plots/pareto_front.png" in log_sweep_plots(tracker, parent, study)


def test_a_study_without_completed_trials_logs_what_it_can(tmp_path) -> None:
    tracker, parent = store(tmp_path)
    assert log_sweep_plots(tracker, parent, optuna.create_study()) == [
        "plots/learning_curves.html", "plots/learning_curves.png"]
