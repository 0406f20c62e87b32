"""What the sweep machinery costs: the wall time of a sweep's trials against the same trials'
`fit` runs done directly, at equal concurrency.

A warm-up sweep first trains the teacher into the stage store (and fills the teacher-output
cache), as the first trials of any sweep do. Then the measured sweep runs `--trials` trials,
`--concurrent` at a time, with random sampling and no early stopping so every trial trains
every epoch. Its trial phase (Tune's fit: actors, Optuna, MLflow runs and per-epoch logging,
per-epoch checkpoints) is timed. The same sampled configurations are then trained directly
with `fit` (same sources, cache and options) in a pool of `--concurrent` already-started
processes. Prints both wall times and their ratio; the whole sweep (Ray start, CE baseline,
export, plots) is printed too.

    .venv/bin/python benchmarks/sweep_overhead.py
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from common import environment, write_json

from cluster.session import init_ray
from sweeps.runner import WORKER_ENV, run_sweep
from sweeps.spec import SweepSpec

SPEC: dict[str, Any] = {
    "name": "overhead",
    "data": {"name": "digits", "seed": 0},
    "teacher": {"arch": {"name": "convnet", "args": {"width": 32, "depth": 2}},
                "recipe": {"name": "digits", "epochs": 10}},
    "student": {"arch": {"name": "convnet", "args": {"width": 16, "depth": 2}}},
    "method": {"name": "kd"},
    "recipe": {"name": "digits"},
    "search": {"method.T": {"low": 1.0, "high": 10.0}, "method.w_kd": {"low": 0.0, "high": 1.0},
               "recipe.lr": {"low": 0.01, "high": 0.2, "log": True}},
    "sweep": {"cpus_per_trial": 1, "sampler": {"type": "random", "seed": 0}, "scheduler": {"type": "none"}},
    "tracking": {"experiment": "overhead"},
}


def direct_fit(spec_data: dict[str, Any], sampled: dict[str, Any], storage: str, tracking_uri: str) -> float:
    """One trial's configuration trained directly with `fit`; returns its wall seconds."""
    from kd_core.train import fit
    from sweeps.pipeline import SweepContext, build_distiller, fit_options, load_dataset, trial_sources, worker_setup
    from sweeps.space import resolve_trial
    from sweeps.tracking import Tracker

    spec = SweepSpec.model_validate(spec_data)
    worker_setup(spec, spec.sweep.cpus_per_trial)
    started = time.perf_counter()
    plan = resolve_trial(spec, sampled)
    context = SweepContext("direct", spec, storage, tracking_uri, "")
    data = load_dataset(spec.data.model_dump())
    sources = trial_sources(spec, plan, data, context, Tracker(tracking_uri), "cpu")  # from the stage store
    distiller = build_distiller(plan, data, spec.sweep.seed, sources, "cpu")
    fit(distiller, data, plan.recipe, seed=spec.sweep.seed,
        **fit_options(context, distiller, sources, data, spec.data.model_dump()))
    return time.perf_counter() - started


def warm_up() -> None:
    """Start a pool process and import what a trial needs (Tune's actors start cold, which is fairer to direct)."""
    import sweeps.pipeline  # noqa: F401

    time.sleep(1)  # hold this process so that the next warm-up task reaches another one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--json")
    args = parser.parse_args()
    SPEC["recipe"]["epochs"] = args.epochs
    SPEC["sweep"].update(num_trials=args.trials, max_concurrent=args.concurrent)
    spec = SweepSpec.model_validate(SPEC)
    with tempfile.TemporaryDirectory() as work:
        uri, storage = f"sqlite:///{work}/mlflow.db", Path(work) / "storage"
        init_ray(None, num_cpus=args.concurrent, env_vars=WORKER_ENV)
        warm = spec.model_copy(update={"sweep": spec.sweep.model_copy(update={"num_trials": 1})})
        run_sweep(warm, name="warm-up", storage=storage, tracking_uri=uri)
        outcome = run_sweep(spec, name="measured", storage=storage, tracking_uri=uri)
        ray.shutdown()
        sampled = [t.sampled for t in outcome.trials]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.concurrent, mp_context=context) as pool:
            for warming in [pool.submit(warm_up) for _ in range(args.concurrent)]:
                warming.result()
            started = time.perf_counter()
            futures = [pool.submit(direct_fit, spec.model_dump(mode="json"), s, str(storage), uri) for s in sampled]
            fit_seconds = [f.result() for f in futures]
            direct_wall = time.perf_counter() - started
    ratio = outcome.tune_seconds / direct_wall
    print(f"{args.trials} trials x {args.epochs} epochs, {args.concurrent} at a time, 1 CPU each "
          f"(KD, convnet 16x2 student on digits)")
    print(f"sum of the trials' direct fit times:     {sum(fit_seconds):8.1f} s")
    print(f"direct fits, {args.concurrent} processes (wall):       {direct_wall:8.1f} s")
    print(f"sweep trial phase (Tune fit, wall):      {outcome.tune_seconds:8.1f} s")
    print(f"whole sweep (baseline, export, plots):   {outcome.seconds:8.1f} s")
    print(f"sweep trial phase / direct fits: {ratio:.3f}  (target <= 1.15)")
    write_json("sweep_overhead", {
        "config": vars(args), "environment": environment(), "fit_seconds": fit_seconds, "direct_wall": direct_wall,
        "sweep_tune_seconds": outcome.tune_seconds, "sweep_seconds": outcome.seconds,
        "ratio_sweep_over_direct": ratio,
    }, args.json)


if __name__ == "__main__":
    main()
