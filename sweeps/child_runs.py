"""A child run while the process that trains it holds it open: `child_run` opens (or reopens)
it and ends it with `end_status`; `TrackedRun` logs each epoch once, in batches."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sweeps.tracking import Tracker, end_status


class TrackedRun:
    """A child run while it is open: epochs are logged once each, even when a retried or
    resumed run trains some of them again.

    The first epoch is written at once; later ones are held and written together once
    `write_every` seconds have passed since the last write (one store write per few short
    epochs), and by `flush`, which `child_run` calls before it sets the run's status. Writes are
    synchronous, on the logging thread (a trial's reporting thread). Not MLflow's asynchronous
    logging: `set_terminated` after it waits up to 1 s for MLflow's idle writer thread.
    """

    def __init__(self, tracker: Tracker, run_id: str, write_every: float = 2.0) -> None:
        self.tracker, self.run_id, self.write_every = tracker, run_id, write_every
        self.epochs_done = tracker.last_step(run_id)  # > 0 after a retry or resume
        self._held: list[tuple[int, int, dict[str, float]]] = []  # (epoch, ms, metrics) not yet written
        self._written = -math.inf

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Holds the epoch's metrics (stamped now) unless the run has the epoch; writes what is
        held once `write_every` seconds have passed. Raises what writing raised."""
        if epoch > self.epochs_done:
            self._held.append((epoch, int(time.time() * 1000), dict(metrics)))
            self.epochs_done = epoch
        if time.monotonic() - self._written >= self.write_every:
            self.flush()

    def flush(self) -> None:
        """Writes every epoch held; raises what writing raised."""
        held, self._held = self._held, []
        self._written = time.monotonic()
        if held:
            self.tracker.log_steps(self.run_id, held)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def set_tags(self, run_tags: dict[str, str]) -> None:
        self.tracker.set_tags(self.run_id, run_tags)


@contextmanager
def child_run(
    tracker: Tracker, parent_run_id: str, *, role: str, key_tag: str, key: str, name: str, epochs: int,
    params: dict[str, Any], run_tags: dict[str, str] | None = None, stopped_by: Callable[[], str | None] | None = None,
) -> Iterator[TrackedRun]:
    """Open (or reopen) a child run; on leaving, end it with `end_status` of what happened.

    Raises whatever the body raised, after the run has its terminal status and reason.
    """
    run = TrackedRun(tracker, tracker.open_child(parent_run_id, role, key_tag, key, name, params, run_tags or {}))
    try:
        try:
            yield run
        finally:
            run.flush()  # what was logged is in the store before the run's status says it ended
    except SystemExit:
        # Tune stopped the trial. A scheduler stop reaches the driver's CloseTrialRuns before the
        # trial, so a run still open was stopped by something else: `stopped_by` says what.
        if run.epochs_done >= epochs:
            tracker.finish(run.run_id, "FINISHED")
        else:
            cause = (stopped_by() if stopped_by else None) or "stopped by Ray (its worker was told to exit)"
            tracker.finish_if_running(run.run_id, "KILLED", f"{cause} after {run.epochs_done} of {epochs} epochs")
        raise
    except BaseException as error:
        tracker.finish(run.run_id, *end_status(run.epochs_done, epochs, error))
        raise
    tracker.finish(run.run_id, "FINISHED")
