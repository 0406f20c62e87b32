"""Run or resume a sweep: Ray Tune + OptunaSearch (TPE) + ASHA over `train_trial`, tracked in
MLflow; then `finish_sweep` (baseline, confirmation, export). Needs Ray initialised by the
caller (`cluster.session.ray_session`), with `WORKER_ENV` in its workers' environment.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from rich.console import Console

from sweeps import interrupts, tags
from sweeps.callbacks import CancelWatch, CloseTrialRuns, CsvResults, JsonResults, LiveProgress
from sweeps.finish import SweepOutcome, finish_sweep, study_storage
from sweeps.interrupts import Interrupted, StopOnSignals, clear_interruption, interruption, record_driver
from sweeps.pipeline import SweepContext, trial_resources
from sweeps.preflight import check_before_start, check_cluster_resources, check_experiment
from sweeps.restore import KeepRestorableCheckpoints, SchedulerState, prune_checkpoints
from sweeps.results import METRIC, SweepFailedError, TrialSummary, summarize
from sweeps.search import SweepSearch, check_search_state
from sweeps.space import SearchSpace
from sweeps.spec import SpecError, SweepSpec, load_spec
from sweeps.study_search import StudySearch, SweepGenerator
from sweeps.timings import DRIVER_CPU
from sweeps.tracking import Tracker
from sweeps.trainable import train_trial
from sweeps.warm_start import WarmStart, objectives, resolve_warm_start, start_from

__all__ = ["WORKER_ENV", "Interrupted", "SweepFailedError", "SweepOutcome", "check_before_start", "check_new_sweep",
           "default_sweep_name", "resumable", "resume_sweep", "run_sweep"]

SPEC_FILE = "spec.yaml"  # the validated spec, in the sweep's storage directory: what `resume` restarts from

# Tune's own console output is replaced by LiveProgress; its warning about frequent experiment
# snapshots is not for us (they follow trial checkpoints by design). Tune's automatic result
# loggers are off: `_callbacks` adds its CSV and JSON ones (Tune's own record of every result),
# not TensorBoard's event files, which cost the driver a sixth of its time and MLflow replaces.
QUIET_TUNE = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
              "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
WORKER_ENV = {**QUIET_TUNE, "PYTHONWARNINGS": "ignore::FutureWarning"}  # for `ray_session(env_vars=...)`


def default_sweep_name(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _quiet_driver() -> None:
    """The console shows the sweep's own lines: third parties' INFO lines, progress bars and
    deprecation notices stay off it (Ray's and Tune's go to a log file: cluster.session)."""
    import logging

    os.environ.update(QUIET_TUNE)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # re-reading the exported model
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # as in the workers (WORKER_ENV)
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


def check_new_sweep(tracker: Tracker, name: str, storage: Path, spec: SweepSpec | None = None) -> WarmStart | None:
    """The name is free in the tracking store (a deleted sweep's name is) and the storage, and
    (given the spec) its MLflow experiment can take runs and its warm-start sweep exists; SpecError
    otherwise. Writes nothing; returns the resolved warm start, if the spec asks for one."""
    if spec is not None:
        check_experiment(tracker, spec.tracking.experiment)
    if any(r.data.tags.get(tags.SWEEP) == name for r in tracker.find_sweeps(name)):
        raise SpecError(f"a sweep named {name!r} already exists in {tracker.uri}; choose another --name")
    if (storage / name).exists():
        raise SpecError(f"{storage / name} already exists; choose another --name or --storage")
    return resolve_warm_start(tracker, spec) if spec is not None else None


def run_sweep(
    spec: SweepSpec, *, name: str, storage: Path, tracking_uri: str, console: Console | None = None,
) -> SweepOutcome:
    """Run a new sweep to the end: trials, the CE baseline, the exported best student."""
    _quiet_driver()
    check_cluster_resources(spec.sweep)  # now that Ray is up, before anything is written
    storage = storage.resolve()
    tracker = Tracker(tracking_uri)
    warm = check_new_sweep(tracker, name, storage, spec)
    experiment_dir = storage / name
    experiment_dir.mkdir(parents=True)
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    (experiment_dir / SPEC_FILE).write_text(spec_yaml)
    parent_run_id = tracker.start_sweep(
        tracker.experiment_id(spec.tracking.experiment), name,
        {tags.SPEC: spec.name, tags.STORAGE: str(storage), **(warm.lineage_tags() if warm else {}),
         **({"mlflow.note.content": spec.description} if spec.description else {})},
    )
    tracker.client.log_text(parent_run_id, spec_yaml, SPEC_FILE)
    tracker.log_params(parent_run_id, {
        "spec": spec.name, "num_trials": spec.sweep.num_trials,
        "max_concurrent": spec.sweep.max_concurrent, "sampler": spec.sweep.sampler.type,
        "scheduler": spec.sweep.scheduler.type, "metric": METRIC,
        "search": ",".join(spec.search), "student": spec.student.arch.label(),
        "teacher": spec.teacher.arch.label() if spec.teacher else "", "objectives": objectives(spec),
        **({"time_budget_s": spec.sweep.time_budget} if spec.sweep.time_budget else {}),
        **({"warm_start_from": warm.sweep} if warm else {}),
    })
    context = SweepContext(name, spec, str(storage), tracking_uri, parent_run_id)
    console = console or Console(stderr=True)
    if warm is not None:  # into the study before the searcher loads it
        taken = start_from(warm, spec, study_storage(context), name)
        tracker.set_tags(parent_run_id, {tags.WARM_START: taken})
        console.print(f"warm start: {taken}", markup=False)
    return _drive(context, tracker, console, restore=False)


def resumable(name: str, tracker: Tracker, address: str | None = None) -> SweepContext:
    """The context of an unfinished sweep that can be resumed; SpecError says why not. Its data,
    models and (for a local sweep, `address` None) resources are checked as a new sweep's are.

    A sweep resumes only in the folder it was created in (a copy elsewhere is never written):
    Ray 2.60 pickles that absolute path into its search-generator state, and trials it creates
    after a restore would be written there. Needs no Ray: the command line checks this first.
    """
    runs = [r for r in tracker.find_sweeps(name) if r.data.tags.get(tags.SWEEP) == name]
    if not runs:
        raise SpecError(f"no sweep named {name!r} at {tracker.uri}")
    parent = runs[0]
    if parent.info.status == "FINISHED":
        raise SpecError(f"sweep {name!r} has already finished; nothing to resume")
    storage = Path(parent.data.tags[tags.STORAGE])
    experiment_dir = storage / name
    if not experiment_dir.is_dir():
        raise SpecError(f"sweep {name!r} cannot be resumed: its folder {experiment_dir} is gone; a sweep "
                        "resumes only where it was created (Ray records that path): move the folder back")
    if not (experiment_dir / SPEC_FILE).exists() or not tune.Tuner.can_restore(str(experiment_dir)):
        raise SpecError(f"sweep {name!r} cannot be resumed: no Tune experiment state in {experiment_dir}")
    check_search_state(experiment_dir)  # a damaged snapshot fails here, not minutes later inside Ray
    spec = load_spec(experiment_dir / SPEC_FILE)
    check_before_start(spec, address)  # the data may have moved, the machine changed
    return SweepContext(name, spec, str(storage), tracker.uri, parent.info.run_id)


def resume_sweep(context: SweepContext, *, console: Console | None = None) -> SweepOutcome:
    """Continue a sweep that was interrupted or whose driver died (`resumable`): the Tune
    experiment (errored trials too), the scheduler's rungs and the Optuna study are restored;
    trial runs are reopened by trial id."""
    _quiet_driver()
    check_cluster_resources(context.spec.sweep)  # now that Ray is up, before anything is written
    tracker = Tracker(context.tracking_uri)
    tracker.reopen(context.parent_run_id)
    clear_interruption(Path(context.storage) / context.name)
    return _drive(context, tracker, console or Console(stderr=True), restore=True)


def sweep_trainable(context: SweepContext) -> Any:
    """`train_trial` as Tune runs it: with the sweep's context and each trial's CPUs and GPUs."""
    return tune.with_resources(tune.with_parameters(train_trial, context=context), trial_resources(context.spec.sweep))


def _tuner(context: SweepContext, tracker: Tracker, console: Console, restore: bool) -> tune.Tuner:
    spec, experiment_dir = context.spec, Path(context.storage) / context.name
    epochs = spec.recipe.build().epochs
    trainable = sweep_trainable(context)
    # A trial lost in a crash runs again as a new Tune trial, in its MLflow run (no epoch logged twice)
    on_rerun = functools.partial(tracker.rekey_child, context.parent_run_id, "trial", tags.TRIAL_ID)
    if restore:
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
        # Tuner.restore unpickles the searcher, scheduler and callbacks from tuner.pkl as they
        # were at the start (Ray has no public handle on them). Tune restores the searcher's
        # state, and SchedulerState the scheduler's, from the snapshot; paths are the current ones.
        config, run_config = tuner._local_tuner._tune_config, tuner._local_tuner.get_run_config()
        search = config.search_alg  # a SweepGenerator, or a StudySearch in sweeps saved before it
        getattr(search, "study_search", search).reopen(study_storage(context), on_rerun)
        run_config.callbacks = _callbacks(context, tracker, console, config.scheduler)
        return tuner
    searcher = SweepSearch(
        epochs=epochs, space=SearchSpace(spec), sampler=_sampler(spec), time_budget_s=spec.sweep.time_budget,
        **({"metric": [METRIC, f"cost_{spec.sweep.cost}"], "mode": ["max", "min"]} if spec.sweep.cost
           else {"metric": METRIC, "mode": "max"}),
        points_to_evaluate=[dict(p) for p in spec.sweep.initial_points] or None,
        study_name=context.name, storage=optuna.storages.RDBStorage(study_storage(context)),
    )
    search = SweepGenerator(StudySearch(searcher, study_storage(context), spec.sweep.max_concurrent, on_rerun))
    scheduler = _scheduler(spec)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=search, scheduler=scheduler, num_samples=spec.sweep.num_trials,
            reuse_actors=True),
        run_config=tune.RunConfig(
            name=context.name, storage_path=context.storage, verbose=0,
            # Tune keeps every checkpoint; KeepRestorableCheckpoints deletes the ones no snapshot needs.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
            callbacks=_callbacks(context, tracker, console, scheduler),
        ),
    )


def _callbacks(context: SweepContext, tracker: Tracker, console: Console,
               scheduler: tune.schedulers.TrialScheduler) -> list[tune.Callback]:
    """The driver's Tune callbacks. Their order is fixed: Tune restores callback states by position."""
    spec, epochs = context.spec, context.spec.recipe.build().epochs
    return [SchedulerState(scheduler), KeepRestorableCheckpoints(),
            CloseTrialRuns(tracker.uri, context.parent_run_id, epochs),
            LiveProgress(spec.sweep.num_trials, epochs, METRIC, console), CancelWatch(),
            CsvResults(), JsonResults()]  # stateless: after the others (QUIET_TUNE)


def _drive(context: SweepContext, tracker: Tracker, console: Console, restore: bool) -> SweepOutcome:
    """Tune the trials (new or restored), then close every run and finish the sweep."""
    started = time.monotonic()
    spec, parent_run_id = context.spec, context.parent_run_id
    experiment_dir = Path(context.storage) / context.name
    try:
        with StopOnSignals(experiment_dir) as signals:
            record_driver(experiment_dir)  # `kdsweep cancel` tells a live driver from a dead one by it
            console.print(f"[bold]kdsweep[/] sweep [cyan]{context.name}[/]: {spec.sweep.num_trials} trials, "
                          f"{spec.sweep.max_concurrent} at a time, tracking {tracker.uri}"
                          + (" (resumed)" if restore else ""))
            tuner = _tuner(context, tracker, console, restore)
            tune_started, driver_cpu, parts = time.monotonic(), time.process_time(), dict(DRIVER_CPU.seconds)
            results = signals.run(tuner.fit)  # raises Interrupted after Tune's orderly stop
            tune_seconds, driver_cpu = time.monotonic() - tune_started, time.process_time() - driver_cpu
            parts = DRIVER_CPU.since(parts)
            prune_checkpoints(experiment_dir)  # fit ends with a snapshot that waited for storage
            trials = summarize(results, spec.recipe.build().epochs)
            _note_budget(tracker, context, len(results), console)
            _reconcile(tracker, parent_run_id, trials)
            outcome = finish_sweep(context, tracker, results, trials, console)
    except BaseException as error:
        cause = interrupts.signal_cause(error)
        _close_after(tracker, context, cause)
        if cause is not error:  # a signal that arrived inside Ray's native code
            raise cause from None
        raise
    tracker.finish(parent_run_id, "FINISHED")
    return dataclasses.replace(outcome, seconds=time.monotonic() - started, tune_seconds=tune_seconds,
                               tune_driver_cpu_seconds=driver_cpu, tune_driver_cpu_parts=parts)


def _note_budget(tracker: Tracker, context: SweepContext, started: int, console: Console) -> None:
    """Say on the parent run when `sweep.time_budget` ended the sweep (fewer trials than asked)."""
    budget, wanted = context.spec.sweep.time_budget, context.spec.sweep.num_trials
    if budget is not None and started < wanted:
        note = f"spent: {started} of {wanted} trials started within the {budget:g} s time budget"
        tracker.set_tags(context.parent_run_id, {tags.TIME_BUDGET: note})
        console.print(f"time budget {note}", markup=False)


def _close_after(tracker: Tracker, context: SweepContext, error: BaseException) -> None:
    """The parent and every open child run closed with what really stopped the driver."""
    interrupted = isinstance(error, Interrupted | KeyboardInterrupt | SystemExit)
    if isinstance(error, Interrupted):
        cause = interruption(Path(context.storage) / context.name) or str(error)
        reason = f"{cause}; `kdsweep resume {context.name}` continues it"
    else:
        what = "was stopped" if interrupted else "failed"
        cause = reason = f"the sweep driver {what}: {type(error).__name__}: {error}"
    for run in tracker.running_children(context.parent_run_id):  # a trial may end on its own meanwhile
        tracker.finish_if_running(run.info.run_id, "KILLED", cause)
    tracker.finish(context.parent_run_id, "KILLED" if interrupted else "FAILED", reason)


def _reconcile(tracker: Tracker, parent_run_id: str, trials: list[TrialSummary]) -> None:
    """No child run stays RUNNING: a trial's run follows what Tune says of its trial."""
    by_id = {t.trial_id: t for t in trials}
    for run in tracker.running_children(parent_run_id):
        trial = by_id.get(run.data.tags.get(tags.TRIAL_ID, ""))
        if trial is not None:
            tracker.finish(run.info.run_id, trial.status, "closed by the driver after the sweep")
        else:  # a run whose trial or stage a crashed driver left behind
            tracker.finish(run.info.run_id, "KILLED", "orphaned: its process died with an earlier driver")
