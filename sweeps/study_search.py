"""The search as Tune runs it, restored to match the trials Tune restores (checked against Ray 2.60).

Tune writes a snapshot's files (trials, search generator, searcher, callbacks) on the driver and
copies them to storage in the background, file by file: after a crash they may come from
different snapshots, and the newest trials file (`snapshot_trials`, what `Tuner.restore` reads)
may miss trials that started or even ended after it, while the Optuna study, written at once,
holds them.

- `StudySearch` wraps `sweeps.search.SweepSearch` (an OptunaSearch). OptunaSearch pickles its
  study storage (an absolute path) into its snapshot; here the snapshot holds no study and
  `reopen` binds the search to the study where the sweep is now. Each study trial records its
  Tune trial id (`TUNE_TRIAL_ATTR`), so `reconcile` rebuilds the searcher's map from the study and
  gives the study trials of lost Tune trials to the next trials, with their parameters. It limits
  concurrent trials itself: Tune's ConcurrencyLimiter saves its own set of live trials, which a
  crash can leave naming a trial that never ends (and then waits for it forever).
- `SweepGenerator` is Tune's SearchGenerator over a StudySearch: restored, its trial count is
  that of the restored trials, and the search is reconciled with them.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from sweeps.timings import driver_part

SNAPSHOT_GLOB = "experiment_state-*.json"  # Tune's snapshot; restore reads the newest name
TUNE_TRIAL_ATTR = "tune_trial_id"  # an Optuna trial's user attribute: the Tune trial it was asked for


def snapshot_trials(experiment_dir: Path) -> list[Trial] | None:
    """The trials (stubs: ids, statuses, checkpoints) of the newest snapshot in `experiment_dir`,
    the one `Tuner.restore` reads; None while no complete snapshot is there."""
    snapshots = sorted(Path(experiment_dir).glob(SNAPSHOT_GLOB))
    if not snapshots:
        return None
    try:
        state = json.loads(snapshots[-1].read_text())
    except (OSError, ValueError):  # being copied to storage right now: next time
        return None
    trials = []
    for trial_state, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_state, stub=True)
        trial.restore_run_metadata(run_metadata)
        trials.append(trial)
    return trials


class StudySearch(Searcher):
    """An OptunaSearch bound to the study at `study_url`, running at most `max_concurrent`
    trials at a time (None: no limit), restorable to match Tune's trials (`reconcile`).

    `on_rerun(old, new)` (not saved) is called when the study trial of Tune trial `old`, lost in
    a crash, is given to the new Tune trial `new` (the runner moves the MLflow run over to it)."""

    UNSAVED = ("_ot_study", "_storage")

    def __init__(self, search: OptunaSearch, study_url: str, max_concurrent: int | None = None,
                 on_rerun: Callable[[str, str], None] | None = None) -> None:
        super().__init__(metric=search.metric, mode=search.mode)
        # Not named `searcher`: Tune would then save and restore the inner searcher directly.
        self.search = search
        self.study_url = study_url
        self.max_concurrent = max_concurrent
        self.on_rerun = on_rerun
        self.live: set[str] = set()  # Tune trials asked for and not ended
        self.lost: list[FrozenTrial] = []  # study trials of trials Tune lost: run again first

    def reopen(self, study_url: str, on_rerun: Callable[[str, str], None] | None = None) -> None:
        """Use the study at `study_url` (the sweep's current storage) from now on."""
        self.study_url, self.on_rerun = study_url, on_rerun
        self._bind(self._state(self.search))

    def reconcile(self, trials: list[Trial]) -> None:
        """Match the search to Tune's restored `trials`: each is mapped to the study trial asked
        for it, and finished study trials are not told twice. A study trial asked for a trial
        Tune did not restore (it ended or started after the snapshot Tune restores) is `lost`:
        the next trials Tune asks for take these first, with their parameters, and train them
        again (a finished one is not told again), as a straight run had them."""
        study = self.search._ot_study
        frozen = study.get_trials(deepcopy=False)
        by_tune_id = {t.user_attrs[TUNE_TRIAL_ATTR]: t._trial_id for t in frozen if TUNE_TRIAL_ATTR in t.user_attrs}
        saved = self.search._ot_trials  # a sweep saved before the attribute: the searcher's own map
        mapped = {trial.trial_id: optuna.trial.Trial(study, by_tune_id[trial.trial_id])
                  if trial.trial_id in by_tune_id else saved[trial.trial_id]
                  for trial in trials if trial.trial_id in by_tune_id or trial.trial_id in saved}
        numbers = {trial.number for trial in mapped.values()}
        finished = {t.number for t in frozen if t.state.is_finished()}
        self.search._ot_trials = mapped
        self.search._completed_trials = {tid for tid, t in mapped.items() if t.number in finished}
        self.live = {trial.trial_id for trial in trials if trial.status != Trial.TERMINATED}
        self.lost = [t for t in frozen if t.number not in numbers
                     and (t.state == TrialState.RUNNING or (TUNE_TRIAL_ATTR in t.user_attrs and t.state.is_finished()))]

    def _state(self, search: OptunaSearch) -> dict[str, Any]:
        """The inner searcher's state without its study: trials by number."""
        state = {k: v for k, v in vars(search).items() if k not in self.UNSAVED}
        state["_ot_trials"] = {tid: t if isinstance(t, int) else t.number for tid, t in search._ot_trials.items()}
        return state

    def _bind(self, state: dict[str, Any]) -> None:
        storage = optuna.storages.RDBStorage(self.study_url)
        study = optuna.load_study(study_name=state["_study_name"], storage=storage, sampler=state["_sampler"])
        study_id = storage.get_study_id_from_name(state["_study_name"])
        trials = {tid: optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))
                  for tid, number in state["_ot_trials"].items()}
        vars(self.search).update({**state, "_ot_trials": trials, "_ot_study": study, "_storage": storage})

    def __getstate__(self) -> dict[str, Any]:  # tuner.pkl
        return {**vars(self), "search": None, "study_url": None, "on_rerun": None, "lost": [],
                "_search_state": self._state(self.search), "_search_type": type(self.search)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        search_state, search_type = state.pop("_search_state"), state.pop("_search_type")
        vars(self).update({"max_concurrent": None, "on_rerun": None, "live": set(), "lost": [], **state},
                          search=search_type.__new__(search_type))
        vars(self.search).update(search_state)  # unbound until `reopen`

    @driver_part("snapshot_of_scheduler_and_study")
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self._state(self.search), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self._bind(pickle.load(file))

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if not self.search.set_search_properties(metric, mode, config, **spec):
            return False
        self._metric, self._mode = self.search.metric, self.search.mode
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True  # a ConcurrencyLimiter around it leaves the limit to it

    @driver_part("optuna")
    def suggest(self, trial_id: str) -> dict | str | None:
        if self.max_concurrent is not None and len(self.live) >= self.max_concurrent:
            return None  # Tune asks again once a trial ended
        rerun = self.lost.pop(0) if self.lost else None
        told = rerun is not None and rerun.state.is_finished()  # its end is in the study already
        if rerun is not None:  # OptunaSearch answers with the parameters of the study trial it is given
            self.search._ot_trials[trial_id] = optuna.trial.Trial(self.search._ot_study, rerun._trial_id)
        if told:
            self.search._completed_trials.add(trial_id)
        config = self.search.suggest(trial_id)
        if not isinstance(config, dict):
            return config
        self.live.add(trial_id)
        if not told:  # a finished study trial takes no attribute
            self.search._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        if rerun is not None and TUNE_TRIAL_ATTR in rerun.user_attrs and self.on_rerun is not None:
            self.on_rerun(rerun.user_attrs[TUNE_TRIAL_ATTR], trial_id)
        return config

    @driver_part("optuna")
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.search._ot_trials:  # restored, but the study never asked for it
            return
        try:
            self.search.on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told before a crash that the restored snapshot had not seen

    @driver_part("optuna")
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        if trial_id in self.search._ot_trials:
            self.search.on_trial_complete(trial_id, result, error)


class SweepGenerator(SearchGenerator):
    """Tune's SearchGenerator over a StudySearch, restored to match the trials Tune restores
    (module docstring): its trial count is theirs, and the search is reconciled with them.

    A ConcurrencyLimiter stands between them only so that Tune queues as many pending trials as
    may run at once (Tune looks for one); it leaves the limiting to StudySearch."""

    def __init__(self, search: StudySearch) -> None:
        self.study_search = search
        super().__init__(ConcurrencyLimiter(search, search.max_concurrent) if search.max_concurrent else search)

    def __getstate__(self) -> dict[str, Any]:  # tuner.pkl; Tune's argument parser does not pickle
        return {k: v for k, v in vars(self).items() if k != "_parser"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        SearchGenerator.__init__(self, state["searcher"])
        vars(self).update(state)

    def has_checkpoint(self, dirpath: str) -> bool:
        # Restore whenever Tune restores trials, even with no search state saved yet.
        return super().has_checkpoint(dirpath) or snapshot_trials(Path(dirpath)) is not None

    def restore_from_dir(self, dirpath: str) -> None:
        if super().has_checkpoint(dirpath):
            super().restore_from_dir(dirpath)
        trials = snapshot_trials(Path(dirpath)) or []
        self._counter, self._finished = len(trials), False  # the searcher says FINISHED again if it is
        self.study_search.reconcile(trials)
