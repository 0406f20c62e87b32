"""The sweep's searcher against a real Optuna study, driven the way Tune drives it: trials ASHA
stopped are PRUNED with their intermediate values; and a damaged search state is named before
Ray starts."""

from __future__ import annotations

import copy
import pickle
import sqlite3
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from sweeps.search import SearchStateError, SweepSearch, check_search_state

EPOCHS = 5


def space(trial: optuna.Trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


def searcher(tmp_path, **objectives) -> SweepSearch:
    objectives = objectives or {"metric": "val_acc_best", "mode": "max"}
    return SweepSearch(epochs=EPOCHS, space=space, sampler=optuna.samplers.RandomSampler(seed=0),
                       study_name="s", storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}"),
                       **objectives)


def run(search: SweepSearch, trial_id: str, values: list[float], stopped: bool) -> None:
    """As TuneController does: every result but a stopping one goes to on_trial_result; the last
    one (done) to on_trial_complete."""
    search.suggest(trial_id)
    results = [{"val_acc_best": v, "cost_params": 100.0, "training_iteration": i}
               for i, v in enumerate(values, start=1)]
    for result in results[:-1] if stopped else results:
        search.on_trial_result(trial_id, result)
    search.on_trial_complete(trial_id, result=results[-1])


def study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")


def test_a_trial_stopped_early_is_pruned_with_its_intermediate_values(tmp_path) -> None:
    search = searcher(tmp_path)
    run(search, "stopped", [0.5, 0.744], stopped=True)  # ASHA stopped it after 2 of 5 epochs
    run(search, "full", [0.5, 0.8, 0.9, 0.95, 0.967], stopped=True)  # ASHA stops every trial at max_t
    search.suggest("failed")
    search.on_trial_complete("failed", error=True)
    stopped, full, failed = study(tmp_path).trials
    assert stopped.state == TrialState.PRUNED
    assert stopped.intermediate_values == {1: 0.5, 2: 0.744}
    assert stopped.value == 0.744  # Optuna's rule: a pruned trial's value is its last intermediate one
    assert full.state == TrialState.COMPLETE and full.value == 0.967
    assert full.intermediate_values == {1: 0.5, 2: 0.8, 3: 0.9, 4: 0.95, 5: 0.967}
    assert failed.state == TrialState.FAIL


def test_tpe_ranks_a_pruned_trial_below_completed_ones(tmp_path) -> None:
    """What the state is for: TPE splits COMPLETE trials first, PRUNED ones only after them."""
    from optuna.samplers._tpe.sampler import _split_trials

    search = searcher(tmp_path)
    run(search, "a", [0.9, 0.99], stopped=True)  # a high partial value...
    run(search, "b", [0.5, 0.6, 0.7, 0.8, 0.9], stopped=False)
    s = study(tmp_path)
    below, _ = _split_trials(s, s.trials, n_below=1)
    assert [t.number for t in below] == [1]  # ...does not outrank a finished trial


def test_multi_objective_trials_are_pruned_without_values(tmp_path) -> None:
    search = searcher(tmp_path, metric=["val_acc_best", "cost_params"], mode=["max", "min"])
    run(search, "stopped", [0.5, 0.7], stopped=True)
    run(search, "full", [0.5, 0.6, 0.7, 0.8, 0.9], stopped=False)
    stopped, full = study(tmp_path).trials
    assert stopped.state == TrialState.PRUNED and stopped.values is None
    assert stopped.intermediate_values == {}  # Optuna has none for multi-objective studies
    assert full.state == TrialState.COMPLETE and full.values == [0.9, 100.0]


def test_the_searcher_survives_tunes_pickle_round_trip(tmp_path) -> None:
    search = searcher(tmp_path)
    run(search, "a", [0.5], stopped=True)
    search.save(str(tmp_path / "searcher-state-x.pkl"))
    restored = searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher-state-x.pkl"))
    run(restored, "b", [0.4, 0.6], stopped=True)
    assert [t.state for t in study(tmp_path).trials] == [TrialState.PRUNED, TrialState.PRUNED]


def experiment(tmp_path) -> None:
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    (tmp_path / "search_gen_state-2026-01-01_00-00-00.json").write_bytes(pickle.dumps({"counter": 1}))  # sic
    (tmp_path / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(pickle.dumps({"_ot_trials": {}}))
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"a": 1}))
    sqlite3.connect(tmp_path / "study.db").execute("create table t (x)").connection.close()


def test_intact_search_state_passes(tmp_path) -> None:
    experiment(tmp_path)
    check_search_state(tmp_path)
    check_search_state(tmp_path / "nothing-here")  # absent state is Tuner.can_restore's to report


@pytest.mark.parametrize("damage", ["truncated_searcher", "garbage_searcher", "json", "search_gen", "tuner", "study"])
def test_damaged_search_state_is_named(tmp_path, damage) -> None:
    experiment(tmp_path)
    searcher_file = tmp_path / "searcher-state-2026-01-01_00-00-00.pkl"
    target = {"truncated_searcher": searcher_file, "garbage_searcher": searcher_file,
              "json": tmp_path / "experiment_state-2026-01-01_00-00-00.json", "tuner": tmp_path / "tuner.pkl",
              "search_gen": tmp_path / "search_gen_state-2026-01-01_00-00-00.json",
              "study": tmp_path / "study.db"}[damage]
    data = target.read_bytes()
    target.write_bytes(b"\x00garbage\x13" * 200 if damage in ("garbage_searcher", "study") else data[: len(data) // 2])
    with pytest.raises(SearchStateError, match=target.name):
        check_search_state(tmp_path)


def test_a_study_a_killed_driver_left_mid_write_is_recovered_not_called_damaged(tmp_path) -> None:
    """SIGKILL during a study write leaves a hot journal; opened read-only, SQLite refuses the file
    ("attempt to write a readonly database"), where a writer rolls the journal back (its crash recovery)."""
    experiment(tmp_path)
    study_db = tmp_path / "study.db"
    with sqlite3.connect(study_db) as db:
        db.executemany("insert into t values (?)", [(bytes(500),)] * 2000)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, time\n"
        f"db = sqlite3.connect({str(study_db)!r}, isolation_level=None)\n"
        "db.execute('pragma cache_size=1'); db.execute('begin'); db.execute('update t set x = randomblob(500)')\n"
        "print('writing', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    assert (tmp_path / "study.db-journal").exists()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # what the read-only check used to meet
        sqlite3.connect(f"file:{study_db}?mode=ro", uri=True).execute("pragma quick_check").fetchone()
    check_search_state(tmp_path)
    assert sqlite3.connect(study_db).execute("select count(*) from t").fetchone() == (2000,)  # rolled back


def test_only_the_newest_snapshot_counts(tmp_path) -> None:
    """Tune restores from the newest file of each kind; an older damaged one is not in the way."""
    experiment(tmp_path)
    (tmp_path / "searcher-state-2025-01-01_00-00-00.pkl").write_bytes(b"\x80\x05broken")
    check_search_state(tmp_path)
    (tmp_path / "searcher-state-2027-01-01_00-00-00.pkl").write_bytes(b"\x80\x05broken")
    with pytest.raises(SearchStateError, match="2027"):
        check_search_state(tmp_path)


def test_resume_refuses_a_damaged_search_state_before_ray_starts(tmp_path) -> None:
    """`kdsweep resume` checks this in `resumable` (no Ray): one message naming the file."""
    import yaml

    from sweeps import tags
    from sweeps.runner import SPEC_FILE, resumable
    from sweeps.spec import SpecError, parse_spec
    from sweeps.tracking import Tracker
    from tests.conftest import BASE_SPEC

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_sweep(tracker.experiment_id("x"), "cut", {tags.STORAGE: str(tmp_path / "storage")})
    experiment_dir = tmp_path / "storage" / "cut"
    experiment_dir.mkdir(parents=True)
    experiment(experiment_dir)
    (experiment_dir / SPEC_FILE).write_text(yaml.safe_dump(parse_spec(copy.deepcopy(BASE_SPEC)).model_dump(mode="json")))
    assert resumable("cut", tracker).name == "cut"
    searcher_file = experiment_dir / "searcher-state-2026-01-01_00-00-00.pkl"
    searcher_file.write_bytes(searcher_file.read_bytes()[:10])
    with pytest.raises(SpecError, match=f"{searcher_file.name} is damaged"):
        resumable("cut", tracker)
