"""Best student -> files (state dict, torch.export program, ONNX, metadata) and an MLflow
registered model version, each verified by reloading it and re-evaluating it on the test split.

Forms (torch 2.14): TorchScript (`torch.jit.trace`/`script`) is deprecated upstream and warns on
every use, so it is no longer written; `student.pt2` (a `torch.export` program) replaces it and
`student.onnx` (the dynamo-based ONNX exporter) runs without torch. Both take any batch size.
SimKD's deployable reads its alignment size from an integer buffer, which torch.export would
treat as a data-dependent input and refuse; `exportable` fixes integer buffers as Python values
in the copy that is exported (they are configuration, never changed after training).

The registered model is the ONNX file (MLflow's ONNX flavour) and `load_registered` reads it
with onnxruntime: ONNX is a protobuf, parsed without Python's unpickler, so nothing in the model
store runs and a file that is not ONNX is refused. Neither older choice keeps that property:
MLflow's PyTorch flavour unpickles on `mlflow.pytorch.load_model`, and `torch.export.load` falls
back to unpickling (`weights_only=False`) for what a .pt2 archive marks as pickled, so
`student.pt2` is for files you made yourself.

A sweep refers to its student by the pinned version (`models:/NAME/VERSION`) everywhere. The
`champion` alias moves by one rule (`champion_decision`): to a version whose val accuracy beats
the current champion's on the same data, or when asked (`tracking.champion`, `kdsweep promote`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import onnxruntime
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
PROGRAM_FILE = "student.pt2"  # torch.export program (torch.export.save)
ONNX_FILE = "student.onnx"
META_FILE = "student.json"
ARTIFACT_DIR = "export"
PARETO_DIR = "pareto"  # pareto/<trial id>/: every Pareto-optimal student of a multi-objective sweep
ALIAS = "champion"
REGISTERED_FILE = "model.onnx"  # where MLflow's ONNX flavour keeps the model
INPUT, OUTPUT = "images", "logits"  # the exported graphs' input and output names
#: An exported form's logits must equal the model's within |a - b| <= ATOL + RTOL * |b| (float32
#: kernels may order sums differently), and its test accuracy must equal the recorded one exactly.
ATOL, RTOL = 1e-4, 1e-4


class ExportError(RuntimeError):
    """A reloaded form does not reproduce the model: logits beyond ATOL/RTOL, or another test accuracy."""


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


def exportable(model: nn.Module) -> nn.Module:
    """A CPU eval-mode copy of `model` whose integer buffers (SimKD's aligned size, BatchNorm's
    step counter) are plain Python values, so torch.export bakes them into the graph instead of
    treating them as inputs whose value it cannot know."""
    copied = copy.deepcopy(model).cpu().eval()
    for module in copied.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_floating_point():
                del module._buffers[name]
                setattr(module, name, buffer.tolist())
    return copied


def _batch_dim() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


class OnnxStudent(nn.Module):
    """An ONNX model run by onnxruntime on the CPU, called like the student: images (N, C, H, W)
    float32 -> logits (N, classes), as torch tensors."""

    def __init__(self, model: str | bytes) -> None:
        super().__init__()
        self.session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run([OUTPUT], {INPUT: images.detach().cpu().numpy()})
        return torch.from_numpy(logits)


def _verify(what: str, form: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, data: Dataset,
            test_acc: float) -> None:
    """Raise ExportError unless `form` gives `model`'s logits (ATOL, RTOL) and `test_acc` on the test split."""
    correct, worst = 0, 0.0
    with torch.no_grad():
        for images, labels in data.test.batches(512):
            expected, logits = model(images), form(images)
            worst = max(worst, float(((logits - expected).abs() - RTOL * expected.abs()).max()))
            correct += int((logits.argmax(1) == labels).sum())
    if worst > ATOL:
        raise ExportError(f"{what}: logits differ from the model's by {worst:.3g} beyond rtol {RTOL} "
                          f"(tolerance {ATOL})")
    accuracy = correct / len(data.test)
    if accuracy != test_acc:
        raise ExportError(f"{what}: test accuracy {accuracy:.6f} != recorded {test_acc:.6f}")


class RegisteredModelError(ValueError):
    """A registered model that is not an ONNX model (damaged, or replaced by a pickle)."""


def load_registered(model_uri: str) -> OnnxStudent:
    """The registered student at `model_uri` (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, a
    run or a local path), read by onnxruntime alone: no Python unpickling, so nothing in the
    store runs. Raises RegisteredModelError naming the URI when it is not an ONNX model."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        try:
            return OnnxStudent((directory / REGISTERED_FILE).read_bytes())
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors derive from Exception alone
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise RegisteredModelError(f"{model_uri}: {REGISTERED_FILE} is not an ONNX model, refused "
                                       f"({first[:200]})") from None


def _describe(example: torch.Tensor, data: Dataset) -> dict[str, dict[str, Any]]:
    """For each file form: how to load it and what its input must be (from the dataset's split)."""
    batch = "batch (any N >= 1)"
    image = {"name": INPUT, "shape": [batch, *example.shape[1:]], "dtype": str(example.dtype).removeprefix("torch."),
             "layout": "NCHW (batch, channels, height, width)" if example.dim() == 4 else "batch first",
             "preprocess": data.preprocess}
    output = {"name": OUTPUT, "shape": [batch, data.num_classes], "meaning": "class logits (argmax: the class)"}
    return {
        ONNX_FILE: {"format": "ONNX", "load": "onnxruntime.InferenceSession(path)", "input": image, "output": output},
        PROGRAM_FILE: {"format": "torch.export program", "input": image, "output": output,
                       "load": "torch.export.load(path).module() (traced in eval mode; it has no .eval())"},
        STATE_DICT_FILE: {"format": "state dict of tensors", "load": "torch.load(path, weights_only=True), then "
                          "load_state_dict into the deployable of `method` built with `arch`",
                          "input": image, "output": output},
    }


def write_student_files(
    model: nn.Module, data: Dataset, directory: Path, tracker: Tracker, parent_run_id: str,
    artifact_path: str, meta: dict[str, Any],
) -> tuple[float, int]:
    """State dict, torch.export program and ONNX file (each reloaded and verified, `_verify`) and
    the metadata, in `directory` and as artifacts of the parent run. Returns (test accuracy,
    parameter count). Raises ExportError when a form does not reproduce the model."""
    model = model.cpu().eval()
    _, test_acc = evaluate(model, data.test)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / STATE_DICT_FILE)
    example, _ = next(data.test.batches(2))  # model inputs, after the split's transform
    frozen = exportable(model)
    torch.export.save(torch.export.export(frozen, (example,), dynamic_shapes=_batch_dim()), directory / PROGRAM_FILE)
    _verify(PROGRAM_FILE, torch.export.load(directory / PROGRAM_FILE).module(), model, data, test_acc)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(frozen, (example,), directory / ONNX_FILE, dynamo=True, dynamic_shapes=_batch_dim(),
                          input_names=[INPUT], output_names=[OUTPUT], external_data=False, verbose=False)
    _verify(ONNX_FILE, OnnxStudent(str(directory / ONNX_FILE)), model, data, test_acc)
    num_params = sum(p.numel() for p in model.parameters())
    info = {
        **meta, "test_acc": test_acc, "num_params": num_params,
        "input_shape": list(example.shape[1:]), "num_classes": data.num_classes, "preprocess": data.preprocess,
        "files": [STATE_DICT_FILE, PROGRAM_FILE, ONNX_FILE], "forms": _describe(example, data),
        "tolerance": {"atol": ATOL, "rtol": RTOL},
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
    """Write, log, register (the ONNX file) and verify the student; move `champion` by
    `champion_decision`. `meta` describes how it was made: its sweep, its val accuracy and its
    data spec among it. Raises ExportError when a form or the registered model does not reproduce it."""
    import mlflow.onnx
    import onnx

    model = model.cpu().eval()
    test_acc, num_params = write_student_files(model, data, directory, tracker, parent_run_id, ARTIFACT_DIR, meta)
    example, _ = next(data.test.batches(2))
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # MLflow prints its registration messages straight to stderr: kept out of the console, logged.
    printed = io.StringIO()
    with mlflow.start_run(run_id=parent_run_id), contextlib.redirect_stderr(printed):
        logged = mlflow.onnx.log_model(
            onnx.load(str(directory / ONNX_FILE)), name="student", registered_model_name=model_name,
            signature=signature, save_as_external_data=False,
            pip_requirements=[f"onnxruntime=={onnxruntime.__version__}"],
        )
    if printed.getvalue().strip():
        logging.getLogger(__name__).info("%s", printed.getvalue().strip())
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
    # The pinned version: an alias may move meanwhile.
    _verify("MLflow model", load_registered(result.model_uri), model, data, test_acc)
    return result
