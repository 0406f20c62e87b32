"""What a resumed sweep needs beyond Tune's experiment snapshot (checked against Ray 2.60):

- `KeepRestorableCheckpoints`: Tune's `CheckpointConfig(num_to_keep)` deletes a checkpoint as soon
  as a newer one is registered, while the last snapshot on storage (what `Tuner.restore` reads)
  may still point to it; a crash then loses the trial. Here a checkpoint goes only once the
  snapshot on storage points past it.
- `SchedulerState`: the snapshot leaves the scheduler out (`Tuner.restore` unpickles it from
  tuner.pkl as it was at the start), so a restored ASHA would forget its rung records.
- `StudySearch`: OptunaSearch pickles its study storage (an absolute path) into the snapshot, and
  the study is written at once while the snapshot lags: after a crash the study may already hold
  results the restored searcher does not know, and Optuna refuses them a second time.
- `check_storage_trusted`: `Tuner.restore` unpickles tuner.pkl and the searcher snapshots, and
  unpickling runs whatever the file names, so `resume` refuses storage that another user could
  have written (docs/security.md).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.spec import SpecError
from sweeps.timings import driver_part

SNAPSHOT_GLOB = "experiment_state-*.json"  # Tune's snapshot; restore reads the newest name
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
    snapshots = sorted(experiment_dir.glob(SNAPSHOT_GLOB))
    if not snapshots:
        return None
    try:
        state = json.loads(snapshots[-1].read_text())
    except (OSError, ValueError):  # being copied to storage right now: next time
        return None
    kept = {}
    for trial_state, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_state, stub=True)
        trial.restore_run_metadata(run_metadata)
        if trial.checkpoint is not None:
            kept[Path(trial.path).name] = Path(trial.checkpoint.path).name
    return kept


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

    Tune saves callback states in the same snapshot as the trials, so the rung records always
    match the restored trials. `scheduler` must be the very object in the TuneConfig (tuner.pkl
    pickles both in one go, so they stay one object after `Tuner.restore`).
    """

    def __init__(self, scheduler: TrialScheduler) -> None:
        self.scheduler = scheduler

    @driver_part("snapshot_of_scheduler_and_study")
    def get_state(self) -> dict[str, Any] | None:
        state = dict(vars(self.scheduler))
        return {"scheduler": state} if state else None

    def set_state(self, state: dict[str, Any]) -> None:
        vars(self.scheduler).update(state["scheduler"])


class StudySearch(Searcher):
    """An OptunaSearch whose saved state holds no study: `reopen` binds it to the study where the
    sweep is now. Results of trials the study already finished are not told again."""

    UNSAVED = ("_ot_study", "_storage")

    def __init__(self, search: OptunaSearch, study_url: str) -> None:
        super().__init__(metric=search.metric, mode=search.mode)
        # Not named `searcher`: Tune would then save and restore the inner searcher directly.
        self.search = search
        self.study_url = study_url

    def reopen(self, study_url: str) -> None:
        """Use the study at `study_url` (the sweep's current storage) from now on."""
        self.study_url = study_url
        self._bind(self._state(self.search))

    def _state(self, search: OptunaSearch) -> dict[str, Any]:
        """The inner searcher's state without its study: trials by number."""
        state = {k: v for k, v in vars(search).items() if k not in self.UNSAVED}
        state["_ot_trials"] = {tid: t if isinstance(t, int) else t.number for tid, t in search._ot_trials.items()}
        return state

    def _bind(self, state: dict[str, Any], fail_orphans: bool = False) -> None:
        storage = optuna.storages.RDBStorage(self.study_url)
        study = optuna.load_study(study_name=state["_study_name"], storage=storage, sampler=state["_sampler"])
        study_id = storage.get_study_id_from_name(state["_study_name"])

        def trial_id(number: int) -> int:
            return storage.get_trial_id_from_study_id_trial_number(study_id, number)

        trials = {tid: optuna.trial.Trial(study, trial_id(number)) for tid, number in state["_ot_trials"].items()}
        vars(self.search).update({**state, "_ot_trials": trials, "_ot_study": study, "_storage": storage})
        if fail_orphans:  # asked after the snapshot, by a driver that died: no Tune trial will ever end them
            known = set(state["_ot_trials"].values())
            for orphan in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if orphan.number not in known:
                    storage.set_trial_state_values(trial_id(orphan.number), optuna.trial.TrialState.FAIL)
                    if "fixed_params" in orphan.system_attrs:  # an initial point it had taken: still to run
                        study.enqueue_trial(orphan.system_attrs["fixed_params"])

    def __getstate__(self) -> dict[str, Any]:  # tuner.pkl
        return {**vars(self), "search": None, "study_url": None, "_search_state": self._state(self.search),
                "_search_type": type(self.search)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        search_state, search_type = state.pop("_search_state"), state.pop("_search_type")
        vars(self).update(state, search=search_type.__new__(search_type))
        vars(self.search).update(search_state)  # unbound until `reopen`

    @driver_part("snapshot_of_scheduler_and_study")
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self._state(self.search), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self._bind(pickle.load(file), fail_orphans=True)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if not self.search.set_search_properties(metric, mode, config, **spec):
            return False
        self._metric, self._mode = self.search.metric, self.search.mode
        return True

    @driver_part("optuna")
    def suggest(self, trial_id: str) -> dict | None:
        return self.search.suggest(trial_id)

    @driver_part("optuna")
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            self.search.on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told before a crash that the restored snapshot had not seen

    @driver_part("optuna")
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.search.on_trial_complete(trial_id, result, error)
