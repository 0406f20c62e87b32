"""What a resume restores beyond Tune's snapshot, without a cluster: the searcher's study (bound to
the sweep's current folder, results the study already has not told twice, trials a dead driver
asked failed and their initial points asked again) and the scheduler's rung records."""

from __future__ import annotations

import pickle

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from sweeps.restore import SchedulerState, StudySearch


def _search(url: str) -> StudySearch:
    search = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)}, metric="m", mode="max",
                          study_name="s", storage=optuna.storages.RDBStorage(url),
                          points_to_evaluate=[{"x": 0.1}, {"x": 0.2}, {"x": 0.3}])
    return StudySearch(search, url)


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
    restored.reopen(f"sqlite:///{new}")
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_result("t1", {"m": 0.6, "training_iteration": 2})  # t1 re-run: no UpdateFinishedTrialError
    restored.on_trial_complete("t1", {"m": 0.6, "training_iteration": 2})
    assert restored.suggest("t3") == {"x": 0.3}  # the next initial point
    assert restored.suggest("t4") == {"x": 0.2}  # t2's initial point, asked again
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{new}")
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 1  # t2's orphan; t1 once
    assert old.stat().st_mtime_ns == stamp  # the old folder's study was never opened


def test_the_scheduler_state_is_saved_with_the_snapshot() -> None:
    scheduler = ASHAScheduler(metric="m", mode="max", max_t=4, grace_period=1)
    # tuner.pkl pickles the TuneConfig and the callbacks in one go: one scheduler after Tuner.restore
    config, callback = pickle.loads(pickle.dumps((tune.TuneConfig(scheduler=scheduler), SchedulerState(scheduler))))
    assert callback.scheduler is config.scheduler
    scheduler._brackets[0]._rungs[-1][1]["t1"] = 0.9  # recorded after tuner.pkl was written
    snapshot = pickle.dumps(SchedulerState(scheduler).get_state())
    callback.set_state(pickle.loads(snapshot))
    assert config.scheduler._brackets[0]._rungs[-1][1] == {"t1": 0.9}
