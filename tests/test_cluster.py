"""A real multi-node Ray cluster on loopback: `kdsweep cluster up` (head 127.0.0.2, workers
127.0.0.3-4, token auth, MLflow server on 127.0.0.1), sweeps submitted as Ray jobs, a worker
node killed mid-sweep, and `kdsweep cluster down` leaving nothing behind.

Nothing is mocked; every command runs in its own process as a user runs it. One cluster is
shared by the module (about 15 s to start) and stopped by the last test or the finalizer; one
sweep shows the spread over nodes and the survival of a node's death.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from cluster import jobs, local, processes
from cluster import state as cluster_state
from sweeps import tags
from sweeps.cli import app
from sweeps.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ("127.0.0.3", "127.0.0.4")
NODES = ("127.0.0.2", *WORKERS)
EPOCHS = 6
runner = CliRunner()
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                          "RAY_AUTH_MODE")}


def sweep_spec(name: str, trials: int, epochs: int = EPOCHS, max_failures: int = 0) -> dict:
    """A CE sweep whose trials last ~10 s on this machine: long enough for Tune to start one on
    every node (a node's first worker takes seconds) and for a kill to land mid-trial."""
    return {
        "name": name,
        "student": {"arch": {"name": "convnet", "args": {"width": 32, "depth": 2}}},
        "method": {"name": "ce"},
        "recipe": {"name": "digits", "epochs": epochs},
        "search": {"recipe.lr": {"low": 0.02, "high": 0.2, "log": True}},
        # A checkpoint every epoch: a trial on a killed node resumes where it stopped (checked below).
        "sweep": {"num_trials": trials, "max_concurrent": 3, "cpus_per_trial": 1, "max_failures": max_failures,
                  "scheduler": {"type": "none"}, "sampler": {"type": "random", "seed": 0}, "checkpoint_interval": 0},
        "tracking": {"experiment": name, "registered_model": f"{name}_student"},
    }


def kdsweep(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=CLEAN_ENV,
                          capture_output=True, text=True, timeout=timeout)


def submit_and_kill_a_node(args: list[str], cwd: Path, cluster_dir: Path,
                           victim: Callable[[], str]) -> subprocess.CompletedProcess:
    """`kdsweep submit ARGS` as a user runs it (it waits for the job and streams its logs); the
    worker node whose address `victim()` returns (once it returns) is SIGKILLed meanwhile."""
    submit = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "submit", *args], cwd=cwd, env=CLEAN_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert local.kill_node(cluster_dir, victim())  # SIGKILL: raylet, its workers, their trials
        stdout, stderr = submit.communicate(timeout=450)
    finally:
        if submit.poll() is None:
            os.killpg(submit.pid, signal.SIGKILL)
            submit.wait(timeout=30)
    return subprocess.CompletedProcess(submit.args, submit.returncode, stdout, stderr)


def cli(*args: str) -> Result:
    """A quick command in this process (the cluster's own processes are what is tested)."""
    return runner.invoke(app, list(args), env={k: None for k in os.environ.keys() - CLEAN_ENV.keys()})


def output(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    directory = work / "kdsweep_cluster"
    try:
        done = kdsweep("cluster", "up", "--workers", str(len(WORKERS)), "--dir", str(directory),
                       "--dashboard-port", "0", "--timeout", "240", cwd=work, timeout=300)
        assert done.returncode == 0, output(done)
        state = cluster_state.Cluster.load(directory)
        yield SimpleNamespace(work=work, dir=directory, state=state, tracker=Tracker(state.tracking_uri),
                              client=jobs.connect(state.dashboard_url, state.token))
    finally:
        local.down(directory, quiet=True)  # a no-op once the last test has stopped it


# --- user errors: no cluster needed ----------------------------------------------------------


@pytest.fixture
def empty_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(sweep_spec("errors", 2)))
    return tmp_path


def free_port() -> int:
    return processes.port_block(1)


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "bad.yaml"], "bad.yaml"),
    (["submit", "spec.yaml", "--num-trials", "0"], "--num-trials"),
    (["submit", "spec.yaml"], "no tracking server"),
    (["submit", "spec.yaml", "--tracking-uri", "http://127.0.0.1:9"], "no storage"),
    (["submit", "spec.yaml", "--tracking-uri", "sqlite:///mlflow.db", "--storage", "/shared"],
     "needs an MLflow tracking server"),
    (["submit", "spec.yaml", "--tracking-uri", "http://127.0.0.1:9", "--storage", "s3://bucket/x"],
     "shared filesystem path"),
    (["submit", "spec.yaml", "--tracking-uri", "http://127.0.0.1:9", "--storage", "/shared"],
     "no --address given and no cluster"),
    (["submit", "spec.yaml", "--address", "127.0.0.2:8265"], "use the Ray dashboard URL"),
    (["status", "--job", "x"], "no --address given and no cluster"),
    (["status", "--follow"], "--follow follows a job"),
    (["cluster", "down"], "no cluster started in"),
    (["cluster", "status"], "no cluster started in"),
], ids=["bad spec", "zero trials", "no tracking", "no storage", "sqlite tracking", "object store",
        "no address", "gcs address", "job without address", "follow without job", "down", "status"])
def test_cluster_commands_reject_bad_input(empty_dir, args, message) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert sorted(p.name for p in empty_dir.iterdir()) == ["spec.yaml"]  # nothing written


def test_unreachable_address_is_one_line(empty_dir) -> None:
    address = f"http://127.0.0.2:{free_port()}"
    result = runner.invoke(app, ["submit", "spec.yaml", "--address", address, "--tracking-uri",
                                 "http://127.0.0.1:9", "--storage", "/shared"])
    assert result.exit_code == 2, result.output
    assert f"cannot reach the Ray Jobs API at {address}" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_job_package_leaves_out_environments_stores_and_cluster_tokens(tmp_path) -> None:
    project = tmp_path / "project"
    for path in ("sweeps_plugin.py", "pkg/mod.py", ".venv/bin/python", ".git/HEAD", "mlflow.db",
                 "kdsweep_storage/s/x", "benchmarks/results/r.json", "benchmarks/b.py", "pkg/__pycache__/m.pyc",
                 "my_cluster/cluster.json", "my_cluster/auth_token"):
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text("x")
    shutil.copytree(project, tmp_path / "shipped", ignore=jobs._ignore(project))
    shipped = sorted(str(p.relative_to(tmp_path / "shipped")) for p in (tmp_path / "shipped").rglob("*")
                     if p.is_file())
    assert shipped == ["benchmarks/b.py", "pkg/mod.py", "sweeps_plugin.py"]


# --- the loopback cluster --------------------------------------------------------------------

def _first_trial_on_a_worker(tracker: Tracker, sweep: str, timeout: float) -> tuple[str, str]:
    """(node ip, trial id) of the first trial that has logged two epochs on a worker node: Tune
    holds the first epoch's checkpoint then (a trial's report returns once Tune took it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for parent in tracker.find_sweeps(sweep):
            for run in tracker.children(parent.info.run_id, "trial"):
                ip = run.data.tags.get("kdsweep.node_ip")
                if ip in WORKERS and len(tracker.client.get_metric_history(run.info.run_id, "val_acc")) >= 2:
                    return ip, run.data.tags["kdsweep.trial_id"]
        time.sleep(1)
    pytest.fail(f"no trial of {sweep} logged two epochs on a worker node within {timeout:.0f}s")


@pytest.mark.timeout(600)
def test_submitted_sweep_spreads_over_nodes_and_survives_a_worker_node_dying(cluster) -> None:
    """One sweep shows both: a submitted job that streams its logs, spreads its trials over the
    nodes and logs to the cluster's MLflow server, and a worker node killed mid-trial."""
    report = cli("cluster", "status", "--dir", str(cluster.dir), "--json")
    assert report.exit_code == 0, report.output
    status = json.loads(report.stdout)
    assert [(n["ip"], n["state"], n["resources"]["CPU"]) for n in status["nodes"]] == \
        [(ip, "ALIVE", 1.0) for ip in NODES]
    assert status["dashboard"] == cluster.state.dashboard_url and status["mlflow_running"]

    trials = 3
    (cluster.work / "failover.yaml").write_text(yaml.safe_dump(sweep_spec("failover", trials, max_failures=3)))
    found: list[tuple[str, str]] = []

    def victim_node() -> str:
        found.append(_first_trial_on_a_worker(cluster.tracker, "failover", timeout=300))
        return found[0][0]

    done = submit_and_kill_a_node(["failover.yaml", "--cluster-dir", str(cluster.dir), "--name", "failover",
                                   "--set", "tracking.registered_model=failover_set"],
                                  cluster.work, cluster.dir, victim_node)
    ((victim_ip, victim),) = found
    assert done.returncode == 0, output(done)
    assert "job failover: SUCCEEDED" in done.stderr
    assert "best vs CE-only student" in done.stdout  # the job's logs, streamed

    tracker = cluster.tracker
    (parent,) = tracker.find_sweeps("failover")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tags.STORAGE] == cluster.state.storage  # the path every node reaches
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert not (cluster.work / "mlflow.db").exists()  # never the local default store
    # --set travelled with the job: the file's registered_model is failover_student.
    version = tracker.client.get_model_version_by_alias("failover_set", "champion")  # the first: champion
    assert str(version.version) == parent.data.tags["kdsweep.model_version"]
    children = tracker.children(parent.info.run_id)
    assert not [r for r in children if r.info.status == "RUNNING"]
    runs = [r for r in children if r.data.tags["kdsweep.role"] == "trial"]
    assert len(runs) == trials  # no trial lost, none duplicated by its retry
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    assert {r.data.tags["kdsweep.node_ip"] for r in runs} <= set(NODES)  # the node of its last attempt
    # Where each trial started, from Tune's results (a retried trial's run is tagged again where
    # it resumed: the tags alone once showed every trial on the head).
    started_on = {json.loads(path.read_text().splitlines()[0])["node_ip"]
                  for path in (Path(cluster.state.storage) / "failover").glob("train_trial_*/result.json")}
    assert started_on <= set(NODES) and len(started_on) >= 2, started_on
    for run in runs:
        steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, len(steps) + 1))  # a retry never logs an epoch twice
        assert (run.info.status == "FINISHED") == (len(steps) == EPOCHS)

    # Tune's own record: the victim failed on the dead node and resumed from its checkpoint
    # on another one (the epochs go on where they stopped, they do not start over). Tune takes
    # a function trainable's checkpoint in a `save` call after it logged the result: a node that
    # dies between the two leaves the last reported epoch without its checkpoint, and the retry
    # trains that one epoch again (tune_controller `_schedule_trial_save`).
    (trial_dir,) = (Path(cluster.state.storage) / "failover").glob(f"train_trial_{victim}_*")
    assert "Failure # 1" in (trial_dir / "error.txt").read_text()
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    iterations = [r["training_iteration"] for r in results]
    restart = next((i for i in range(1, len(iterations)) if iterations[i] != iterations[i - 1] + 1), len(iterations))
    first, retry = iterations[:restart], iterations[restart:]
    assert first == list(range(1, len(first) + 1)), iterations
    # resumed after the last reported epoch (then nothing repeats), or after the one before it
    assert retry in ([], list(range(len(first), EPOCHS + 1))) and (retry or first)[-1] == EPOCHS, iterations
    assert results[0]["node_ip"] == victim_ip and results[-1]["node_ip"] != victim_ip

    job = cli("status", "--job", "failover", "--cluster-dir", str(cluster.dir))
    assert job.exit_code == 0 and "job failover: SUCCEEDED" in job.stdout, job.output
    report = local.status(cluster.dir)
    dead = next(n for n in report["nodes"] if n["ip"] == victim_ip)
    assert dead["process"] == "gone" and dead["state"] == "DEAD"


def _job_driver(state: cluster_state.Cluster) -> int | None:
    for pid in cluster_state.cluster_processes(state):
        try:
            if b"sweeps.cli\0run" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


@pytest.mark.timeout(300)
def test_cluster_down_stops_exactly_its_own_processes(cluster) -> None:
    # A job still running: its driver lives in a session of its own (Ray's job supervisor).
    (cluster.work / "long.yaml").write_text(yaml.safe_dump(sweep_spec("long", trials=50, epochs=50)))
    done = kdsweep("submit", "long.yaml", "--cluster-dir", str(cluster.dir), "--name", "long", "--no-wait",
                   cwd=cluster.work, timeout=120)
    assert done.returncode == 0, output(done)
    deadline = time.monotonic() + 120
    while (driver := _job_driver(cluster.state)) is None:
        assert time.monotonic() < deadline, "the job's driver did not start"
        time.sleep(1)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # not the cluster's
    try:
        before = cluster_state.cluster_processes(cluster.state)
        assert driver in before and len(before) > 10

        done = kdsweep("cluster", "down", "--dir", str(cluster.dir), cwd=cluster.work, timeout=120)
        assert done.returncode == 0, output(done)
        assert cluster_state.cluster_processes(cluster.state) == []
        assert [pid for pid in before if processes.process_stat(pid) is not None] == []
        assert bystander.poll() is None  # untouched
        ports = [int(cluster.state.gcs_address.rsplit(":", 1)[1]),
                 int(cluster.state.dashboard_url.rsplit(":", 1)[1]),
                 int(cluster.state.tracking_uri.rsplit(":", 1)[1])]
        assert all(processes.port_free(p) for p in ports)
        assert not (cluster.dir / cluster_state.STATE_FILE).exists()
        assert not Path(cluster.state.ray_temp).exists()
        assert (cluster.dir / "mlflow.db").exists()  # the runs stay

        again = cli("cluster", "down", "--dir", str(cluster.dir))
        assert again.exit_code == 2 and "no cluster started in" in again.output
        assert "Traceback" not in again.output
    finally:
        os.kill(bystander.pid, signal.SIGKILL)
        bystander.wait(timeout=10)
