"""What a worker process does before and around training: set itself up, load data, get a
method's frozen sources from the stage store (a missing stage is trained once, under the
store's lock, after its own parents, as a tracked MLflow run) and build the distiller.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kd_core.cache import SourceLogitCache, build_cache, replayable
from kd_core.data import DATASETS, Dataset
from kd_core.distillers import DISTILLERS, Distiller
from kd_core.distributed import DataParallel
from kd_core.models import StagedModel, build_model
from kd_core.recipes import Recipe
from kd_core.stages import CorruptStageError, StageRecord, StageSpec, StageStore, TrainedStage
from kd_core.train import EpochReport, evaluate, fit
from sweeps import tags
from sweeps.child_runs import child_run
from sweeps.pretrained import initialise
from sweeps.sources import source_plan, source_stages
from sweeps.space import TrialPlan
from sweeps.spec import SweepSettings, SweepSpec, load_plugins
from sweeps.tracking import Tracker

LOG = logging.getLogger("kdsweep")
CACHE_DIR = "teacher_cache"  # under the sweep storage, beside the stage store
_datasets: dict[tuple[str, str], Dataset] = {}  # per process: a reused actor loads data once
_models: dict[tuple[str, str], StagedModel] = {}
_caches: dict[tuple[str, ...], SourceLogitCache] = {}


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep needs besides its sampled values (small, picklable).

    `spec` is validated once, by the driver; workers use it as it is (`worker_setup`).
    """

    name: str
    spec: SweepSpec
    storage: str
    tracking_uri: str
    parent_run_id: str


@dataclass(frozen=True)
class Source:
    """A frozen source as a trial sees it: its stage, its record and its model."""

    stage: StageSpec
    record: StageRecord
    model: StagedModel


class StageWorkers(Protocol):
    """Workers a stage can train on, this process being rank 0 (`sweeps.data_parallel.WorkerGroup`)."""

    world_size: int

    def shares(self, distiller: type[Distiller], train_size: int, batch_size: int) -> str | None:
        """None when such a run can train on these workers, else why not."""

    def node_ips(self) -> list[str]:
        """Every rank's node address, rank 0 first."""

    def stage(self, stage: StageSpec) -> AbstractContextManager[DataParallel]:
        """Start `stage` on the other ranks and join them as rank 0."""


def task_options(settings: SweepSettings) -> dict[str, float]:
    """The Ray resources of one stage or task that trains on one device (`ray.remote(...).options
    (**...)`): one worker's CPUs and GPUs (a whole trial's when it has one worker), so GPU work
    is placed on GPU nodes and limited per GPU."""
    worker = settings.resources_per_worker
    return {"num_cpus": worker["CPU"], "num_gpus": worker.get("GPU", 0.0)}


def trial_resources(settings: SweepSettings) -> Any:
    """A trial's placement request (`tune.with_resources`): one bundle per worker (data-parallel
    rank), each with its share of the trial's CPUs and GPUs, a `tune.PlacementGroupFactory`
    (PACK: on as few nodes as fit). The trial's own actor is rank 0, in the first bundle;
    stages a trial trains run there, on its resources."""
    from ray import tune  # the command line imports Ray only once its token is set (cluster.session)

    return tune.PlacementGroupFactory([dict(settings.resources_per_worker)] * settings.workers_per_trial)


def worker_setup(spec: SweepSpec, *, driver: bool = False) -> None:
    """What every process that trains does first: import the spec's plugins, give torch one
    thread per CPU of a worker (`sweep.resources_per_worker`: a trial's share per DDP rank), or
    of the machine in the `driver`, and in a worker keep its imports out of garbage collection."""
    load_plugins(spec.plugins)
    cpus = os.cpu_count() if driver else spec.sweep.resources_per_worker["CPU"]
    torch.set_num_threads(max(1, int(cpus or 1)))
    if not driver:
        _freeze_imports()


@functools.cache  # once per process: a later call would also freeze the garbage of earlier trials
def _freeze_imports() -> None:
    """The objects alive after a worker's imports (torch, MLflow, Ray: half a million modules,
    functions, classes and their data) move to the garbage collector's permanent generation:
    each full collection while training then skips them, 0.06 s instead of 0.3 s in a trial's
    actor, every few trials."""
    gc.freeze()


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


def new_model(arch: dict[str, Any], data: Dataset, seed: int, init: dict[str, Any] | None = None,
              tracking_uri: str | None = None, *, new_head: bool = True) -> StagedModel:
    """A model for `data`, seeded (equal seeds give equal initial weights across trials), then
    loaded from `init` when given (`new_head`: a head of another class count is replaced)."""
    torch.manual_seed(seed)
    model = build_model(arch["name"], data.num_classes, data.in_channels, arch.get("args", {}))
    for note in initialise(model, init, tracking_uri, new_head=new_head):
        LOG.warning(note)
    return model


def arch_params(prefix: str, arch: dict[str, Any]) -> dict[str, Any]:
    inner = ",".join(f"{k}={v}" for k, v in sorted(arch.get("args", {}).items()))
    params: dict[str, Any] = {prefix: f"{arch['name']}({inner})"}
    params.update({f"{prefix}.{k}": v for k, v in arch.get("args", {}).items()})
    return params


def recipe_params(recipe: Recipe) -> dict[str, Any]:
    return {f"recipe.{k}": v for k, v in recipe.as_dict().items()}


def lineage_tags(sources: list[Source]) -> dict[str, str]:
    """Run id and stage key tags per source (`tags.lineage`; assistants numbered from 1)."""
    lineage, counts = {}, {}
    for source in sources:
        role = source.stage.role
        counts[role] = counts.get(role, 0) + 1
        run_tag, key_tag = tags.lineage(role if role != "assistant" else f"assistant_{counts[role]}")
        lineage[key_tag] = source.record.key
        lineage[run_tag] = source.record.run_id or ""
    return lineage


def fit_options(
    context: SweepContext, distiller: Distiller, sources: list[Source], data: Dataset, data_spec: dict[str, Any]
) -> dict[str, Any]:
    """`fit`'s keyword arguments from the sweep settings: precision, memory format and, where
    the method allows it, the teacher-output cache in the sweep's storage."""
    settings = context.spec.sweep
    cache, use_cache = settings.teacher_cache, None
    if cache.enabled and sources and distiller.can_cache_sources() and replayable(data.train):
        data_key = json.dumps(data_spec, sort_keys=True)
        key = (context.storage, tuple(s.record.content_key for s in sources), data_key, cache.model_dump_json(),
               str(data.train.labels.device))
        if key not in _caches:  # a reused actor loads it once
            # by content: a stage trained again (after damage) gets logits of its new weights
            named = [(s.record.content_key, s.model) for s in sources]
            _caches[key] = build_cache(Path(context.storage) / CACHE_DIR, named, data_key, data.train,
                                       views=cache.views, seed=cache.seed, dtype=cache.dtype)
        use_cache = _caches[key]
    return {"source_cache": use_cache, "precision": settings.precision, "channels_last": settings.channels_last}


def import_stage(stage: StageSpec, device: str, tracker: Tracker, context: SweepContext) -> TrainedStage:
    """A pretrained stage: its weights loaded (never trained), evaluated once on val and test,
    recorded as a stage run with eval metrics only."""
    source = stage.init or {}
    with child_run(
        tracker, context.parent_run_id, role=stage.role, key_tag=tags.STAGE_KEY, key=stage.key,
        name=f"{stage.role}-{stage.key[:8]}", epochs=0,
        params={"method": "pretrained", **arch_params("arch", stage.arch), "data": stage.data["name"],
                "stage_key": stage.key, "weights": source.get("file") or source.get("model_uri"),
                "weights_sha256": source.get("sha256")},
    ) as run:
        data = load_dataset(stage.data, device)
        model = new_model(stage.arch, data, stage.seed, stage.init, context.tracking_uri, new_head=False).to(device)
        (val_loss, val_acc), (test_loss, test_acc) = evaluate(model, data.val), evaluate(model, data.test)
        metrics = {"val_loss": val_loss, "val_acc": val_acc, "val_acc_best": val_acc, "val_loss_best": val_loss,
                   "test_loss": test_loss, "test_acc": test_acc}
        run.log_metrics(metrics)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return TrainedStage(state, data.num_classes, data.in_channels, metrics=metrics, info={"run_id": run.run_id})


def stage_distiller(stage: StageSpec, sources: list[Source], data: Dataset, tracking_uri: str,
                    device: str) -> Distiller:
    """A trained stage's distiller: its model (seeded, from its `init`) learning with its method
    from its resolved parents `sources`."""
    method = DISTILLERS.get(stage.method["name"])
    model = new_model(stage.arch, data, stage.seed, stage.init, tracking_uri)
    return method(model, [s.model for s in sources], method.make_params(stage.method.get("params", {}))).to(device)


def train_stage(
    stage: StageSpec, sources: list[Source], device: str, tracker: Tracker, context: SweepContext,
    group: StageWorkers | None = None,
) -> TrainedStage:
    """Train one stage with its method, learning from its (already resolved) parents, on
    `group`'s workers where its method and batches allow (else on this process alone, with a
    warning); a pretrained stage is only imported (`import_stage`)."""
    if not stage.trained:
        return import_stage(stage, device, tracker, context)
    recipe = Recipe(**stage.recipe)
    method = DISTILLERS.get(stage.method["name"])
    params = method.make_params(stage.method.get("params", {}))
    data = load_dataset(stage.data, device)
    if group is not None and (problem := group.shares(method, len(data.train), recipe.batch_size)):
        LOG.warning("the %s stage %s trains on one worker: %s", stage.role, stage.key[:8], problem)
        group = None
    with child_run(
        tracker, context.parent_run_id, role=stage.role, key_tag=tags.STAGE_KEY, key=stage.key,
        name=f"{stage.role}-{stage.key[:8]}", epochs=recipe.epochs,
        params={"method": stage.method["name"], **vars(params), **arch_params("arch", stage.arch),
                **recipe_params(recipe), "data": stage.data["name"], "seed": stage.seed, "stage_key": stage.key,
                **({"workers": group.world_size} if group else {})},
        run_tags=lineage_tags(sources),
    ) as run:
        distiller = stage_distiller(stage, sources, data, context.tracking_uri, device)

        def log(report: EpochReport) -> None:
            run.log_epoch(report.epoch, report.metrics)

        with group.stage(stage) if group else contextlib.nullcontext() as parallel:
            if group:
                run.set_tags({tags.WORKER_IPS: ",".join(group.node_ips())})
            result = fit(distiller, data, recipe, seed=stage.seed, callback=log, data_parallel=parallel,
                         **fit_options(context, distiller, sources, data, stage.data))
        return TrainedStage(
            result.best_state, data.num_classes, data.in_channels,
            metrics=result.metrics, info={"run_id": run.run_id, "best_epoch": result.best_epoch},
        )


def resolve_stage(stage: StageSpec, context: SweepContext, tracker: Tracker, device: str = "cpu",
                  group: StageWorkers | None = None) -> Source:
    """The trained stage and its frozen model on `device`; trains it (parents first, on `group`'s
    workers when given) if absent, and again if its stored files are damaged
    (`kd_core.stages.CorruptStageError` names it)."""
    store = StageStore(context.storage)

    def train(s: StageSpec) -> TrainedStage:
        parents = [resolve_stage(p, context, tracker, device, group) for p in s.parents]
        return train_stage(s, parents, device, tracker, context, group)

    record, _ = store.get_or_train(stage, train)
    if (record.content_key, device) not in _models:  # a stage trained again is a new model
        try:
            model = record.load_model(device)
        except CorruptStageError:  # its hash holds, but its weights do not fit its metadata
            record, _ = store.get_or_train(stage, train, check_load=True)
            model = record.load_model(device)
        _models[(record.content_key, device)] = model
    return Source(stage, record, _models[(record.content_key, device)])


def trial_sources(
    spec: SweepSpec, plan: TrialPlan, data: Dataset, context: SweepContext, tracker: Tracker, device: str,
    group: StageWorkers | None = None,
) -> list[Source]:
    """The frozen sources of a trial's method, trained first (on `group`'s workers when given)
    where no one has yet."""
    sources = source_plan(spec, data.num_classes, input_shape(data), plan.student_arch)
    stages = source_stages(plan.method, plan.params, sources)
    return [resolve_stage(stage, context, tracker, device, group) for stage in stages]


def build_distiller(plan: TrialPlan, data: Dataset, seed: int, sources: list[Source], device: str) -> Distiller:
    """The trial's distiller: a fresh student (seeded) learning from the frozen sources."""
    student = new_model(plan.student_arch, data, seed, plan.student_init)
    return DISTILLERS.get(plan.method)(student, [s.model for s in sources], plan.params).to(device)
