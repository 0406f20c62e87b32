"""Best student -> files (state dict, TorchScript, metadata) and an MLflow registered model
version, each verified by reloading it and re-evaluating it on the test split.

The registered model is the TorchScript student (MLflow's PyTorch flavour stores a ScriptModule
with `torch.jit.save`), and `load_registered` reads it with `torch.jit.load`, which parses the
TorchScript format itself and never calls Python's unpickler: nothing in the model store is
unpickled as code, and a file that is not a TorchScript archive is refused. (`torch.export`'s
"pt2" format cannot hold every student: SimKD's deployable sizes its pooling from a buffer.)

A sweep refers to its student by the pinned version (`models:/NAME/VERSION`) everywhere. The
`champion` alias moves by one rule (`champion_decision`): to a version whose val accuracy beats
the current champion's on the same data, or when asked (`tracking.champion`, `kdsweep promote`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pytorch
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from torch import nn

from kd_core.checkpoints import sha256_file
from kd_core.data import Dataset
from kd_core.train import evaluate
from sweeps import tags
from sweeps.tracking import Tracker

STATE_DICT_FILE = "student_state_dict.pt"
TORCHSCRIPT_FILE = "student.torchscript.pt"
META_FILE = "student.json"
ARTIFACT_DIR = "export"
PARETO_DIR = "pareto"  # pareto/<trial id>/: every Pareto-optimal student of a multi-objective sweep
ALIAS = "champion"
REGISTERED_FILE = "data/model.pth"  # where MLflow's PyTorch flavour keeps the TorchScript archive


class ExportError(RuntimeError):
    """A reloaded export does not reproduce the recorded accuracy."""


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    test_acc: float
    num_params: int
    model_name: str
    model_version: str
    champion: str = ""  # whether this version took the `champion` alias, and why

    @property
    def model_uri(self) -> str:
        """The pinned version: it means this student for good, whatever the alias does later."""
        return f"models:/{self.model_name}/{self.model_version}"


def data_key(data_spec: dict[str, Any]) -> str:
    """What makes two val accuracies comparable: the same dataset spec (name, seed, split fractions...)."""
    return hashlib.sha256(json.dumps(data_spec, sort_keys=True).encode()).hexdigest()[:16]


def champion_decision(client: MlflowClient, name: str, val_acc: float, data: str, rule: str) -> tuple[bool, str]:
    """Whether a new version (val accuracy `val_acc` on data `data_key`) takes the `champion` alias
    of `name`, and why. `rule`: better | always | never (`tracking.champion`)."""
    if rule != "better":
        return rule == "always", f"{'promoted' if rule == 'always' else 'not promoted'} (tracking.champion: {rule})"
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return True, f"promoted: the first champion of {name}"
    theirs, held = current.tags or {}, f"version {current.version} keeps {ALIAS}"
    if theirs.get(tags.DATA_KEY) != data:
        return False, f"{held}: it was selected on other data, not comparable (kdsweep promote moves it)"
    best = float(theirs[tags.VAL_ACC])
    if val_acc > best:
        return True, f"promoted: val accuracy {val_acc:.4f} beats version {current.version}'s {best:.4f}"
    return False, f"{held}: its val accuracy {best:.4f} >= {val_acc:.4f}"


def _check(what: str, accuracy: float, expected: float) -> None:
    if abs(accuracy - expected) > 1e-9:
        raise ExportError(f"{what}: test accuracy {accuracy:.6f} != recorded {expected:.6f}")


class RegisteredModelError(ValueError):
    """A registered model that is not a TorchScript archive (damaged, or replaced by a pickle)."""


def load_registered(model_uri: str) -> torch.jit.ScriptModule:
    """The registered student at `model_uri` (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, a
    run or a local path), read by `torch.jit.load` alone: no Python unpickling, so nothing in
    the store runs. Raises RegisteredModelError naming the URI when it is not TorchScript."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        try:
            return torch.jit.load(str(directory / REGISTERED_FILE), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise RegisteredModelError(f"{model_uri}: {REGISTERED_FILE} is not a TorchScript model, refused "
                                       f"({first[:200]})") from None


def write_student_files(
    model: nn.Module, data: Dataset, directory: Path, tracker: Tracker, parent_run_id: str,
    artifact_path: str, meta: dict[str, Any],
) -> tuple[float, int]:
    """State dict, TorchScript (reloaded and re-evaluated) and metadata, in `directory` and as
    artifacts of the parent run. Returns (test accuracy, parameter count)."""
    model = model.cpu().eval()
    _, test_acc = evaluate(model, data.test)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / STATE_DICT_FILE)
    example, _ = next(data.test.batches(2))  # model inputs, after the split's transform
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        torch.jit.trace(model, example).save(str(directory / TORCHSCRIPT_FILE))
        _check("TorchScript", evaluate(torch.jit.load(str(directory / TORCHSCRIPT_FILE)),
                                       data.test)[1], test_acc)
    num_params = sum(p.numel() for p in model.parameters())
    info = {
        **meta, "test_acc": test_acc, "num_params": num_params,
        "input_shape": list(example.shape[1:]), "num_classes": data.num_classes,
        "preprocess": data.preprocess, "files": [STATE_DICT_FILE, TORCHSCRIPT_FILE],
    }
    (directory / META_FILE).write_text(json.dumps(info, indent=2, default=str))
    tracker.client.log_artifacts(parent_run_id, str(directory), artifact_path)
    return test_acc, num_params


def export_student(
    model: nn.Module,
    data: Dataset,
    directory: Path,
    tracker: Tracker,
    parent_run_id: str,
    model_name: str,
    meta: dict[str, Any],
    champion: str = "better",
) -> ExportResult:
    """Write, log, register and verify the student; move `champion` by `champion_decision`.
    `meta` describes how it was made: its sweep, its val accuracy and its data spec among it."""
    model = model.cpu().eval()
    test_acc, num_params = write_student_files(model, data, directory, tracker, parent_run_id, ARTIFACT_DIR, meta)
    example, _ = next(data.test.batches(2))
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # MLflow warns about pickles: a ScriptModule is written by torch.jit.save, not pickled.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with mlflow.start_run(run_id=parent_run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        scripted = torch.jit.load(str(directory / TORCHSCRIPT_FILE))  # the file verified above
        logged = mlflow.pytorch.log_model(
            scripted, name="student", registered_model_name=model_name, signature=signature,
            serialization_format="pickle", pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version, client = str(logged.registered_model_version), tracker.client
    key = data_key(meta["data"])
    # Decided before this version is tagged, so that it is never compared with itself.
    promote, reason = champion_decision(client, model_name, meta["val_acc"], key, champion)
    for tag, value in {tags.SWEEP: meta["sweep"], tags.VAL_ACC: repr(float(meta["val_acc"])), tags.DATA_KEY: key,
                       tags.WEIGHTS_SHA256: sha256_file(directory / STATE_DICT_FILE)}.items():
        client.set_model_version_tag(model_name, version, tag, value)
    if promote:
        client.set_registered_model_alias(model_name, ALIAS, version)
    result = ExportResult(directory, test_acc, num_params, model_name, version, reason)
    reloaded = load_registered(result.model_uri)  # the pinned version: an alias may move meanwhile
    _check("MLflow model", evaluate(reloaded, data.test)[1], test_acc)
    return result
