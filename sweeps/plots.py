"""Sweep plots logged on the parent run: each as PNG (matplotlib) and interactive HTML (plotly)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: drivers run on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from sweeps import tags  # noqa: E402
from sweeps.tracking import Tracker  # noqa: E402


def _save(name: str, figure: go.Figure, directory: Path) -> list[str]:
    """One plotly figure as self-contained HTML and, redrawn with matplotlib, as PNG."""
    figure.write_html(directory / f"{name}.html", include_plotlyjs=True)  # the UI may be offline
    fig, ax = plt.subplots(figsize=(8, 5))
    for trace in figure.data:
        if trace.type == "bar":
            ax.barh(list(trace.y), list(trace.x))
        else:
            ax.plot(list(trace.x), list(trace.y), marker="o" if "markers" in (trace.mode or "") else None,
                    linestyle="-" if "lines" in (trace.mode or "lines") else "none", label=trace.name)
    ax.set_title(figure.layout.title.text or name)
    ax.set_xlabel(figure.layout.xaxis.title.text or "")
    ax.set_ylabel(figure.layout.yaxis.title.text or "")
    if len(figure.data) > 1 and len(figure.data) <= 20:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / f"{name}.png", dpi=100)
    plt.close(fig)
    return [f"{name}.html", f"{name}.png"]


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def history(study: optuna.Study) -> go.Figure | None:
    trials = _complete(study)
    if not trials or len(study.directions) > 1:
        return None
    values = [t.value for t in trials]
    best = [max(values[: i + 1]) for i in range(len(values))]
    numbers = [t.number for t in trials]
    return go.Figure([go.Scatter(x=numbers, y=values, mode="markers", name="trial"),
                      go.Scatter(x=numbers, y=best, mode="lines", name="best so far")],
                     layout={"title": "Optimization history", "xaxis_title": "trial",
                             "yaxis_title": "val_acc_best"})


def importances(study: optuna.Study) -> go.Figure | None:
    if len(_complete(study)) < 2 or len(study.directions) > 1:
        return None
    try:
        scores = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # no parameter varies among the completed trials
        return None
    if not scores:
        return None
    names = list(scores)[::-1]
    return go.Figure([go.Bar(x=[scores[n] for n in names], y=names, orientation="h", name="importance")],
                     layout={"title": "Parameter importances (fANOVA)", "xaxis_title": "importance"})


def pareto(study: optuna.Study) -> go.Figure | None:
    trials = _complete(study)
    if len(study.directions) < 2 or not trials:
        return None
    front = {t.number for t in study.best_trials}
    others = [t for t in trials if t.number not in front]
    best = sorted((t for t in trials if t.number in front), key=lambda t: t.values[1])
    return go.Figure([go.Scatter(x=[t.values[1] for t in others], y=[t.values[0] for t in others],
                                 mode="markers", name="trials"),
                      go.Scatter(x=[t.values[1] for t in best], y=[t.values[0] for t in best],
                                 mode="lines+markers", name="Pareto front")],
                     layout={"title": "Pareto front", "xaxis_title": "cost", "yaxis_title": "val_acc_best"})


def learning_curves(tracker: Tracker, parent_run_id: str) -> go.Figure | None:
    traces = []
    for run in tracker.children(parent_run_id, "trial"):
        points = sorted(tracker.client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        if points:
            traces.append(go.Scatter(x=[m.step for m in points], y=[m.value for m in points], mode="lines",
                                     name=run.data.tags.get(tags.TRIAL_ID, run.info.run_id)))
    if not traces:
        return None
    return go.Figure(traces, layout={"title": "Learning curves", "xaxis_title": "epoch", "yaxis_title": "val_acc"})


def log_sweep_plots(
    tracker: Tracker, parent_run_id: str, study: optuna.Study, artifact_dir: str = "plots"
) -> list[str]:
    """Render every plot that has data and log it under `artifact_dir`; returns the artifact paths."""
    figures = {"optimization_history": history(study), "param_importances": importances(study),
               "pareto_front": pareto(study), "learning_curves": learning_curves(tracker, parent_run_id)}
    with tempfile.TemporaryDirectory() as tmp:
        files = [f for name, figure in figures.items() if figure is not None for f in _save(name, figure, Path(tmp))]
        if files:
            tracker.client.log_artifacts(parent_run_id, tmp, artifact_dir)
    return [f"{artifact_dir}/{f}" for f in files]
