"""The exported student's forms: the ONNX file gives the recorded test accuracy under onnxruntime
in a process without torch, for any batch size; the torch.export program reloads and matches;
SimKD's deployable (projector + reused teacher classifier) exports too; a form that differs
fails the export. Real training, real MLflow (SQLite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.data.base import seeded_split
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.testing import build_distiller
from kd_core.train import evaluate, fit
from sweeps.export import (
    ATOL,
    META_FILE,
    ONNX_FILE,
    PROGRAM_FILE,
    RTOL,
    STATE_DICT_FILE,
    ExportError,
    _verify,
    export_student,
    load_registered,
    write_student_files,
)
from sweeps.tracking import Tracker

DATA = {"name": "digits", "seed": 0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits) -> dict:
    """A convnet student trained 3 epochs with CE on digits, exported and registered."""
    from kd_core.distillers import DISTILLERS

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model("convnet", 10, 1, {"width": 4, "depth": 1})
    ce = DISTILLERS.get("ce")
    fit(ce(model, [], ce.make_params()), digits, build_recipe("digits", {"epochs": 3}))
    tracker = Tracker(f"sqlite:///{work / 'mlflow.db'}")
    parent = tracker.start_sweep(tracker.experiment_id("export"), "export", {})
    meta = {"sweep": "export", "val_acc": 0.9, "data": DATA}
    result = export_student(model, digits, work / "student", tracker, parent, "export_student", meta)
    return {"work": work, "model": model.eval(), "result": result, "tracker": tracker}


ONNX_ONLY = """
import json, sys
import numpy as np
import onnxruntime

directory, raw_file, labels_file = sys.argv[1:]
meta = json.load(open(f"{directory}/student.json"))
form = meta["forms"]["student.onnx"]
spec, pre = form["input"], form["input"]["preprocess"]
# The recorded preprocessing, applied to raw 0..16 grey levels: scale, then (x - mean) / std.
raw = np.load(raw_file)
images = ((raw.astype(np.float32) * pre["scale"] - pre["mean"]) / pre["std"]).astype(spec["dtype"])
images = images.reshape(len(images), *spec["shape"][1:])  # NCHW
session = onnxruntime.InferenceSession(f"{directory}/student.onnx", providers=["CPUExecutionProvider"])
logits = session.run([form["output"]["name"]], {spec["name"]: images})[0]
accuracy = float((logits.argmax(1) == np.load(labels_file)).mean())
single = session.run(None, {spec["name"]: images[:1]})[0]
seven = session.run(None, {spec["name"]: images[1:8]})[0]
assert single.shape == (1, meta["num_classes"]) and seven.shape == (7, meta["num_classes"])
assert np.allclose(seven, logits[1:8], atol=1e-5) and np.allclose(single, logits[:1], atol=1e-5)
assert "torch" not in sys.modules, "onnxruntime pulled in torch"
print(json.dumps({"accuracy": accuracy}))
"""


def test_the_onnx_file_gives_the_recorded_accuracy_without_torch(exported, tmp_path) -> None:
    from sklearn.datasets import load_digits

    directory = exported["result"].directory
    meta = json.loads((directory / META_FILE).read_text())
    assert set(meta["forms"]) == {ONNX_FILE, PROGRAM_FILE, STATE_DICT_FILE}
    assert meta["forms"][ONNX_FILE]["input"]["shape"] == ["batch (any N >= 1)", 1, 8, 8]
    bunch = load_digits()  # the raw test images, as a user has them (the split is the dataset's seeded one)
    _, _, test = seeded_split(len(bunch.target), (0.15, 0.2), DATA["seed"])
    np.save(tmp_path / "raw.npy", bunch.images[test.numpy()])
    np.save(tmp_path / "labels.npy", bunch.target[test.numpy()])
    done = subprocess.run([sys.executable, "-c", ONNX_ONLY, str(directory), str(tmp_path / "raw.npy"),
                           str(tmp_path / "labels.npy")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = json.loads(done.stdout.strip().splitlines()[-1])["accuracy"]
    assert accuracy == meta["test_acc"] == exported["result"].test_acc
    assert accuracy > 0.5  # a trained student, not chance


def test_the_program_and_the_registered_model_reproduce_the_student(exported, digits) -> None:
    result, model = exported["result"], exported["model"]
    program = torch.export.load(result.directory / PROGRAM_FILE).module()
    registered = load_registered(result.model_uri)  # ONNX, read by onnxruntime: nothing unpickled
    images = digits.test.images[:7]
    with torch.no_grad():
        for batch in (images[:1], images):  # any batch size
            torch.testing.assert_close(program(batch), model(batch), atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(registered(batch), model(batch), atol=ATOL, rtol=RTOL)
    assert evaluate(registered, digits.test)[1] == result.test_acc
    _verify(PROGRAM_FILE, program, model, digits, result.test_acc)  # an exported module has no .eval()


def test_a_simkd_deployable_exports(tmp_path, digits) -> None:
    """SimKD deploys encoder + projector + the reused teacher classifier, aligned by a size kept in
    an integer buffer: torch.export and ONNX take it as a constant."""
    distiller = build_distiller("simkd")
    fit(distiller, digits, build_recipe("digits", {"epochs": 1}))
    deployable = distiller.deployable().eval()
    assert deployable.aligned_size.tolist() != [0, 0]
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_sweep(tracker.experiment_id("simkd"), "simkd", {})
    test_acc, _ = write_student_files(deployable, digits, tmp_path / "simkd", tracker, parent, "export",
                                      {"method": "simkd"})  # each form reloaded and verified inside
    assert test_acc == evaluate(deployable, digits.test)[1]
    program = torch.export.load(tmp_path / "simkd" / PROGRAM_FILE).module()
    with torch.no_grad():
        torch.testing.assert_close(program(digits.test.images[:3]), deployable(digits.test.images[:3]),
                                   atol=ATOL, rtol=RTOL)


def test_a_form_that_differs_fails_the_export(exported, digits) -> None:
    model, test_acc = exported["model"], exported["result"].test_acc
    with pytest.raises(ExportError, match="student.onnx: logits differ"):
        _verify(ONNX_FILE, lambda images: model(images) + 10 * ATOL, model, digits, test_acc)
    with pytest.raises(ExportError, match=r"student.pt2: test accuracy .* != recorded"):
        _verify(PROGRAM_FILE, model, model, digits, test_acc - 0.01)


def test_files_are_where_pull_finds_them(exported) -> None:
    tracker, result = exported["tracker"], exported["result"]
    (parent,) = tracker.find_sweeps("export")
    logged = {Path(f.path).name for f in tracker.client.list_artifacts(parent.info.run_id, "export")}
    assert {ONNX_FILE, PROGRAM_FILE, STATE_DICT_FILE, META_FILE} <= logged
    assert result.model_uri == "models:/export_student/1"
