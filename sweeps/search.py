"""The sweep's searcher and the state it leaves on disk.

`SweepSearch` is Ray's OptunaSearch with two differences: a trial Tune stopped before its last
epoch (ASHA) enters the Optuna study as PRUNED with its intermediate values, as Optuna's own
pruners record it, not as COMPLETE with a partial value that TPE would take for a final one; and
with a time budget (`sweep.time_budget`) it starts no trial once the budget is spent (it answers
Searcher.FINISHED: running trials finish, then Tune ends as after the last trial). Tune's own
`time_budget_s` would kill the running trials instead.

`check_search_state` reads what `Tuner.restore` would read (the newest experiment, search
generator and searcher snapshots, the tuner pickle, the study) without executing any of it, so
`resume` refuses a damaged sweep with one message instead of stalling inside Ray.
"""

from __future__ import annotations

import json
import logging
import pickletools
import sqlite3
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray.air.constants import TRAINING_ITERATION
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.restore import check_storage_trusted
from sweeps.spec import SpecError
from sweeps.tracking import end_status

LOG = logging.getLogger("kdsweep")

#: What `Tuner.restore` reads from an experiment directory (the newest file of each pattern), and
#: how: Tune writes its search generator state as a pickle despite the .json suffix.
STATE_FILES = {"experiment_state-*.json": "json", "search_gen_state-*.json": "pickle",
               "searcher-state-*.pkl": "pickle", "tuner.pkl": "pickle"}
STUDY_FILE = "study.db"  # the Optuna study, in the sweep's storage directory (sweeps.finish.study_storage)
DRIVER_SESSION = uuid.uuid4().hex  # this driver process: a budget clock saved by another one restarts here


class SearchStateError(SpecError):
    """A sweep's saved search state cannot be read: the message names the file and what to do
    (a user error: the command line prints it and exits 2)."""


class SweepSearch(OptunaSearch):
    """OptunaSearch that tells trials stopped before `epochs` as PRUNED (see the module docstring).

    Single-objective: an intermediate value is reported per Tune result, at its epoch (the
    trainable reports `training_iteration` = epoch; `sweep.report_interval`), and Optuna takes
    the last one, the epoch the trial stopped at, as the pruned trial's value. Multi-objective
    studies cannot hold intermediate values (Optuna raises on `report`), so a stopped trial is
    PRUNED without values there, as `study.optimize` records a multi-objective TrialPruned.
    """

    def __init__(self, *, epochs: int, time_budget_s: float | None = None, **kwargs: Any) -> None:
        self._epochs = epochs
        self._budget_s = time_budget_s
        self._spent_s = 0.0  # of the budget; saved with the searcher's state, so it survives a resume
        self._tick: tuple[str, float] | None = None  # (driver session, monotonic time) of the last look
        super().__init__(**kwargs)

    def budget_spent_s(self) -> float:
        """Seconds of running time so far: this driver's, plus earlier drivers' up to their last
        saved state (time between drivers, while nobody ran the sweep, is not counted)."""
        now, tick, spent = time.monotonic(), getattr(self, "_tick", None), getattr(self, "_spent_s", 0.0)
        if tick is not None and tick[0] == DRIVER_SESSION:
            spent += now - tick[1]
        self._spent_s, self._tick = spent, (DRIVER_SESSION, now)
        return spent

    def suggest(self, trial_id: str) -> dict | str | None:
        """The next configuration, or Searcher.FINISHED once the time budget is spent."""
        budget = getattr(self, "_budget_s", None)  # None in a sweep saved before budgets existed
        if budget is not None and self.budget_spent_s() >= budget:
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.budget_spent_s()  # keeps the saved clock current between suggestions
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Record the trial's last result, then tell the study how it ended: PRUNED when it ran
        fewer than `epochs` epochs, otherwise as OptunaSearch does (COMPLETE, FAIL)."""
        if error or not result or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        done = int(result.get(TRAINING_ITERATION, 0))
        stopped = end_status(done, self._epochs)[0] == "KILLED"
        ot_trial = self._ot_trials[trial_id]
        try:
            if not isinstance(self.metric, list) and self.metric in result:
                # Tune hands a trial's last result (done, or the one its scheduler stopped it
                # on) to on_trial_complete only, never to on_trial_result: report it here.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a step already reported (a repeated epoch) is kept
                    ot_trial.report(result[self.metric], done)
            if stopped:
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception as exc:  # as OptunaSearch does: a study that refuses a record must not stop the sweep
            LOG.warning("Optuna did not record the end of trial %s: %s", trial_id, exc)
        if stopped:
            self._completed_trials.add(trial_id)
        else:
            super().on_trial_complete(trial_id, result, error)


def _newest(directory: Path, pattern: str) -> Path | None:
    # Tune's own rule (Searcher.restore_from_dir, _find_newest_experiment_checkpoint): the
    # greatest name, names being timestamped.
    found = sorted(directory.glob(pattern))
    return found[-1] if found else None


def _problem(path: Path, kind: str) -> str | None:
    """Why `path` (json, pickle or sqlite) cannot be read back, or None. Pickles are walked opcode
    by opcode, never run."""
    try:
        data = path.read_bytes()
        if kind == "json":
            json.loads(data)
        elif kind == "pickle":
            for _ in pickletools.genops(data):  # raises where pickle.load would: truncation, garbage
                pass
        else:
            # Read-only, unless a write was cut short (a killed driver): its hot journal must be
            # rolled back first, which is SQLite's own crash recovery and needs write access.
            hot = path.with_name(path.name + "-journal").exists()
            db = sqlite3.connect(f"file:{path}?mode={'rw' if hot else 'ro'}", uri=True)
            try:
                (answer,) = db.execute("PRAGMA quick_check").fetchone()
            finally:
                db.close()
            if answer != "ok":
                return f"SQLite quick_check: {answer}"
    except (OSError, ValueError, sqlite3.Error) as error:  # JSON and pickle errors are ValueErrors
        return f"{type(error).__name__}: {error}"
    return None


def check_search_state(experiment_dir: Path) -> None:
    """Raise SearchStateError naming the first file of a sweep's search state that `Tuner.restore`
    could not read (truncated, garbage, an unreadable study), after `check_storage_trusted`
    (UntrustedStorageError: storage another user could write); a missing file is not checked here
    (`Tuner.can_restore` says whether there is state at all)."""
    experiment_dir = Path(experiment_dir)
    check_storage_trusted(experiment_dir)  # before anything of it is read: Tuner.restore unpickles it
    files = [(_newest(experiment_dir, pattern), kind) for pattern, kind in STATE_FILES.items()]
    for path, kind in [*files, (experiment_dir / STUDY_FILE, "sqlite")]:
        if path is None or not path.exists():
            continue
        if (problem := _problem(path, kind)) is not None:
            raise SearchStateError(
                f"sweep state file {path} is damaged ({problem}); resume cannot continue from it. "
                f"Start a new sweep, or, if an older snapshot is beside it, move this file away and resume again")
