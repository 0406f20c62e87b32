"""Stages and the stage store.

A stage is one training run whose result other runs reuse (a teacher, an assistant, a
baseline student). Its key hashes everything that determines the result, so a sweep
trains each stage once and every trial (and later sweeps on the same storage) reuses it.
A file lock per key keeps concurrent trials from training the same stage twice.

Every stage is checked on load against what was recorded when it was published (its weights'
content hash, its key): a damaged one is named, set aside as `<key>.corrupt-<time>` and
trained again, so one bad file never poisons later sweeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from kd_core.checkpoints import load_tensors, sha256_file
from kd_core.models import StagedModel, build_model

WEIGHTS_FILE = "weights.pt"
META_FILE = "stage.json"
WEIGHTS_HASH = "weights_sha256"  # in stage.json: the weights file's content hash at publish time
QUARANTINE = ".corrupt-"  # a damaged stage is set aside as `<key>.corrupt-<time>`
LOG = logging.getLogger("kdsweep")


class CorruptStageError(RuntimeError):
    """A stored stage whose files do not match its record: names it and how to remove it."""

    def __init__(self, key: str, path: Path, problem: str) -> None:
        self.key, self.path, self.problem = key, path, problem
        super().__init__(f"stage {key} at {path} is damaged: {problem}. kdsweep sets such a stage aside "
                         f"and trains it again when a sweep needs it; to remove it yourself: rm -r {path}")


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

    @property
    def content_key(self) -> str:
        """The key and the weights' hash: names what is derived from these very weights (caches)."""
        digest = self.meta.get(WEIGHTS_HASH)
        return f"{self.key}-{digest[:16]}" if digest else self.key

    def load_model(self, device: torch.device | str = "cpu") -> StagedModel:
        """The stage's model with its weights; CorruptStageError when they do not load into it."""
        try:
            arch = self.meta["spec"]["arch"]
            model = build_model(
                arch["name"], self.meta["num_classes"], self.meta["in_channels"], arch.get("args", {})
            )
            model.load_state_dict(load_tensors(self.path / WEIGHTS_FILE))  # weights_only: nothing runs
        except Exception as error:  # truncated, garbage, another architecture's weights, bad metadata
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CorruptStageError(self.key, self.path, f"{WEIGHTS_FILE} does not load: {first[:300]}") from error
        return model.to(device)


class StageStore:
    """Trained stages under `root/stages/<key>/`, each trained at most once."""

    def __init__(self, root: str | Path, lock_timeout: float = 6 * 3600) -> None:
        self.root = Path(root) / "stages"
        self.lock_timeout = lock_timeout

    def get(self, key: str) -> StageRecord | None:
        """The stored stage, checked against its record; None when absent.

        Raises CorruptStageError when its metadata is unreadable, its weights are missing or
        differ from the hash recorded at publish time (stages published before hashes were
        recorded are checked by loading their weights into their architecture).
        """
        path = self.root / key
        meta_file = path / META_FILE
        if not meta_file.exists():  # written last, so its presence marks a complete stage
            return None
        try:
            meta = json.loads(meta_file.read_text())
            recorded_key, _ = meta["key"], meta["spec"]["arch"]["name"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptStageError(key, path, f"{META_FILE} is unreadable ({type(error).__name__}: {error})") from None
        if recorded_key != key:
            raise CorruptStageError(key, path, f"{META_FILE} records stage {recorded_key}")
        if not (path / WEIGHTS_FILE).is_file():
            raise CorruptStageError(key, path, f"{WEIGHTS_FILE} is missing")
        record = StageRecord(key, path, meta)
        if WEIGHTS_HASH not in meta:
            record.load_model()  # raises CorruptStageError
        elif (digest := sha256_file(path / WEIGHTS_FILE)) != meta[WEIGHTS_HASH]:
            raise CorruptStageError(key, path, f"{WEIGHTS_FILE} changed since it was published "
                                               f"(sha256 {digest[:12]}, recorded {meta[WEIGHTS_HASH][:12]})")
        return record

    def set_aside(self, error: CorruptStageError) -> Path:
        """Move a damaged stage out of the way (kept for a look, never used again); its new path."""
        aside = self.root / f"{error.key}{QUARANTINE}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.replace(error.path, aside)
        (aside / "damage.txt").write_text(f"{error.problem}\n")
        LOG.warning("stage %s was damaged (%s): set aside as %s, training it again", error.key, error.problem, aside)
        return aside

    def get_or_train(
        self, spec: StageSpec, train: Callable[[StageSpec], TrainedStage], check_load: bool = False,
    ) -> tuple[StageRecord, bool]:
        """The stored stage, training it first if absent or damaged (set aside, by one process
        under the lock). `check_load`: the caller could not load it, so it is also loaded here
        before it counts as intact. Returns (record, trained_now)."""
        key = spec.key
        try:
            if not check_load and (record := self.get(key)) is not None:
                return record, False
        except CorruptStageError:
            pass  # set aside below, under the lock
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock"), timeout=self.lock_timeout):
            try:
                if (record := self.get(key)) is not None:  # trained (or replaced) while we waited
                    if check_load:
                        record.load_model()
                    return record, False
            except CorruptStageError as error:
                self.set_aside(error)
            started = time.time()
            result = train(spec)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
            torch.save(result.state_dict, tmp / WEIGHTS_FILE)
            meta = {
                "key": key, "spec": spec.describe(), "num_classes": result.num_classes,
                "in_channels": result.in_channels, "metrics": result.metrics,
                "info": result.info, "trained_on": socket.gethostname(), "pid": os.getpid(),
                "train_seconds": time.time() - started, "finished_at": time.time(),
                WEIGHTS_HASH: sha256_file(tmp / WEIGHTS_FILE),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
            final = self.root / key
            if final.exists():  # an incomplete leftover of a crashed run
                shutil.rmtree(final)
            os.replace(tmp, final)
            return StageRecord(key, final, meta), True
