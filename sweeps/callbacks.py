"""Tune callbacks on the driver: live progress, terminal statuses for trial runs, `kdsweep cancel`,
Tune's own result files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from rich.console import Console
from rich.live import Live
from rich.text import Text

from sweeps import tags
from sweeps.interrupts import poll_cancel
from sweeps.timings import driver_part
from sweeps.tracking import Tracker, end_status

TRIAL_ERRORED = "trial raised an error (see the Tune trial's error file)"


def trial_outcome(trial: Trial, epochs: int, errored: bool) -> tuple[str, str | None]:
    """(MLflow status, reason) for a trial that Tune has ended (`end_status` of its epochs)."""
    done = int((trial.last_result or {}).get("training_iteration", 0))
    return end_status(done, epochs, TRIAL_ERRORED if errored else None)


class CloseTrialRuns(Callback):
    """Gives a trial's child run its terminal status as soon as Tune ends the trial.

    The trial closes its own run where it can; a trial stopped by ASHA or whose process
    died may not get that far, so the driver does it here.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, epochs: int) -> None:
        # Tune pickles its callbacks with the experiment state: keep only plain values.
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.epochs = epochs

    @property
    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri)

    def _close(self, trial: Trial, errored: bool) -> None:
        status, reason = trial_outcome(trial, self.epochs, errored)
        tracker = self.tracker
        run = tracker.child_by_key(self.parent_run_id, "trial", tags.TRIAL_ID, trial.trial_id)
        if run is not None:
            tracker.finish_if_running(run.info.run_id, status, reason)

    @driver_part("mlflow")
    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._close(trial, errored=False)

    @driver_part("mlflow")
    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._close(trial, errored=True)


class LiveProgress(Callback):
    """On a terminal, one live status line: trials done / running / stopped early / failed, best,
    elapsed. Elsewhere (a pipe, a log file, a Ray job) one plain line per trial as it ends."""

    def __init__(self, total: int, epochs: int, metric: str, console: Console) -> None:
        self.total, self.epochs, self.metric = total, epochs, metric
        self.started = time.monotonic()
        self.best: float | None = None
        self.best_trial = ""
        self.counts = {"done": 0, "stopped": 0, "failed": 0}
        self.running: set[str] = set()
        self.console = console
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the display is not state.
        return {k: v for k, v in vars(self).items() if k not in ("console", "live")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state, console=Console(stderr=True), live=None)

    def _render(self) -> Text:
        elapsed = time.monotonic() - self.started
        finished = sum(self.counts.values())
        width = 24
        filled = int(width * finished / max(self.total, 1))
        best = f"{self.best:.4f} ({self.best_trial})" if self.best is not None else "-"
        return Text.assemble(
            ("sweep ", "bold"), ("█" * filled + "░" * (width - filled), "cyan"),
            f" {finished}/{self.total} trials | done {self.counts['done']}"
            f" | running {len(self.running)} | stopped early {self.counts['stopped']}"
            f" | failed {self.counts['failed']} | best {self.metric} {best}"
            f" | {elapsed:5.0f}s",
        )

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()
        if self.console.is_terminal:  # a redrawn line in a file would be its every frame
            self.live = Live(self._render(), console=self.console, refresh_per_second=2)
            self.live.start()

    def _ended(self, trials: list[Trial], trial: Trial, status: str) -> None:
        """Off a terminal: `trial 3/10 finished: 8/8 epochs, val_acc_best 0.9123, 42s`."""
        if self.console.is_terminal:
            self._refresh()
            return
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float | int) else "-"
        number = trials.index(trial) + 1 if trial in trials else sum(self.counts.values())
        self.console.print(
            f"trial {number}/{self.total} {status}: {int(result.get('training_iteration', 0))}/{self.epochs} epochs, "
            f"{self.metric} {shown}, {time.monotonic() - self.started:.0f}s", markup=False, highlight=False,
            soft_wrap=True)

    @driver_part("progress")
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._refresh()

    @driver_part("progress")
    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        value = result.get(self.metric)
        if value is not None and (self.best is None or value > self.best):
            self.best, self.best_trial = value, trial.trial_id
        self._refresh()

    @driver_part("progress")
    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        status, _ = trial_outcome(trial, self.epochs, errored=False)
        finished = status == "FINISHED"
        self.counts["done" if finished else "stopped"] += 1
        self._ended(trials, trial, "finished" if finished else "stopped early")

    @driver_part("progress")
    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.counts["failed"] += 1
        self._ended(trials, trial, "failed")

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._refresh()
        if self.live is not None:
            self.live.stop()


class CancelWatch(Callback):
    """Tune's loop looks for a `kdsweep cancel` request (`interrupts.poll_cancel`). Stateless, and
    after the stateful callbacks (Tune restores their states by position)."""

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        poll_cancel()


class _KeepDriverResults:
    """Tune's result loggers copy a trial's file back from storage whenever the trial restarts
    from a checkpoint (after a node failure, say), over the driver's own copy, which storage gets
    only at the next experiment snapshot: the results logged since that snapshot were lost. The
    driver's copy, where it has one, holds every result storage has: keep it."""

    def _restore_from_remote(self, file_name: str, trial: Trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)  # type: ignore[misc]


class JsonResults(_KeepDriverResults, JsonLoggerCallback):
    """Tune's result.json per trial (every reported result), restart-safe (`_KeepDriverResults`)."""


class CsvResults(_KeepDriverResults, CSVLoggerCallback):
    """Tune's progress.csv per trial, restart-safe (`_KeepDriverResults`)."""
