"""What a resume restores beyond Tune's snapshot, without a cluster: the searcher's study (bound to
the sweep's current folder, results the study already has not told twice, study trials asked for
trials Tune lost run first, the search matched to the trials Tune restores) and the scheduler's
rung records."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import optuna
import pyarrow.fs
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.execution.tune_controller import _get_max_pending_trials
from ray.tune.experiment import Experiment, Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from sweeps.callbacks import CsvResults, JsonResults
from sweeps.restore import SchedulerState
from sweeps.study_search import StudySearch, SweepGenerator


def _search(url: str, max_concurrent: int | None = None) -> StudySearch:
    search = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)}, metric="m", mode="max",
                          study_name="s", storage=optuna.storages.RDBStorage(url),
                          points_to_evaluate=[{"x": 0.1}, {"x": 0.2}, {"x": 0.3}])
    return StudySearch(search, url, max_concurrent)


def _trial(trial_id: str, status: str) -> Trial:
    trial = Trial("train_trial", trial_id=trial_id, stub=True)
    trial.status, trial.placement_group_factory = status, PlacementGroupFactory([{"CPU": 1}])
    return trial


def _snapshot(directory: Path, trials: list[Trial]) -> None:
    """An experiment snapshot as Tune writes it: the trials' JSON states."""
    state = {"trial_data": [_trial(trial.trial_id, trial.status).get_json_state() for trial in trials]}
    (directory / "experiment_state-2026-12-01_00-00-00.json").write_text(json.dumps(state))


def test_a_restored_search_uses_the_current_study_and_is_idempotent(tmp_path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    search = _search(f"sqlite:///{old}")
    search.suggest("t1")
    search.on_trial_result("t1", {"m": 0.5, "training_iteration": 1})
    search.save(str(tmp_path / "state.pkl"))  # the snapshot: t1 running
    search.suggest("t2")  # asked after the snapshot, then the driver dies
    search.on_trial_complete("t1", {"m": 0.6, "training_iteration": 2})  # told after it
    pickled = pickle.dumps(search)  # what tuner.pkl holds
    assert str(old).encode() not in pickled
    new.write_bytes(old.read_bytes())
    stamp = old.stat().st_mtime_ns

    restored = pickle.loads(pickled)
    reruns = []
    restored.reopen(f"sqlite:///{new}", on_rerun=lambda old, new: reruns.append((old, new)))
    restored.restore(str(tmp_path / "state.pkl"))
    restored.reconcile([_trial("t1", Trial.RUNNING)])  # what Tune restored: t1, to run again
    restored.on_trial_result("t1", {"m": 0.6, "training_iteration": 2})  # t1 re-run: no UpdateFinishedTrialError
    restored.on_trial_complete("t1", {"m": 0.6, "training_iteration": 2})
    assert restored.suggest("t3") == {"x": 0.2}  # t2's study trial, lost with the driver, runs first
    assert restored.suggest("t4") == {"x": 0.3}  # then the next initial point
    assert reruns == [("t2", "t3")]  # the runner moves t2's MLflow run over to t3
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{new}")
    assert [(t.state.name, t.user_attrs["tune_trial_id"]) for t in study.trials] == [
        ("COMPLETE", "t1"), ("RUNNING", "t3"), ("RUNNING", "t4")]  # t1 told once
    assert old.stat().st_mtime_ns == stamp  # the old folder's study was never opened


def test_a_search_snapshot_newer_than_the_trials_is_matched_to_them(tmp_path) -> None:
    """The crash CI met: the searcher's and the search generator's files on storage were a
    snapshot ahead of the trials' file (t2 asked, then the copy to storage was cut). Tune restores
    t1 only; t2's study trial goes to the next trial, and the trial count is Tune's."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    at_start = pickle.dumps(SweepGenerator(_search(url, max_concurrent=1)))  # what tuner.pkl holds
    generator = pickle.loads(at_start)
    generator.study_search.reopen(url)
    generator.set_search_properties("m", "max", {})
    generator.add_configurations(Experiment("s", run=_train, num_samples=3, storage_path=str(tmp_path)))
    first = generator.next_trial()
    assert first.config == {"x": 0.1} and generator.next_trial() is None  # one trial at a time
    _snapshot(tmp_path, [first])  # the trials' file: t1 running
    generator.on_trial_result(first.trial_id, {"m": 0.4, "training_iteration": 1})
    generator.on_trial_complete(first.trial_id, {"m": 0.5, "training_iteration": 2})
    assert generator.next_trial().config == {"x": 0.2}
    generator.save_to_dir(str(tmp_path), "2026-12-01_00-00-00")  # the search's files: t1 ended, t2 asked

    restored = pickle.loads(at_start)
    restored.study_search.reopen(url)  # as the runner does before Tune runs
    restored.set_search_properties("m", "max", {})
    assert restored.has_checkpoint(str(tmp_path))
    restored.restore_from_dir(str(tmp_path))
    assert restored.study_search.live == {first.trial_id}  # Tune runs t1 again (RUNNING in its snapshot)
    assert restored.next_trial() is None  # one at a time: t1 first
    restored.on_trial_result(first.trial_id, {"m": 0.4, "training_iteration": 1})
    restored.on_trial_complete(first.trial_id, {"m": 0.5, "training_iteration": 2})  # the study has it already
    second = restored.next_trial()
    assert second.config == {"x": 0.2}  # t2's study trial, for a new Tune trial
    restored.on_trial_complete(second.trial_id, {"m": 0.3, "training_iteration": 2})
    third = restored.next_trial()
    assert third.config == {"x": 0.3}
    restored.on_trial_complete(third.trial_id, {"m": 0.2, "training_iteration": 2})
    assert restored.next_trial() is None and restored.is_finished()  # 3 trials, as Tune counts them
    study = optuna.load_study(study_name="s", storage=url)
    assert sorted((t.params["x"], t.state.name) for t in study.trials) == [
        (0.1, "COMPLETE"), (0.2, "COMPLETE"), (0.3, "COMPLETE")]
    assert [t.user_attrs["tune_trial_id"] for t in study.trials if t.state.name == "COMPLETE"] == [
        first.trial_id, second.trial_id, third.trial_id]


def test_tune_queues_as_many_pending_trials_as_may_run(tmp_path) -> None:
    """Tune sizes its queue of pending trials by the ConcurrencyLimiter it finds (1 without one:
    trials then start one by one, and a cluster's nodes are not all used)."""
    generator = SweepGenerator(_search(f"sqlite:///{tmp_path / 'study.db'}", max_concurrent=3))
    assert _get_max_pending_trials(generator) == 3


def test_a_trial_that_ended_after_the_snapshot_runs_again_and_is_told_once(tmp_path) -> None:
    """Tune's snapshot on storage lags up to its period (10 s or more): a trial that ended in
    between is not restored, while the study holds its end. It runs again under a new Tune trial
    with the same parameters (its MLflow run moves over: `on_rerun`); the study keeps its first end."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    at_start = pickle.dumps(SweepGenerator(_search(url)))
    generator = pickle.loads(at_start)
    generator.study_search.reopen(url)
    generator.set_search_properties("m", "max", {})
    generator.add_configurations(Experiment("s", run=_train, num_samples=2, storage_path=str(tmp_path)))
    generator.save_to_dir(str(tmp_path), "2026-12-01_00-00-00")
    _snapshot(tmp_path, [])  # the last snapshot on storage: no trial yet
    first = generator.next_trial()
    generator.on_trial_complete(first.trial_id, {"m": 0.5, "training_iteration": 2})

    restored, reruns = pickle.loads(at_start), []
    restored.study_search.reopen(url, on_rerun=lambda old, new: reruns.append((old, new)))
    restored.set_search_properties("m", "max", {})
    restored.restore_from_dir(str(tmp_path))
    again = restored.next_trial()
    assert again.config == {"x": 0.1} and reruns == [(first.trial_id, again.trial_id)]
    restored.on_trial_result(again.trial_id, {"m": 0.4, "training_iteration": 1})
    restored.on_trial_complete(again.trial_id, {"m": 0.9, "training_iteration": 2})  # not told: ended already
    assert restored.next_trial().config == {"x": 0.2} and restored.next_trial() is None  # 2 trials in all
    study = optuna.load_study(study_name="s", storage=url)
    assert [(t.params["x"], t.state.name, t.value) for t in study.trials if t.state.name != "WAITING"] == [
        (0.1, "COMPLETE", 0.5), (0.2, "RUNNING", None)]


def _train(config: dict) -> None:
    pass


def test_the_scheduler_state_is_saved_with_the_snapshot() -> None:
    scheduler = ASHAScheduler(metric="m", mode="max", max_t=4, grace_period=1)
    # tuner.pkl pickles the TuneConfig and the callbacks in one go: one scheduler after Tuner.restore
    config, callback = pickle.loads(pickle.dumps((tune.TuneConfig(scheduler=scheduler), SchedulerState(scheduler))))
    assert callback.scheduler is config.scheduler
    scheduler._brackets[0]._rungs[-1][1]["t1"] = 0.9  # recorded after tuner.pkl was written
    snapshot = pickle.dumps(SchedulerState(scheduler).get_state())
    callback.set_state(pickle.loads(snapshot))
    assert config.scheduler._brackets[0]._rungs[-1][1] == {"t1": 0.9}


def test_a_restarted_trial_keeps_the_results_the_driver_logged(tmp_path) -> None:
    """A trial restarted from its checkpoint (its node died) while storage's copy of its result
    file lags the driver's: the driver's copy stays. With none on the driver (a resumed sweep on
    a new driver), storage's copy is taken, as Tune does."""
    driver, storage = tmp_path / "driver", tmp_path / "storage"
    driver.mkdir()
    storage.mkdir()
    (storage / "result.json").write_text("")  # the snapshot was copied before the first result
    trial = SimpleNamespace(local_path=str(driver), checkpoint=object(), storage=SimpleNamespace(
        trial_fs_path=str(storage), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    (driver / "result.json").write_text('{"training_iteration": 1}\n{"training_iteration": 2}\n')
    JsonResults()._restore_from_remote("result.json", trial)
    assert (driver / "result.json").read_text().count("training_iteration") == 2
    (storage / "progress.csv").write_text("training_iteration\n1\n")
    CsvResults()._restore_from_remote("progress.csv", trial)
    assert (driver / "progress.csv").read_text() == "training_iteration\n1\n"


def test_a_restored_scheduler_forgets_trials_tune_did_not_restore() -> None:
    scheduler = ASHAScheduler(metric="m", mode="max", max_t=4, grace_period=1)
    scheduler._brackets[0]._rungs[-1][1].update({"t1": 0.9, "lost": 0.1})  # the rung state of a later snapshot
    state = SchedulerState(scheduler)
    state.set_state(pickle.loads(pickle.dumps(state.get_state())))
    state.on_step_begin(0, [_trial("t1", Trial.TERMINATED)])
    assert scheduler._brackets[0]._rungs[-1][1] == {"t1": 0.9}
