"""Child runs in MLflow (sweeps/tracking.py): found by their key, reopened whole after a crash."""

from __future__ import annotations

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from sweeps import tags
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
