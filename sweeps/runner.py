"""Run or resume a sweep: Ray Tune + OptunaSearch (TPE) + ASHA over `train_trial`, tracked in
MLflow; then `finish_sweep` (baseline, confirmation, export). Needs Ray initialised by the
caller (`cluster.session.ray_session`), with `WORKER_ENV` in its workers' environment.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

import optuna
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from sweeps import tags
from sweeps.callbacks import CloseTrialRuns, LiveProgress
from sweeps.finish import SweepOutcome, finish_sweep, study_storage
from sweeps.pipeline import SweepContext
from sweeps.results import METRIC, SweepFailedError, TrialSummary, summarize
from sweeps.space import SearchSpace
from sweeps.spec import SpecError, SweepSpec, load_spec
from sweeps.tracking import Tracker
from sweeps.trainable import train_trial

__all__ = ["WORKER_ENV", "SweepFailedError", "SweepOutcome", "check_new_sweep", "default_sweep_name", "resumable",
           "resume_sweep", "run_sweep"]

SPEC_FILE = "spec.yaml"  # the validated spec, in the sweep's storage directory: what `resume` restarts from

# Tune's own console output is replaced by LiveProgress. The snapshot warning fires on
# every per-epoch checkpoint with num_to_keep=1, which is intended here.
QUIET_TUNE = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
WORKER_ENV = {**QUIET_TUNE, "PYTHONWARNINGS": "ignore::FutureWarning"}  # for `ray_session(env_vars=...)`


def default_sweep_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _quiet_driver() -> None:
    os.environ.update(QUIET_TUNE)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not ray.is_initialized():
        raise RuntimeError("start Ray first (cluster.session.ray_session): Tune would start one off loopback")


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
    if any(r.data.tags.get(tags.SWEEP) == name for r in tracker.find_sweeps(name)):
        raise SpecError(f"a sweep named {name!r} already exists in {tracker.uri}; choose another --name")
    if (storage / name).exists():
        raise SpecError(f"{storage / name} already exists; choose another --name or --storage")


def run_sweep(
    spec: SweepSpec, *, name: str, storage: Path, tracking_uri: str, console: Console | None = None,
) -> SweepOutcome:
    """Run a new sweep to the end: trials, the CE baseline, the exported best student."""
    _quiet_driver()
    storage = storage.resolve()
    tracker = Tracker(tracking_uri)
    check_new_sweep(tracker, name, storage)
    experiment_dir = storage / name
    experiment_dir.mkdir(parents=True)
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    (experiment_dir / SPEC_FILE).write_text(spec_yaml)
    parent_run_id = tracker.start_sweep(
        tracker.experiment_id(spec.tracking.experiment), name,
        {tags.SPEC: spec.name, tags.STORAGE: str(storage),
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
    context = SweepContext(name, spec, str(storage), tracking_uri, parent_run_id)
    return _drive(context, tracker, console or Console(stderr=True), restore=False)


def resumable(name: str, tracker: Tracker) -> SweepContext:
    """The context of an unfinished sweep that can be resumed; SpecError says why not.

    Needs no Ray: the command line checks this before starting it.
    """
    runs = [r for r in tracker.find_sweeps(name) if r.data.tags.get(tags.SWEEP) == name]
    if not runs:
        raise SpecError(f"no sweep named {name!r} at {tracker.uri}")
    parent = runs[0]
    if parent.info.status == "FINISHED":
        raise SpecError(f"sweep {name!r} has already finished; nothing to resume")
    storage = Path(parent.data.tags[tags.STORAGE])
    experiment_dir = storage / name
    if not (experiment_dir / SPEC_FILE).exists() or not tune.Tuner.can_restore(str(experiment_dir)):
        raise SpecError(f"sweep {name!r} cannot be resumed: no Tune experiment state in {experiment_dir}")
    return SweepContext(name, load_spec(experiment_dir / SPEC_FILE), str(storage), tracker.uri, parent.info.run_id)


def resume_sweep(context: SweepContext, *, console: Console | None = None) -> SweepOutcome:
    """Continue a sweep whose driver died (`resumable`): the Tune experiment (errored trials
    too) and the Optuna study are restored; trial runs are reopened by trial id."""
    _quiet_driver()
    tracker = Tracker(context.tracking_uri)
    tracker.client.update_run(context.parent_run_id, status="RUNNING")
    return _drive(context, tracker, console or Console(stderr=True), restore=True)


def _tuner(context: SweepContext, tracker: Tracker, console: Console, restore: bool) -> tune.Tuner:
    spec, experiment_dir = context.spec, Path(context.storage) / context.name
    epochs = spec.recipe.build().epochs
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, context=context), {"cpu": spec.sweep.cpus_per_trial}
    )
    if restore:
        # The searcher, scheduler and callbacks come back from the experiment's snapshot.
        return tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
    searcher = OptunaSearch(
        space=SearchSpace(spec), sampler=_sampler(spec),
        **({"metric": [METRIC, f"cost_{spec.sweep.cost}"], "mode": ["max", "min"]} if spec.sweep.cost
           else {"metric": METRIC, "mode": "max"}),
        points_to_evaluate=[dict(p) for p in spec.sweep.initial_points] or None,
        study_name=context.name, storage=optuna.storages.RDBStorage(study_storage(context)),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=searcher, scheduler=_scheduler(spec),
            num_samples=spec.sweep.num_trials, max_concurrent_trials=spec.sweep.max_concurrent, reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=context.name, storage_path=context.storage, verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
            callbacks=[CloseTrialRuns(tracker.uri, context.parent_run_id, epochs),
                       LiveProgress(spec.sweep.num_trials, epochs, METRIC, console)],
        ),
    )


def _drive(context: SweepContext, tracker: Tracker, console: Console, restore: bool) -> SweepOutcome:
    """Tune the trials (new or restored), then close every run and finish the sweep."""
    started = time.monotonic()
    spec, parent_run_id = context.spec, context.parent_run_id
    try:
        console.print(f"[bold]kdsweep[/] sweep [cyan]{context.name}[/]: {spec.sweep.num_trials} trials, "
                      f"{spec.sweep.max_concurrent} at a time, tracking {tracker.uri}"
                      + (" (resumed)" if restore else ""))
        tuner = _tuner(context, tracker, console, restore)
        tune_started = time.monotonic()
        results = tuner.fit()
        tune_seconds = time.monotonic() - tune_started
        trials = summarize(results, spec.recipe.build().epochs)
        _reconcile(tracker, parent_run_id, trials)
        outcome = finish_sweep(context, tracker, results, trials, console)
    except BaseException as error:
        for run in tracker.running_children(parent_run_id):
            tracker.finish(run.info.run_id, "KILLED", "the sweep driver stopped")
        # Ctrl-C, or SIGTERM (Ray's and the shell's way to stop a driver) ends a sweep KILLED.
        status = "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
        tracker.finish(parent_run_id, status, f"{type(error).__name__}: {error}")
        raise
    tracker.finish(parent_run_id, "FINISHED")
    return dataclasses.replace(outcome, seconds=time.monotonic() - started, tune_seconds=tune_seconds)


def _reconcile(tracker: Tracker, parent_run_id: str, trials: list[TrialSummary]) -> None:
    """No child run stays RUNNING: a trial's run follows what Tune says of its trial."""
    by_id = {t.trial_id: t for t in trials}
    for run in tracker.running_children(parent_run_id):
        trial = by_id.get(run.data.tags.get(tags.TRIAL_ID, ""))
        if trial is not None:
            tracker.finish(run.info.run_id, trial.status, "closed by the driver after the sweep")
        else:  # a run whose trial or stage a crashed driver left behind
            tracker.finish(run.info.run_id, "KILLED", "orphaned: its process died with an earlier driver")
