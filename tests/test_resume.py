"""Kill the driver (SIGKILL) mid-sweep, resume it, and check Tune, Optuna and MLflow agree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import yaml

from sweeps import tags
from sweeps.tracking import Tracker

TRIALS, EPOCHS = 4, 4


def test_resume_after_the_driver_is_killed(tmp_path) -> None:
    spec = {
        "name": "resume",
        "teacher": {"arch": {"name": "convnet", "args": {"width": 8, "depth": 1}},
                    "recipe": {"name": "digits", "epochs": 2}},
        "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
        "recipe": {"name": "digits", "epochs": EPOCHS},
        "search": {"method.T": {"low": 1.0, "high": 8.0}, "recipe.lr": {"low": 0.02, "high": 0.1}},
        "sweep": {"num_trials": TRIALS, "max_concurrent": 2, "scheduler": {"type": "none"},
                  "sampler": {"type": "tpe", "seed": 3, "n_startup_trials": 3}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "sweeps.cli"]
    driver = subprocess.Popen([*command, "run", "spec.yaml", "--name", "resume"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        deadline = time.monotonic() + 600
        while True:  # wait until some trials are done and others are running
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished in time"
            sweeps = tracker.find_sweeps("resume") if (tmp_path / "mlflow.db").exists() else []
            trials = tracker.children(sweeps[0].info.run_id, "trial") if sweeps else []
            finished = [r for r in trials if r.info.status == "FINISHED"]
            if len(finished) >= 2 and any(r.info.status == "RUNNING" for r in trials):
                break
            time.sleep(0.5)
        os.kill(driver.pid, signal.SIGKILL)  # a real crash: no handler runs
        driver.wait(timeout=60)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # anything of the old driver's that survived
        except ProcessLookupError:
            pass
    parent_id = sweeps[0].info.run_id
    assert tracker.client.get_run(parent_id).info.status == "RUNNING"  # the crash closed nothing
    def history(run_id: str) -> list[tuple[int, int, float]]:
        return [(m.step, m.timestamp, m.value) for m in tracker.client.get_metric_history(run_id, "val_acc")]

    # A trial that finished just before the crash may not be in Tune's last snapshot: it is then
    # restored from its final checkpoint and reopened, but trains no epoch again.
    before = {r.data.tags[tags.TRIAL_ID]: history(r.info.run_id)
              for r in tracker.children(parent_id, "trial") if r.info.status == "FINISHED"}

    done = subprocess.run([*command, "resume", "resume"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    parent = tracker.client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and len(tracker.find_sweeps("resume")) == 1
    trials = tracker.children(parent_id, "trial")
    ids = Counter(r.data.tags[tags.TRIAL_ID] for r in trials)
    assert max(ids.values()) == 1  # no duplicate run for any trial
    live = [r for r in trials if "orphaned" not in r.data.tags.get(tags.END_REASON, "")]
    assert len(live) == TRIALS and all(r.info.status == "FINISHED" for r in live)
    assert all(r.info.status != "RUNNING" for r in tracker.children(parent_id))
    for run in trials:  # no metric step logged twice
        steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == sorted(set(steps))
    after = {r.data.tags[tags.TRIAL_ID]: history(r.info.run_id) for r in trials}
    for trial_id, record in before.items():  # completed trials were not re-run: not one epoch again
        assert after[trial_id] == record and [step for step, _, _ in record] == list(range(1, EPOCHS + 1))
    assert parent.data.metrics["trials_finished"] == TRIALS
    study = optuna.load_study(study_name="resume",
                              storage=f"sqlite:///{tmp_path / 'kdsweep_storage/resume/study.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == TRIALS
