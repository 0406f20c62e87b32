"""Method-by-method table: each method's best configuration (selected on val) re-trained with
several seeds; test accuracy mean and std, and the difference from the CE-only baseline with its
95% confidence interval.

For every method of an all-methods spec, a sweep over that method's own search space runs
(real Ray Tune + Optuna + MLflow); its best trial by val accuracy is then trained again with
seeds 0..S-1 (student initialisation and shuffling; teachers and assistants are the stored
stages), the seeds in parallel as Ray tasks. The difference from `ce` is Welch's two-sample t
interval (unequal variances) over the seeds' test accuracies; an interval that contains 0 means
the method is not distinguishable from CE-only at this many seeds. Writes JSON and a markdown table.

    .venv/bin/python benchmarks/method_table.py --spec sweeps/specs/fashion_mnist_all_methods.yaml \
        --trials 5 --seeds 5                                         # the docs/methods.md table
    .venv/bin/python benchmarks/method_table.py --trials 4 --seeds 2 --methods ce kd dgkd   # digits
    .venv/bin/python benchmarks/method_table.py --spec ... --methods dkd crd --add-to TABLE.json
                                            # new rows beside an earlier run's (same spec and seeds)

On a GPU: copy the spec, drop `data.train_subset`, set `sweep.gpus_per_trial: 1` (and
`max_concurrent` to the number of GPUs), raise the epochs, and pass the copy with `--spec`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from scipy import stats

from cluster.session import init_ray
from sweeps.confirm import retrain_task
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
    data["sweep"]["confirm"] = {"top_k": 0}  # the seeds below re-train the best configuration
    data["tracking"]["registered_model"] = f"{spec.name}-{method}-student"
    return SweepSpec.model_validate(data)


def difference_from(baseline: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, float] | None:
    """Mean test-accuracy difference `row - baseline` with Welch's 95% t interval (fractions).

    None without a baseline row, for the baseline itself, or with fewer than 2 seeds a side."""
    if baseline is None or row is baseline or min(len(row["test_accs"]), len(baseline["test_accs"])) < 2:
        return None
    test = stats.ttest_ind(row["test_accs"], baseline["test_accs"], equal_var=False)
    interval = test.confidence_interval(0.95)
    return {"mean": statistics.mean(row["test_accs"]) - statistics.mean(baseline["test_accs"]),
            "low": float(interval.low), "high": float(interval.high), "p_value": float(test.pvalue)}


def format_difference(diff: dict[str, float] | None) -> str:
    if diff is None:
        return "-"
    return f"{100 * diff['mean']:+.2f} [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]"


def earlier_rows(path: str | None, args: argparse.Namespace, methods: list[str]) -> list[dict[str, Any]]:
    """The rows of an earlier run's JSON except those of `methods` ([] without `path`). Raises
    SystemExit when that run used another spec, trial count or seed count (not comparable)."""
    if path is None:
        return []
    earlier = json.loads(Path(path).read_text())
    ours = {"spec": Path(args.spec).resolve(), "trials": args.trials, "seeds": args.seeds}
    theirs = {"spec": (ROOT / earlier["spec"]).resolve(), "trials": earlier["trials"], "seeds": earlier["seeds"]}
    if ours != theirs:
        raise SystemExit(f"--add-to {path}: made with {theirs}, this run is {ours}; rows would not be comparable")
    return [row for row in earlier["rows"] if row["method"] not in methods]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "sweeps/specs/digits_all_methods.yaml"))
    parser.add_argument("--trials", type=int, default=8, help="trials per method sweep")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="*", help="default: every method.name choice of the spec")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks/results/method_table"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/method_table.json"))
    parser.add_argument("--markdown", default=str(ROOT / "benchmarks/results/method_table.md"))
    parser.add_argument("--add-to", help="an earlier run's JSON (same spec, trials and seeds): its rows are kept, "
                                         "those of --methods replaced, and the CE-only row compared with")
    args = parser.parse_args()

    console = Console(stderr=True)
    spec = load_spec(args.spec)
    methods = args.methods or list(spec.search["method.name"].choices)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    init_ray(None, env_vars=WORKER_ENV)
    rows = earlier_rows(args.add_to, args, methods)
    for method in methods:
        one = method_spec(spec, method, args.trials)
        started = time.monotonic()
        outcome = run_sweep(one, name=f"{one.name}-{stamp}", storage=workdir / "storage",
                            tracking_uri=uri, console=console)
        context = SweepContext(outcome.name, one, str(workdir / "storage"), uri, outcome.parent_run_id)
        task = ray.remote(retrain_task).options(num_cpus=one.sweep.cpus_per_trial, num_gpus=one.sweep.gpus_per_trial)
        accuracies = [r["test_acc"] for r in ray.get([
            task.remote(context, outcome.best.trial_id, outcome.best.sampled, seed, one.sweep.device)
            for seed in range(args.seeds)])]
        rows.append({
            "method": method, "best_config": outcome.best.sampled, "val_acc": outcome.best.metrics["val_acc_best"],
            "test_acc_mean": statistics.mean(accuracies),
            "test_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "test_accs": accuracies, "student_params": outcome.export.num_params,
            "trials": len(outcome.trials), "seconds": time.monotonic() - started,
        })
        console.print(f"{method}: test {rows[-1]['test_acc_mean']:.4f} ± {rows[-1]['test_acc_std']:.4f}")

    baseline = next((r for r in rows if r["method"] == "ce"), None)
    for r in rows:
        r["diff_vs_ce"] = difference_from(baseline, r)
    header = (f"| method | test acc, mean ± std ({args.seeds} seeds) | vs CE-only, 95% CI | val acc (sweep best) "
              f"| deployed params | trials | best configuration |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['method']} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} | "
             f"{format_difference(r['diff_vs_ce'])} | {100 * r['val_acc']:.2f} | {r['student_params']} | "
             f"{r['trials']} | "
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
