"""Pretrained weights a sweep starts from: a teacher (a file, or another sweep's exported student in
MLflow) and the students' initialisation. Resolved in the driver before anything trains; loaded
in workers by content hash, so a changed file is refused rather than used stale.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.artifacts
import torch
from mlflow.exceptions import MlflowException

from kd_core.checkpoints import CheckpointError, load_weights, read_state_dict, sha256_file
from kd_core.models import StagedModel, build_model
from sweeps import tags
from sweeps.spec import ArchSpec, SweepSpec
from sweeps.tracking import Tracker

STATE_FILE = "student_state_dict.pt"  # as sweeps.export writes them
META_FILE = "student.json"
EXPORT_DIR = "export"


def _model_version(uri: str, tracker: Tracker) -> tuple[str, str, str, str | None]:
    """(run id, artifact dir, pinned URI, weights hash recorded at registration or None) of
    `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/PATH`."""
    if uri.startswith("runs:/"):
        run_id, _, artifact = uri.removeprefix("runs:/").partition("/")
        return run_id, artifact.strip("/") or EXPORT_DIR, uri, None
    name_part = uri.removeprefix("models:/")
    if "@" in name_part:
        name, alias = name_part.split("@", 1)
        version = tracker.client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = name_part.rpartition("/")
        version = tracker.client.get_model_version(name, number)
    registered = (version.tags or {}).get(tags.WEIGHTS_SHA256)
    return version.run_id, EXPORT_DIR, f"models:/{name}/{version.version}", registered


def _download(run_id: str, path: str, tracker: Tracker, into: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=into,
                                                    tracking_uri=tracker.uri))


def pin_teacher(spec: SweepSpec, tracker: Tracker) -> SweepSpec:
    """The spec with a `model_uri` teacher resolved to a fixed model version (its run, artifact
    path, weights hash, class count; `arch` taken from the model). Raises ValueError naming the
    problem: an unknown model, version or alias, an export that is not a staged model."""
    teacher = spec.teacher
    if teacher is None or teacher.model_uri is None or teacher.resolved is not None:
        return spec
    uri = teacher.model_uri
    try:
        run_id, artifact, pinned, registered = _model_version(uri, tracker)
        with tempfile.TemporaryDirectory() as tmp:
            meta = json.loads(_download(run_id, f"{artifact}/{META_FILE}", tracker, tmp).read_text())
            weights = _download(run_id, f"{artifact}/{STATE_FILE}", tracker, tmp)
            if registered and sha256_file(weights) != registered:  # the run's export/ was written again
                raise ValueError(f"teacher.model_uri {uri!r}: the files of {pinned} in run {run_id} are not "
                                 "the ones registered with it (the run exported another student since)")
            arch = ArchSpec.model_validate(meta["arch"])
            if teacher.arch is not None and teacher.arch.model_dump() != arch.model_dump():
                raise ValueError(f"teacher.arch {teacher.arch.label()} differs from the model's {arch.label()}")
            model = build_model(arch.name, int(meta["num_classes"]), int(meta["input_shape"][0]), arch.args)
            load_weights(model, read_state_dict(weights), f"teacher.model_uri {uri}")
            resolved = {"model_uri": pinned, "run_id": run_id, "artifact": f"{artifact}/{STATE_FILE}",
                        "sha256": sha256_file(weights), "num_classes": str(meta["num_classes"])}
    except MlflowException as error:
        first = str(error.message if hasattr(error, "message") else error).strip().splitlines()[0]
        raise ValueError(f"teacher.model_uri {uri!r} at {tracker.uri}: {first}") from None
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"teacher.model_uri {uri!r}: not a kdsweep export ({META_FILE} lacks arch, "
                         "num_classes or input_shape)") from None
    except CheckpointError as error:
        raise ValueError(f"{error} (a SimKD student, whose deployable reuses its teacher's head, cannot "
                         "be a teacher)") from None
    return spec.model_copy(update={"teacher": teacher.model_copy(update={"arch": arch, "resolved": resolved})})


def init_weights(init: dict[str, Any], tracking_uri: str | None) -> dict[str, torch.Tensor]:
    """The state dict an `init` names, checked against its recorded hash.

    Raises CheckpointError when the file or model changed since the sweep resolved it.
    """
    if "file" in init:
        source, path = Path(init["file"]), Path(init["file"])
        return _checked(read_state_dict(path, init.get("key")), sha256_file(path), init, str(source))
    with tempfile.TemporaryDirectory() as tmp:
        if tracking_uri is None:
            raise ValueError(f"{init['model_uri']}: loading an MLflow model needs the tracking URI")
        path = _download(init["run_id"], init["artifact"], Tracker(tracking_uri), tmp)
        return _checked(read_state_dict(path), sha256_file(path), init, init["model_uri"])


def _checked(state: dict[str, torch.Tensor], digest: str, init: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    if digest != init["sha256"]:
        raise CheckpointError(f"{source} changed since the sweep started (sha256 {digest[:12]}, "
                              f"recorded {init['sha256'][:12]}): start a new sweep")
    return state


def initialise(model: StagedModel, init: dict[str, Any] | None, tracking_uri: str | None, *,
               new_head: bool) -> list[str]:
    """Load `init`'s weights into `model` (nothing when None); returns notes for the log.
    `tracking_uri` is needed only for an MLflow model."""
    if init is None:
        return []
    source = init.get("file") or init["model_uri"]
    return load_weights(model, init_weights(init, tracking_uri), str(source), new_head=new_head)
