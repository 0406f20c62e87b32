"""Sweep plots logged on the parent run, drawn by Optuna from the sweep's study.

Under `plots/` on the parent run:
- `report.html`: every plot, interactive (plotly), with plotly.js embedded once so the report
  renders offline (the MLflow UI shows it in its artifact view); plotly.js is most of its size.
- `NAME.png`: each plot again, drawn by `optuna.visualization.matplotlib` (no browser needed).

The Optuna plots are optimization history, parameter importances, parallel coordinates, slice,
contour and, for a multi-objective study, the Pareto front; the other plots of a multi-objective
study show its first objective (accuracy). Learning curves come from the trial runs' MLflow
metrics (multi-objective studies hold no intermediate values). A plot the study cannot support
(too few completed trials, too few varying parameters) is skipped, and the reason is logged and
written into the report.
"""

from __future__ import annotations

import html
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: drivers run on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization as plotly_plots  # noqa: E402
import optuna.visualization.matplotlib as matplotlib_plots  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from sweeps import tags  # noqa: E402
from sweeps.results import METRIC  # noqa: E402
from sweeps.tracking import Tracker  # noqa: E402

LOG = logging.getLogger("kdsweep")
REPORT = "report.html"
CONTOUR_PARAMS = 4  # a contour plot draws every pair: at most the 4 most important parameters
LEARNING_METRIC = "val_acc"  # per epoch, on each trial run

#: A plot Optuna can draw: its function name in optuna.visualization (and .matplotlib) and arguments.
Plan = tuple[str, dict[str, Any]]


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's own warnings (a parameter with one value, experimental matplotlib functions) off
    while plotting; skipped plots are reported by `plan_plots` instead."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # matplotlib's "identical low and high xlims" for a parameter that never varied
            warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def objective_names(study: optuna.Study, target_names: Sequence[str] | None = None) -> list[str]:
    """Names of the study's objectives: `target_names`, else the study's metric names, else
    METRIC for the first (accuracy) and `objective i` for the others."""
    count = len(study.directions)
    names = list(target_names or study.metric_names or [])
    return names if len(names) == count else [METRIC] + [f"objective {i}" for i in range(1, count)]


def plan_plots(study: optuna.Study, target_names: Sequence[str] | None = None,
               ) -> tuple[dict[str, Plan], dict[str, str]]:
    """Which Optuna plots `study` supports: ({name: (function, kwargs)}, {name: why it is skipped}).

    Raises nothing: a study without completed trials gets every plot skipped with a reason.
    """
    names = objective_names(study, target_names)
    multi = len(names) > 1
    # Other plots of a multi-objective study show its first objective (accuracy).
    target = {"target": lambda trial: trial.values[0], "target_name": names[0]} if multi \
        else {"target_name": names[0]}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    params = sorted({p for t in complete for p in t.params})
    varying = [p for p in params if len({repr(t.params[p]) for t in complete if p in t.params}) > 1]
    plans: dict[str, Plan] = {}
    skipped: dict[str, str] = {}

    def need(name: str, reason: str | None, plan: Plan) -> None:
        if reason is None:
            plans[name] = plan
        else:
            skipped[name] = reason

    no_trials = "no completed trials" if not complete else None
    if multi:
        need("pareto_front", no_trials or (f"draws 2 or 3 objectives, the study has {len(names)}"
                                           if len(names) > 3 else None),
             ("plot_pareto_front", {"target_names": names}))
    need("optimization_history", no_trials, ("plot_optimization_history", target))
    need("param_importances",
         no_trials or (f"needs at least 2 completed trials (the study has {len(complete)})" if len(complete) < 2
                       else None if varying else "no parameter varies among the completed trials"),
         ("plot_param_importances", {**target, "params": varying,
                                     "evaluator": optuna.importance.FanovaImportanceEvaluator(seed=0)}))
    no_params = no_trials or (None if params else "the study has no parameters")
    need("parallel_coordinate", no_params, ("plot_parallel_coordinate", {**target, "params": params}))
    need("slice", no_params, ("plot_slice", {**target, "params": params}))
    need("contour", no_trials or (f"needs at least 2 varying parameters (the study has {len(varying)})"
                                  if len(varying) < 2 else None),
         ("plot_contour", {**target, "params": _most_important(study, varying, target)}))
    return plans, skipped


def _most_important(study: optuna.Study, varying: list[str], target: dict[str, Any]) -> list[str]:
    """At most CONTOUR_PARAMS of the varying parameters, the most important first (fANOVA)."""
    if len(varying) <= CONTOUR_PARAMS:
        return varying
    scores = optuna.importance.get_param_importances(
        study, params=varying, target=target.get("target"),
        evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    return list(scores)[:CONTOUR_PARAMS]


def _png(axes: Any, path: Path, params: int) -> None:
    """Save the figure of Optuna's matplotlib `axes` (one Axes or an array), sized for `params` parameters."""
    figure = np.asarray(axes).flat[0].figure
    if path.stem == "contour":
        figure.set_size_inches(2.8 * params + 1.5, 2.6 * params)
    elif path.stem == "slice":
        figure.set_size_inches(max(6.4, 3.2 * params + 1.5), 4.2)
    elif path.stem == "parallel_coordinate":
        figure.set_size_inches(max(8.0, 1.8 * (params + 1)), 5.0)
    else:
        figure.set_size_inches(8.0, 5.0)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def learning_curves(tracker: Tracker, parent_run_id: str) -> dict[str, tuple[list[int], list[float]]]:
    """{trial id: (epochs, LEARNING_METRIC values)} of every trial run of the sweep that logged one."""
    curves = {}
    for run in tracker.children(parent_run_id, "trial"):
        points = sorted(tracker.client.get_metric_history(run.info.run_id, LEARNING_METRIC), key=lambda m: m.step)
        if points:
            curves[run.data.tags.get(tags.TRIAL_ID, run.info.run_id)] = ([m.step for m in points],
                                                                         [m.value for m in points])
    return dict(sorted(curves.items()))


def _learning_curve_plots(curves: dict[str, tuple[list[int], list[float]]], png: Path) -> go.Figure:
    """The learning curves as a plotly figure, and as a PNG at `png`."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for trial_id, (epochs, values) in curves.items():
        ax.plot(epochs, values, label=trial_id)
    ax.set(title="Learning curves", xlabel="epoch", ylabel=LEARNING_METRIC)
    if len(curves) <= 20:
        ax.legend(fontsize=7)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return go.Figure([go.Scatter(x=epochs, y=values, mode="lines", name=trial_id)
                      for trial_id, (epochs, values) in curves.items()],
                     layout={"title": {"text": "Learning curves"}, "xaxis_title": "epoch",
                             "yaxis_title": LEARNING_METRIC})


def write_report(path: Path, title: str, figures: dict[str, go.Figure], skipped: dict[str, str]) -> None:
    """One HTML page: each figure in a `<section id=NAME>`, plotly.js embedded once (offline), then
    the plots not drawn and why."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>",
             f"<body style='font-family: sans-serif'><h1>{html.escape(title)}</h1>"]
    for index, (name, figure) in enumerate(figures.items()):
        div = figure.to_html(full_html=False, include_plotlyjs=index == 0, div_id=f"plot-{name}",
                             default_width="100%", default_height="600px")
        parts.append(f"<section id='{name}'>{div}</section>")
    if skipped:
        parts.append("<h2>Not drawn</h2><ul>")
        parts += [f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in skipped.items()]
        parts.append("</ul>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def log_sweep_plots(
    tracker: Tracker, parent_run_id: str, study: optuna.Study, artifact_dir: str = "plots",
    target_names: Sequence[str] | None = None,
) -> list[str]:
    """Draw every plot the study and the trial runs support (module docstring) and log them on the
    parent run under `artifact_dir`; returns the logged artifact paths (none when nothing has data).

    `target_names` names the study's objectives (default: `objective_names`). A plot that Optuna
    fails to draw is skipped with its error as the reason: plots never fail a finished sweep.
    """
    plans, skipped = plan_plots(study, target_names)
    curves = learning_curves(tracker, parent_run_id)
    if not curves:
        skipped["learning_curves"] = f"no trial run logged {LEARNING_METRIC}"
    figures: dict[str, go.Figure] = {}
    with tempfile.TemporaryDirectory() as tmp, _quiet_optuna():
        directory = Path(tmp)
        for name, (function, kwargs) in plans.items():
            params = len(kwargs.get("params", ()))
            try:
                figures[name] = getattr(plotly_plots, function)(study, **kwargs)
                _png(getattr(matplotlib_plots, function)(study, **kwargs), directory / f"{name}.png", params)
            except Exception as error:  # noqa: BLE001  a plot must not fail a finished sweep
                figures.pop(name, None)
                (directory / f"{name}.png").unlink(missing_ok=True)
                plt.close("all")
                skipped[name] = f"Optuna could not draw it: {type(error).__name__}: {error}"
        if curves:
            figures["learning_curves"] = _learning_curve_plots(curves, directory / "learning_curves.png")
        for name, why in skipped.items():
            LOG.info("plot %s not drawn: %s", name, why)
        if figures:
            write_report(directory / REPORT, f"Sweep {study.study_name}", figures, skipped)
        files = sorted(p.name for p in directory.iterdir())
        if files:
            tracker.client.log_artifacts(parent_run_id, tmp, artifact_dir)
    return [f"{artifact_dir}/{f}" for f in files]
