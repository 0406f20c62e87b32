"""Sweep control (issue 17), end to end with real Ray, Optuna and MLflow, the CLI in subprocesses:
`sweep.warm_start`, `sweep.time_budget`, `kdsweep delete` and `kdsweep cancel` (from another
process, then `kdsweep resume`).

One workspace, a copy of the session's digits sweep `e2e` (never the shared one: a sweep here is
deleted), holds two small sweeps that reuse its teacher from the stage store:
- `warm` warm-starts from `e2e` (same search space: e2e's finished trials join its study) with a
  1 s time budget and one trial at a time, so exactly one trial starts (a trial takes longer than
  the budget); it finishes normally and is exported. Then it is deleted.
- `stopped` is cancelled by `kdsweep cancel` (from the test's process, not the driver's) while its
  first trial trains, then resumed to the end.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from typer.testing import CliRunner

import sweeps.cli.sweep
from sweeps import tags
from sweeps.cli import app
from sweeps.runner import check_new_sweep
from sweeps.spec import SpecError, parse_spec
from sweeps.study_search import TUNE_TRIAL_ATTR
from sweeps.tracking import Tracker
from sweeps.warm_start import ORIGIN_ATTR
from tests.sweep_cli import MODEL, NAME, SPEC, kdsweep, run_spec
from tests.test_bad_input import copy_workspace
from tests.test_interrupts import descendants, kill_and_reap

TRIALS = 3


def spec(**sweep: Any) -> dict[str, Any]:
    """The session sweep's spec (same teacher, same search space), 2 epochs, one trial at a time,
    no scheduler, no confirmation, with `sweep` settings added."""
    result = copy.deepcopy(SPEC)
    result["recipe"]["epochs"] = 2
    result["sweep"] = {"num_trials": TRIALS, "max_concurrent": 1, "scheduler": {"type": "none"},
                       "confirm": {"top_k": 0}, "sampler": {"type": "tpe", "seed": 3, "n_startup_trials": 2},
                       **sweep}
    return result


def study(work: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'kdsweep_storage' / name / 'study.db'}")


def versions(tracker: Tracker) -> list[tuple[str, str]]:
    return sorted((v.version, v.run_id) for v in tracker.client.search_model_versions(f"name='{MODEL}'"))


def one_error_line(result: Any, expect: str) -> None:
    """Exit 2 and one `error:` line holding `expect`, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expect in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits_sweep) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("sweep_control") / "work"
    uri = copy_workspace(digits_sweep["work"], work)
    return {"work": work, "uri": uri, "tracker": Tracker(uri), "source": digits_sweep["parent"]}


@pytest.fixture(scope="module")
def warm(workspace) -> dict[str, Any]:
    """Sweep `warm` run to the end, with what the registry held before it."""
    before = versions(workspace["tracker"])
    warm_spec = spec(time_budget="1s", warm_start={"from": NAME, "top_k": 2})
    warm_spec["tracking"] = {**warm_spec["tracking"], "champion": "always"}
    return {**run_spec(workspace["work"], warm_spec, "warm"), "versions_before": before}


def test_warm_start_adds_the_earlier_trials_and_records_lineage(workspace, warm) -> None:
    parent = warm["parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tags.WARM_START_FROM] == NAME
    assert parent.data.tags[tags.WARM_START_RUN_ID] == workspace["source"].info.run_id
    assert parent.data.tags[tags.WARM_START].startswith("added")
    earlier = [t for t in study(workspace["work"], NAME).trials if t.state.name in ("COMPLETE", "PRUNED")]
    trials = study(workspace["work"], "warm").trials
    added = [t for t in trials if t.user_attrs.get(ORIGIN_ATTR) == NAME]
    # Every finished e2e trial is in the new study as it was, before any trial of its own.
    assert sorted((t.params["recipe.lr"], t.state.name, t.value) for t in added) == \
        sorted((t.params["recipe.lr"], t.state.name, t.value) for t in earlier)
    assert [t.number for t in added] == list(range(len(earlier)))
    own = [t for t in trials if ORIGIN_ATTR not in t.user_attrs]
    assert [t.state.name for t in own] == ["COMPLETE"]
    # Only its own trials name a Tune trial of this sweep (a resume reruns study trials Tune lost).
    assert all(TUNE_TRIAL_ATTR in t.user_attrs for t in earlier + own)
    assert not any(TUNE_TRIAL_ATTR in t.user_attrs for t in added)


def test_time_budget_stops_new_trials_and_the_sweep_finishes(warm) -> None:
    tracker, parent = warm["tracker"], warm["parent"]
    runs = tracker.children(parent.info.run_id, "trial")
    # One trial at a time, and the first outlasts the 1 s budget: no second trial starts.
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert parent.data.tags[tags.TIME_BUDGET] == f"spent: 1 of {TRIALS} trials started within the 1 s time budget"
    assert parent.data.params["time_budget_s"] == "1.0"
    assert tags.MODEL_URI in parent.data.tags and "baseline_test_acc" in parent.data.metrics


def test_delete_removes_the_sweep_and_frees_its_name(workspace, warm) -> None:
    tracker, work, parent = workspace["tracker"], workspace["work"], warm["parent"]
    folder = work / "kdsweep_storage" / "warm"
    client = tracker.client
    ours = [v for v in versions(tracker) if v not in warm["versions_before"]]
    assert ours and client.get_registered_model(MODEL).aliases["champion"] == ours[0][0]
    run_ids = [parent.info.run_id, *(r.info.run_id for r in tracker.children(parent.info.run_id))]
    runner = CliRunner()
    refused = runner.invoke(app, ["delete", "warm", "--tracking-uri", workspace["uri"]], input="n\n")
    assert refused.exit_code == 1 and folder.is_dir() and versions(tracker) == sorted(warm["versions_before"] + ours)
    missing = runner.invoke(app, ["delete", "nope", "--yes", "--tracking-uri", workspace["uri"]])
    one_error_line(missing, "no sweep named 'nope'")

    done = runner.invoke(app, ["delete", "warm", "--yes", "--tracking-uri", workspace["uri"]])
    assert done.exit_code == 0, done.output
    assert "alias removed" in done.stdout and "deleted sweep warm" in done.stdout
    assert all(client.get_run(run_id).info.lifecycle_stage == "deleted" for run_id in run_ids)
    assert versions(tracker) == warm["versions_before"]  # e2e's versions stay
    assert "champion" not in client.get_registered_model(MODEL).aliases
    assert not folder.exists() and (work / "kdsweep_storage" / NAME / "study.db").is_file()
    assert (work / "kdsweep_storage" / "stages").is_dir()  # shared with other sweeps
    assert [r.data.tags[tags.SWEEP] for r in tracker.find_sweeps()] == [NAME]
    check_new_sweep(tracker, "warm", work / "kdsweep_storage")  # the name is free again: no error


def test_cancel_from_another_process_then_resume(workspace) -> None:
    work, tracker, uri = workspace["work"], workspace["tracker"], workspace["uri"]
    stopped = {**spec(num_trials=2), "tracking": {"experiment": "control", "registered_model": "control_student"}}
    # Epochs take a tenth of a second: 60 leave the cancel time to land mid-trial (with 6, and
    # with 20 once trials no longer waited for Tune every epoch, both ended before it landed).
    stopped["recipe"]["epochs"] = 60
    (work / "stopped.yaml").write_text(yaml.safe_dump(stopped, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = work / "stopped.log"  # a file, not a pipe: a full pipe would block the driver
    with log.open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", "stopped.yaml", "--name", "stopped"],
                                  cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while True:  # until the first trial has trained an epoch
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial started"
            parents = [r for r in tracker.find_sweeps("stopped") if r.data.tags.get(tags.SWEEP) == "stopped"]
            trials = tracker.children(parents[0].info.run_id, "trial") if parents else []
            if any(r.info.status == "RUNNING" and tracker.last_step(r.info.run_id) >= 1 for r in trials):
                break
            time.sleep(0.5)
        below = descendants(driver.pid)
        running = CliRunner().invoke(app, ["delete", "stopped", "--yes", "--tracking-uri", uri])
        one_error_line(running, "is running")
        # `cancel` from this (the test's) process, not the driver's: in-process, it lands within a second.
        cancelled = CliRunner().invoke(app, ["cancel", "stopped", "--tracking-uri", uri])
        assert cancelled.exit_code == 0 and "stopped cancelled" in cancelled.stdout, cancelled.output
        assert driver.wait(timeout=120) == 128 + signal.SIGTERM
        assert "sweep cancelled with `kdsweep cancel`: continue it with `kdsweep resume stopped`" in log.read_text()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_and_reap(below | descendants(driver.pid))

    (parent,) = [r for r in tracker.find_sweeps("stopped") if r.data.tags.get(tags.SWEEP) == "stopped"]
    assert parent.info.status == "KILLED" and "cancelled (kdsweep cancel" in parent.data.tags[tags.END_REASON]
    trials = tracker.children(parent.info.run_id, "trial")
    assert trials and all(r.info.status in ("FINISHED", "KILLED") for r in trials)
    assert any(r.info.status == "KILLED" and "cancelled" in r.data.tags[tags.END_REASON] for r in trials)
    assert tags.MODEL_URI not in parent.data.tags
    assert not tracker.client.search_model_versions("name='control_student'")  # nothing exported
    again = kdsweep("cancel", "stopped", cwd=work)  # the command line in its own process
    assert again.returncode == 2 and "not running (status KILLED)" in again.stderr

    resumed = kdsweep("resume", "stopped", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    parent = tracker.client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and tags.END_REASON not in parent.data.tags
    assert [r.info.status for r in tracker.children(parent.info.run_id, "trial")] == ["FINISHED", "FINISHED"]
    assert len(tracker.client.search_model_versions("name='control_student'")) == 1


def test_bad_budget_and_unknown_warm_start_are_refused_before_ray(workspace, monkeypatch) -> None:
    work, uri = workspace["work"], workspace["uri"]
    with pytest.raises(SpecError, match=r"sweep\.time_budget: 'soon' is not a duration"):
        parse_spec(spec(time_budget="soon"))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a bad warm start got past the checks: Ray was reached")

    monkeypatch.setattr(sweeps.cli.sweep, "_in_ray_session", refuse)
    (work / "unknown.yaml").write_text(yaml.safe_dump(spec(warm_start={"from": "nope"}), sort_keys=False))
    before = sorted(p.name for p in (work / "kdsweep_storage").iterdir())
    result = CliRunner().invoke(app, ["run", str(work / "unknown.yaml"), "--name", "unknown", "--tracking-uri", uri,
                                      "--storage", str(work / "kdsweep_storage")])
    one_error_line(result, "sweep.warm_start.from: no sweep named 'nope'")
    assert sorted(p.name for p in (work / "kdsweep_storage").iterdir()) == before
    assert not [r for r in workspace["tracker"].find_sweeps("unknown") if r.data.tags.get(tags.SWEEP) == "unknown"]
