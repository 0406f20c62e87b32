"""Stages and the stage store.

A stage is one training run whose result other runs reuse (a teacher, an assistant, a
baseline student). Its key hashes everything that determines the result, so a sweep
trains each stage once and every trial (and later sweeps on the same storage) reuses it.
A file lock per key keeps concurrent trials from training the same stage twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from kd_core.models import StagedModel, build_model

WEIGHTS_FILE = "weights.pt"
META_FILE = "stage.json"


@dataclass(frozen=True)
class StageSpec:
    """Everything that determines a stage's weights.

    `init` names the weights a stage starts from (a user's file by its content hash, or a
    pinned MLflow model); with `recipe` None the stage is not trained at all: its weights are
    `init`'s, evaluated once (a pretrained teacher).
    """

    role: str  # teacher, assistant, baseline, ...
    arch: dict[str, Any]  # {"name": ..., "args": {...}}
    data: dict[str, Any]  # {"name": ..., "seed": ..., ...}
    recipe: dict[str, Any] | None  # a Recipe as a dict; None: imported, not trained
    method: dict[str, Any] = field(default_factory=lambda: {"name": "ce", "params": {}})
    seed: int = 0
    parents: tuple[StageSpec, ...] = ()  # the frozen stages this one learns from, in order
    #: {"file", "sha256", "key"} or {"model_uri", "run_id", "artifact", "sha256"}; where a file
    #: lies is not a determinant, its content is.
    init: dict[str, Any] | None = None

    @property
    def trained(self) -> bool:
        return self.recipe is not None

    @property
    def key(self) -> str:
        # The role is a label, not a determinant: a teacher and a baseline with equal
        # settings are the same training run. Parents count through their keys.
        determinants = {
            "arch": self.arch, "data": self.data, "recipe": self.recipe, "method": self.method,
            "seed": self.seed, "parents": [p.key for p in self.parents],
        }
        if self.init is not None:  # absent otherwise: keys of stages without init stay as they were
            determinants["init"] = {k: v for k, v in self.init.items() if k != "file"}
        canonical = json.dumps(determinants, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description, parents by key."""
        return {**{k: v for k, v in asdict(self).items() if k != "parents"},
                "parents": [p.key for p in self.parents]}


@dataclass(frozen=True)
class SourcePlan:
    """What a method builds its frozen source stages from (`Distiller.source_stages`)."""

    teacher: StageSpec | None
    assistants: tuple[dict[str, Any], ...]  # assistant architectures, largest first
    student_arch: dict[str, Any]
    data: dict[str, Any]
    recipe: dict[str, Any]  # for stages derived during a sweep (assistants, ...)
    seed: int
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) of model inputs
    #: The spec's fixed method parameters. Derived stages use these, never a trial's sampled
    #: values, so that every trial shares them.
    fixed_params: dict[str, Any] = field(default_factory=dict)

    def fixed_params_of(self, params_class: type) -> dict[str, Any]:
        """The fixed parameter values a params dataclass has."""
        names = {f.name for f in fields(params_class)}
        return {k: v for k, v in self.fixed_params.items() if k in names}

    @property
    def teacher_recipe(self) -> dict[str, Any]:
        """The teacher's recipe, or this plan's for a pretrained (untrained) teacher."""
        return self.require_teacher().recipe or self.recipe

    def require_teacher(self) -> StageSpec:
        if self.teacher is None:
            raise ValueError("needs a teacher (add a 'teacher' section)")
        return self.teacher

    def require_assistants(self, n: int) -> tuple[dict[str, Any], ...]:
        if n > len(self.assistants):
            raise ValueError(f"needs {n} assistants but {len(self.assistants)} are available "
                             "(list them under 'assistants', largest first)")
        return self.assistants[:n]

    def stage(
        self, role: str, arch: dict[str, Any], method: str, params: dict[str, Any],
        parents: tuple[StageSpec, ...] = (), **changes: Any,
    ) -> StageSpec:
        """A derived stage on this plan's data, recipe and seed (any of them can be changed)."""
        values = {"data": self.data, "recipe": self.recipe, "seed": self.seed, **changes}
        return StageSpec(role, arch, method={"name": method, "params": params}, parents=parents,
                         **values)


@dataclass(frozen=True)
class TrainedStage:
    """What a stage's training function returns."""

    state_dict: dict[str, torch.Tensor]
    num_classes: int
    in_channels: int
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the tracking run id


@dataclass(frozen=True)
class StageRecord:
    """A stage in the store."""

    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def run_id(self) -> str | None:
        return self.meta.get("info", {}).get("run_id")

    def load_model(self, device: torch.device | str = "cpu") -> StagedModel:
        arch = self.meta["spec"]["arch"]
        model = build_model(
            arch["name"], self.meta["num_classes"], self.meta["in_channels"], arch.get("args", {})
        )
        state = torch.load(self.path / WEIGHTS_FILE, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
        return model.to(device)


class StageStore:
    """Trained stages under `root/stages/<key>/`, each trained at most once."""

    def __init__(self, root: str | Path, lock_timeout: float = 6 * 3600) -> None:
        self.root = Path(root) / "stages"
        self.lock_timeout = lock_timeout

    def get(self, key: str) -> StageRecord | None:
        path = self.root / key
        meta_file = path / META_FILE
        if not meta_file.exists():  # written last, so its presence marks a complete stage
            return None
        return StageRecord(key, path, json.loads(meta_file.read_text()))

    def get_or_train(
        self, spec: StageSpec, train: Callable[[StageSpec], TrainedStage]
    ) -> tuple[StageRecord, bool]:
        """The stored stage, training it first if absent. Returns (record, trained_now)."""
        key = spec.key
        if (record := self.get(key)) is not None:
            return record, False
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock"), timeout=self.lock_timeout):
            if (record := self.get(key)) is not None:  # trained while we waited
                return record, False
            started = time.time()
            result = train(spec)
            meta = {
                "key": key, "spec": spec.describe(), "num_classes": result.num_classes,
                "in_channels": result.in_channels, "metrics": result.metrics,
                "info": result.info, "trained_on": socket.gethostname(), "pid": os.getpid(),
                "train_seconds": time.time() - started, "finished_at": time.time(),
            }
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
            torch.save(result.state_dict, tmp / WEIGHTS_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
            final = self.root / key
            if final.exists():  # an incomplete leftover of a crashed run
                shutil.rmtree(final)
            os.replace(tmp, final)
            return StageRecord(key, final, meta), True
