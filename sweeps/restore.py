"""What a resumed sweep needs beyond Tune's experiment snapshot (checked against Ray 2.60):

- `KeepRestorableCheckpoints`: Tune's `CheckpointConfig(num_to_keep)` deletes a checkpoint as soon
  as a newer one is registered, while the last snapshot on storage (what `Tuner.restore` reads)
  may still point to it; a crash then loses the trial. Here a checkpoint goes only once the
  snapshot on storage points past it.
- `SchedulerState`: the snapshot leaves the scheduler out (`Tuner.restore` unpickles it from
  tuner.pkl as it was at the start), so a restored ASHA would forget its rung records.
- The search (`sweeps.study_search`): restored to match the trials Tune restores.
- `check_storage_trusted`: `Tuner.restore` unpickles tuner.pkl and the searcher snapshots, and
  unpickling runs whatever the file names, so `resume` refuses storage that another user could
  have written (docs/security.md).
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from sweeps.spec import SpecError
from sweeps.study_search import SNAPSHOT_GLOB, snapshot_trials
from sweeps.study_search import StudySearch as StudySearch  # where sweeps saved before it moved pickled it
from sweeps.timings import driver_part

#: What `Tuner.restore` unpickles from an experiment directory (every file of these patterns).
PICKLED_STATE = ("tuner.pkl", "search_gen_state-*.json", "searcher-state-*.pkl")


class UntrustedStorageError(SpecError):
    """Sweep storage that another user could have written: resuming from it could run their code."""


def _writable_by_others(path: Path) -> str | None:
    """Why another user could change `path` (owned by someone else, or group/world-writable),
    or None. A sticky world-writable folder such as /tmp is fine: others cannot replace what
    is ours in it. A missing path is None: whether state exists is checked elsewhere."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    sticky_dir = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
        who = "others" if info.st_mode & stat.S_IWOTH else "its group"
        return f"writable by {who} (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def check_storage_trusted(experiment_dir: Path) -> None:
    """Raise UntrustedStorageError (exit 2) unless the sweep's storage folder, its experiment
    folder and the pickled state `Tuner.restore` would load are owned by this user and writable
    by no one else: Ray unpickles that state, and unpickling runs any code the file names."""
    experiment_dir = Path(experiment_dir).absolute()
    pickled = [path for pattern in PICKLED_STATE for path in sorted(experiment_dir.glob(pattern))]
    for path in (experiment_dir.parent, experiment_dir, *pickled):
        if (problem := _writable_by_others(path)) is not None:
            raise UntrustedStorageError(
                f"refusing to resume from {path}: it is {problem}. Resuming unpickles the sweep's saved "
                "state, which runs any code written into it; resume only from storage only you can "
                f"write (e.g. chmod go-w {path}) — see docs/security.md")


def snapshot_checkpoints(experiment_dir: Path) -> dict[str, str] | None:
    """{trial directory name: checkpoint directory name} that the newest snapshot on storage
    restores from; None while no complete snapshot is there."""
    trials = snapshot_trials(experiment_dir)
    if trials is None:
        return None
    return {Path(t.path).name: Path(t.checkpoint.path).name for t in trials if t.checkpoint is not None}


def prune_checkpoints(experiment_dir: Path) -> None:
    """Delete every checkpoint older than the one the snapshot on storage restores its trial from."""
    kept = snapshot_checkpoints(experiment_dir) or {}
    for trial_dir, checkpoint in kept.items():
        for old in (experiment_dir / trial_dir).glob("checkpoint_*"):
            if old.name < checkpoint:  # checkpoint_000012: zero-padded, so names sort by number
                shutil.rmtree(old, ignore_errors=True)


class KeepRestorableCheckpoints(Callback):
    """Prunes old checkpoints (Tune keeps all: `num_to_keep=None`) whenever a new snapshot is on storage.

    Looks every `EVERY_S` seconds, not at every step of Tune's loop (about 25 a second): Tune
    snapshots every 10 s or more, and `prune_checkpoints` runs once more when the trials end."""

    EVERY_S = 2.0

    def __init__(self) -> None:
        self.seen: tuple[str, int] | None = None
        self.looked = 0.0  # time.monotonic() of the last look

    @driver_part("checkpoint_pruning")
    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        if not trials or now - self.looked < self.EVERY_S:
            return
        self.looked = now
        experiment_dir = Path(trials[0].path).parent  # where the sweep is now (Tune re-bases it on restore)
        snapshots = sorted(experiment_dir.glob(SNAPSHOT_GLOB))
        if not snapshots:
            return
        seen = (snapshots[-1].name, snapshots[-1].stat().st_mtime_ns)
        if seen != self.seen:
            self.seen = seen
            prune_checkpoints(experiment_dir)


class SchedulerState(Callback):
    """Saves the scheduler's state with every Tune snapshot and puts it back on restore.

    Tune saves callback states with the trials, but a crash while the snapshot is copied to
    storage can leave them from a later one: at its first step a restored ASHA forgets the rung
    records of trials Tune did not restore (a lost trial asked again is a new trial; its old
    record would count twice). `scheduler` must be the very object in the TuneConfig (tuner.pkl
    pickles both in one go, so they stay one object after `Tuner.restore`).
    """

    def __init__(self, scheduler: TrialScheduler) -> None:
        self.scheduler = scheduler
        self.restored = False

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self.restored:
            return
        self.restored = False
        known = {trial.trial_id for trial in trials}
        for bracket in getattr(self.scheduler, "_brackets", []):  # ASHA's rungs: [(milestone, {trial id: value})]
            for _, recorded in bracket._rungs:
                for trial_id in set(recorded) - known:
                    del recorded[trial_id]

    @driver_part("snapshot_of_scheduler_and_study")
    def get_state(self) -> dict[str, Any] | None:
        state = dict(vars(self.scheduler))
        return {"scheduler": state} if state else None

    def set_state(self, state: dict[str, Any]) -> None:
        vars(self.scheduler).update(state["scheduler"])
        self.restored = True
