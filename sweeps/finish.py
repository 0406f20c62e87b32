"""After the trials: the CE-only baseline, the teacher's figures, confirmation, the exported best
student (and, for a multi-objective sweep, every Pareto-optimal one), the parent run's summary
metrics, tags and plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from torch import nn

from kd_core.cost import COST_UNITS, COSTS
from kd_core.data import Dataset
from kd_core.stages import StageRecord, StageSpec, StageStore
from kd_core.train import load_checkpoint
from sweeps import tags
from sweeps.confirm import Confirmation, start_confirmations
from sweeps.data_parallel import submit, worker_group
from sweeps.export import PARETO_DIR, ExportResult, export_student, write_student_files
from sweeps.pipeline import (
    SweepContext,
    build_distiller,
    load_dataset,
    resolve_stage,
    trial_sources,
    worker_setup,
)
from sweeps.plots import log_sweep_plots
from sweeps.results import METRIC, TrialSummary, best_trial, pareto_front, status_counts
from sweeps.search import STUDY_FILE
from sweeps.sources import baseline_stage, teacher_stage
from sweeps.space import TrialPlan, resolve_trial
from sweeps.tracking import Tracker


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    parent_run_id: str
    trials: list[TrialSummary]
    best: TrialSummary
    best_plan: TrialPlan
    baseline_metrics: dict[str, float]
    teacher_metrics: dict[str, float] | None
    export: ExportResult
    confirmations: list[Confirmation]
    pareto: list[dict[str, Any]]  # multi-objective sweeps: the Pareto front, cheapest first
    seconds: float  # the whole sweep
    tune_seconds: float = 0.0  # the trials alone (Tune's fit)
    tune_driver_cpu_seconds: float = 0.0  # CPU time of this process (all its threads) during Tune's fit
    tune_driver_cpu_parts: dict[str, float] = field(default_factory=dict)  # of it, in our code (timings)


def study_storage(context: SweepContext) -> str:
    """The Optuna study's storage URL (SQLite in the sweep's storage directory)."""
    return f"sqlite:///{Path(context.storage) / context.name / STUDY_FILE}"


def train_baseline(stage: StageSpec, context: SweepContext, device: str) -> StageRecord:
    """The CE-only baseline stage, trained (on a trial's workers) if absent: a Ray task (`submit`)."""
    worker_setup(context.spec)
    with worker_group(context) as group:
        return resolve_stage(stage, context, Tracker(context.tracking_uri), device, group).record


def finish_sweep(
    context: SweepContext, tracker: Tracker, results: tune.ResultGrid, trials: list[TrialSummary],
    console: Any,
) -> SweepOutcome:
    """Everything after the trials; raises SweepFailedError when no trial finished."""
    spec, parent_run_id = context.spec, context.parent_run_id
    best = best_trial(trials)
    plan = resolve_trial(spec, best.sampled)
    data = load_dataset(spec.data.model_dump())
    worker_setup(spec, driver=True)
    console.print("training the CE-only baseline student (same architecture and recipe)"
                  + (" and confirming the top trials" if spec.sweep.confirm.top_k else "")
                  + ", exporting the best student...")
    # Ray tasks with a trial's resources (a GPU sweep trains its baseline on a GPU too; a
    # sweep of N-worker trials, on N workers). They train while this process exports the best
    # student: a new Ray worker spends its first 8-11 s importing torch, MLflow and Ray Tune,
    # which this process used to wait for.
    baseline_ref = submit(spec.sweep, train_baseline, baseline_stage(spec, plan.recipe, plan.student_arch),
                          context, spec.sweep.device)
    confirming = start_confirmations(context, trials)

    trial_runs = {r.data.tags.get(tags.TRIAL_ID): r for r in tracker.children(parent_run_id, "trial")}

    def deployable_of(trial: TrialSummary) -> tuple[nn.Module, dict[str, Any]]:
        """The trial's best-epoch deployable (SimKD: encoder + projector + teacher head) and its metadata."""
        trial_plan = resolve_trial(spec, trial.sampled)
        result = next(r for r in results if (r.metrics or {}).get("trial_id") == trial.trial_id)
        with result.checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)["best"]["state"]
        sources = trial_sources(spec, trial_plan, data, context, tracker, "cpu")
        deployable = build_distiller(trial_plan, data, spec.sweep.seed, sources, "cpu").deployable()
        deployable.load_state_dict(state)
        meta = {"sweep": context.name, "trial_id": trial.trial_id, "run_id": trial_runs[trial.trial_id].info.run_id,
                "method": trial_plan.method, "params": trial_plan.param_dict(), "arch": trial_plan.student_arch,
                "recipe": trial_plan.recipe.as_dict(), "val_acc": trial.metrics[METRIC], "data": spec.data.model_dump()}
        return deployable, meta

    directory = Path(context.storage) / context.name
    deployable, meta = deployable_of(best)
    export = export_student(deployable, data, directory / "export", tracker, parent_run_id,
                            spec.registered_model, meta, spec.tracking.champion)
    pareto = _export_pareto(context, trials, deployable_of, data, tracker)
    log_sweep_plots(tracker, parent_run_id, optuna.load_study(study_name=context.name, storage=study_storage(context)),
                    target_names=[METRIC, f"cost_{context.spec.sweep.cost}"] if context.spec.sweep.cost else None)
    baseline = ray.get(baseline_ref)
    teacher = StageStore(context.storage).get(teacher_stage(spec).key) if spec.teacher else None
    confirmations = confirming.collect(tracker)
    counts = status_counts(t.status for t in trials)
    # The best trial's settings and figures on the parent too, so the sweep's row shows them.
    best_run = trial_runs[best.trial_id]
    tracker.log_params(parent_run_id, {f"best.{key}": value for key, value in best_run.data.params.items()})
    tracker.log_metrics(parent_run_id, {
        "best_val_acc": best.metrics[METRIC], "best_test_acc": export.test_acc,
        **{f"best_{key}": float(best.metrics[key]) for key in ("val_loss_best", "best_epoch", *_cost_metrics())
           if key in best.metrics},
        "baseline_test_acc": baseline.meta["metrics"]["test_acc"],
        "baseline_val_acc": baseline.meta["metrics"][METRIC],
        **({"teacher_test_acc": teacher.meta["metrics"]["test_acc"]} if teacher else {}),
        "trials_finished": counts["FINISHED"], "trials_stopped_early": counts["KILLED"],
        "trials_failed": counts["FAILED"], "student_params": export.num_params,
    }, step=0)
    tracker.set_tags(parent_run_id, {
        tags.BEST_TRIAL_ID: best.trial_id, tags.BEST_RUN_ID: best_run.info.run_id,
        tags.MODEL_URI: export.model_uri, tags.MODEL_VERSION: export.model_version, tags.CHAMPION: export.champion,
        tags.BASELINE_RUN_ID: baseline.run_id or "",
        tags.TEACHER_RUN_ID: (teacher.run_id or "") if teacher else "",
    })
    return SweepOutcome(
        context.name, parent_run_id, trials, best, plan, baseline.meta["metrics"],
        teacher.meta["metrics"] if teacher else None, export, confirmations, pareto, seconds=0.0,
    )


def _cost_metrics() -> list[str]:
    return [f"cost_{name}" for name in COSTS]


def _export_pareto(context: SweepContext, trials: list[TrialSummary], deployable_of: Any, data: Dataset,
                   tracker: Tracker) -> list[dict[str, Any]]:
    """Every Pareto-optimal student as files (pullable with --trial), and the front as a table: per
    student its val and test accuracy, the cost objective (`cost`, in `cost_unit`) and every cost
    the trial measured (`costs`: params, flops, latency_ms)."""
    cost_name = context.spec.sweep.cost
    if cost_name is None:
        return []
    cost, parent_run_id = f"cost_{cost_name}", context.parent_run_id
    directory = Path(context.storage) / context.name / PARETO_DIR
    rows = []
    for trial in pareto_front(trials, cost):
        deployable, meta = deployable_of(trial)
        test_acc, _ = write_student_files(deployable, data, directory / trial.trial_id, tracker,
                                          parent_run_id, f"{PARETO_DIR}/{trial.trial_id}", meta)
        costs = {("latency_ms" if name == "latency" else name): trial.metrics.get(f"cost_{name}") for name in COSTS}
        rows.append({"trial_id": trial.trial_id, "val_acc": trial.metrics[METRIC], "test_acc": test_acc,
                     "cost_name": cost_name, "cost": trial.metrics[cost], "cost_unit": COST_UNITS[cost_name],
                     "costs": costs, "settings": trial.sampled})
    tracker.client.log_dict(parent_run_id, rows, "pareto.json")
    tracker.set_tags(parent_run_id, {tags.PARETO_TRIAL_IDS: ",".join(r["trial_id"] for r in rows)})
    return rows
