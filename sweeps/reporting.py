"""How a trial's epochs reach MLflow and Tune without holding up its training.

A Tune function trainable blocks in `tune.report` until the driver has handled the result
(searcher, scheduler, callbacks, snapshot) and asked for the next one: a round trip per result.
`EpochReporter` makes that trip, the MLflow write and the checkpoint file on a second thread
while the next epoch trains, and adds the time of each to the trial's `PhaseTimes`.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from ray.air.constants import TRAINING_ITERATION

from kd_core.train import EpochReport
from sweeps.child_runs import TrackedRun
from sweeps.spec import SweepSpec
from sweeps.timings import PhaseTimes


def decision_epochs(spec: SweepSpec) -> frozenset[int]:
    """The epochs after which the sweep's scheduler may stop a trial: where ASHA (one bracket, as
    `ray.tune.schedulers.ASHAScheduler` places its rungs) first sees a trial at or past a rung,
    min_t * rf**k for k < int(log(max_t / min_t) / log(rf) + 1); none for FIFO."""
    scheduler = spec.sweep.scheduler
    if scheduler.type == "none":
        return frozenset()
    max_t, min_t, rf = spec.recipe.build().epochs, scheduler.grace_period, scheduler.reduction_factor
    rungs = int(math.log(max_t / min_t) / math.log(rf) + 1)
    return frozenset(math.ceil(min_t * rf**k) for k in range(max(rungs, 0)))


class EpochReporter:
    """`fit`'s callback in a trial: each epoch is logged to MLflow and, when a result is due,
    reported to Tune, on a reporting thread while the next epoch trains, with a checkpoint when
    one is due.

    A checkpoint is due after the last epoch, after `decision_epochs` (where the scheduler may
    stop the trial, so a stopped trial's checkpoint holds its end), when a stop is requested, and
    once `checkpoint_interval` seconds have passed since the previous one (0: every epoch).
    Writing one costs a state copy on the training thread, a file and Tune's copy of it to
    storage: per epoch, that was a tenth of a short epoch's time. The checkpoint is of the state
    when the epoch ended (`EpochReport.frozen`), so resume is exact; MLflow holds every epoch up
    to a checkpoint before Tune has it, so a trial resumed from it leaves no epoch unlogged.

    A result to Tune is due with every checkpoint, once `report_interval` seconds have passed
    since the previous result (0: every epoch), and at once when `stop_requested()` names a
    reason (the driver is stopping the sweep: a result is where Tune can stop the trial, so the
    stop lands within an epoch instead of a report interval). Its `training_iteration` is the
    epoch (Tune keeps a value the trainable reports), so the scheduler's rungs and every count
    of epochs done stay in epochs. Each result costs milliseconds of CPU in the trial, Ray and
    the driver (searcher, scheduler, callbacks): on sub-second epochs, several percent of the
    training's CPU.

    At most one epoch is in flight: a call first waits for the previous epoch's report. After
    decision epochs, a stop request and the last epoch it waits for Tune's answer at once, so a
    stopped trial trains no epoch past its stop and a reused actor is free at once. Whatever the
    reporting thread raised (SystemExit: Tune stopped the trial) is raised in the training
    thread at the next call, or on leaving the `with` block unless the block itself raised.
    """

    def __init__(self, run: TrackedRun, extra_metrics: dict[str, float], decisions: Collection[int],
                 times: PhaseTimes, checkpoint_interval: float = 0.0, report_interval: float = 0.0,
                 stop_requested: Callable[[], str | None] = lambda: None) -> None:
        self.run, self.extra_metrics, self.decisions, self.times = run, extra_metrics, decisions, times
        self.checkpoint_interval, self.report_interval = checkpoint_interval, report_interval
        self.stop_requested = stop_requested
        # The trial's start counts as both: the first of each is due an interval later.
        self._checkpointed = self._reported = time.monotonic()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kdsweep-report")
        self._pending: Future[None] | None = None

    def __call__(self, epoch: EpochReport) -> None:
        self.wait()
        now = time.monotonic()
        deciding = epoch.is_last or epoch.epoch in self.decisions or self.stop_requested() is not None
        due = deciding or now - self._checkpointed >= self.checkpoint_interval
        to_tune = due or now - self._reported >= self.report_interval
        frozen = None
        if due:
            with self.times.phase("snapshot"):
                frozen = epoch.frozen()
            self._checkpointed = time.monotonic()
        if to_tune:
            self._reported = now
        self._pending = self._thread.submit(self._report, epoch.epoch, dict(epoch.metrics), to_tune, frozen)
        if deciding:
            self.wait()

    def wait(self) -> None:
        """Until the epoch in flight has been reported; raises what reporting it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with self.times.phase("report_wait"):
                pending.result()

    def _report(self, epoch: int, metrics: dict[str, float], to_tune: bool, checkpoint: EpochReport | None) -> None:
        cpu = time.thread_time()
        try:
            self._write(epoch, metrics, to_tune, checkpoint)
        finally:
            self.times.add("report_cpu", time.thread_time() - cpu)  # what it took from the trial's CPUs

    def _write(self, epoch: int, metrics: dict[str, float], to_tune: bool, checkpoint: EpochReport | None) -> None:
        from ray import tune

        with self.times.phase("mlflow_log"):
            self.run.log_epoch(epoch, metrics)  # held, written every few seconds
        if not to_tune:
            return
        metrics = {**metrics, **self.extra_metrics, TRAINING_ITERATION: epoch}
        if checkpoint is None:
            with self.times.phase("tune_report"):
                tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            with self.times.phase("checkpoint"):
                checkpoint.save(directory)
            with self.times.phase("mlflow_log"):  # every epoch so far is in MLflow before this
                self.run.flush()  # checkpoint is on storage: a trial resumed from it leaves none unlogged
            with self.times.phase("tune_report"):  # Tune copies the files into the trial's storage
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    def __enter__(self) -> EpochReporter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self.wait()
        except BaseException:
            if kind is None:  # the body's own error comes first
                raise
        finally:
            self._thread.shutdown(wait=True)

