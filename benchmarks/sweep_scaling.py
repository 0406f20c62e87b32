"""How the sweep machinery's cost grows: overhead per trial as the number of trials grows, and per
epoch as trials get longer, for tiny trials on a local Ray.

Each point is one real sweep (CE-only, a 4-channel convnet on digits, random sampling of the
learning rate, no early stopping, `--concurrent` trials at a time, 1 CPU each). Its overhead is
the trial phase's CPU-time budget not spent training:

    overhead per trial = (trial-phase wall x concurrent - sum of the trials' epoch_time) / trials

where `epoch_time` is what `fit` measures for each epoch (train + eval) inside the trial. The
trial-count series (1 epoch each) gives the cost of a trial's start and end; the epoch series
(`--series-trials` trials each) gives, by a straight-line fit of overhead per trial against
epochs, the cost of each epoch's report (MLflow, checkpoint, Tune). Prints a table, writes
benchmarks/results/sweep_scaling.{json,png}. Ray's release test beside it: 10,000 one-second
trials at 14% overhead; reusing actors cuts a trial's start from about 0.2 s to 0.03 s.

    .venv/bin/python benchmarks/sweep_scaling.py                      # 16, 128, 1024 trials; 1, 4, 16 epochs
    .venv/bin/python benchmarks/sweep_scaling.py --trials 16 128 --epochs 1 8
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib
import ray
from common import RESULTS, environment, write_json
from sweep_overhead import trial_breakdown

from cluster.session import init_ray
from sweeps.runner import WORKER_ENV, run_sweep
from sweeps.spec import SweepSpec

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SWEEPS = itertools.count()
RAY_RELEASE_TEST = "Ray release test: 10,000 trials of 1 s, 14% overhead; trial start 0.2 s, 0.03 s with reused actors"


def tiny_spec(trials: int, epochs: int, concurrent: int) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "scaling", "data": {"name": "digits", "seed": 0},
        "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
        "method": {"name": "ce"}, "recipe": {"name": "digits", "epochs": epochs},
        "search": {"recipe.lr": {"low": 0.01, "high": 0.2, "log": True}},
        "sweep": {"num_trials": trials, "max_concurrent": concurrent, "cpus_per_trial": 1,
                  "sampler": {"type": "random", "seed": 0}, "scheduler": {"type": "none"}},
        "tracking": {"experiment": "scaling"},
    })


def measure(trials: int, epochs: int, concurrent: int, work: Path) -> dict[str, Any]:
    """One sweep of `trials` tiny trials of `epochs` epochs: its trial phase and the trials' own times."""
    name = f"sweep{next(SWEEPS)}-t{trials}-e{epochs}"
    uri = f"sqlite:///{work}/{name}.db"
    outcome = run_sweep(tiny_spec(trials, epochs, concurrent), name=name, storage=work / "storage", tracking_uri=uri)
    means = trial_breakdown(uri, outcome.parent_run_id)
    training = means["epoch_time_sum"] * trials
    start = sum(means.get(f"time_{p}", 0.0) for p in ("setup", "mlflow_open", "data", "sources", "costs"))
    overhead = (outcome.tune_seconds * concurrent - training) / trials
    return {"trials": trials, "epochs": epochs, "tune_seconds": outcome.tune_seconds, "training_seconds": training,
            "overhead_per_trial_s": overhead, "overhead_share": 1 - training / (outcome.tune_seconds * concurrent),
            "trial_start_in_trial_s": start, "driver_cpu_seconds": outcome.tune_driver_cpu_seconds}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    n, mean_x, mean_y = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if n > 1 and var else 0.0
    return slope, mean_y - slope * mean_x


def plot(by_trials: list[dict[str, Any]], by_epochs: list[dict[str, Any]], slope: float, target: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["trials"] for r in by_trials], [r["overhead_per_trial_s"] for r in by_trials], "o-", label="kdsweep")
    left.axhline(0.03, color="grey", linestyle="--", label="Ray: trial start, reused actor (0.03 s)")
    left.axhline(0.2, color="grey", linestyle=":", label="Ray: trial start, new actor (0.2 s)")
    left.set(xscale="log", xlabel="trials in the sweep (1 epoch each)", ylabel="overhead per trial (s)",
             title="per trial, as trials grow")
    left.legend(fontsize=8)
    right.plot([r["epochs"] for r in by_epochs], [r["overhead_per_trial_s"] for r in by_epochs], "o-")
    right.set(xlabel="epochs per trial", ylabel="overhead per trial (s)",
              title=f"as trials get longer: {slope * 1000:.0f} ms per epoch")
    figure.suptitle(RAY_RELEASE_TEST, fontsize=8)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, nargs="+", default=[16, 128, 1024], help="trial counts (1 epoch each)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4, 16], help="epoch counts")
    parser.add_argument("--series-trials", type=int, default=16, help="trials per point of the epoch series")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        init_ray(None, num_cpus=args.concurrent, env_vars=WORKER_ENV)
        measure(2, 1, args.concurrent, Path(work))  # actors' first imports, not a point
        by_trials = [measure(n, 1, args.concurrent, Path(work)) for n in args.trials]
        by_epochs = [measure(args.series_trials, e, args.concurrent, Path(work)) for e in args.epochs]
        ray.shutdown()
    slope, intercept = fit_line([r["epochs"] for r in by_epochs], [r["overhead_per_trial_s"] for r in by_epochs])
    print(f"tiny trials (CE, convnet w4 on digits), {args.concurrent} at a time, 1 CPU each; "
          f"{time.monotonic() - started:.0f} s in all")
    print(f"{'trials':>7} {'epochs':>7} {'trial phase':>12} {'training':>9} {'overhead/trial':>15} "
          f"{'overhead':>9} {'start in trial':>15}")
    for r in by_trials + by_epochs:
        print(f"{r['trials']:7d} {r['epochs']:7d} {r['tune_seconds']:11.1f}s {r['training_seconds']:8.1f}s "
              f"{r['overhead_per_trial_s']:14.3f}s {r['overhead_share']:8.1%} {r['trial_start_in_trial_s']:14.3f}s")
    print(f"per epoch: {slope * 1000:.0f} ms (line through the epoch series; per trial beside it: {intercept:.2f} s)")
    print(RAY_RELEASE_TEST)
    picture = Path(args.json).with_suffix(".png") if args.json else RESULTS / "sweep_scaling.png"
    plot(by_trials, by_epochs, slope, picture)
    write_json("sweep_scaling", {"config": vars(args), "environment": environment(), "by_trials": by_trials,
                                 "by_epochs": by_epochs, "per_epoch_s": slope, "per_trial_s": intercept,
                                 "ray_release_test": RAY_RELEASE_TEST}, args.json)


if __name__ == "__main__":
    main()
