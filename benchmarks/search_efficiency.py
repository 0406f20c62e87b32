"""Search efficiency: TPE with ASHA against random search without early stopping, at an equal
budget of trials.

For each seed both searches run as real sweeps (Ray Tune, Optuna, MLflow) on the default digits
KD spec (or `--spec`, e.g. sweeps/specs/fashion_mnist_kd.yaml) with realistic ranges (lr 1e-4..1
and weight decay 1e-5..3e-2 on log scales, batch size 32..256, T 1..20, the loss weights 0..1).
From every trial's per-epoch val accuracy in MLflow, ordered by the time it was logged, the
script counts the epochs each search had consumed (all trials together) when a trial first came
within `--margin` points of the best val accuracy either search found for that seed. Prints the
epochs per seed and the ratio of the totals, TPE+ASHA / random (a search that never got there
counts all its epochs).

    .venv/bin/python benchmarks/search_efficiency.py                 # 4 seeds x 32 trials each
    .venv/bin/python benchmarks/search_efficiency.py --spec sweeps/specs/fashion_mnist_kd.yaml --seeds 1  # 25 min
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import ray
import yaml
from common import ROOT, environment, write_json

from cluster.session import init_ray
from sweeps.runner import WORKER_ENV, run_sweep
from sweeps.spec import SweepSpec
from sweeps.tracking import Tracker

SEARCHES = {
    "tpe_asha": {"sampler": {"type": "tpe"}, "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 3}},
    "random": {"sampler": {"type": "random"}, "scheduler": {"type": "none"}},
}


def search_spec(base: dict[str, Any], search: str, seed: int, trials: int) -> SweepSpec:
    spec = copy.deepcopy(base)
    # Realistic ranges, in which most settings fall short (a small lr or large batch underfits
    # in 20 epochs, a large weight decay over-regularises a 5K-parameter student).
    spec["search"].update({
        "recipe.lr": {"low": 1e-4, "high": 1.0, "log": True},
        "recipe.batch_size": {"choices": [32, 64, 128, 256]},
        "recipe.weight_decay": {"low": 1e-5, "high": 3e-2, "log": True},
        "method.T": {"low": 1.0, "high": 20.0},
    })
    settings = copy.deepcopy(SEARCHES[search])
    settings["sampler"]["seed"] = seed
    spec["sweep"].update(settings, num_trials=trials, confirm={"top_k": 0})
    return SweepSpec.model_validate(spec)


def epoch_timeline(tracker: Tracker, parent_run_id: str) -> list[float]:
    """Every trial's per-epoch val accuracy, in the order the epochs were logged."""
    points = []
    for run in tracker.children(parent_run_id, "trial"):
        history = tracker.client.get_metric_history(run.info.run_id, "val_acc")
        points += [(m.timestamp, m.step, m.value) for m in history]
    return [value for _, _, value in sorted(points)]


def epochs_until(timeline: list[float], target: float) -> tuple[int, bool]:
    for consumed, value in enumerate(timeline, start=1):
        if value >= target:
            return consumed, True
    return len(timeline), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed + seeds - 1")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--margin", type=float, default=0.5, help="accuracy points below the best")
    parser.add_argument("--spec", default=str(ROOT / "sweeps/specs/digits_kd.yaml"))
    parser.add_argument("--json")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.spec).read_text())
    init_ray(None, env_vars=WORKER_ENV)  # one Ray for every sweep
    rows = []
    with tempfile.TemporaryDirectory() as work:
        tracker = Tracker(f"sqlite:///{work}/mlflow.db")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            timelines = {}
            for search in SEARCHES:
                outcome = run_sweep(search_spec(base, search, seed, args.trials), name=f"{search}-{seed}",
                                    storage=Path(work) / "storage", tracking_uri=tracker.uri)
                timelines[search] = epoch_timeline(tracker, outcome.parent_run_id)
            best = max(max(t) for t in timelines.values())
            target = best - args.margin / 100
            row: dict[str, Any] = {"seed": seed, "best_val_acc": best, "target": target}
            for search, timeline in timelines.items():
                consumed, reached = epochs_until(timeline, target)
                row[search] = {"epochs_until_target": consumed, "reached": reached, "epochs_total": len(timeline),
                               "best_val_acc": max(timeline)}
            rows.append(row)
            print(f"seed {seed}: best val acc {best:.4f}, target {target:.4f}: epochs until target "
                  + ", ".join(f"{s} {row[s]['epochs_until_target']}{'' if row[s]['reached'] else ' (never)'}"
                              f" of {row[s]['epochs_total']}" for s in SEARCHES), flush=True)
    ray.shutdown()
    totals = {search: sum(r[search]["epochs_until_target"] for r in rows) for search in SEARCHES}
    ratio = totals["tpe_asha"] / totals["random"]
    print(f"\n{'seed':<6} {'best val':>9} {'TPE+ASHA epochs':>16} {'random epochs':>14}")
    for r in rows:
        print(f"{r['seed']:<6} {r['best_val_acc']:>9.4f} {r['tpe_asha']['epochs_until_target']:>16} "
              f"{r['random']['epochs_until_target']:>14}")
    print(f"{'total':<6} {'':>9} {totals['tpe_asha']:>16} {totals['random']:>14}")
    print(f"TPE+ASHA / random epochs until within {args.margin} points of the best: {ratio:.2f}  (target <= 0.40)")
    write_json("search_efficiency", {"config": vars(args), "environment": environment(), "seeds": rows,
                                     "totals": totals, "ratio_tpe_asha_over_random": ratio}, args.json)


if __name__ == "__main__":
    main()
