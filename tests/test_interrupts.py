"""One sweep interrupted three times (SIGINT right after a checkpoint, SIGTERM mid-trial, SIGKILL),
resumed each time (once refused: its folder had been moved), against the same sweep run straight
through: same trials, same metric histories, same ASHA stops, same exported student; exit codes
130 and 143; nothing exported while interrupted.
Real Ray, Optuna and MLflow, the CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
import yaml
from mlflow.entities import Run

from sweeps import tags
from sweeps.export import STATE_DICT_FILE
from sweeps.tracking import Tracker

EPOCHS = 4
SPEC = {
    "name": "interrupts",
    "teacher": {"arch": {"name": "convnet", "args": {"width": 8, "depth": 1}},
                "recipe": {"name": "digits", "epochs": 2}},
    # Epochs of ~0.6 s (a 4-channel student's take 0.1 s): a trial then lasts long enough for the
    # SIGTERM below to land while its next epochs train.
    "student": {"arch": {"name": "convnet", "args": {"width": 32, "depth": 2}}},
    "recipe": {"name": "digits", "epochs": EPOCHS},
    "search": {"recipe.lr": {"low": 0.0001, "high": 0.2, "log": True}},
    "sweep": {"num_trials": 4, "max_concurrent": 1, "confirm": {"top_k": 0},
              "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
              # trials 3 and 4 learn next to nothing: ASHA stops them after one epoch
              "initial_points": [{"recipe.lr": 0.1}, {"recipe.lr": 0.05}, {"recipe.lr": 0.0001},
                                 {"recipe.lr": 0.0002}]},
}
COMMAND = [sys.executable, "-m", "sweeps.cli"]
ENV = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Ray's raylet and workers live in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_and_reap(pids: set[int]) -> None:
    """SIGKILL `pids` and wait until they are gone, so no orphaned worker writes afterwards."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, "the driver's processes did not die"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def interrupt(cwd: Path, args: list[str], tracker: Tracker, ready: Callable[[list[Run]], bool],
              signum: int) -> int:
    """Start the CLI, send `signum` to its driver once `ready(trial runs)`; its exit status.
    SIGKILL is a crash: the driver and every process below it die at once."""
    driver = subprocess.Popen([*COMMAND, *args], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while True:
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "never ready to interrupt"
            sweeps = tracker.find_sweeps("s") if (cwd / "mlflow.db").exists() else []
            if sweeps and ready(tracker.children(sweeps[0].info.run_id, "trial")):
                break
            time.sleep(0.2)
        below = descendants(driver.pid)
        if signum == signal.SIGKILL:
            kill_and_reap({driver.pid, *below})
        else:
            os.kill(driver.pid, signum)
        return driver.wait(timeout=120)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # whatever of the driver's Ray is left
        except ProcessLookupError:
            pass
        kill_and_reap(below | descendants(driver.pid))


def record(tracker: Tracker, storage: Path) -> dict:
    """What a sweep did: per trial (by lr) its statuses, epochs, val_acc history; the best student.
    The runs of trials that a crash lost before Tune's snapshot held them (their parameters ran
    again in a later trial) are apart, in "lost"."""
    (parent,) = tracker.find_sweeps("s")
    trials, lost = {}, {}
    for run in tracker.children(parent.info.run_id, "trial"):
        history = [(m.step, round(m.value, 6)) for m in tracker.client.get_metric_history(run.info.run_id, "val_acc")]
        reason = run.data.tags.get(tags.END_REASON)
        orphaned = reason is not None and reason.startswith("orphaned")
        (lost if orphaned else trials)[run.data.params["recipe.lr"]] = (run.info.status, history, reason)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{storage / 's' / 'study.db'}")
    return {"parent": parent, "trials": trials, "lost": lost,
            # a trial asked by a driver that then died stays FAIL in the study (its point is asked again)
            "study": sorted((t.params["recipe.lr"], t.state.name) for t in study.trials if t.state.name != "FAIL"),
            "best": (parent.data.tags.get(tags.BEST_TRIAL_ID) and round(parent.data.metrics["best_test_acc"], 6),
                     round(parent.data.metrics.get("best_val_acc", -1), 6))}


def epochs(runs: list[Run], tracker: Tracker) -> list[int]:
    return [tracker.last_step(r.info.run_id) for r in runs]


def test_three_interruptions_and_resumes_match_a_straight_run(tmp_path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for directory in (straight, broken):
        directory.mkdir()
        (directory / "spec.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    done = cli(straight, "run", "spec.yaml", "--name", "s")
    assert done.returncode == 0, done.stderr[-5000:]
    expected = record(Tracker(f"sqlite:///{straight / 'mlflow.db'}"), straight / "kdsweep_storage")
    histories = {lr: h for lr, (_, h, _) in expected["trials"].items()}
    assert [len(h) for h in histories.values()].count(1) >= 2  # ASHA stopped the poor ones after 1 epoch

    tracker = Tracker(f"sqlite:///{broken / 'mlflow.db'}")
    storage = broken / "kdsweep_storage"
    checkpoints = lambda: list(storage.glob("s/train_trial_*/checkpoint_*"))  # noqa: E731
    # 1. Ctrl-C right after the first checkpoint.
    status = interrupt(broken, ["run", "spec.yaml", "--name", "s"], tracker, lambda runs: bool(checkpoints()),
                       signal.SIGINT)
    assert status == 130
    (parent,) = tracker.find_sweeps("s")
    assert parent.info.status == "KILLED" and "SIGINT" in parent.data.tags[tags.END_REASON]
    assert tags.MODEL_URI not in parent.data.tags and not tracker.client.search_model_versions()
    for run in tracker.children(parent.info.run_id, "trial"):
        assert run.info.status in ("FINISHED", "KILLED")
        if run.info.status == "KILLED":  # what really stopped it: not "the scheduler"
            assert "interrupted (SIGINT)" in run.data.tags[tags.END_REASON]
    # 2. SIGTERM once a trial finished and the next one passed its first epoch.
    status = interrupt(broken, ["resume", "s"], tracker, lambda runs: any(
        r.info.status == "FINISHED" for r in runs) and any(r.info.status == "RUNNING" and e >= 1
                                                           for r, e in zip(runs, epochs(runs, tracker))),
        signal.SIGTERM)
    assert status == 143
    assert "SIGTERM" in tracker.client.get_run(parent.info.run_id).data.tags[tags.END_REASON]
    # A moved sweep is not resumed elsewhere: the message says why, and nothing is written.
    moved = tmp_path / "moved"
    storage.rename(moved)
    refused = cli(broken, "resume", "s")
    assert refused.returncode == 2 and "move the folder back" in refused.stderr and not storage.exists()
    moved.rename(storage)
    # 3. A crash once three trials ended.
    interrupt(broken, ["resume", "s"], tracker,
              lambda runs: sum(r.info.status != "RUNNING" for r in runs) >= 3, signal.SIGKILL)
    done = cli(broken, "resume", "s")
    assert done.returncode == 0, done.stderr[-5000:]
    again = cli(broken, "resume", "s")  # idempotent: a finished sweep is not resumed twice
    assert again.returncode == 2 and "already finished" in again.stderr

    got = record(tracker, storage)
    assert got["parent"].info.status == "FINISHED" and tags.END_REASON not in got["parent"].data.tags
    assert {lr: h for lr, (_, h, _) in got["trials"].items()} == histories  # trials, histories, ASHA stops
    assert expected["lost"] == {} and {s for s, _, _ in got["lost"].values()} <= {"KILLED"}
    assert set(got["lost"]) <= set(got["trials"])  # a lost trial's parameters ran again
    assert {lr: s for lr, (s, _, _) in got["trials"].items()} == {lr: s for lr, (s, _, _) in expected["trials"].items()}
    assert all("interrupted" not in (reason or "") for _, _, reason in got["trials"].values())
    assert got["study"] == expected["study"]
    assert got["best"] == expected["best"]
    exported = [torch.load(root / "kdsweep_storage" / "s" / "export" / STATE_DICT_FILE, weights_only=True)
                for root in (straight, broken)]
    assert exported[0].keys() == exported[1].keys()
    for name, value in exported[0].items():  # the same student, up to float rounding
        torch.testing.assert_close(exported[1][name], value, rtol=1e-4, atol=1e-5, msg=name)
