"""Payload files for every place kdsweep reads a file: nothing in them runs.

Each payload is a pickle whose `__reduce__` calls `open(MARKER, "w")`: loading it with plain
`pickle.load` (or `torch.load(weights_only=False)`) would create the marker file. Every test
checks that the marker was not created and that the error names the file in one line, never
suggesting `weights_only=False`. Formats that are not pickles (IDX, images, YAML) get the same
payload bytes, or their own way of running code (YAML's python tags). See docs/security.md.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.checkpoints import CheckpointError, read_state_dict
from kd_core.data import DATASETS
from kd_core.data.cifar import CifarFileError
from kd_core.data.idx import read_idx
from kd_core.models import build_model
from kd_core.stages import META_FILE, WEIGHTS_FILE, CorruptStageError, StageStore
from kd_core.train import load_checkpoint
from sweeps.restore import UntrustedStorageError, check_storage_trusted
from sweeps.search import check_search_state
from sweeps.spec import SpecError, load_spec
from tests.cifar_files import CIFAR10_FOLDER, write_cifar


class Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return open, (self.marker, "w")


@pytest.fixture
def marker(tmp_path: Path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a payload ran: the marker file was created"


def one_line(error: BaseException, path: Path) -> str:
    """The error's message, checked: one line, naming `path`, no `weights_only=False` advice."""
    message = str(error)
    assert "\n" not in message.strip()
    assert str(path) in message
    assert "weights_only=False" not in message
    return message


def test_the_payload_works(tmp_path: Path) -> None:
    """The control: plain unpickling of the payload does create the marker."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# --- CIFAR batch files (a pickle format) ---------------------------------------------------------


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return write_cifar(tmp_path / "cifar", 10, 20, 10)


def test_a_cifar_batch_carrying_code_is_refused(cifar_root: Path, marker: Path) -> None:
    batch = cifar_root / CIFAR10_FOLDER / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}, protocol=2))
    with pytest.raises(CifarFileError) as error:
        DATASETS.get("cifar10")(root=str(cifar_root))
    assert "could run code" in one_line(error.value, batch)


def test_a_cifar_meta_file_carrying_code_is_refused(cifar_root: Path, marker: Path) -> None:
    meta = cifar_root / CIFAR10_FOLDER / "batches.meta"
    meta.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CifarFileError) as error:
        DATASETS.get("cifar10")(root=str(cifar_root))
    one_line(error.value, meta)


def test_a_truncated_cifar_batch_is_named(cifar_root: Path) -> None:
    batch = cifar_root / CIFAR10_FOLDER / "test_batch"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(ValueError) as error:
        DATASETS.get("cifar10")(root=str(cifar_root))
    assert "truncated" in one_line(error.value, batch)


@pytest.mark.parametrize("content", [
    {"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]},  # grey 32x32, not RGB
    {"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]},
    {"data": np.zeros((2, 3072), np.uint8), "labels": [0]},
    {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]},  # CIFAR-10 has labels 0..9
    {"labels": [0, 1]},
])
def test_a_cifar_batch_of_the_wrong_layout_is_named(cifar_root: Path, content: dict) -> None:
    batch = cifar_root / CIFAR10_FOLDER / "data_batch_2"
    batch.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(ValueError) as error:
        DATASETS.get("cifar10")(root=str(cifar_root))
    one_line(error.value, batch)


# --- weights: teacher checkpoints, student init, torchvision/timm weights ------------------------


def payload_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(1), "extra": Payload(marker)}, path)
    return path


def test_a_checkpoint_carrying_code_is_refused(tmp_path: Path, marker: Path) -> None:
    path = payload_checkpoint(tmp_path / "teacher.pt", marker)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert "could run code" in one_line(error.value, path)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_a_missing_or_damaged_checkpoint_is_named(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "teacher.pt"
    if damage != "missing":
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:200] if damage == "truncated" else b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    one_line(error.value, path)


@pytest.mark.parametrize("damage", ["payload", "missing", "truncated"])
def test_a_torchvision_weights_path_is_loaded_without_code(tmp_path: Path, marker: Path, damage: str) -> None:
    path = tmp_path / "resnet18.pth"
    if damage != "missing":
        payload_checkpoint(path, marker)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError) as error:  # CheckpointError is a ValueError: a user error, exit 2
        build_model("tv_resnet18", 10, 3, {"weights_path": str(path)})
    one_line(error.value, path)


def test_a_stage_whose_weights_carry_code_is_refused(tmp_path: Path, marker: Path) -> None:
    stage = tmp_path / "stages" / "abc123"
    stage.mkdir(parents=True)
    payload_checkpoint(stage / WEIGHTS_FILE, marker)
    (stage / META_FILE).write_text(json.dumps({"key": "abc123", "num_classes": 10, "in_channels": 1,
                                               "spec": {"arch": {"name": "convnet", "args": {}}}}))
    with pytest.raises(CorruptStageError) as error:
        StageStore(tmp_path).get("abc123")
    assert "could run code" in str(error.value) and "weights_only=False" not in str(error.value)


def test_a_trial_checkpoint_carrying_code_is_refused(tmp_path: Path, marker: Path) -> None:
    from kd_core.train import CHECKPOINT_FILE

    payload_checkpoint(tmp_path / CHECKPOINT_FILE, marker)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True: refused, then Tune retries or fails the trial
        load_checkpoint(tmp_path)


def test_a_teacher_cache_file_carrying_code_is_not_used(tmp_path: Path, marker: Path) -> None:
    from kd_core.cache import _load

    path = payload_checkpoint(tmp_path / "logits.pt", marker)
    assert _load(path) is None  # refused: the cache computes it again (and sets the file aside)


# --- the registered MLflow model -----------------------------------------------------------------


def test_a_registered_model_carrying_code_is_refused(tmp_path: Path, marker: Path) -> None:
    """The registered model is ONNX, read by onnxruntime: a model file replaced by a pickle (or by
    a torch.save-style zip holding one) is refused as not ONNX, and nothing runs."""
    import mlflow.onnx
    from onnx import TensorProto, helper, numpy_helper

    from sweeps.export import INPUT, OUTPUT, REGISTERED_FILE, RegisteredModelError, load_registered

    example = torch.randn(2, 1, 8, 8)
    weight = numpy_helper.from_array(np.ones((64, 10), np.float32), "weight")  # a linear classifier
    graph = helper.make_graph(
        [helper.make_node("Flatten", [INPUT], ["flat"]), helper.make_node("MatMul", ["flat", "weight"], [OUTPUT])],
        "honest", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 10])], [weight])
    saved = tmp_path / "model"
    mlflow.onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(saved),
                           save_as_external_data=False)
    assert load_registered(str(saved))(example).shape == (2, 10)  # an honest model loads
    for payload in (pickle.dumps(Payload(marker)), b"\x80\x02garbage"):
        (saved / REGISTERED_FILE).write_bytes(payload)
        with pytest.raises(RegisteredModelError, match="not an ONNX model"):
            load_registered(str(saved))
    with zipfile.ZipFile(saved / REGISTERED_FILE, "w") as archive:  # a torch.save-style zip holding the payload
        archive.writestr("model/data.pkl", pickle.dumps(Payload(marker)))
        archive.writestr("model/version", "3\n")
    with pytest.raises(RegisteredModelError):
        load_registered(str(saved))


# --- formats that are not pickles: IDX, image folders, specs -------------------------------------


def test_an_idx_file_holding_a_pickle_is_refused(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError) as error:
        read_idx(path, labels=False)
    one_line(error.value, path)


def test_an_image_folder_file_holding_a_pickle_is_not_an_image(tmp_path: Path, marker: Path) -> None:
    for root in ("train", "val"):
        (tmp_path / root / "cat").mkdir(parents=True)
        for name in ("x.png", "y.png"):
            (tmp_path / root / "cat" / name).write_bytes(pickle.dumps(Payload(marker)))
    data = DATASETS.get("image_folder")(str(tmp_path / "train"), str(tmp_path / "val"), image_size=8,
                                        batch_workers=0, val_fraction=0.5)
    with pytest.raises(Exception, match=r"[xy]\.png"):  # PIL: cannot identify image file '.../x.png'
        next(data.test.batches(1))


@pytest.mark.parametrize("tag", ["!!python/object/apply:builtins.open", "!!python/name:builtins.open",
                                 "!!python/object/new:builtins.open"])
def test_a_spec_with_python_tags_is_refused(tmp_path: Path, marker: Path, tag: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: x\nstudent: {tag} [{str(marker)!r}, 'w']\n")
    with pytest.raises(SpecError):
        load_spec(path)


# --- a sweep's storage: search state and who may write it ----------------------------------------


def test_search_state_carrying_code_is_inspected_without_running_it(tmp_path: Path, marker: Path) -> None:
    experiment = tmp_path / "storage" / "sweep"
    experiment.mkdir(parents=True)
    for name in ("tuner.pkl", "search_gen_state-2026-01-01_00-00-00.json", "searcher-state-2026-01-01_00-00-00.pkl"):
        (experiment / name).write_bytes(pickle.dumps(Payload(marker)))
    check_search_state(experiment)  # walks the opcodes: well-formed, so no damage is reported, and nothing ran


@pytest.mark.parametrize("what", ["tuner.pkl", "experiment", "storage"])
def test_resume_refuses_storage_others_can_write(tmp_path: Path, what: str) -> None:
    storage = tmp_path / "storage"
    experiment = storage / "sweep"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({}))
    check_storage_trusted(experiment)  # ours, writable by us only
    target = {"tuner.pkl": experiment / "tuner.pkl", "experiment": experiment, "storage": storage}[what]
    target.chmod(target.stat().st_mode | 0o022)
    with pytest.raises(UntrustedStorageError) as error:
        check_search_state(experiment)  # what `kdsweep resume` calls before Ray starts
    assert "writable by others" in one_line(error.value, target)
    os.chmod(target, 0o700 if target.is_dir() else 0o600)
    check_storage_trusted(experiment)
