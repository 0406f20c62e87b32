"""Training on several workers (`sweep.workers_per_trial` > 1): DDP ranks as Ray actors.

A trial's Tune actor is rank 0, in the first bundle of the trial's placement group
(`pipeline.trial_resources`); `worker_group` starts ranks 1..N-1 as actors in the other bundles.
Everything the trial trains runs on the group: the stages it trains first (teacher,
assistants: `WorkerGroup.stage`) and the trial itself (`WorkerGroup.trial`). The finish's
tasks (the CE baseline, confirmations) get a placement group of their own (`submit`) and do
the same. Rank 0 alone opens MLflow runs, evaluates, writes the stage store, checkpoints and
reports to Tune, so OptunaSearch, ASHA, resume and MLflow see a trial as they do with one
worker; the other ranks rebuild the same distiller, load the same checkpoint and train on
their rows of each batch (`kd_core.distributed`). Rank 0 listens for each process group on its
node's address.

A rank whose process or node dies closes its connections: the others' next collective fails,
the trial fails, and Tune retries it (`sweep.max_failures`) from its last checkpoint on a new
placement group. The ranks are owned by the trial's actor, so they die with it. Tune reuses a
trial's actor (and its placement group) for the next trial: the ranks of a trial that ended
are kept for it too (started once, data and sources loaded once). Those of a trial that failed
or was stopped are killed: they may wait in a collective, and Tune gives a stopped trial's
thread 2 s to end before it reuses the actor (TUNE_FUNCTION_THREAD_TIMEOUT_S).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kd_core.distillers import Distiller
from kd_core.distributed import DataParallel, check_data_parallel, join, leave
from kd_core.recipes import Recipe
from kd_core.stages import StageSpec
from kd_core.train import fit
from sweeps.pipeline import (
    SweepContext,
    build_distiller,
    fit_options,
    load_dataset,
    resolve_stage,
    stage_distiller,
    task_options,
    trial_resources,
    trial_sources,
    worker_setup,
)
from sweeps.space import resolve_trial
from sweeps.spec import SweepSettings
from sweeps.tracking import Tracker

#: Seconds rank 0 waits for the other ranks' actors to start (a new Ray worker imports torch,
#: MLflow and Ray Tune: 8-11 s on 2 cores) before it fails the trial.
START_TIMEOUT_S = 300.0
_ranks: dict[str, list[Any]] = {}  # per process: a reused trial actor's ranks, by placement group id


class TrialRank:
    """One data-parallel rank > 0 of a trial, stage or finish task (a Ray actor, `worker_group`)."""

    def node_ip(self) -> str:
        """The node this rank runs on (asked once: the actor has started when it answers)."""
        return ray.util.get_node_ip_address()

    def train(self, context: SweepContext, config: dict[str, Any], seed: int, rank: int, world_size: int,
              init_method: str, resume: dict[str, Any] | None) -> None:
        """Rebuild a trial's distiller (its sampled `config`, student seed `seed`) as rank 0 did
        and train this rank's rows of every epoch; returns when training ends, raises what
        training raised."""
        spec = context.spec
        worker_setup(spec)
        plan = resolve_trial(spec, config)
        device = spec.sweep.device
        data = load_dataset(spec.data.model_dump(), device)
        # Rank 0 resolved the sources before starting this rank: they are loaded, never trained.
        sources = trial_sources(spec, plan, data, context, Tracker(context.tracking_uri), device)
        distiller = build_distiller(plan, data, seed, sources, device)
        options = fit_options(context, distiller, sources, data, spec.data.model_dump())
        with _joined(rank, world_size, init_method, device) as parallel:
            fit(distiller, data, plan.recipe, seed=seed, resume=resume, data_parallel=parallel, **options)

    def train_stage(self, context: SweepContext, stage: StageSpec, rank: int, world_size: int,
                    init_method: str) -> None:
        """Train this rank's rows of a stage that rank 0 trains (`WorkerGroup.stage`)."""
        spec = context.spec
        worker_setup(spec)
        device = spec.sweep.device
        tracker = Tracker(context.tracking_uri)
        # Rank 0 resolved the stage's parents before training it: they are loaded, never trained.
        parents = [resolve_stage(p, context, tracker, device) for p in stage.parents]
        data = load_dataset(stage.data, device)
        distiller = stage_distiller(stage, parents, data, context.tracking_uri, device)
        options = fit_options(context, distiller, parents, data, stage.data)
        with _joined(rank, world_size, init_method, device) as parallel:
            fit(distiller, data, Recipe(**stage.recipe), seed=stage.seed, data_parallel=parallel, **options)


@contextlib.contextmanager
def _joined(rank: int, world_size: int, init_method: str, device: str) -> Iterator[DataParallel]:
    parallel = join(rank, world_size, init_method, device)
    try:
        yield parallel
    except BaseException:
        with contextlib.suppress(Exception):  # the body's error is the one to see
            leave()  # closes the connections: ranks still in a collective fail at once
        raise
    leave()


class WorkerGroup:
    """Ranks 1..N-1 of the current trial or task, this process being rank 0: each training run
    (`stage`, `trial`) is one DDP process group over all N ranks."""

    def __init__(self, context: SweepContext, ranks: list[Any]) -> None:
        self.context = context
        self.ranks = ranks
        self.world_size = len(ranks) + 1
        self._node_ips: list[str] | None = None

    def node_ips(self) -> list[str]:
        """Every rank's node address, rank 0 first (waits for the ranks to start; RayError or
        GetTimeoutError when one cannot)."""
        if self._node_ips is None:
            others = ray.get([r.node_ip.remote() for r in self.ranks], timeout=START_TIMEOUT_S)
            self._node_ips = [ray.util.get_node_ip_address(), *others]
        return self._node_ips

    def shares(self, distiller: type[Distiller], train_size: int, batch_size: int) -> str | None:
        """None when a run of `distiller` on `train_size` images in batches of `batch_size` can
        train on this group, else why not (it then trains on rank 0 alone)."""
        try:
            check_data_parallel(distiller)
            DataParallel(0, self.world_size).check_batches(train_size, batch_size)
        except ValueError as error:
            return str(error)
        return None

    def trial(self, config: dict[str, Any], seed: int, resume: dict[str, Any] | None
              ) -> contextlib.AbstractContextManager[DataParallel]:
        """Start the trial of sampled `config` (student seed `seed`) on ranks 1..N-1 and join as
        rank 0 (a context manager: rank 0 trains inside it)."""
        resume_ref = ray.put(resume)
        return self._run(lambda actor, rank, address: actor.train.remote(
            self.context, config, seed, rank, self.world_size, address, resume_ref))

    def stage(self, stage: StageSpec) -> contextlib.AbstractContextManager[DataParallel]:
        """Start `stage` (its parents already in the stage store) on ranks 1..N-1 and join as rank 0."""
        return self._run(lambda actor, rank, address: actor.train_stage.remote(
            self.context, stage, rank, self.world_size, address))

    @contextlib.contextmanager
    def _run(self, start: Callable[[Any, int, str], ray.ObjectRef]) -> Iterator[DataParallel]:
        """One process group: rank 0 yields inside it; on leaving, waits for the ranks to end
        (raising, when rank 0 failed, the error a rank raised first: why its collective broke)."""
        self.node_ips()  # the ranks have started (a rank that cannot start fails here, not in a join)
        address = _listen_address()
        training = [start(actor, rank, address) for rank, actor in enumerate(self.ranks, 1)]
        try:
            with _joined(0, self.world_size, address, self.context.spec.sweep.device) as parallel:
                yield parallel
        except Exception:
            _raise_rank_error(training)
            raise
        ray.get(training, timeout=START_TIMEOUT_S)  # the ranks end with rank 0's last collective


def _listen_address() -> str:
    """`tcp://IP:PORT` on this node's address with a port free now (rank 0 binds it next)."""
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((ip, 0))
        port = probe.getsockname()[1]
    return f"tcp://{ip}:{port}"


@contextlib.contextmanager
def worker_group(context: SweepContext) -> Iterator[WorkerGroup | None]:
    """Inside a trial or a `submit`ted task: the `WorkerGroup` of ranks 1..N-1 in the current
    placement group (None with one worker: nothing is started). Ranks start in the background
    (a new Ray worker imports torch for seconds) while rank 0 sets up. On leaving, keeps them
    for this actor's next trial; when the body failed or was stopped, kills them."""
    settings = context.spec.sweep
    if settings.workers_per_trial == 1:
        yield None
        return
    group = get_current_placement_group()
    if group is None:
        raise RuntimeError("training on several workers must run in its placement group (a trial, or `submit`)")
    key = group.id.hex()
    for stale in [k for k in _ranks if k != key]:  # another placement group's: Tune moved this actor
        _kill(_ranks.pop(stale))
    ranks = _ranks.pop(key, None) or _start(settings, group)
    reusable = False
    try:
        yield WorkerGroup(context, ranks)
        reusable = True
    finally:
        if reusable:
            _ranks[key] = ranks
        else:
            _kill(ranks)


def submit(settings: SweepSettings, function: Callable[..., Any], *args: Any) -> ray.ObjectRef:
    """`function(*args)` as a Ray task with a trial's resources: one worker's share, and with
    several workers, bundle 0 of a placement group of its own shaped like a trial's (the task's
    `worker_group` starts ranks in the others). The group is removed as soon as the task ends,
    by a thread that waits for it: a group still waiting to be placed (the CPUs of another
    finish task's) must not wait on the driver collecting results in some order."""
    task = ray.remote(function)
    if settings.workers_per_trial == 1:
        return task.options(**task_options(settings)).remote(*args)
    shape = trial_resources(settings)
    group = placement_group(shape.bundles, strategy=shape.strategy)
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    ref = task.options(**task_options(settings), scheduling_strategy=strategy).remote(*args)
    threading.Thread(target=_release_when_done, args=(ref, group), name="kdsweep-release", daemon=True).start()
    return ref


def _release_when_done(ref: ray.ObjectRef, group: Any) -> None:
    with contextlib.suppress(Exception):  # Ray shut down first: the group went with it
        ray.wait([ref], fetch_local=False)
        remove_placement_group(group)  # its ranks die with it


def _start(settings: SweepSettings, group: Any) -> list[Any]:
    """Ranks 1..N-1 as actors in bundles 1..N-1 of `group`, each with one worker's resources."""
    return [
        ray.remote(TrialRank).options(
            **task_options(settings), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote()
        for rank in range(1, settings.workers_per_trial)
    ]


def _kill(ranks: list[Any]) -> None:
    for rank in ranks:
        ray.kill(rank, no_restart=True)


def _raise_rank_error(training: list[ray.ObjectRef]) -> None:
    """Raise the error of a rank that has already failed (waiting a moment for it), if any."""
    if not training:
        return
    done, _ = ray.wait(training, num_returns=len(training), timeout=5.0)
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as error:
            raise RuntimeError(f"a data-parallel rank failed: {error}") from error
