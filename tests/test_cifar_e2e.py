"""A sweep with CIFAR architectures on CIFAR-format files the test writes, end to end through
real Ray Tune, Optuna and MLflow, with device-resident crop/flip augmentation."""

from __future__ import annotations

import json

from tests.cifar_files import write_cifar
from tests.sweep_cli import run_spec


def test_cifar_sweep_runs_end_to_end(tmp_path) -> None:
    root = write_cifar(tmp_path / "data", num_classes=10, n_train=300, n_test=60)
    spec = {
        "name": "cifar_e2e",
        "data": {"name": "cifar10", "root": str(root), "augment": "crop_flip", "val_fraction": 0.2},
        "teacher": {"arch": {"name": "resnet14"}, "recipe": {"name": "crd", "epochs": 2, "milestones": [1]}},
        "student": {"arch": {"name": "resnet8"}},
        "method": {"name": "kd"},
        "recipe": {"name": "crd", "epochs": 2, "milestones": [1]},
        "search": {"method.T": {"low": 1.0, "high": 8.0}, "recipe.lr": {"low": 0.01, "high": 0.1, "log": True}},
        "sweep": {"num_trials": 2, "max_concurrent": 2, "scheduler": {"type": "none"}},
        "tracking": {"registered_model": "cifar_e2e_student"},
    }
    swept = run_spec(tmp_path, spec, "cifar")
    tracker, parent = swept["tracker"], swept["parent"]
    trials = tracker.children(parent.info.run_id, "trial")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.params["arch"] == "resnet8()" and r.data.params["teacher"] == "resnet14()" for r in trials)
    meta = json.loads((tmp_path / "kdsweep_storage/cifar/export/student.json").read_text())
    assert meta["input_shape"] == [3, 32, 32] and meta["num_classes"] == 10
    assert meta["preprocess"]["mean"]  # normalisation travels with the export
