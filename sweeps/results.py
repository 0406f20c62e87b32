"""Trial results as the driver sees them: one summary per trial, one ranking, one status count.

Selection looks at validation metrics only; the test split is for the final report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeps import tags
from sweeps.tracking import end_status

if TYPE_CHECKING:  # the command line reads results without importing Ray
    from ray import tune

METRIC = "val_acc_best"  # best-epoch val accuracy: what selection uses everywhere
STATUSES = ("FINISHED", "KILLED", "FAILED")


class SweepFailedError(RuntimeError):
    """The sweep ran but produced no usable trial."""


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    status: str  # FINISHED | KILLED (stopped early) | FAILED
    epochs: int  # epochs reported
    metrics: dict[str, Any]  # the last reported metrics
    sampled: dict[str, Any]  # the values the searcher chose


def summarize(results: tune.ResultGrid, epochs: int) -> list[TrialSummary]:
    """One summary per Tune trial, its status by `end_status`."""
    trials = []
    for result in results:
        metrics = dict(result.metrics or {})
        done = int(metrics.get("training_iteration", 0))
        status, _ = end_status(done, epochs, str(result.error) if result.error is not None else None)
        trial_id = str(metrics.get("trial_id", "?"))  # absent if it failed before a report
        trials.append(TrialSummary(trial_id, status, done, metrics, dict(result.config or {})))
    return trials


def rank_key(trial: TrialSummary) -> tuple[float, float]:
    """Higher is better: best-epoch val accuracy, ties to the lower best-epoch val loss."""
    return trial.metrics[METRIC], -trial.metrics["val_loss_best"]


def ranked(trials: Iterable[TrialSummary]) -> list[TrialSummary]:
    """Finished trials, best first."""
    return sorted((t for t in trials if t.status == "FINISHED"), key=rank_key, reverse=True)


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    """How many of each terminal status (every key of STATUSES present)."""
    counts = dict.fromkeys(STATUSES, 0)
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts


def best_trial(trials: list[TrialSummary]) -> TrialSummary:
    """The best finished trial; raises SweepFailedError when none finished."""
    finished = ranked(trials)
    if not finished:
        counts = status_counts(t.status for t in trials)
        raise SweepFailedError(
            f"no trial finished ({counts['FAILED']} failed, {counts['KILLED']} stopped early); "
            f"see the trials' {tags.END_REASON} tags in MLflow and their error files in storage"
        )
    return finished[0]


def pareto_front(trials: list[TrialSummary], cost: str) -> list[TrialSummary]:
    """Finished trials no other finished trial beats on both val accuracy (higher) and cost (lower)."""
    finished = [t for t in trials if t.status == "FINISHED"]

    def dominates(a: TrialSummary, b: TrialSummary) -> bool:
        acc_a, acc_b, cost_a, cost_b = a.metrics[METRIC], b.metrics[METRIC], a.metrics[cost], b.metrics[cost]
        return acc_a >= acc_b and cost_a <= cost_b and (acc_a > acc_b or cost_a < cost_b)

    front = [t for t in finished if not any(dominates(o, t) for o in finished)]
    return sorted(front, key=lambda t: t.metrics[cost])
