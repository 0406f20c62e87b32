"""Confirmation: the top-k configurations (ranked on val) re-trained with new seeds.

Each re-training is a Ray task with a trial's resources (on its N workers with
`sweep.workers_per_trial`) and a `confirm` child run; the mean
and standard deviation per configuration are logged on the parent run. Ranking never looks
at test metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any

import ray

from kd_core.train import EpochReport, fit
from sweeps import tags
from sweeps.child_runs import child_run
from sweeps.data_parallel import WorkerGroup, submit, worker_group
from sweeps.pipeline import (
    SweepContext,
    build_distiller,
    fit_options,
    load_dataset,
    trial_sources,
    worker_setup,
)
from sweeps.results import METRIC, TrialSummary, ranked
from sweeps.space import resolve_trial
from sweeps.tracking import Tracker
from sweeps.trainable import trial_params


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


def retrain(context: SweepContext, trial_id: str, sampled: dict[str, Any], seed: int,
            device: str = "cpu", group: WorkerGroup | None = None) -> dict[str, float]:
    """Train a trial's configuration again with another seed (student initialisation and
    shuffling; the frozen sources stay the stored ones), as a `confirm` child run, on `group`'s
    workers when given. Returns the final metrics: the test metrics are those of the best-val
    epoch."""
    spec = context.spec
    tracker = Tracker(context.tracking_uri)
    plan = resolve_trial(spec, sampled)
    with child_run(
        tracker, context.parent_run_id, role="confirm", key_tag=tags.CONFIRM_KEY, key=f"{trial_id}/seed{seed}",
        name=f"confirm-{trial_id}-seed{seed}", epochs=plan.recipe.epochs,
        params={**trial_params(spec, plan), "seed": seed}, run_tags={tags.TRIAL_ID: trial_id},
    ) as run:
        data = load_dataset(spec.data.model_dump(), device)
        sources = trial_sources(spec, plan, data, context, tracker, device, group)
        distiller = build_distiller(plan, data, seed, sources, device)
        options = fit_options(context, distiller, sources, data, spec.data.model_dump())

        def log(report: EpochReport) -> None:
            run.log_epoch(report.epoch, report.metrics)

        with group.trial(sampled, seed, None) if group else contextlib.nullcontext() as parallel:
            return fit(distiller, data, plan.recipe, seed=seed, callback=log, data_parallel=parallel,
                       **options).metrics


def retrain_task(context: SweepContext, trial_id: str, sampled: dict[str, Any], seed: int,
                 device: str) -> dict[str, float]:
    """`retrain` in a Ray task (`submit`: on a trial's workers)."""
    worker_setup(context.spec)
    with worker_group(context) as group:
        return retrain(context, trial_id, sampled, seed, device, group)


@dataclass(frozen=True)
class PendingConfirmations:
    """Confirmation re-trainings submitted to Ray (`start_confirmations`), training while the
    driver does other work; `collect` waits for them and records them."""

    context: SweepContext
    top: list[TrialSummary]
    seeds: list[int]
    refs: list[list[ray.ObjectRef]]  # per top trial, one re-training per seed

    def collect(self, tracker: Tracker) -> list[Confirmation]:
        """Wait for every re-training; log each configuration's mean and spread on the parent run
        and tag the configuration confirmed best. Raises what a re-training raised."""
        context = self.context
        confirmations = []
        for rank, (trial, refs) in enumerate(zip(self.top, self.refs, strict=True), start=1):
            results = ray.get(refs)
            confirmations.append(Confirmation(rank, trial.trial_id, trial.sampled, self.seeds,
                                              [r[METRIC] for r in results], [r["test_acc"] for r in results]))
        if not confirmations:
            return []
        for c in confirmations:
            tracker.log_metrics(context.parent_run_id, {f"confirm_{c.rank}_{k}": v for k, v in c.summary().items()}, 0)
        chosen = max(confirmations, key=lambda c: c.summary()["val_acc_mean"])
        tracker.set_tags(context.parent_run_id, {tags.CONFIRMED_BEST_TRIAL_ID: chosen.trial_id})
        tracker.client.log_dict(context.parent_run_id,
                                [{**dataclasses.asdict(c), **c.summary()} for c in confirmations], "confirm.json")
        return confirmations


def start_confirmations(context: SweepContext, trials: list[TrialSummary]) -> PendingConfirmations:
    """Submit the re-training of the top-k finished configurations (`sweep.confirm.top_k`, ranked
    on val) with `sweep.confirm.seeds` new seeds each; none when top_k is 0."""
    settings = context.spec.sweep
    top = ranked(trials)[: settings.confirm.top_k]
    seeds = [settings.seed + 1 + i for i in range(settings.confirm.seeds)]
    refs = [[submit(settings, retrain_task, context, t.trial_id, t.sampled, seed, settings.device) for seed in seeds]
            for t in top]
    return PendingConfirmations(context, top, seeds, refs)
