"""Stage pipelines: a method's frozen sources come from the stage store, and a stage that
is missing is trained once (under the store's lock) as its own tracked MLflow run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import ray
import torch

from kd_core.data import DATASETS, Dataset
from kd_core.distillers import DISTILLERS
from kd_core.models import StagedModel, build_model
from kd_core.recipes import Recipe
from kd_core.stages import StageRecord, StageSpec, StageStore, TrainedStage
from kd_core.train import EpochReport, fit
from sweeps.tracking import TAG_STAGE, Tracker

_datasets: dict[tuple[str, str], Dataset] = {}  # per process: a reused actor loads data once
_models: dict[tuple[str, str], StagedModel] = {}


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep needs besides its sampled values (small, picklable)."""

    name: str
    spec: dict[str, Any]
    storage: str
    tracking_uri: str
    parent_run_id: str


def load_dataset(data: dict[str, Any], device: str = "cpu") -> Dataset:
    """The dataset on `device`, loaded once per process."""
    key = (json.dumps(data, sort_keys=True), device)
    if key not in _datasets:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("the sweep asks for GPUs (gpus_per_trial > 0) but CUDA is not available")
        args = {k: v for k, v in data.items() if k != "name"}
        _datasets[key] = DATASETS.get(data["name"])(**args).to(device)
    return _datasets[key]


def new_model(arch: dict[str, Any], data: Dataset, seed: int) -> StagedModel:
    torch.manual_seed(seed)  # equal seeds give equal initial weights across trials
    return build_model(arch["name"], data.num_classes, data.in_channels, arch.get("args", {}))


def arch_params(prefix: str, arch: dict[str, Any]) -> dict[str, Any]:
    inner = ",".join(f"{k}={v}" for k, v in sorted(arch.get("args", {}).items()))
    params: dict[str, Any] = {prefix: f"{arch['name']}({inner})"}
    params.update({f"{prefix}.{k}": v for k, v in arch.get("args", {}).items()})
    return params


def recipe_params(recipe: Recipe) -> dict[str, Any]:
    return {f"recipe.{k}": v for k, v in recipe.as_dict().items()}


def train_stage(stage: StageSpec, device: str, tracker: Tracker, parent_run_id: str) -> TrainedStage:
    """Train one stage (CE, or its method from frozen parents) as a tracked child run."""
    recipe = Recipe(**stage.recipe)
    method = DISTILLERS.get(stage.method["name"])
    params = method.make_params(stage.method.get("params", {}))
    run_id = tracker.open_child(
        parent_run_id, stage.role, TAG_STAGE, stage.key, f"{stage.role}-{stage.key[:8]}",
        params={"method": stage.method["name"], **vars(params), **arch_params("arch", stage.arch),
                **recipe_params(recipe), "data": stage.data["name"], "seed": stage.seed,
                "stage_key": stage.key},
        tags={},
    )
    status, reason = "FAILED", None
    try:
        data = load_dataset(stage.data, device)
        model = new_model(stage.arch, data, stage.seed).to(device)
        distiller = method(model, [], params)

        def log(report: EpochReport) -> None:
            tracker.log_metrics(run_id, report.metrics, report.epoch)

        result = fit(distiller, data, recipe, seed=stage.seed, callback=log)
        status = "FINISHED"
        return TrainedStage(
            result.best_state, data.num_classes, data.in_channels,
            metrics=result.metrics, info={"run_id": run_id, "best_epoch": result.best_epoch},
        )
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        raise
    finally:
        tracker.finish(run_id, status, reason)


def resolve_stage(
    stage: StageSpec, context: SweepContext, tracker: Tracker, device: str = "cpu"
) -> tuple[StageRecord, StagedModel]:
    """The trained stage and its frozen model on `device`, training it first if no one has."""
    store = StageStore(context.storage)
    record, _ = store.get_or_train(
        stage, lambda s: train_stage(s, device, tracker, context.parent_run_id)
    )
    key = (record.key, device)
    if key not in _models:
        _models[key] = record.load_model(device)
    return record, _models[key]


def ensure_stage(stage: StageSpec, context: SweepContext, device: str) -> StageRecord:
    """`resolve_stage` for a Ray task: returns only the (picklable) record."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    return resolve_stage(stage, context, Tracker(context.tracking_uri), device)[0]
