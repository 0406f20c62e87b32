"""The Tune function trainable: resolve the trial's plan and sources, train, report per epoch.

One `tune.report` per epoch with a checkpoint; a restarted trial resumes from
`tune.get_checkpoint()` and reopens its MLflow child run by trial id.
"""

from __future__ import annotations

import tempfile
from typing import Any

import ray
import torch
from ray import tune

from kd_core.cost import COSTS
from kd_core.train import EpochReport, NonFiniteLossError, fit, load_checkpoint
from sweeps.pipeline import (
    SweepContext,
    arch_params,
    build_distiller,
    fit_options,
    lineage_tags,
    load_dataset,
    recipe_params,
    trial_sources,
)
from sweeps.space import resolve_trial
from sweeps.spec import SweepSpec
from sweeps.tracking import TAG_TRIAL, Tracker


def train_trial(config: dict[str, Any], context: SweepContext) -> None:
    spec = SweepSpec.model_validate(context.spec)
    torch.set_num_threads(max(1, int(spec.sweep.cpus_per_trial)))
    tracker = Tracker(context.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    plan = resolve_trial(spec, config)
    device = spec.sweep.device
    student_arch = plan.student_arch
    run_id = tracker.open_child(
        context.parent_run_id, "trial", TAG_TRIAL, trial_id, f"trial-{trial_id}",
        params={"method": plan.method, **plan.param_dict(), **arch_params("arch", student_arch),
                **recipe_params(plan.recipe), "data": spec.data.name, "seed": spec.sweep.seed,
                **({"teacher": arch_params("teacher", spec.teacher.arch.model_dump())["teacher"]}
                   if spec.teacher else {})},
        tags={"kdsweep.node_ip": ray.util.get_node_ip_address()},
    )
    status, reason = "FAILED", None
    try:
        data = load_dataset(spec.data.model_dump(), device)
        # Sources may be trained here, by the first trial that needs them: inside `try`, so
        # a failing stage fails this trial's run with a reason instead of leaving no run.
        sources = trial_sources(spec, plan, data, context, tracker, device)
        distiller = build_distiller(plan, data, spec.sweep.seed, sources, device)
        options = fit_options(context, distiller, sources, data, spec.data.model_dump())
        tracker.set_tags(run_id, {**lineage_tags(sources),
                                  "kdsweep.teacher_cache": "on" if options["source_cache"] else "off"})
        example, _ = next(data.val.batches(1))
        costs = {f"cost_{name}": float(measure(distiller.deployable(), example)) for name, measure in COSTS.items()}
        tracker.log_metrics(run_id, costs, 0)
        checkpoint = tune.get_checkpoint()
        resume = None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                resume = load_checkpoint(directory)

        reached_last_epoch = False
        logged = tracker.last_step(run_id)  # > 0 after a retry or resume: never log a step twice

        def report(epoch: EpochReport) -> None:
            nonlocal reached_last_epoch
            reached_last_epoch = epoch.is_last
            if epoch.epoch > logged:
                tracker.log_metrics(run_id, epoch.metrics, epoch.epoch)
            with tempfile.TemporaryDirectory() as directory:
                epoch.save(directory)
                tune.report({**epoch.metrics, **costs}, checkpoint=tune.Checkpoint.from_directory(directory))

        fit(distiller, data, plan.recipe, seed=spec.sweep.seed, callback=report, resume=resume, **options)
        status = "FINISHED"
    except SystemExit:  # how Tune stops a trial; ASHA also stops every trial at max_t
        if reached_last_epoch:
            status = "FINISHED"
        else:
            status, reason = "KILLED", "stopped early by the scheduler"
        raise
    except NonFiniteLossError as error:
        reason = f"non-finite loss: {error}"
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        raise
    finally:
        tracker.finish(run_id, status, reason)
