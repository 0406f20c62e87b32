"""A trial on several workers (`sweep.workers_per_trial` > 1): DDP ranks as Ray actors.

The trial's Tune actor is rank 0, in the first bundle of the trial's placement group
(`pipeline.trial_resources`); `workers` starts ranks 1..N-1 as actors in the other bundles.
Rank 0 alone opens the MLflow run, evaluates, checkpoints and reports to Tune, so OptunaSearch,
ASHA, resume and MLflow see a trial as they do with one worker; the other ranks rebuild the
same distiller, load the same checkpoint and train on their rows of each batch
(`kd_core.distributed`). Rank 0 listens for the process group on its node's address.

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
import logging
import socket
from collections.abc import Iterator
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kd_core.distributed import DataParallel, join, leave
from kd_core.train import fit
from sweeps.pipeline import SweepContext, build_distiller, fit_options, load_dataset, trial_sources, worker_setup
from sweeps.space import resolve_trial
from sweeps.tracking import Tracker

LOG = logging.getLogger("kdsweep")
#: Seconds rank 0 waits for the other ranks' actors to start (a new Ray worker imports torch,
#: MLflow and Ray Tune: 8-11 s on 2 cores) before it fails the trial.
START_TIMEOUT_S = 300.0
_ranks: dict[str, list[Any]] = {}  # per process: a reused trial actor's ranks, by placement group id


class TrialRank:
    """One data-parallel rank > 0 of a trial (a Ray actor, `workers`)."""

    def node_ip(self) -> str:
        """The node this rank runs on (asked once: the actor has started when it answers)."""
        return ray.util.get_node_ip_address()

    def train(self, context: SweepContext, config: dict[str, Any], rank: int, world_size: int,
              init_method: str, resume: dict[str, Any] | None) -> None:
        """Rebuild the trial's distiller as rank 0 did and train this rank's rows of every
        epoch; returns when training ends, raises what training raised."""
        spec = context.spec
        worker_setup(spec, spec.sweep.resources_per_worker["CPU"])
        plan = resolve_trial(spec, config)
        device = spec.sweep.device
        data = load_dataset(spec.data.model_dump(), device)
        # Rank 0 resolved the sources before starting this rank: they are loaded, never trained.
        sources = trial_sources(spec, plan, data, context, Tracker(context.tracking_uri), device)
        distiller = build_distiller(plan, data, spec.sweep.seed, sources, device)
        options = fit_options(context, distiller, sources, data, spec.data.model_dump())
        parallel = join(rank, world_size, init_method, device)
        try:
            fit(distiller, data, plan.recipe, seed=spec.sweep.seed, resume=resume, data_parallel=parallel, **options)
        finally:
            leave()  # closes the connections: ranks still in a collective fail at once


def _listen_address() -> str:
    """`tcp://IP:PORT` on this node's address with a port free now (rank 0 binds it next)."""
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((ip, 0))
        port = probe.getsockname()[1]
    return f"tcp://{ip}:{port}"


@contextlib.contextmanager
def workers(context: SweepContext, config: dict[str, Any], resume: dict[str, Any] | None,
            node_ips: list[str]) -> Iterator[DataParallel | None]:
    """Inside a trial: start ranks 1..N-1 in the trial's placement group, join them as rank 0
    and yield this rank's `DataParallel` (None with one worker: nothing is started). Appends
    every rank's node address to `node_ips`. On leaving, waits for the ranks to end and keeps them
    for this actor's next trial; when the trial failed or was stopped, kills them (raising, for a
    failure, the error a rank raised first: why rank 0's collective broke)."""
    settings = context.spec.sweep
    world = settings.workers_per_trial
    if world == 1:
        yield None
        return
    group = get_current_placement_group()
    if group is None:
        raise RuntimeError("a trial on several workers must run in its placement group (Tune's trial actor)")
    key = group.id.hex()
    for stale in [k for k in _ranks if k != key]:  # another placement group's: Tune moved this actor
        _kill(_ranks.pop(stale))
    ranks = _ranks.pop(key, None) or _start(settings.resources_per_worker, group, world)
    training: list[ray.ObjectRef] = []
    reusable = False
    try:
        node_ips += ray.get([r.node_ip.remote() for r in ranks], timeout=START_TIMEOUT_S)
        address = _listen_address()
        resume_ref = ray.put(resume)
        training = [r.train.remote(context, config, rank, world, address, resume_ref)
                    for rank, r in enumerate(ranks, 1)]
        try:
            yield join(0, world, address, settings.device)
        except Exception:
            _raise_rank_error(training)  # a rank's own error explains rank 0's broken collective
            raise
        finally:
            with contextlib.suppress(Exception):
                leave()
        ray.get(training, timeout=START_TIMEOUT_S)  # the ranks end with rank 0's last collective
        reusable = True
    finally:
        if reusable:
            _ranks[key] = ranks
        else:
            _kill(ranks)


def _start(worker: dict[str, float], group: Any, world: int) -> list[Any]:
    """Ranks 1..world-1 as actors in bundles 1..world-1 of `group`, each with `worker`'s resources."""
    return [
        ray.remote(TrialRank).options(
            num_cpus=worker["CPU"], num_gpus=worker.get("GPU", 0.0), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote()
        for rank in range(1, world)
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
            LOG.warning("a data-parallel rank failed: %s", error)
            raise RuntimeError(f"a data-parallel rank of this trial failed: {error}") from error
