"""The `kdsweep` command line. User errors print one message and exit with status 2."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from cluster import local as local_cluster
from cluster.local import ClusterError
from sweeps.spec import NAME_PATTERN, SpecError, load_spec
from sweeps.tracking import DEFAULT_TRACKING_URI, TAG_SWEEP, Tracker, resolve_tracking_uri

app = typer.Typer(
    name="kdsweep", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    help="Distributed hyperparameter sweeps for knowledge distillation "
         "(Ray Tune + Optuna + MLflow).",
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class NotFoundError(LookupError):
    """A sweep, store or export the user named does not exist."""

TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help=f"MLflow tracking URI [default: $MLFLOW_TRACKING_URI or "
                           f"{DEFAULT_TRACKING_URI}]")]
SweepName = Annotated[str, typer.Argument(help="Sweep name (or spec name: its newest sweep).")]


def user_errors(command: F) -> F:
    """Turn user errors into one line on stderr and exit status 2, without a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SpecError, NotFoundError, ClusterError) as error:
            err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _tracker(tracking_uri: str | None, *, reading: bool = False) -> Tracker:
    """The tracker for a URI; `reading` refuses to create a local store that is absent."""
    uri = resolve_tracking_uri(tracking_uri)
    if reading and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise NotFoundError(f"no sweeps recorded at {uri}")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise SpecError(f"tracking URI {uri}: directory {db.parent} does not exist")
    elif uri.startswith(("file:", "./", "/")) or "://" not in uri:
        raise SpecError(f"tracking URI {uri!r}: use sqlite:///PATH, http://HOST:PORT or a "
                        "database URI (MLflow 3 does not accept file stores)")
    return Tracker(uri)


def _find_sweep(tracker: Tracker, name: str) -> Any:
    runs = tracker.find_sweeps(name)
    if not runs:
        known = sorted({r.data.tags.get(TAG_SWEEP, "") for r in tracker.find_sweeps()})
        raise NotFoundError(f"no sweep named {name!r} at {tracker.uri}"
                          + (f" (known: {', '.join(known)})" if known else ""))
    return runs[0]


@app.command()
@user_errors
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="Sweep spec (YAML).")],
    name: Annotated[str | None, typer.Option(help="Sweep name [default: SPEC-NAME-TIMESTAMP].")] = None,
    num_trials: Annotated[int | None, typer.Option(min=1, help="Override sweep.num_trials.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="Override sweep.max_concurrent.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address [default: a local Ray on 127.0.0.2].")] = None,
    tracking_uri: TrackingUri = None,
    storage: Annotated[Path, typer.Option(
        help="Storage root: Tune experiments, stage store, studies, exports.")] = Path("kdsweep_storage"),
) -> None:
    """Run a sweep and print the best trial beside the CE-only student."""
    spec = load_spec(spec_path)
    overrides = {k: v for k, v in {"num_trials": num_trials, "max_concurrent": max_concurrent}.items()
                 if v is not None}
    if overrides:
        spec = spec.model_copy(update={"sweep": spec.sweep.model_copy(update=overrides)})
    if name is not None and not NAME_PATTERN.match(name):
        raise SpecError(f"--name {name!r}: use letters, digits, '_', '.' and '-'")
    if storage.exists() and not storage.is_dir():
        raise SpecError(f"--storage {storage}: not a directory")
    tracker = _tracker(tracking_uri)
    _cluster_token_env(address)

    from sweeps.runner import SweepFailedError, default_sweep_name, run_sweep  # Ray: after validation

    try:
        outcome = run_sweep(spec, name=name or default_sweep_name(spec), storage=storage,
                            tracking_uri=tracker.uri, address=address, console=err)
    except SweepFailedError as error:
        err.print(f"[bold red]sweep failed:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_outcome(outcome)


@app.command()
@user_errors
def resume(
    name: Annotated[str, typer.Argument(help="The sweep to continue (its exact name).")],
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address [default: a local Ray on 127.0.0.2].")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Continue a sweep whose driver was interrupted or killed, then print its result."""
    tracker = _tracker(tracking_uri, reading=True)
    _cluster_token_env(address)

    from sweeps.runner import SweepFailedError, resume_sweep  # Ray: after validation

    try:
        outcome = resume_sweep(name, tracking_uri=tracker.uri, address=address, console=err)
    except SweepFailedError as error:
        err.print(f"[bold red]sweep failed:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_outcome(outcome)


def _cluster_token_env(address: str | None) -> None:
    """`--address` of the loopback cluster in ./kdsweep_cluster: use its token (unless one is set).
    Must run before Ray is imported, which reads RAY_AUTH_MODE once."""
    if not address or address == "auto" or {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys():
        return
    found = local_cluster.find_local(address)
    if found is not None:
        os.environ["RAY_AUTH_TOKEN_PATH"] = found.token_file
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _print_outcome(outcome: Any) -> None:
    best, plan = outcome.best, outcome.best_plan
    counts = {s: sum(t.status == s for t in outcome.trials) for s in ("FINISHED", "KILLED", "FAILED")}
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
    settings = ", ".join(f"{k}={_short(v)}" for k, v in best.sampled.items())
    out.print(f"best trial settings: {settings}", soft_wrap=True)
    for c in outcome.confirmations:
        stats = c.summary()
        out.print(f"confirmation #{c.rank} (trial {c.trial_id}, seeds {c.seeds}): "
                  f"val {stats['val_acc_mean']:.4f} ± {stats['val_acc_std']:.4f}, "
                  f"test {stats['test_acc_mean']:.4f} ± {stats['test_acc_std']:.4f}", soft_wrap=True)
    for row in outcome.pareto:
        out.print(f"Pareto: trial {row['trial_id']} {row['cost_name']}={row['cost']:.0f} val {row['val_acc']:.4f} "
                  f"test {row['test_acc']:.4f}", soft_wrap=True)
    delta = outcome.export.test_acc - m["test_acc"]
    out.print(f"best vs CE-only student: {delta * 100:+.2f} test-accuracy points")
    out.print(f"model: {outcome.export.model_uri} (version {outcome.export.model_version})", soft_wrap=True)
    out.print(f"files: {outcome.export.directory}", soft_wrap=True)
    out.print(f"pull it: kdsweep pull {outcome.name} --to DIR", soft_wrap=True)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
@user_errors
def best(
    name: SweepName,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    pareto: Annotated[bool, typer.Option(
        "--pareto", help="The Pareto front of a multi-objective sweep (accuracy vs cost).")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """The best trial of a sweep: config, metrics, model URI (or its Pareto front)."""
    tracker = _tracker(tracking_uri, reading=True)
    sweep = _find_sweep(tracker, name)
    tags = sweep.data.tags
    if pareto:
        _print_pareto(tracker, sweep, as_json)
        return
    run_id = tags.get("kdsweep.best_run_id")
    if not run_id:
        raise NotFoundError(f"sweep {tags.get(TAG_SWEEP)!r} has no best trial yet "
                          f"(status {sweep.info.status})")
    trial = tracker.client.get_run(run_id)
    summary = {
        "sweep": tags.get(TAG_SWEEP), "status": sweep.info.status,
        "trial_id": tags.get("kdsweep.best_trial_id"), "run_id": run_id,
        "params": trial.data.params,
        "metrics": {k: trial.data.metrics.get(k) for k in ("val_acc_best", "test_acc", "best_epoch")},
        "sweep_metrics": sweep.data.metrics,
        "model_uri": tags.get("kdsweep.model_uri"), "model_version": tags.get("kdsweep.model_version"),
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print(f"sweep {summary['sweep']} ({summary['status']}): best trial {summary['trial_id']}"
              f" (run {run_id})")
    for key, value in summary["metrics"].items():
        out.print(f"  {key} = {value}")
    out.print(f"  baseline_test_acc = {sweep.data.metrics.get('baseline_test_acc')}")
    for key, value in sorted(trial.data.params.items()):
        out.print(f"  {key}: {value}")
    out.print(f"  model: {summary['model_uri']} (version {summary['model_version']})")


def _print_pareto(tracker: Tracker, sweep: Any, as_json: bool) -> None:
    if "kdsweep.pareto_trial_ids" not in sweep.data.tags:
        raise NotFoundError(f"sweep {sweep.data.tags.get(TAG_SWEEP)!r} has no Pareto front "
                            "(only multi-objective sweeps, `sweep.objectives: [accuracy, params]`, have one)")
    rows = _load_json(tracker, sweep.info.run_id, "pareto.json")
    if as_json:
        out.print_json(json.dumps(rows))
        return
    cost = rows[0]["cost_name"]
    table = Table(title=f"Pareto front of {sweep.data.tags.get(TAG_SWEEP)} (val accuracy vs {cost})")
    for column in ("trial", cost, "val acc", "test acc", "settings"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["trial_id"], f"{row['cost']:.0f}", f"{row['val_acc']:.4f}", f"{row['test_acc']:.4f}",
                      ", ".join(f"{k}={_short(v)}" for k, v in row["settings"].items()))
    out.print(table)
    out.print("pull one: kdsweep pull NAME --to DIR --trial TRIAL")


def _load_json(tracker: Tracker, run_id: str, path: str) -> Any:
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                    tracking_uri=tracker.uri)
        return json.loads(Path(local).read_text())


@app.command()
@user_errors
def pull(
    name: SweepName,
    to: Annotated[Path, typer.Option("--to", help="Directory for the student files.")],
    trial: Annotated[str | None, typer.Option(
        help="A Pareto-optimal trial of a multi-objective sweep instead of the best one.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Copy the best student's files (state dict, TorchScript, metadata) into a directory."""
    import mlflow.artifacts

    tracker = _tracker(tracking_uri, reading=True)
    sweep = _find_sweep(tracker, name)
    if "kdsweep.model_uri" not in sweep.data.tags:
        raise NotFoundError(f"sweep {name!r} has no exported student (status {sweep.info.status})")
    artifact_path = "export"
    if trial is not None:
        front = [t for t in sweep.data.tags.get("kdsweep.pareto_trial_ids", "").split(",") if t]
        if trial not in front:
            raise NotFoundError(f"trial {trial!r} is not on the Pareto front of {name!r} "
                                f"(Pareto trials: {', '.join(front) or 'none'})")
        artifact_path = f"pareto/{trial}"
    if to.exists() and not to.is_dir():
        raise SpecError(f"--to {to}: not a directory")
    to.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=sweep.info.run_id, artifact_path=artifact_path, dst_path=tmp,
            tracking_uri=tracker.uri,
        )
        for path in sorted(Path(local).iterdir()):
            shutil.copy2(path, to / path.name)
            out.print(f"{to / path.name}")


ClusterDir = Annotated[Path, typer.Option(
    "--cluster-dir", help="Where `kdsweep cluster up` keeps the loopback cluster's state.")]
JobAddress = Annotated[str | None, typer.Option(
    help="Ray dashboard URL (Jobs API), e.g. http://127.0.0.2:8265 "
         "[default: the loopback cluster in --cluster-dir].")]


@app.command()
@user_errors
def status(
    name: Annotated[str | None, typer.Argument(help="A sweep: list its trials.")] = None,
    tracking_uri: TrackingUri = None,
    job: Annotated[str | None, typer.Option(
        help="A sweep submitted with `kdsweep submit`: its Ray job (the job id is the sweep name).")] = None,
    address: JobAddress = None,
    follow: Annotated[bool, typer.Option(
        "--follow", help="With --job: stream the job's logs until it ends; exit 1 unless it succeeded.")] = False,
    cluster_dir: ClusterDir = local_cluster.DEFAULT_DIR,
) -> None:
    """List sweeps with trial counts and best so far, or one sweep's trials, or follow a job."""
    if job is not None:
        _job_status(job, address, follow, cluster_dir)
        return
    if follow:
        raise SpecError("--follow follows a job: give --job JOB_ID")
    tracker = _tracker(tracking_uri, reading=True)
    if name is None:
        sweeps = tracker.find_sweeps()
        table = Table(title=f"sweeps at {tracker.uri}")
        for column in ("sweep", "status", "trials", "finished", "stopped", "failed", "running",
                       "best val acc"):
            table.add_column(column)
        for sweep in sweeps:
            trials = tracker.children(sweep.info.run_id, "trial")
            count = {s: sum(t.info.status == s for t in trials)
                     for s in ("FINISHED", "KILLED", "FAILED", "RUNNING")}
            best_val = max((t.data.metrics.get("val_acc_best", 0.0) for t in trials), default=None)
            table.add_row(sweep.data.tags.get(TAG_SWEEP, ""), sweep.info.status, str(len(trials)),
                          *(str(count[s]) for s in count),
                          f"{best_val:.4f}" if best_val is not None else "-")
        out.print(table)
        return
    sweep = _find_sweep(tracker, name)
    table = Table(title=f"sweep {sweep.data.tags.get(TAG_SWEEP)} ({sweep.info.status})")
    for column in ("trial", "status", "method", "epochs", "val acc", "test acc", "params"):
        table.add_column(column)
    for trial in sorted(tracker.children(sweep.info.run_id, "trial"),
                        key=lambda r: r.info.start_time):
        params = trial.data.params
        shown = ", ".join(f"{k}={params[k]}" for k in ("T", "w_ce", "w_kd", "kl_reduction",
                                                        "recipe.lr") if k in params)
        metrics = trial.data.metrics
        table.add_row(
            trial.data.tags.get("kdsweep.trial_id", ""), trial.info.status, params.get("method", ""),
            str(_epochs(tracker, trial.info.run_id)),
            f"{metrics.get('val_acc_best', float('nan')):.4f}",
            f"{metrics['test_acc']:.4f}" if "test_acc" in metrics else "-", shown,
        )
    out.print(table)


def _epochs(tracker: Tracker, run_id: str) -> int:
    return len(tracker.client.get_metric_history(run_id, "val_acc"))


def _job_client(address: str | None, cluster_dir: Path) -> tuple[Any, local_cluster.Cluster | None]:
    """A Jobs API client for `address`, or for the loopback cluster when none is given."""
    from cluster import jobs

    found = local_cluster.find_local(address, cluster_dir)
    if address is None:
        if found is None:
            raise ClusterError(f"no --address given and no cluster recorded in {cluster_dir}: pass "
                               "--address http://HOST:8265 or start one with `kdsweep cluster up`")
        address = found.dashboard_url
    return jobs.connect(address, jobs.token_for(found)), found


def _job_status(job_id: str, address: str | None, follow: bool, cluster_dir: Path) -> None:
    from cluster import jobs

    client, _ = _job_client(address, cluster_dir)
    try:
        if follow:
            final = jobs.follow(client, job_id, lambda chunk: out.print(chunk, end="", markup=False,
                                                                          highlight=False, soft_wrap=True))
        else:
            final = jobs.status(client, job_id)
    except jobs.JobNotFoundError as error:
        raise NotFoundError(str(error)) from None
    when = " ".join(f"{label} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))}"
                    for label, t in (("started", final.start_time), ("ended", final.end_time)) if t)
    out.print(f"job {final.job_id}: {final.status}" + (f" ({when})" if when else ""), highlight=False)
    out.print(f"  entrypoint: {final.entrypoint}", highlight=False, soft_wrap=True, markup=False)
    if final.status != "SUCCEEDED" and final.message:
        out.print(f"  {final.message.strip().splitlines()[0]}", highlight=False, soft_wrap=True, markup=False)
    if follow and final.status != "SUCCEEDED":
        raise typer.Exit(1)


@app.command()
@user_errors
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="Sweep spec (YAML).")],
    address: JobAddress = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking server every node reaches [default: $MLFLOW_TRACKING_URI, "
                               "else the loopback cluster's server].")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Storage root as every node sees it: a shared filesystem path "
             "[default: the loopback cluster's storage].")] = None,
    name: Annotated[str | None, typer.Option(
        help="Sweep name, also the Ray job id [default: SPEC-NAME-TIMESTAMP].")] = None,
    num_trials: Annotated[int | None, typer.Option(min=1, help="Override sweep.num_trials.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="Override sweep.max_concurrent.")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Stream the job's logs until it ends (exit 1 unless it succeeds).")] = True,
    working_dir: Annotated[Path, typer.Option(
        help="Project directory shipped with the job (plugins, local modules); "
             "environments, stores and caches are left out.")] = Path("."),
    cluster_dir: ClusterDir = local_cluster.DEFAULT_DIR,
) -> None:
    """Run a sweep as a Ray job on a cluster: `kdsweep run` on the head, trials on every node."""
    from cluster import jobs

    spec = load_spec(spec_path)
    overrides = {k: v for k, v in {"num_trials": num_trials, "max_concurrent": max_concurrent}.items()
                 if v is not None}
    if overrides:  # validated here, applied by `kdsweep run` on the cluster
        spec = spec.model_copy(update={"sweep": spec.sweep.model_copy(update=overrides)})
    if name is not None and not NAME_PATTERN.match(name):
        raise SpecError(f"--name {name!r}: use letters, digits, '_', '.' and '-'")
    if not working_dir.is_dir():
        raise SpecError(f"--working-dir {working_dir}: not a directory")
    if address is not None:
        jobs.check_address(address)
    found = local_cluster.find_local(address, cluster_dir)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (found.tracking_uri if found else None)
    if uri is None:
        raise SpecError("no tracking server: pass --tracking-uri http://HOST:PORT (one every node reaches)")
    root = storage or (found.storage if found else None)
    if root is None:
        raise SpecError("no storage: pass --storage PATH (a shared filesystem path every node mounts)")
    uri, root = jobs.check_tracking_uri(uri), jobs.check_storage(root)
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # as `kdsweep run` names sweeps

    client, _ = _job_client(address, cluster_dir)
    job_id = jobs.submit(client, spec_path, name=name, storage=root, tracking_uri=uri, project=working_dir,
                         spec_name=spec.name, num_trials=num_trials, max_concurrent=max_concurrent)
    where = client.get_address()
    err.print(f"[bold]kdsweep[/] job [cyan]{job_id}[/] submitted to {where}; tracking {uri}; storage {root}",
              highlight=False, soft_wrap=True)
    follow_hint = f"kdsweep status --job {job_id} --address {where} --follow"
    if not wait:
        out.print(job_id)
        err.print(f"follow it: {follow_hint}", highlight=False, soft_wrap=True)
        return
    try:
        final = jobs.follow(client, job_id, lambda chunk: out.print(chunk, end="", markup=False,
                                                                      highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        err.print(f"detached; the job goes on. Follow it: {follow_hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    err.print(f"job {job_id}: {final.status}", highlight=False)
    if final.status != "SUCCEEDED":
        if final.message:
            err.print(final.message.strip().splitlines()[0], highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(1)


cluster_app = typer.Typer(
    name="cluster", no_args_is_help=True,
    help="A loopback multi-node Ray cluster (head on 127.0.0.2, workers on 127.0.0.3, ...) with "
         "token auth and an MLflow tracking server on 127.0.0.1.",
)
app.add_typer(cluster_app)
StateDir = Annotated[Path, typer.Option("--dir", help="State, logs, MLflow store and storage of the cluster.")]


@cluster_app.command("up")
@user_errors
def cluster_up(
    workers: Annotated[int, typer.Option(min=0, max=250, help="Worker nodes besides the head.")] = 2,
    num_cpus: Annotated[int, typer.Option(min=1, help="Logical CPUs each node offers to Ray.")] = 1,
    dashboard_port: Annotated[int, typer.Option(
        min=0, max=65535, help="Dashboard (Jobs API) port on 127.0.0.2; 0: any free port.")] = 8265,
    backend_store_uri: Annotated[str | None, typer.Option(
        help="MLflow backend store, e.g. postgresql://... [default: sqlite in --dir].")] = None,
    timeout: Annotated[float, typer.Option(min=10, help="Seconds to wait for every node.")] = 180,
    directory: StateDir = local_cluster.DEFAULT_DIR,
) -> None:
    """Start the head, the worker nodes and the MLflow server; print the URLs."""
    started = time.monotonic()
    cluster = local_cluster.up(directory, workers, num_cpus=num_cpus, dashboard_port=dashboard_port,
                               backend_store_uri=backend_store_uri, timeout=timeout)
    out.print(f"cluster up in {time.monotonic() - started:.0f}s: head {cluster.nodes[0].ip}, workers "
              f"{', '.join(n.ip for n in cluster.nodes[1:]) or 'none'}", highlight=False)
    _print_urls(cluster)
    out.print(f"submit a sweep: kdsweep submit SPEC.yaml --address {cluster.dashboard_url}", highlight=False)


def _print_urls(cluster: local_cluster.Cluster) -> None:
    out.print(f"  dashboard / Jobs API: {cluster.dashboard_url}", highlight=False)
    out.print(f"  Ray address (ray.init, kdsweep run --address): {cluster.gcs_address}", highlight=False)
    out.print(f"  MLflow tracking server: {cluster.tracking_uri}", highlight=False)
    out.print(f"  storage: {cluster.storage}", highlight=False)
    out.print(f"  token: {cluster.token_file} (export RAY_AUTH_TOKEN_PATH=... for other Ray clients)",
              highlight=False)


@cluster_app.command("down")
@user_errors
def cluster_down(directory: StateDir = local_cluster.DEFAULT_DIR) -> None:
    """Stop exactly the processes `cluster up` started (the MLflow store and storage stay)."""
    stopped = local_cluster.down(directory)
    out.print(f"cluster in {directory} stopped ({len(stopped)} processes)", highlight=False)


@cluster_app.command("status")
@user_errors
def cluster_status(
    directory: StateDir = local_cluster.DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Nodes (as Ray sees them), their resources, and the cluster's URLs."""
    report = local_cluster.status(directory)
    if as_json:
        out.print_json(json.dumps(report))
        return
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


@app.command()
@user_errors
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 5000,
    tracking_uri: TrackingUri = None,
) -> None:
    """Start the MLflow UI on 127.0.0.1 over the tracking store."""
    tracker = _tracker(tracking_uri)
    if tracker.uri.startswith(("http://", "https://")):
        out.print(f"the tracking server already serves its UI: {tracker.uri}")
        return
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracker.uri,
               "--host", "127.0.0.1", "--port", str(port)]
    out.print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C stops it)")
    os.execv(sys.executable, command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
