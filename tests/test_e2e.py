"""A small real sweep through Ray Tune, Optuna and MLflow (SQLite), then the exported model.

Nothing is mocked: the CLI runs in its own process, exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from cluster.addresses import LOCAL_RAY_IP
from kd_core.data import DATASETS
from kd_core.stages import StageStore
from kd_core.train import evaluate
from sweeps import tags
from sweeps.export import load_registered
from tests.sweep_cli import EPOCHS, MODEL, NAME, TRIALS, kdsweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sweep(digits_sweep) -> dict:
    return digits_sweep


def test_parent_and_children_have_terminal_statuses(sweep) -> None:
    tracker, parent = sweep["tracker"], sweep["parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tags.SWEEP] == NAME
    children = tracker.children(parent.info.run_id)
    trials = [r for r in children if r.data.tags[tags.ROLE] == "trial"]
    assert len(trials) == TRIALS
    assert {r.data.tags[tags.ROLE] for r in children} == {"trial", "teacher", "baseline", "confirm"}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    # Confirmation re-trainings are runs too: top 2 x 2 seeds, each tied to its trial, every epoch.
    confirms = [r for r in children if r.data.tags[tags.ROLE] == "confirm"]
    assert len(confirms) == 4 and all(r.info.status == "FINISHED" for r in confirms)
    assert {r.data.tags[tags.TRIAL_ID] for r in confirms} <= {r.data.tags[tags.TRIAL_ID] for r in trials}
    assert {r.data.params["seed"] for r in confirms} == {"1", "2"}
    assert all(len(tracker.client.get_metric_history(r.info.run_id, "val_acc")) == EPOCHS for r in confirms)
    for run in trials:
        epochs = len(tracker.client.get_metric_history(run.info.run_id, "val_acc"))
        # ASHA-stopped trials are KILLED with a reason; complete ones FINISHED.
        assert (run.info.status == "FINISHED") == (epochs == EPOCHS)
        if run.info.status == "KILLED":
            assert "stopped early" in run.data.tags[tags.END_REASON]


def test_the_study_records_stopped_trials_as_pruned(sweep) -> None:
    """TPE sees what happened: finished trials COMPLETE, ASHA-stopped ones PRUNED (not COMPLETE
    with a partial value), each with intermediate values at the epochs reported to Tune: ASHA's
    decision epochs and the last one trained, whose value is the trial's."""
    import optuna

    from sweeps.reporting import decision_epochs
    from sweeps.spec import SweepSpec
    from tests.sweep_cli import SPEC

    decisions = decision_epochs(SweepSpec.model_validate(SPEC))
    tracker, parent = sweep["tracker"], sweep["parent"]
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{sweep['work'] / 'kdsweep_storage' / NAME / 'study.db'}")
    epochs = {"FINISHED": [], "KILLED": []}
    for run in tracker.children(parent.info.run_id, "trial"):
        epochs[run.info.status].append(len(tracker.client.get_metric_history(run.info.run_id, "val_acc")))
    states = {"FINISHED": optuna.trial.TrialState.COMPLETE, "KILLED": optuna.trial.TrialState.PRUNED}
    for status, state in states.items():
        recorded = [t for t in study.trials if t.state == state]
        assert sorted(max(t.intermediate_values) for t in recorded) == sorted(epochs[status]), status
        for trial in recorded:
            last = max(trial.intermediate_values)
            assert {e for e in decisions if e <= last} <= trial.intermediate_values.keys() <= set(range(1, last + 1))
            assert trial.value == trial.intermediate_values[last]


def test_a_real_experiments_search_state_passes_the_resume_check(sweep) -> None:
    from sweeps.search import check_search_state

    check_search_state(sweep["work"] / "kdsweep_storage" / NAME)  # what Tune wrote reads back


def test_each_trial_has_params_and_one_point_per_epoch(sweep) -> None:
    tracker, parent = sweep["tracker"], sweep["parent"]
    runs = tracker.children(parent.info.run_id, "trial")
    # an actor's first trial counts its start (process, imports); its later trials count none
    assert any(run.data.metrics.get("time_actor_start", 0.0) > 0 for run in runs)
    for run in runs:
        params = run.data.params
        assert params["method"] == "kd"
        assert {"method.T", "method.w_ce", "method.w_kd", "method.kl_reduction", "arch", "student.args.width",
                "recipe.lr",
                "recipe.epochs", "teacher", "seed"} <= set(params)
        assert 1.0 <= float(params["method.T"]) <= 8.0  # named by its spec path
        for key in ("val_acc", "train_loss", "train_loss_ce", "train_loss_kd"):
            steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, len(steps) + 1)), key
        if run.info.status == "FINISHED":
            assert "test_acc" in run.data.metrics
            # where its time went (sweeps/timings.py), as benchmarks/sweep_overhead.py reads it
            times = {k: v for k, v in run.data.metrics.items() if k.startswith("time_")}
            assert {"time_actor_start", "time_setup", "time_data", "time_sources", "time_checkpoint",
                    "time_tune_report", "time_report_cpu"} <= set(times) and all(v >= 0 for v in times.values()), times


def test_teacher_trained_exactly_once_and_lineage_recorded(sweep) -> None:
    tracker, parent = sweep["tracker"], sweep["parent"]
    teachers = tracker.children(parent.info.run_id, "teacher")
    assert len(teachers) == 1  # 2 concurrent trials, one teacher
    teacher = teachers[0]
    key = teacher.data.tags["kdsweep.stage_key"]
    for run in tracker.children(parent.info.run_id, "trial"):
        assert run.data.tags["kdsweep.teacher_run_id"] == teacher.info.run_id
        assert run.data.tags["kdsweep.teacher_stage_key"] == key
        assert run.data.tags["kdsweep.node_ip"] == LOCAL_RAY_IP
    stored = StageStore(sweep["work"] / "kdsweep_storage").get(key)
    assert stored is not None and stored.run_id == teacher.info.run_id
    assert parent.data.tags["kdsweep.teacher_run_id"] == teacher.info.run_id


def test_trials_share_one_teacher_output_cache(sweep) -> None:
    tracker, parent = sweep["tracker"], sweep["parent"]
    for run in tracker.children(parent.info.run_id, "trial"):
        assert run.data.tags["kdsweep.teacher_cache"] == "on"
    # digits has no augmentation: one exact view, computed once for the one teacher
    assert len(list((sweep["work"] / "kdsweep_storage" / "teacher_cache").rglob("logits.pt"))) == 1


def test_driver_prints_best_beside_ce_baseline(sweep) -> None:
    text = " ".join(sweep["stdout"].split())
    assert "student, CE only" in text and "student, best trial" in text
    assert "model: models:/e2e_student/1 (pinned; champion: promoted: the first champion" in text


def test_top_configurations_are_confirmed_with_new_seeds(sweep) -> None:
    metrics, tags = sweep["parent"].data.metrics, sweep["parent"].data.tags
    for rank in (1, 2):
        assert 0 < metrics[f"confirm_{rank}_test_acc_mean"] <= 1
        assert metrics[f"confirm_{rank}_test_acc_std"] >= 0
        assert f"confirm_{rank}_val_acc_mean" in metrics
    confirmed = json.loads(sweep["tracker"].client.download_artifacts(
        sweep["parent"].info.run_id, "confirm.json", str(sweep["work"])) and
        (sweep["work"] / "confirm.json").read_text())
    assert [c["seeds"] for c in confirmed] == [[1, 2], [1, 2]]
    ranked = max(confirmed, key=lambda c: c["val_acc_mean"])  # chosen on val only
    assert tags["kdsweep.confirmed_best_trial_id"] == ranked["trial_id"]
    assert "confirmation #1" in sweep["stdout"]


def test_best_json(sweep) -> None:
    done = kdsweep("best", NAME, "--json", cwd=sweep["work"])
    assert done.returncode == 0, done.stderr
    best = json.loads(done.stdout)
    assert best["sweep"] == NAME and best["model_uri"] == "models:/e2e_student/1"  # pinned, never the alias
    assert best["champion"].startswith("promoted")
    assert best["run_id"] == sweep["parent"].data.tags["kdsweep.best_run_id"]
    assert best["params"]["method"] == "kd"


def test_status_lists_the_sweep_and_its_trials(sweep) -> None:
    overview = kdsweep("status", cwd=sweep["work"])
    assert overview.returncode == 0 and NAME in overview.stdout
    detail = kdsweep("status", NAME, cwd=sweep["work"])
    assert detail.returncode == 0
    assert detail.stdout.count("FINISHED") + detail.stdout.count("KILLED") >= TRIALS


def test_pulled_program_runs_with_torch_alone(sweep, tmp_path) -> None:
    done = kdsweep("pull", NAME, "--to", str(tmp_path / "student"), cwd=sweep["work"])
    assert done.returncode == 0, done.stderr
    assert "model: models:/e2e_student/1" in done.stdout
    files = {p.name for p in (tmp_path / "student").iterdir()}
    assert {"student.onnx", "student.pt2", "student_state_dict.pt", "student.json"} <= files
    meta = json.loads((tmp_path / "student" / "student.json").read_text())
    recorded = sweep["parent"].data.metrics["best_test_acc"]
    assert meta["test_acc"] == recorded

    test = DATASETS.get("digits")().test
    torch.save({"images": test.images, "labels": test.labels}, tmp_path / "test.pt")
    script = (
        "import sys, torch\n"
        f"model = torch.export.load({str(tmp_path / 'student' / 'student.pt2')!r}).module()\n"
        f"data = torch.load({str(tmp_path / 'test.pt')!r})\n"
        "with torch.no_grad():\n"
        "    predicted = model(data['images']).argmax(1)\n"
        "print((predicted == data['labels']).float().mean().item())\n"
        "assert not any(m.split('.')[0] in ('kd_core', 'sweeps', 'mlflow', 'ray') for m in sys.modules)\n"
    )
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert float(fresh.stdout.strip()) == pytest.approx(recorded, abs=1e-6)


def test_registered_champion_loads_and_reproduces_accuracy(sweep) -> None:
    mlflow.set_tracking_uri(sweep["uri"])
    mlflow.set_registry_uri(sweep["uri"])
    client = MlflowClient(sweep["uri"])
    version = client.get_model_version_by_alias("e2e_student", "champion")
    assert str(version.version) == sweep["parent"].data.tags["kdsweep.model_version"]
    model = load_registered("models:/e2e_student@champion")  # ONNX: nothing in the store is unpickled
    _, accuracy = evaluate(model, DATASETS.get("digits")().test)
    assert accuracy == sweep["parent"].data.metrics["best_test_acc"]


def test_rerunning_an_existing_name_is_refused_and_changes_nothing(sweep) -> None:
    tracker = sweep["tracker"]
    before = len(tracker.children(sweep["parent"].info.run_id))
    done = kdsweep("run", "spec.yaml", "--name", NAME, cwd=sweep["work"])
    assert done.returncode == 2
    assert f"a sweep named '{NAME}' already exists" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert len(tracker.children(sweep["parent"].info.run_id)) == before
    assert len(tracker.find_sweeps(NAME)) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_sweep_on_loopback(sweep) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "ui", "--port", str(port)], cwd=sweep["work"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={sweep['parent'].info.run_id}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    run = json.load(response)["run"]
                break
            except OSError:
                assert server.poll() is None, "the UI process exited"
                assert time.monotonic() < deadline, "the UI did not answer within 90 s"
                time.sleep(1)
        assert {"key": tags.SWEEP, "value": NAME} in run["data"]["tags"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_piped_run_prints_one_line_per_trial_and_no_third_party_noise(sweep) -> None:
    """Not a terminal: one progress line per finished trial; Ray's and Tune's log lines are in the
    driver's log file, not on the console."""
    lines = sweep["stderr"].splitlines()
    progress = [line for line in lines if line.startswith("trial ")]
    assert len(progress) == TRIALS, sweep["stderr"][-3000:]
    assert all(f"/{TRIALS} " in line for line in progress)
    for noise in ("Token authentication", " INFO ", "Started a local Ray instance", "*** SIGTERM"):
        assert noise not in sweep["stderr"], noise


def test_readme_prediction_example_runs(sweep, tmp_path) -> None:
    """README's "Predicting with it" block, run as written on this sweep's pulled student (only
    the folder and the registered model's name changed): it must predict what the student does."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Predicting with it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    student = tmp_path / "student"
    assert kdsweep("pull", NAME, "--to", str(student), cwd=sweep["work"]).returncode == 0
    script = (block.replace("DIR/", f"{student}/").replace("digits_kd_student/3", f"{MODEL}/1")
              .replace("digits_kd_student", MODEL)
              + "\nassert (model(torch.from_numpy(x)).argmax(dim=1).numpy() == logits.argmax(axis=1)).all()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": sweep["uri"]})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.split("\n")[0].strip("[]").split()) == 5  # five predicted classes
