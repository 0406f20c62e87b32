"""Bad specs and arguments: one clear message naming the problem, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sweeps.cli import app
from tests.conftest import BASE_SPEC

runner = CliRunner()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working directory; the spec files live elsewhere."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def write_spec(work: Path, changes: dict) -> str:
    data = {**BASE_SPEC, **changes}
    path = work / "specs" / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


CASES = [
    ("unknown key", {"colour": "red"}, [], "colour: Extra inputs are not permitted"),
    ("wrong type", {"sweep": {"num_trials": "many"}}, [], "sweep.num_trials"),
    ("unknown arch", {"student": {"arch": {"name": "resnet9"}}}, [], "unknown architecture 'resnet9'"),
    ("unknown method", {"method": {"name": "fitnet"}}, [], "unknown method 'fitnet'"),
    ("negative epochs", {"recipe": {"name": "digits", "epochs": -1}}, [], "epochs must be >= 1"),
    ("empty search", {"search": {}}, [], "the search space is empty"),
    ("bad range", {"search": {"method.T": {"low": 3, "high": 1}}}, [], "search.method.T: low"),
    ("missing teacher", {"teacher": None}, [], "method kd: needs a teacher"),
    ("all-zero weights", {"method": {"name": "kd", "params": {"w_ce": 0, "w_kd": 0}}}, [],
     "method kd: method.params: every loss weight (w_ce, w_kd) is 0"),
    ("huge trial count", {"sweep": {"num_trials": 10**20}}, [], "sweep.num_trials: Input should be less than or equal"),
    ("float trial count", {"sweep": {"num_trials": 2.5}}, [], "sweep.num_trials: 2.5 is not a whole number"),
    ("search step zero", {"search": {"method.T": {"low": 1, "high": 4, "step": 0}}}, [], "step must be > 0"),
    ("zero trials", {}, ["--num-trials", "0"], "--num-trials"),
    ("bad name", {}, ["--name", "a b"], "--name 'a b'"),
    ("file store", {}, ["--tracking-uri", "file:./mlruns"], "does not accept file stores"),
    ("missing db dir", {}, ["--tracking-uri", "sqlite:////nonexistent/dir/m.db"], "does not exist"),
]


@pytest.mark.parametrize(("changes", "args", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_run_rejects_bad_input(work, changes, args, message) -> None:
    result = runner.invoke(app, ["run", write_spec(work, changes), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert list((work / "work").iterdir()) == []  # nothing written


def test_missing_spec_file(work) -> None:
    result = runner.invoke(app, ["run", "nowhere.yaml"])
    assert result.exit_code == 2
    assert "spec file not found: nowhere.yaml" in result.output
    assert list((work / "work").iterdir()) == []


@pytest.mark.parametrize("command", [["best", "ghost"], ["pull", "ghost", "--to", "out"],
                                     ["status", "ghost"]])
def test_unknown_sweep(work, command) -> None:
    result = runner.invoke(app, command)
    assert result.exit_code == 2
    assert "no sweeps recorded" in result.output
    assert list((work / "work").iterdir()) == []  # reading never creates a store


def test_real_process_prints_one_message_and_no_traceback(work) -> None:
    spec = write_spec(work, {"student": {"arch": {"name": "convnet", "args": {"width": -3}}}})
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "run", spec], capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.returncode == 2
    assert "student.arch.args: width and depth must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert list((work / "work").iterdir()) == []
