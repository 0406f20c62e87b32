"""How the command line shows results: tables and lines on the consoles of `app`."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

from sweeps import tags
from sweeps.cli.app import out
from sweeps.results import status_counts

STATUS_COLUMNS = {"FINISHED": "finished", "KILLED": "stopped", "FAILED": "failed", "RUNNING": "running"}
# Shown in a sweep's trial table, by spec path; runs recorded before params were named so carry
# method params by their bare names ("T").
TRIAL_PARAMS = ("method.T", "method.w_ce", "method.w_kd", "method.kl_reduction", "recipe.lr")


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={short(v)}" for k, v in values.items())


def print_outcome(outcome: Any) -> None:
    """A finished sweep (`sweeps.finish.SweepOutcome`): teacher, CE-only student and best trial."""
    best, plan = outcome.best, outcome.best_plan
    counts = status_counts(t.status for t in outcome.trials)
    table = Table(title=f"sweep {outcome.name}: {len(outcome.trials)} trials in {outcome.seconds:.0f}s "
                        f"({counts['FINISHED']} finished, {counts['KILLED']} stopped early, "
                        f"{counts['FAILED']} failed)")
    for column in ("model", "method", "val acc", "test acc"):
        table.add_column(column)
    if outcome.teacher_metrics:
        m = outcome.teacher_metrics
        table.add_row("teacher", "ce", f"{m['val_acc_best']:.4f}", f"{m['test_acc']:.4f}")
    m = outcome.baseline_metrics
    table.add_row("student, CE only (same arch and recipe)", "ce", f"{m['val_acc_best']:.4f}",
                  f"{m['test_acc']:.4f}")
    table.add_row(f"student, best trial {best.trial_id}", plan.method,
                  f"{best.metrics['val_acc_best']:.4f}", f"{outcome.export.test_acc:.4f}")
    out.print(table)
    out.print(f"best trial settings: {settings(best.sampled)}", soft_wrap=True)
    for c in outcome.confirmations:
        stats = c.summary()
        out.print(f"confirmation #{c.rank} (trial {c.trial_id}, seeds {c.seeds}): "
                  f"val {stats['val_acc_mean']:.4f} ± {stats['val_acc_std']:.4f}, "
                  f"test {stats['test_acc_mean']:.4f} ± {stats['test_acc_std']:.4f}", soft_wrap=True)
    for row in outcome.pareto:
        out.print(f"Pareto: trial {row['trial_id']} {row['cost_name']}={row['cost']:g} val {row['val_acc']:.4f} "
                  f"test {row['test_acc']:.4f}", soft_wrap=True)
    delta = outcome.export.test_acc - m["test_acc"]
    out.print(f"best vs CE-only student: {delta * 100:+.2f} test-accuracy points")
    out.print(f"model: {outcome.export.model_uri} (pinned; champion: {outcome.export.champion})", soft_wrap=True)
    out.print(f"files: {outcome.export.directory}", soft_wrap=True)
    out.print(f"pull it: kdsweep pull {outcome.name} --to DIR", soft_wrap=True)


def print_sweeps(uri: str, rows: list[tuple[Any, list[Any]]]) -> None:
    """One row per sweep: (parent run, its trial runs)."""
    table = Table(title=f"sweeps at {uri}")
    for column in ("sweep", "status", "trials", *STATUS_COLUMNS.values(), "best val acc"):
        table.add_column(column)
    for sweep, trials in rows:
        count = status_counts(t.info.status for t in trials)
        best_val = max((t.data.metrics.get("val_acc_best", 0.0) for t in trials), default=None)
        table.add_row(sweep.data.tags.get(tags.SWEEP, ""), sweep.info.status, str(len(trials)),
                      *(str(count.get(s, 0)) for s in STATUS_COLUMNS),
                      f"{best_val:.4f}" if best_val is not None else "-")
    out.print(table)


def print_trials(sweep: Any, trials: list[tuple[Any, int]]) -> None:
    """One row per trial run of a sweep: (run, epochs logged)."""
    table = Table(title=f"sweep {sweep.data.tags.get(tags.SWEEP)} ({sweep.info.status})")
    for column in ("trial", "status", "method", "epochs", "val acc", "test acc", "params"):
        table.add_column(column)
    for trial, epochs in trials:
        params, metrics = trial.data.params, trial.data.metrics
        table.add_row(
            trial.data.tags.get(tags.TRIAL_ID, ""), trial.info.status, params.get("method", ""), str(epochs),
            f"{metrics.get('val_acc_best', float('nan')):.4f}",
            f"{metrics['test_acc']:.4f}" if "test_acc" in metrics else "-",
            ", ".join(f"{k}={params.get(k, params.get(k.removeprefix('method.')))}" for k in TRIAL_PARAMS
                      if k in params or k.removeprefix("method.") in params),
        )
    out.print(table)


def print_best(summary: dict[str, Any], baseline_test_acc: Any) -> None:
    out.print(f"sweep {summary['sweep']} ({summary['status']}): best trial {summary['trial_id']}"
              f" (run {summary['run_id']})")
    for key, value in summary["metrics"].items():
        out.print(f"  {key} = {value}")
    out.print(f"  baseline_test_acc = {baseline_test_acc}")
    for key, value in sorted(summary["params"].items()):
        out.print(f"  {key}: {value}")
    out.print(f"  model: {summary['model_uri']} (version {summary['model_version']}; champion: "
              f"{summary.get('champion') or 'not recorded'})", soft_wrap=True)


def print_pareto(sweep_name: str, rows: list[dict[str, Any]]) -> None:
    cost = rows[0]["cost_name"]
    table = Table(title=f"Pareto front of {sweep_name} (val accuracy vs {cost})")
    for column in ("trial", cost, "val acc", "test acc", "settings"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["trial_id"], f"{row['cost']:g}", f"{row['val_acc']:.4f}", f"{row['test_acc']:.4f}",
                      settings(row["settings"]))
    out.print(table)
    out.print("pull one: kdsweep pull NAME --to DIR --trial TRIAL")


def print_job(final: Any) -> None:
    """A Ray job's status (`cluster.jobs.JobStatus`)."""
    when = " ".join(f"{label} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))}"
                    for label, t in (("started", final.start_time), ("ended", final.end_time)) if t)
    out.print(f"job {final.job_id}: {final.status}" + (f" ({when})" if when else ""), highlight=False)
    out.print(f"  entrypoint: {final.entrypoint}", highlight=False, soft_wrap=True, markup=False)
    if final.status != "SUCCEEDED" and final.message:
        out.print(f"  {final.message.strip().splitlines()[0]}", highlight=False, soft_wrap=True, markup=False)


def print_log_chunk(chunk: str) -> None:
    out.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)


def print_cluster_urls(cluster: Any) -> None:
    out.print(f"  dashboard / Jobs API: {cluster.dashboard_url}", highlight=False)
    out.print(f"  Ray address (ray.init, kdsweep run --address): {cluster.gcs_address}", highlight=False)
    out.print(f"  MLflow tracking server: {cluster.tracking_uri}", highlight=False)
    out.print(f"  storage: {cluster.storage}", highlight=False)
    out.print(f"  token: {cluster.token_file} (export RAY_AUTH_TOKEN_PATH=... for other Ray clients)",
              highlight=False)


def print_cluster_status(report: dict[str, Any]) -> None:
    table = Table(title=f"Ray cluster from {report['directory']} ({report['processes']} processes)")
    for column in ("node", "role", "process", "Ray state", "CPU", "GPU", "memory GiB"):
        table.add_column(column)
    for node in report["nodes"]:
        res = node["resources"]
        table.add_row(node["ip"], node["role"], node["process"], node["state"], f"{res.get('CPU', 0):g}",
                      f"{res.get('GPU', 0):g}", f"{res.get('memory', 0) / 2**30:.1f}")
    out.print(table)
    if report["ray_error"]:
        out.print(f"  {report['ray_error']}", highlight=False, soft_wrap=True)
    out.print(f"  dashboard / Jobs API: {report['dashboard']}", highlight=False)
    out.print(f"  Ray address: {report['gcs']}", highlight=False)
    out.print(f"  MLflow tracking server: {report['tracking_uri']} "
              f"({'running' if report['mlflow_running'] else 'not running'})", highlight=False)
    out.print(f"  storage: {report['storage']}", highlight=False)
