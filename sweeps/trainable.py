"""The Tune function trainable: resolve the trial's plan and sources, train, log and report its epochs.

With `sweep.workers_per_trial` > 1 the trial's actor is rank 0 of a DDP group whose other
ranks it starts (`sweeps.data_parallel`): the stages it trains and the trial train on all of
them; it alone logs, checkpoints and reports.

Each epoch is logged to MLflow, and a `tune.report` is made when one is due, while the next
epoch trains, with a checkpoint when one is due (`sweeps.reporting.EpochReporter`,
`sweep.report_interval`, `sweep.checkpoint_interval`); a restarted trial resumes from
`tune.get_checkpoint()` and reopens its MLflow child run by trial id (`child_run`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import ray
from mlflow.exceptions import MlflowException
from ray import tune

from kd_core.cost import LatencyProtocol, measure_costs
from kd_core.train import EpochReport, fit, load_checkpoint
from sweeps import tags
from sweeps.child_runs import child_run
from sweeps.data_parallel import WorkerGroup, worker_group
from sweeps.interrupts import interruption
from sweeps.pipeline import (
    SweepContext,
    arch_params,
    build_distiller,
    fit_options,
    lineage_tags,
    load_dataset,
    recipe_params,
    trial_sources,
    worker_setup,
)
from sweeps.reporting import EpochReporter, decision_epochs
from sweeps.space import TrialPlan, resolve_trial
from sweeps.spec import SweepSpec
from sweeps.timings import PhaseTimes, process_start_seconds
from sweeps.tracking import Tracker


def trial_params(spec: SweepSpec, plan: TrialPlan) -> dict[str, Any]:
    """The MLflow params of a trial run, named by their spec paths where they have one (`method.T`,
    `student.args.width`, `recipe.lr`): method, every method param, arch, recipe, data, seed (and
    the workers of a data-parallel trial)."""
    arch = arch_params("arch", plan.student_arch)
    return {"method": plan.method, **{f"method.{k}": v for k, v in plan.param_dict().items()},
            "arch": arch["arch"], **{f"student.args.{k}": v for k, v in plan.student_arch.get("args", {}).items()},
            **recipe_params(plan.recipe), "data": spec.data.name, "seed": spec.sweep.seed,
            **({"teacher": spec.teacher.arch.label()} if spec.teacher else {}),
            **({"workers_per_trial": spec.sweep.workers_per_trial} if spec.sweep.workers_per_trial > 1 else {})}


def train_trial(config: dict[str, Any], context: SweepContext) -> None:
    times = PhaseTimes()  # logged as the run's time_* metrics: where a trial's time goes
    times.add("actor_start", process_start_seconds())
    with worker_group(context) as group:  # the other ranks start while this one sets up
        _train_trial(config, context, group, times)


def _train_trial(config: dict[str, Any], context: SweepContext, group: WorkerGroup | None, times: PhaseTimes) -> None:
    spec = context.spec
    with times.phase("setup"):
        worker_setup(spec)
        tracker = Tracker(context.tracking_uri)
        trial_id = tune.get_context().get_trial_id()
        plan = resolve_trial(spec, config)
    device = spec.sweep.device
    opening = time.perf_counter()
    stop_requested = functools.partial(interruption, Path(context.storage) / context.name)
    with child_run(
        tracker, context.parent_run_id, role="trial", key_tag=tags.TRIAL_ID, key=trial_id,
        name=f"trial-{trial_id}", epochs=plan.recipe.epochs, params=trial_params(spec, plan),
        run_tags={tags.NODE_IP: ray.util.get_node_ip_address()},
        stopped_by=stop_requested,
    ) as run:
        times.add("mlflow_open", time.perf_counter() - opening)
        with times.phase("data"):
            data = load_dataset(spec.data.model_dump(), device)
        # Sources may be trained here, by the first trial that needs them: inside the run, so
        # a failing stage fails this trial's run with a reason instead of leaving no run.
        with times.phase("sources"):
            sources = trial_sources(spec, plan, data, context, tracker, device, group)
            distiller = build_distiller(plan, data, spec.sweep.seed, sources, device)
            options = fit_options(context, distiller, sources, data, spec.data.model_dump())
        run.set_tags({**lineage_tags(sources), tags.TEACHER_CACHE: "on" if options["source_cache"] else "off"})
        example, _ = next(data.val.batches(1))
        # Measured the same way for every trial (spec.sweep.latency), on its device and threads.
        with times.phase("costs"):
            costs = measure_costs(distiller.deployable(), example, LatencyProtocol(**spec.sweep.latency.model_dump()))
        run.log_metrics(costs)
        checkpoint = tune.get_checkpoint()
        resume = None
        if checkpoint is not None:
            with times.phase("resume"), checkpoint.as_directory() as directory:
                resume = load_checkpoint(directory)
        if group is not None:
            run.set_tags({tags.WORKER_IPS: ",".join(group.node_ips())})
        thread_cpu, process_cpu = time.thread_time(), time.process_time()

        def log_times() -> None:
            # CPU while it trained: of the training thread, and of the actor's other threads
            # (reporting, Ray's own), which take it from the same CPUs.
            fit_cpu = time.thread_time() - thread_cpu
            other_cpu = time.process_time() - process_cpu - fit_cpu
            # Diagnostics, not results: a stopped trial's run may be closed by the driver already.
            with contextlib.suppress(MlflowException):
                run.log_metrics(times.metrics(fit_cpu=fit_cpu, other_threads_cpu=other_cpu), step=run.epochs_done)

        def on_epoch(report: EpochReport) -> None:
            if report.is_last:
                # Once Tune has the last result it may stop the trial and end its actor at once,
                # before the `finally` below has run: the times so far go first.
                reporter.wait()
                log_times()
            reporter(report)

        try:
            with group.trial(config, spec.sweep.seed, resume) if group else contextlib.nullcontext() as parallel, \
                    EpochReporter(run, costs, decision_epochs(spec), times, spec.sweep.checkpoint_interval,
                                  spec.sweep.report_interval, stop_requested) as reporter:
                fit(distiller, data, plan.recipe, seed=spec.sweep.seed, callback=on_epoch, resume=resume,
                    data_parallel=parallel, **options)
        finally:
            log_times()  # all of them, the last report's included, at the last epoch logged
