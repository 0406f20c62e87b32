"""Run a sweep: Ray Tune + OptunaSearch (TPE) + ASHA over `train_trial`, tracked in MLflow,
then export the best student and compare it with the CE-only baseline.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console
from torch import nn

from kd_core.stages import StageStore
from kd_core.train import load_checkpoint
from sweeps.callbacks import CloseTrialRuns, LiveProgress
from sweeps.export import PARETO_DIR, ExportResult, export_student, write_student_files
from sweeps.pipeline import (
    SweepContext,
    build_distiller,
    ensure_stage,
    load_dataset,
    retrain_task,
    trial_sources,
)
from sweeps.plots import log_sweep_plots
from sweeps.sources import baseline_stage, teacher_stage
from sweeps.space import SearchSpace, TrialPlan, resolve_trial
from sweeps.spec import SpecError, SweepSpec
from sweeps.tracking import TAG_SPEC, TAG_STORAGE, TAG_SWEEP, TAG_TRIAL, Tracker
from sweeps.trainable import train_trial

METRIC = "val_acc_best"  # best-epoch val accuracy: what selection uses everywhere
LOCAL_NODE_IP = "127.0.0.2"  # keeps a local Ray on loopback
STUDY_FILE = "study.db"
SPEC_FILE = "spec.yaml"


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    status: str
    epochs: int
    metrics: dict[str, Any]
    sampled: dict[str, Any]


@dataclass(frozen=True)
class Confirmation:
    """A top-k configuration re-trained with new seeds."""

    rank: int
    trial_id: str
    sampled: dict[str, Any]
    seeds: list[int]
    val_accs: list[float]
    test_accs: list[float]

    def summary(self) -> dict[str, float]:
        def spread(values: list[float]) -> float:
            return statistics.stdev(values) if len(values) > 1 else 0.0

        return {"val_acc_mean": statistics.mean(self.val_accs), "val_acc_std": spread(self.val_accs),
                "test_acc_mean": statistics.mean(self.test_accs), "test_acc_std": spread(self.test_accs)}


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


def default_sweep_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


# Tune's own console output is replaced by LiveProgress. The snapshot warning fires on
# every per-epoch checkpoint with num_to_keep=1, which is intended here.
QUIET_TUNE = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Start (or connect to) Ray unless this process already has; True if this call did."""
    os.environ.update(QUIET_TUNE)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if ray.is_initialized():
        return False
    env = {**QUIET_TUNE, "PYTHONWARNINGS": "ignore::FutureWarning"}
    try:
        if address:
            _token_auth_if_given(address)
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(_node_ip_address=LOCAL_NODE_IP, num_cpus=num_cpus, include_dashboard=False,
                     runtime_env={"env_vars": env}, log_to_driver=False)
    except (ConnectionError, ValueError) as error:
        raise SpecError(f"cannot start or reach Ray at {address or LOCAL_NODE_IP}: {error}") from None
    return True


def _token_auth_if_given(address: str) -> None:
    """Ray turns token auth on by itself only for address "auto"; for an explicit address
    (a `kdsweep cluster up` or KubeRay cluster) it must be on whenever a token was given."""
    if address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return
    if {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys():
        # Ray's own switch: sets RAY_AUTH_MODE and refreshes the config it read at import.
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


def _sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    s = spec.sweep.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(
        seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate,
        group=s.multivariate, constant_liar=s.constant_liar,
    )


def _scheduler(spec: SweepSpec) -> tune.schedulers.TrialScheduler:
    s = spec.sweep.scheduler
    if s.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(max_t=spec.recipe.build().epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def check_new_sweep(tracker: Tracker, name: str, storage: Path) -> None:
    if any(r.data.tags.get(TAG_SWEEP) == name for r in tracker.find_sweeps(name)):
        raise SpecError(f"a sweep named {name!r} already exists in {tracker.uri}; "
                        "choose another --name")
    if (storage / name).exists():
        raise SpecError(f"{storage / name} already exists; choose another --name or --storage")


def run_sweep(
    spec: SweepSpec,
    *,
    name: str,
    storage: Path,
    tracking_uri: str,
    address: str | None = None,
    console: Console | None = None,
) -> SweepOutcome:
    """Run a new sweep to the end: trials, the CE baseline, the exported best student."""
    storage = storage.resolve()
    tracker = Tracker(tracking_uri)
    check_new_sweep(tracker, name, storage)
    started_ray = init_ray(address)
    experiment_dir = storage / name
    experiment_dir.mkdir(parents=True)
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    (experiment_dir / SPEC_FILE).write_text(spec_yaml)  # what `resume` restarts from
    parent_run_id = tracker.start_sweep(
        tracker.experiment_id(spec.tracking.experiment), name,
        {TAG_SPEC: spec.name, TAG_STORAGE: str(storage),
         **({"mlflow.note.content": spec.description} if spec.description else {})},
    )
    tracker.client.log_text(parent_run_id, spec_yaml, SPEC_FILE)
    tracker.log_params(parent_run_id, {
        "spec": spec.name, "num_trials": spec.sweep.num_trials,
        "max_concurrent": spec.sweep.max_concurrent, "sampler": spec.sweep.sampler.type,
        "scheduler": spec.sweep.scheduler.type, "metric": METRIC,
        "search": ",".join(spec.search), "student": spec.student.arch.label(),
        "teacher": spec.teacher.arch.label() if spec.teacher else "",
    })
    context = SweepContext(name, spec.model_dump(mode="json"), str(storage), tracking_uri, parent_run_id)
    return _drive(spec, context, tracker, console or Console(stderr=True), started_ray, restore=False)


def resume_sweep(
    name: str, *, tracking_uri: str, address: str | None = None, console: Console | None = None
) -> SweepOutcome:
    """Continue a sweep whose driver died: the Tune experiment (errored trials too) and the
    Optuna study are restored; trial runs are reopened by trial id."""
    tracker = Tracker(tracking_uri)
    runs = [r for r in tracker.find_sweeps(name) if r.data.tags.get(TAG_SWEEP) == name]
    if not runs:
        raise SpecError(f"no sweep named {name!r} at {tracking_uri}")
    parent = runs[0]
    if parent.info.status == "FINISHED":
        raise SpecError(f"sweep {name!r} has already finished; nothing to resume")
    storage = Path(parent.data.tags[TAG_STORAGE])
    experiment_dir = storage / name
    if not (experiment_dir / SPEC_FILE).exists() or not tune.Tuner.can_restore(str(experiment_dir)):
        raise SpecError(f"sweep {name!r} cannot be resumed: no Tune experiment state in {experiment_dir}")
    spec = SweepSpec.model_validate(yaml.safe_load((experiment_dir / SPEC_FILE).read_text()))
    started_ray = init_ray(address)
    tracker.client.update_run(parent.info.run_id, status="RUNNING")
    context = SweepContext(name, spec.model_dump(mode="json"), str(storage), tracking_uri, parent.info.run_id)
    return _drive(spec, context, tracker, console or Console(stderr=True), started_ray, restore=True)


def _drive(
    spec: SweepSpec, context: SweepContext, tracker: Tracker, console: Console, started_ray: bool, restore: bool
) -> SweepOutcome:
    """Tune the trials (new or restored), then close every run, train the baseline, export."""
    started = time.monotonic()
    name, storage, parent_run_id = context.name, Path(context.storage), context.parent_run_id
    experiment_dir = storage / name
    epochs = spec.recipe.build().epochs
    try:
        console.print(f"[bold]kdsweep[/] sweep [cyan]{name}[/]: {spec.sweep.num_trials} trials, "
                      f"{spec.sweep.max_concurrent} at a time, tracking {tracker.uri}"
                      + (" (resumed)" if restore else ""))
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, context=context), {"cpu": spec.sweep.cpus_per_trial}
        )
        if restore:
            # The searcher, scheduler and callbacks come back from the experiment's snapshot.
            tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
        else:
            searcher = OptunaSearch(
                space=SearchSpace(spec), sampler=_sampler(spec),
                **({"metric": [METRIC, f"cost_{spec.sweep.cost}"], "mode": ["max", "min"]} if spec.sweep.cost
                   else {"metric": METRIC, "mode": "max"}),
                points_to_evaluate=[dict(p) for p in spec.sweep.initial_points] or None,
                study_name=name,
                storage=optuna.storages.RDBStorage(f"sqlite:///{experiment_dir / STUDY_FILE}"),
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode="max", search_alg=searcher, scheduler=_scheduler(spec),
                    num_samples=spec.sweep.num_trials,
                    max_concurrent_trials=spec.sweep.max_concurrent, reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(storage), verbose=0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
                    callbacks=[CloseTrialRuns(tracker.uri, parent_run_id, epochs),
                               LiveProgress(spec.sweep.num_trials, epochs, METRIC, console)],
                ),
            )
        tune_started = time.monotonic()
        results = tuner.fit()
        tune_seconds = time.monotonic() - tune_started
        trials = _summaries(results, epochs)
        _reconcile(tracker, parent_run_id, trials)
        outcome = _finish(spec, name, storage, tracker, parent_run_id, results, trials, console)
    except BaseException as error:
        for run in tracker.running_children(parent_run_id):
            tracker.finish(run.info.run_id, "KILLED", "the sweep driver stopped")
        # Ctrl-C, or SIGTERM (Ray's and the shell's way to stop a driver) ends a sweep KILLED.
        status = "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
        tracker.finish(parent_run_id, status, f"{type(error).__name__}: {error}")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    tracker.finish(parent_run_id, "FINISHED")
    return dataclasses.replace(outcome, seconds=time.monotonic() - started, tune_seconds=tune_seconds)


def _summaries(results: tune.ResultGrid, epochs: int) -> list[TrialSummary]:
    trials = []
    for result in results:
        metrics = dict(result.metrics or {})
        done = int(metrics.get("training_iteration", 0))
        if result.error is not None:
            status = "FAILED"
        else:
            status = "FINISHED" if done >= epochs else "KILLED"
        trial_id = str(metrics.get("trial_id", "?"))  # absent if it failed before a report
        trials.append(TrialSummary(trial_id, status, done, metrics, dict(result.config or {})))
    return trials


def _reconcile(tracker: Tracker, parent_run_id: str, trials: list[TrialSummary]) -> None:
    """No child run stays RUNNING: its status follows what Tune says of its trial."""
    status_of = {t.trial_id: t for t in trials}
    for run in tracker.running_children(parent_run_id):
        trial = status_of.get(run.data.tags.get(TAG_TRIAL, ""))
        if trial is not None:
            tracker.finish(run.info.run_id, trial.status, "closed by the driver after the sweep")
        else:  # a run whose trial or stage a crashed driver left behind
            tracker.finish(run.info.run_id, "KILLED", "orphaned: its process died with an earlier driver")


class SweepFailedError(RuntimeError):
    """The sweep ran but produced no usable trial."""


def _best(trials: list[TrialSummary]) -> TrialSummary:
    complete = [t for t in trials if t.status == "FINISHED"]
    if not complete:
        counts = {s: sum(t.status == s for t in trials) for s in ("FAILED", "KILLED")}
        raise SweepFailedError(
            f"no trial finished ({counts['FAILED']} failed, {counts['KILLED']} stopped early); "
            "see the trials' kdsweep.end_reason tags in MLflow and their error files in storage"
        )
    return max(complete, key=lambda t: (t.metrics[METRIC], -t.metrics["val_loss_best"]))


def _confirm(spec: SweepSpec, trials: list[TrialSummary], context: SweepContext,
             tracker: Tracker) -> list[Confirmation]:
    """Re-train the top-k finished configurations (ranked on val) with new seeds, as Ray tasks
    with a trial's resources; log mean and std on the parent run. Ranking never looks at test."""
    ranked = sorted((t for t in trials if t.status == "FINISHED"),
                    key=lambda t: (t.metrics[METRIC], -t.metrics["val_loss_best"]), reverse=True)
    ranked = ranked[: spec.sweep.confirm.top_k]
    seeds = [spec.sweep.seed + 1 + i for i in range(spec.sweep.confirm.seeds)]
    task = ray.remote(retrain_task).options(num_cpus=spec.sweep.cpus_per_trial, num_gpus=spec.sweep.gpus_per_trial)
    spec_data = spec.model_dump(mode="json")
    pending = [[task.remote(spec_data, t.sampled, seed, context, spec.sweep.device) for seed in seeds] for t in ranked]
    confirmations = []
    for rank, (trial, refs) in enumerate(zip(ranked, pending, strict=True), start=1):
        results = ray.get(refs)
        confirmations.append(Confirmation(rank, trial.trial_id, trial.sampled, seeds,
                                          [r[METRIC] for r in results], [r["test_acc"] for r in results]))
    for c in confirmations:
        tracker.log_metrics(context.parent_run_id, {f"confirm_{c.rank}_{k}": v for k, v in c.summary().items()}, 0)
    chosen = max(confirmations, key=lambda c: c.summary()["val_acc_mean"])
    tracker.set_tags(context.parent_run_id, {"kdsweep.confirmed_best_trial_id": chosen.trial_id})
    tracker.client.log_dict(context.parent_run_id,
                            [{**dataclasses.asdict(c), **c.summary()} for c in confirmations], "confirm.json")
    return confirmations


def _finish(
    spec: SweepSpec, name: str, storage: Path, tracker: Tracker, parent_run_id: str,
    results: tune.ResultGrid, trials: list[TrialSummary], console: Console,
) -> SweepOutcome:
    best = _best(trials)
    plan = resolve_trial(spec, best.sampled)
    data = load_dataset(spec.data.model_dump())
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    context = SweepContext(name, spec.model_dump(mode="json"), str(storage), tracker.uri,
                           parent_run_id)
    console.print("training the CE-only baseline student (same architecture and recipe)...")
    # A Ray task with a trial's resources, so a GPU sweep trains its baseline on a GPU too.
    baseline = ray.get(ray.remote(ensure_stage).options(
        num_cpus=spec.sweep.cpus_per_trial, num_gpus=spec.sweep.gpus_per_trial,
    ).remote(baseline_stage(spec, plan.recipe, plan.student_arch), context, spec.sweep.device))
    teacher = StageStore(storage).get(teacher_stage(spec).key) if spec.teacher else None

    confirmations = _confirm(spec, trials, context, tracker) if spec.sweep.confirm.top_k else []

    trial_runs = {r.data.tags.get(TAG_TRIAL): r for r in tracker.children(parent_run_id, "trial")}

    def deployable_of(trial: TrialSummary) -> tuple[nn.Module, dict[str, Any]]:
        """The trial's best-epoch deployable (SimKD: encoder + projector + teacher head) and its metadata."""
        trial_plan = resolve_trial(spec, trial.sampled)
        result = next(r for r in results if (r.metrics or {}).get("trial_id") == trial.trial_id)
        with result.checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)["best"]["state"]
        sources = trial_sources(spec, trial_plan, data, context, tracker, "cpu")
        deployable = build_distiller(trial_plan, data, spec.sweep.seed, sources, "cpu").deployable()
        deployable.load_state_dict(state)
        meta = {"sweep": name, "trial_id": trial.trial_id, "run_id": trial_runs[trial.trial_id].info.run_id,
                "method": trial_plan.method, "params": trial_plan.param_dict(), "arch": trial_plan.student_arch,
                "recipe": trial_plan.recipe.as_dict(), "val_acc": trial.metrics[METRIC]}
        return deployable, meta

    deployable, meta = deployable_of(best)
    export = export_student(deployable, data, storage / name / "export", tracker, parent_run_id,
                            spec.registered_model, meta)
    best_run = trial_runs[best.trial_id]
    pareto = _export_pareto(spec, trials, deployable_of, data, storage / name, tracker, parent_run_id)
    counts = {s: sum(t.status == s for t in trials) for s in ("FINISHED", "KILLED", "FAILED")}
    tracker.log_metrics(parent_run_id, {
        "best_val_acc": best.metrics[METRIC], "best_test_acc": export.test_acc,
        "baseline_test_acc": baseline.meta["metrics"]["test_acc"],
        "baseline_val_acc": baseline.meta["metrics"][METRIC],
        **({"teacher_test_acc": teacher.meta["metrics"]["test_acc"]} if teacher else {}),
        "trials_finished": counts["FINISHED"], "trials_stopped_early": counts["KILLED"],
        "trials_failed": counts["FAILED"], "student_params": export.num_params,
    }, step=0)
    tracker.set_tags(parent_run_id, {
        "kdsweep.best_trial_id": best.trial_id, "kdsweep.best_run_id": best_run.info.run_id,
        "kdsweep.model_uri": export.model_uri, "kdsweep.model_version": export.model_version,
        "kdsweep.baseline_run_id": baseline.run_id or "",
        "kdsweep.teacher_run_id": (teacher.run_id or "") if teacher else "",
    })
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / STUDY_FILE}")
    log_sweep_plots(tracker, parent_run_id, study)
    return SweepOutcome(
        name, parent_run_id, trials, best, plan, baseline.meta["metrics"],
        teacher.meta["metrics"] if teacher else None, export, confirmations, pareto, seconds=0.0,
    )


def pareto_front(trials: list[TrialSummary], cost: str) -> list[TrialSummary]:
    """Finished trials no other finished trial beats on both val accuracy (higher) and cost (lower)."""
    finished = [t for t in trials if t.status == "FINISHED"]

    def dominates(a: TrialSummary, b: TrialSummary) -> bool:
        acc_a, acc_b, cost_a, cost_b = a.metrics[METRIC], b.metrics[METRIC], a.metrics[cost], b.metrics[cost]
        return acc_a >= acc_b and cost_a <= cost_b and (acc_a > acc_b or cost_a < cost_b)

    front = [t for t in finished if not any(dominates(o, t) for o in finished)]
    return sorted(front, key=lambda t: t.metrics[cost])


def _export_pareto(spec: SweepSpec, trials: list[TrialSummary], deployable_of: Any, data: Any, directory: Path,
                   tracker: Tracker, parent_run_id: str) -> list[dict[str, Any]]:
    """Every Pareto-optimal student as files (pullable with --trial), and the front as a table."""
    if spec.sweep.cost is None:
        return []
    cost = f"cost_{spec.sweep.cost}"
    rows = []
    for trial in pareto_front(trials, cost):
        deployable, meta = deployable_of(trial)
        test_acc, _ = write_student_files(deployable, data, directory / PARETO_DIR / trial.trial_id, tracker,
                                          parent_run_id, f"{PARETO_DIR}/{trial.trial_id}", meta)
        rows.append({"trial_id": trial.trial_id, "val_acc": trial.metrics[METRIC], "test_acc": test_acc,
                     "cost_name": spec.sweep.cost, "cost": trial.metrics[cost], "settings": trial.sampled})
    tracker.client.log_dict(parent_run_id, rows, "pareto.json")
    tracker.set_tags(parent_run_id, {"kdsweep.pareto_trial_ids": ",".join(r["trial_id"] for r in rows)})
    return rows

