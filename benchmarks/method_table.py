"""Method-by-method table: each method's best configuration (selected on val) re-trained with
several seeds; test accuracy mean and std.

For every method of an all-methods spec, a sweep over that method's own search space runs
(real Ray Tune + Optuna + MLflow); its best trial by val accuracy is then trained again with
seeds 0..S-1 (student initialisation and shuffling; teachers and assistants are the stored
stages). Writes JSON and a markdown table.

    .venv/bin/python benchmarks/method_table.py                      # digits, all methods
    .venv/bin/python benchmarks/method_table.py --trials 4 --seeds 2 --methods kd dgkd
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.session import init_ray
from sweeps.confirm import retrain
from sweeps.pipeline import SweepContext
from sweeps.runner import WORKER_ENV, run_sweep
from sweeps.spec import SweepSpec, load_spec
from sweeps.tracking import resolve_tracking_uri

ROOT = Path(__file__).resolve().parent.parent


def method_spec(spec: SweepSpec, method: str, trials: int) -> SweepSpec:
    """The spec restricted to one method: its conditional parameters become plain ones."""
    data = spec.model_dump(mode="json")
    search = {}
    for path, param in data["search"].items():
        allowed = param.get("when", {}).get("method.name")
        if path == "method.name" or (allowed is not None and method not in (allowed if isinstance(allowed, list)
                                                                             else [allowed])):
            continue
        search[path] = {**param, "when": {k: v for k, v in param.get("when", {}).items() if k != "method.name"}}
    data.update(name=f"{spec.name}-{method}", search=search)
    data["method"] = {"name": method, "params": spec.fixed_params(method)}
    data["sweep"]["num_trials"] = trials
    data["tracking"]["registered_model"] = f"{spec.name}-{method}-student"
    return SweepSpec.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "sweeps/specs/digits_all_methods.yaml"))
    parser.add_argument("--trials", type=int, default=8, help="trials per method sweep")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="*", help="default: every method.name choice of the spec")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks/results/method_table"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/method_table.json"))
    parser.add_argument("--markdown", default=str(ROOT / "benchmarks/results/method_table.md"))
    args = parser.parse_args()

    console = Console(stderr=True)
    spec = load_spec(args.spec)
    methods = args.methods or list(spec.search["method.name"].choices)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    init_ray(None, env_vars=WORKER_ENV)
    rows: list[dict[str, Any]] = []
    for method in methods:
        one = method_spec(spec, method, args.trials)
        started = time.monotonic()
        outcome = run_sweep(one, name=f"{one.name}-{stamp}", storage=workdir / "storage",
                            tracking_uri=uri, console=console)
        context = SweepContext(outcome.name, one, str(workdir / "storage"), uri, outcome.parent_run_id)
        accuracies = [retrain(context, outcome.best.trial_id, outcome.best.sampled, seed)["test_acc"]
                      for seed in range(args.seeds)]
        rows.append({
            "method": method, "best_config": outcome.best.sampled, "val_acc": outcome.best.metrics["val_acc_best"],
            "test_acc_mean": statistics.mean(accuracies),
            "test_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "test_accs": accuracies, "student_params": outcome.export.num_params,
            "trials": len(outcome.trials), "seconds": time.monotonic() - started,
        })
        console.print(f"{method}: test {rows[-1]['test_acc_mean']:.4f} ± {rows[-1]['test_acc_std']:.4f}")

    header = (f"| method | test acc, mean ± std ({args.seeds} seeds) | val acc (sweep best) | deployed params "
              f"| trials | best configuration |\n|---|---|---|---|---|---|\n")
    lines = [f"| {r['method']} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} | "
             f"{100 * r['val_acc']:.2f} | {r['student_params']} | {r['trials']} | "
             + ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                         for k, v in r["best_config"].items()) + " |" for r in rows]
    table = header + "\n".join(lines) + "\n"
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"spec": args.spec, "trials": args.trials, "seeds": args.seeds,
                                           "rows": rows}, indent=2))
    Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
