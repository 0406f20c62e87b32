"""Stage pipelines: a method's frozen sources come from the stage store; a missing stage is
trained once (under the store's lock), after its own parents, as a tracked MLflow run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from kd_core.cache import SourceLogitCache, build_cache, replayable
from kd_core.data import DATASETS, Dataset
from kd_core.distillers import DISTILLERS, Distiller
from kd_core.models import StagedModel, build_model
from kd_core.recipes import Recipe
from kd_core.stages import StageRecord, StageSpec, StageStore, TrainedStage
from kd_core.train import EpochReport, fit
from sweeps.sources import source_plan, source_stages
from sweeps.space import TrialPlan, resolve_trial
from sweeps.spec import SweepSettings, SweepSpec
from sweeps.tracking import TAG_STAGE, Tracker

CACHE_DIR = "teacher_cache"  # under the sweep storage, beside the stage store
_datasets: dict[tuple[str, str], Dataset] = {}  # per process: a reused actor loads data once
_models: dict[tuple[str, str], StagedModel] = {}
_caches: dict[tuple[str, ...], SourceLogitCache] = {}


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep needs besides its sampled values (small, picklable)."""

    name: str
    spec: dict[str, Any]
    storage: str
    tracking_uri: str
    parent_run_id: str


@dataclass(frozen=True)
class Source:
    """A frozen source as a trial sees it: its stage, its record and its model."""

    stage: StageSpec
    record: StageRecord
    model: StagedModel


def load_dataset(data: dict[str, Any], device: str = "cpu") -> Dataset:
    """The dataset on `device`, loaded once per process."""
    key = (json.dumps(data, sort_keys=True), device)
    if key not in _datasets:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("the sweep asks for GPUs (gpus_per_trial > 0) but CUDA is not available")
        args = {k: v for k, v in data.items() if k != "name"}
        _datasets[key] = DATASETS.get(data["name"])(**args).to(device)
    return _datasets[key]


def input_shape(data: Dataset) -> tuple[int, ...]:
    images, _ = next(data.val.batches(1))
    return tuple(images.shape[1:])


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


def lineage_tags(sources: list[Source]) -> dict[str, str]:
    """`kdsweep.<role>_run_id` / `_stage_key` per source (assistants numbered from 1)."""
    tags, counts = {}, {}
    for source in sources:
        role = source.stage.role
        counts[role] = counts.get(role, 0) + 1
        label = role if role != "assistant" else f"assistant_{counts[role]}"
        tags[f"kdsweep.{label}_stage_key"] = source.record.key
        tags[f"kdsweep.{label}_run_id"] = source.record.run_id or ""
    return tags


def fit_options(
    context: SweepContext, distiller: Distiller, sources: list[Source], data: Dataset, data_spec: dict[str, Any]
) -> dict[str, Any]:
    """`fit`'s keyword arguments from the sweep settings: precision, memory format and, where
    the method allows it, the teacher-output cache in the sweep's storage."""
    settings = SweepSettings.model_validate(context.spec["sweep"])
    cache, use_cache = settings.teacher_cache, None
    if cache.enabled and sources and distiller.can_cache_sources() and replayable(data.train):
        data_key = json.dumps(data_spec, sort_keys=True)
        key = (context.storage, tuple(s.record.key for s in sources), data_key, cache.model_dump_json(),
               str(data.train.labels.device))
        if key not in _caches:  # a reused actor loads it once
            _caches[key] = build_cache(Path(context.storage) / CACHE_DIR, [(s.record.key, s.model) for s in sources],
                                       data_key, data.train, views=cache.views, seed=cache.seed, dtype=cache.dtype)
        use_cache = _caches[key]
    return {"source_cache": use_cache, "precision": settings.precision, "channels_last": settings.channels_last}


def train_stage(
    stage: StageSpec, sources: list[Source], device: str, tracker: Tracker, context: SweepContext
) -> TrainedStage:
    """Train one stage with its method, learning from its (already resolved) parents."""
    recipe = Recipe(**stage.recipe)
    method = DISTILLERS.get(stage.method["name"])
    params = method.make_params(stage.method.get("params", {}))
    run_id = tracker.open_child(
        context.parent_run_id, stage.role, TAG_STAGE, stage.key, f"{stage.role}-{stage.key[:8]}",
        params={"method": stage.method["name"], **vars(params), **arch_params("arch", stage.arch),
                **recipe_params(recipe), "data": stage.data["name"], "seed": stage.seed,
                "stage_key": stage.key},
        tags=lineage_tags(sources),
    )
    status, reason = "FAILED", None
    try:
        data = load_dataset(stage.data, device)
        model = new_model(stage.arch, data, stage.seed)
        distiller = method(model, [s.model for s in sources], params).to(device)

        logged = tracker.last_step(run_id)  # > 0 when retraining after a crash

        def log(report: EpochReport) -> None:
            if report.epoch > logged:
                tracker.log_metrics(run_id, report.metrics, report.epoch)

        result = fit(distiller, data, recipe, seed=stage.seed, callback=log,
                     **fit_options(context, distiller, sources, data, stage.data))
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


def resolve_stage(stage: StageSpec, context: SweepContext, tracker: Tracker, device: str = "cpu") -> Source:
    """The trained stage and its frozen model on `device`; trains it (parents first) if absent."""
    store = StageStore(context.storage)
    record = store.get(stage.key)
    if record is None:
        parents = [resolve_stage(p, context, tracker, device) for p in stage.parents]
        record, _ = store.get_or_train(
            stage, lambda s: train_stage(s, parents, device, tracker, context)
        )
    key = (record.key, device)
    if key not in _models:
        _models[key] = record.load_model(device)
    return Source(stage, record, _models[key])


def trial_sources(
    spec: SweepSpec, plan: TrialPlan, data: Dataset, context: SweepContext, tracker: Tracker, device: str
) -> list[Source]:
    """The frozen sources of a trial's method, trained first where no one has yet."""
    sources = source_plan(spec, data.num_classes, input_shape(data), plan.student_arch)
    stages = source_stages(plan.method, plan.params, sources)
    return [resolve_stage(stage, context, tracker, device) for stage in stages]


def build_distiller(plan: TrialPlan, data: Dataset, seed: int, sources: list[Source], device: str) -> Distiller:
    """The trial's distiller: a fresh student (seeded) learning from the frozen sources."""
    student = new_model(plan.student_arch, data, seed)
    return DISTILLERS.get(plan.method)(student, [s.model for s in sources], plan.params).to(device)


def ensure_stage(stage: StageSpec, context: SweepContext, device: str) -> StageRecord:
    """`resolve_stage` for a Ray task: returns only the (picklable) record."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    return resolve_stage(stage, context, Tracker(context.tracking_uri), device).record


def retrain(
    spec: SweepSpec, plan: TrialPlan, seed: int, context: SweepContext, tracker: Tracker, device: str = "cpu"
) -> dict[str, float]:
    """Train a trial's configuration again with another seed (student initialisation and
    shuffling; the frozen sources stay the stored ones). Returns the final metrics: the test
    metrics are those of the best-val epoch."""
    data = load_dataset(spec.data.model_dump(), device)
    sources = trial_sources(spec, plan, data, context, tracker, device)
    distiller = build_distiller(plan, data, seed, sources, device)
    options = fit_options(context, distiller, sources, data, spec.data.model_dump())
    return fit(distiller, data, plan.recipe, seed=seed, **options).metrics


def retrain_task(spec_data: dict[str, Any], sampled: dict[str, Any], seed: int, context: SweepContext,
                 device: str) -> dict[str, float]:
    """`retrain` for a Ray task (the spec travels as plain data)."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    spec = SweepSpec.model_validate(spec_data)
    return retrain(spec, resolve_trial(spec, sampled), seed, context, Tracker(context.tracking_uri), device)
