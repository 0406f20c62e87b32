"""What the sweep machinery costs: the wall time of a sweep's trials against the same trials'
`fit` runs done directly, at equal concurrency, and where the difference goes.

A warm-up sweep of one trial first trains the teacher into the stage store and fills the
teacher-output cache for every epoch, as the first trials of any sweep do. The measured sweep
then runs `--trials` trials, `--concurrent` at a time, with no early stopping so every trial
trains every epoch, on configurations drawn once from the search space (Optuna's random sampler,
seeded; the sweep's `initial_points`). Its trial phase (Tune's fit: actors, Optuna, MLflow runs
and per-epoch logging, checkpoints) is timed. The same configurations are trained directly with
`fit` (same sources, cache and options) in a pool of `--concurrent` already-started processes,
once before the sweep and once after it: their mean is the baseline, so a drift of the machine's
speed during the run (on a shared machine, 10-15% between minutes) weighs on both sides alike.
Each phase starts its own Ray (as `kdsweep run` does). Prints the wall times and their ratio,
then the breakdown: each trial's phase times as the trial recorded them (its MLflow run's
`time_*` metrics: sweeps/timings.py), the time between trials' epochs, the driver's CPU time
during Tune's fit, the CPU time of Ray's own processes, and the CPU time the hypervisor took
from this machine (steal) in each phase.

    .venv/bin/python benchmarks/sweep_overhead.py                        # digits, 12 x 60 epochs
    .venv/bin/python benchmarks/sweep_overhead.py --dataset fashion_mnist  # 55,000-image epochs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import psutil
import ray
from common import environment, write_json

from cluster.session import init_ray
from sweeps.runner import WORKER_ENV, run_sweep
from sweeps.space import SearchSpace
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


def direct_fit(spec_data: dict[str, Any], sampled: dict[str, Any], storage: str,
               tracking_uri: str) -> tuple[float, float]:
    """One trial's configuration trained directly with `fit`: (wall seconds of all of it, CPU
    seconds of `fit` itself, as a trial's `time_fit_cpu`)."""
    from kd_core.train import fit
    from sweeps.pipeline import SweepContext, build_distiller, fit_options, load_dataset, trial_sources, worker_setup
    from sweeps.space import resolve_trial
    from sweeps.tracking import Tracker

    spec = SweepSpec.model_validate(spec_data)
    worker_setup(spec)
    started = time.perf_counter()
    plan = resolve_trial(spec, sampled)
    context = SweepContext("direct", spec, storage, tracking_uri, "")
    data = load_dataset(spec.data.model_dump())
    sources = trial_sources(spec, plan, data, context, Tracker(tracking_uri), "cpu")  # from the stage store
    distiller = build_distiller(plan, data, spec.sweep.seed, sources, "cpu")
    options = fit_options(context, distiller, sources, data, spec.data.model_dump())
    cpu = time.process_time()
    fit(distiller, data, plan.recipe, seed=spec.sweep.seed, **options)
    return time.perf_counter() - started, time.process_time() - cpu


def warm_up() -> None:
    """Start a pool process and import what a trial needs (Tune's actors start cold, which is fairer to direct)."""
    import sweeps.pipeline  # noqa: F401

    time.sleep(1)  # hold this process so that the next warm-up task reaches another one


def ray_daemons_cpu() -> dict[str, float]:
    """CPU seconds so far of Ray's own processes (GCS, raylet, agents, log monitor: this process's
    descendants that are not Ray workers), by process name."""
    seconds: dict[str, float] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            command, name, cpu = process.cmdline(), process.name(), process.cpu_times()
        except psutil.Error:
            continue
        if name.startswith("ray::") or any(part.endswith("default_worker.py") for part in command):
            continue
        label = next((Path(part).name for part in command if part.endswith(".py")), name)
        seconds[label] = seconds.get(label, 0.0) + cpu.user + cpu.system
    return seconds


def trial_breakdown(uri: str, parent_run_id: str) -> dict[str, float]:
    """Per-trial means of the phase times the trials recorded (`time_*`) and of their training
    time (the sum of `epoch_time`, which `fit` measures)."""
    from sweeps.tracking import Tracker

    tracker = Tracker(uri)
    runs = tracker.children(parent_run_id, "trial")
    totals: dict[str, float] = {}
    for run in runs:
        for key, value in run.data.metrics.items():
            if key.startswith("time_"):
                totals[key] = totals.get(key, 0.0) + value
        epochs = tracker.client.get_metric_history(run.info.run_id, "epoch_time")
        totals["epoch_time_sum"] = totals.get("epoch_time_sum", 0.0) + sum(m.value for m in epochs)
    return {key: value / len(runs) for key, value in sorted(totals.items())}


def fixed_points(spec: SweepSpec, trials: int, seed: int = 0) -> list[dict[str, Any]]:
    """`trials` configurations drawn from the spec's search space (`sweeps.space.SearchSpace`)
    by Optuna's seeded random sampler: what both the sweep and the direct fits train."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as the sweep's driver sets it
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(trials):
        trial = study.ask()
        SearchSpace(spec)(trial)
        points.append(dict(trial.params))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # drawn, never trained here
    return points


def direct_pass(spec: SweepSpec, points: list[dict[str, float]], processes: int, storage: Path,
                uri: str) -> tuple[float, list[tuple[float, float]]]:
    """The configurations trained with `fit` in `processes` started processes: (wall, each fit's
    (wall, CPU) seconds)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        for warming in [pool.submit(warm_up) for _ in range(processes)]:
            warming.result()
        started = time.perf_counter()
        futures = [pool.submit(direct_fit, spec.model_dump(mode="json"), p, str(storage), uri) for p in points]
        fit_seconds = [f.result() for f in futures]
        return time.perf_counter() - started, fit_seconds


def _steal_seconds() -> float:
    """CPU seconds so far that the hypervisor gave to other machines (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


@contextlib.contextmanager
def stolen(steal: dict[str, float], phase: str) -> Iterator[None]:
    """Adds to `steal[phase]` the CPU seconds the hypervisor took during the block."""
    started = _steal_seconds()
    try:
        yield
    finally:
        steal[phase] = _steal_seconds() - started


def trial_timeline(uri: str, parent_run_id: str, sweep_started: float, concurrent: int) -> dict[str, float]:
    """Wall seconds outside the trials' epochs, from their MLflow runs' times and epoch
    timestamps: from the sweep's start to the first trials' runs (the driver's set-up, actors
    starting), from a trial's run opening to its first epoch starting and from its last epoch to
    its run's end (in the trial), and from a trial's run end to the start of the next trial in
    its slot (Tune between trials). Means per trial, but the first: per slot."""
    from sweeps.tracking import Tracker

    tracker = Tracker(uri)
    spans = []  # (run start, first epoch's start, last epoch's end, run end), seconds
    for run in tracker.children(parent_run_id, "trial"):
        epochs = sorted(tracker.client.get_metric_history(run.info.run_id, "epoch_time"), key=lambda m: m.step)
        spans.append((run.info.start_time / 1e3, epochs[0].timestamp / 1e3 - epochs[0].value,
                      epochs[-1].timestamp / 1e3, run.info.end_time / 1e3))
    spans.sort()
    first, later = spans[:concurrent], spans[concurrent:]
    gaps = [start - max(end for *_, end in spans if end <= start) for start, *_ in later]
    return {"sweep_start_to_first_runs": sum(s[0] for s in first) / len(first) - sweep_started,
            "run_open_to_first_epoch": sum(s[1] - s[0] for s in spans) / len(spans),
            "last_epoch_to_run_end": sum(s[3] - s[2] for s in spans) / len(spans),
            "run_end_to_next_run_open": sum(gaps) / len(gaps) if gaps else 0.0}


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded digits: short epochs (~0.65 s of KD), where per-epoch costs weigh most.
    "digits": {"data": {"name": "digits", "seed": 0}, "trials": 12, "epochs": 60,
               "teacher": {"width": 32, "depth": 2}, "teacher_epochs": 10, "student": {"width": 16, "depth": 2}},
    # Fashion-MNIST's 55,000 training images per epoch (Debian's dataset-fashion-mnist), with the
    # models of sweeps/specs/fashion_mnist_kd.yaml.
    "fashion_mnist": {"data": {"name": "fashion_mnist", "seed": 0, "augment": "none"}, "trials": 6, "epochs": 4,
                      "teacher": {"width": 16, "depth": 1}, "teacher_epochs": 1, "student": {"width": 4, "depth": 1}},
}

PHASES = {  # time_* metric: what it is (sweeps/trainable.py, sweeps/reporting.py)
    "time_actor_start": "trial start: actor process, imports (1st per actor)",
    "time_setup": "trial start: plugins, threads, plan",
    "time_mlflow_open": "trial start: open its MLflow run",
    "time_data": "trial start: dataset (once per actor)",
    "time_sources": "trial start: teacher, cache, distiller",
    "time_costs": "trial start: params, FLOPs, latency",
    "time_snapshot": "per epoch: copy the state to checkpoint",
    "time_report_wait": "per epoch: training waits for the report",
    "time_mlflow_log": "reporting thread: MLflow epoch writes",
    "time_checkpoint": "reporting thread: checkpoint file",
    "time_tune_report": "reporting thread: tune.report round trip",
    "time_report_cpu": "reporting thread: its CPU time (all of it)",
    "time_fit_cpu": "training thread: its CPU time while training",
    "time_other_threads_cpu": "actor's other threads: CPU while training",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--trials", type=int, help="default: the dataset's preset (digits 12, fashion_mnist 6)")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="default: the dataset's preset (digits 60, fashion_mnist 4)")
    parser.add_argument("--json")
    args = parser.parse_args()
    preset = PRESETS[args.dataset]
    args.trials, args.epochs = args.trials or preset["trials"], args.epochs or preset["epochs"]
    SPEC["data"] = preset["data"]
    SPEC["teacher"]["arch"]["args"], SPEC["student"]["arch"]["args"] = preset["teacher"], preset["student"]
    SPEC["teacher"]["recipe"]["epochs"] = preset["teacher_epochs"]
    SPEC["recipe"]["epochs"] = args.epochs
    SPEC["sweep"].update(num_trials=args.trials, max_concurrent=args.concurrent)
    points = fixed_points(SweepSpec.model_validate(SPEC), args.trials)
    spec = SweepSpec.model_validate({**SPEC, "sweep": {**SPEC["sweep"], "initial_points": points}})
    steal: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        uri, storage = f"sqlite:///{work}/mlflow.db", Path(work) / "storage"
        init_ray(None, num_cpus=args.concurrent, env_vars=WORKER_ENV)
        # One trial of every epoch: the teacher, and its cached outputs for each epoch's draws.
        warm = SweepSpec.model_validate({**SPEC, "sweep": {**SPEC["sweep"], "num_trials": 1}})
        run_sweep(warm, name="warm-up", storage=storage, tracking_uri=uri)
        ray.shutdown()
        with stolen(steal, "direct fits before"):
            direct_before, fits_before = direct_pass(spec, points, args.concurrent, storage, uri)
        init_ray(None, num_cpus=args.concurrent, env_vars=WORKER_ENV)
        daemons_before = ray_daemons_cpu()
        sweep_started = time.time()  # a little before Tune's fit starts: the sweep's own set-up is short
        with stolen(steal, "sweep"):
            outcome = run_sweep(spec, name="measured", storage=storage, tracking_uri=uri)
        daemons = {k: v - daemons_before.get(k, 0.0) for k, v in ray_daemons_cpu().items()}
        ray.shutdown()
        breakdown = trial_breakdown(uri, outcome.parent_run_id)
        timeline = trial_timeline(uri, outcome.parent_run_id, sweep_started, args.concurrent)
        with stolen(steal, "direct fits after"):
            direct_after, fits_after = direct_pass(spec, points, args.concurrent, storage, uri)
    direct_wall = (direct_before + direct_after) / 2
    fit_seconds = [wall for wall, _ in fits_before + fits_after]
    fit_cpu = [cpu for _, cpu in fits_before + fits_after]
    ratio = outcome.tune_seconds / direct_wall
    student, machine = preset["student"], environment()
    print(f"{args.trials} trials x {args.epochs} epochs, {args.concurrent} at a time, 1 CPU each "
          f"(KD, convnet {student['width']}x{student['depth']} student on {args.dataset}), "
          f"{machine['cpus']} CPUs ({machine['cpu_model']})")
    print(f"mean of the direct fit times:            {sum(fit_seconds) / len(fit_seconds):8.1f} s")
    print(f"mean CPU of a direct fit's `fit`:         {sum(fit_cpu) / len(fit_cpu):8.1f} s")
    print(f"direct fits, {args.concurrent} processes, before the sweep: {direct_before:8.1f} s (wall)")
    print(f"direct fits, {args.concurrent} processes, after the sweep:  {direct_after:8.1f} s (wall)")
    print(f"direct fits, the mean of both:           {direct_wall:8.1f} s")
    print(f"sweep trial phase (Tune fit, wall):      {outcome.tune_seconds:8.1f} s")
    print(f"whole sweep (baseline, export, plots):   {outcome.seconds:8.1f} s")
    print("\nwhere a trial's time goes (mean per trial, recorded by the trial):")
    print(f"  {'training (sum of epoch_time)':45s} {breakdown.get('epoch_time_sum', 0.0):8.2f} s")
    for key, what in PHASES.items():
        print(f"  {what:45s} {breakdown.get(key, 0.0):8.3f} s")
    print("between the trials' epochs (wall, mean per trial; the sweep's start: per slot):")
    for key, value in timeline.items():
        print(f"  {key.replace('_', ' '):45s} {value:8.3f} s")
    print("beside the trials, during the trial phase (CPU time; the trials have "
          f"{args.concurrent} CPUs of {os.cpu_count()}):")
    parts = outcome.tune_driver_cpu_parts
    print(f"  {'sweep driver, all of it':53s} {outcome.tune_driver_cpu_seconds:7.1f} s")
    for name, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {'  driver: ' + name.replace('_', ' '):53s} {seconds:7.1f} s")
    rest = outcome.tune_driver_cpu_seconds - sum(parts.values())
    print(f"  {'  driver: Tune loop, loggers, snapshots (the rest)':53s} {rest:7.1f} s")
    for name, seconds in sorted(daemons.items(), key=lambda item: -item[1]):
        if seconds >= 0.05:
            print(f"  {'Ray: ' + name:53s} {seconds:7.1f} s")
    print("CPU time the hypervisor took (steal), per phase: "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steal.items()))
    print(f"\nsweep trial phase / direct fits: {ratio:.3f}  (target <= 1.10; <= 1.05 with Fashion-MNIST epochs)")
    write_json(f"sweep_overhead_{args.dataset}", {
        "config": vars(args), "environment": machine, "points": points, "fit_seconds": fit_seconds,
        "fit_cpu_seconds": fit_cpu,
        "direct_wall_before": direct_before, "direct_wall_after": direct_after, "direct_wall": direct_wall,
        "steal_seconds": steal,
        "sweep_tune_seconds": outcome.tune_seconds, "sweep_seconds": outcome.seconds,
        "driver_cpu_seconds": outcome.tune_driver_cpu_seconds, "driver_cpu_parts": outcome.tune_driver_cpu_parts,
        "ray_daemons_cpu_seconds": daemons,
        "trial_breakdown_mean_s": breakdown, "timeline_s": timeline, "ratio_sweep_over_direct": ratio,
    }, args.json)


if __name__ == "__main__":
    main()
