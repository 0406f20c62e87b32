"""Child runs in MLflow (sweeps/tracking.py): found by their key, reopened whole after a crash."""

from __future__ import annotations

import time

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from sweeps import tags
from sweeps.child_runs import TrackedRun
from sweeps.tracking import Tracker


def test_a_run_created_before_a_crash_gets_its_params_when_reopened(tmp_path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracker.experiment_id("tracking")
    parent = tracker.start_sweep(experiment, "s", {})
    # What a process killed between creating its run and logging the params leaves behind.
    orphan = tracker.client.create_run(experiment, tags={MLFLOW_PARENT_RUN_ID: parent, tags.ROLE: "trial",
                                                         tags.TRIAL_ID: "t1"}).info.run_id
    tracker.client.set_terminated(orphan, "KILLED")
    other = tracker.open_child(parent, "trial", tags.TRIAL_ID, "t2", "trial-t2", {"recipe.lr": 0.2}, {})
    params = {"recipe.lr": 0.1, "method.T": 4.0}
    assert tracker.open_child(parent, "trial", tags.TRIAL_ID, "t1", "trial-t1", params, {}) == orphan
    run = tracker.client.get_run(orphan)
    assert run.info.status == "RUNNING" and run.data.params == {"recipe.lr": "0.1", "method.T": "4.0"}
    # reopened again (a second resume): nothing logged twice, nothing refused
    assert tracker.open_child(parent, "trial", tags.TRIAL_ID, "t1", "trial-t1", params, {}) == orphan
    assert tracker.child_by_key(parent, "trial", tags.TRIAL_ID, "t2").info.run_id == other
    assert tracker.child_by_key(parent, "trial", tags.TRIAL_ID, "t3") is None


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))


def _trial_run_id(tmp_path) -> tuple[Tracker, str]:
    """A store with a sweep and one open trial run: (its tracker, the trial run's id)."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    parent = tracker.start_sweep(tracker.experiment_id("tracking"), "s", {})
    return tracker, tracker.open_child(parent, "trial", tags.TRIAL_ID, "t1", "trial-t1", {}, {})


def test_epochs_after_the_first_are_held_until_write_every_passes_or_a_flush(tmp_path) -> None:
    tracker, run_id = _trial_run_id(tmp_path)
    held = TrackedRun(tracker, run_id, write_every=3600)
    for epoch in (1, 2, 3):
        held.log_epoch(epoch, {"val_acc": epoch / 10, "train_loss": 1 / epoch})
        time.sleep(0.01)  # epochs end at distinct milliseconds
    assert _history(tracker, run_id, "val_acc") == [(1, 0.1)]  # the first at once, the rest held
    held.flush()
    assert _history(tracker, run_id, "val_acc") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert _history(tracker, run_id, "train_loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    stamps = [m.timestamp for m in sorted(tracker.client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)]
    assert stamps == sorted(set(stamps))  # each epoch stamped when it was logged, not when written
    # A retried trial reopens the run: the epochs it holds are skipped, later ones written at once.
    again = TrackedRun(tracker, run_id, write_every=0)
    assert again.epochs_done == 3
    for epoch in (2, 3, 4):
        again.log_epoch(epoch, {"val_acc": epoch, "train_loss": 0.0})
    assert _history(tracker, run_id, "val_acc") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 4.0)]


def test_a_batch_over_mlflows_limit_is_split(tmp_path) -> None:
    tracker, run_id = _trial_run_id(tmp_path)
    run = TrackedRun(tracker, run_id, write_every=3600)
    for epoch in range(1, 401):  # 400 epochs x 3 metrics: 1200, over MLflow's 1000 per log_batch
        run.log_epoch(epoch, {"a": epoch, "b": -epoch, "c": 0.5})
    run.flush()
    assert _history(tracker, run_id, "a") == [(e, float(e)) for e in range(1, 401)]
    assert len(tracker.client.get_metric_history(run_id, "c")) == 400
