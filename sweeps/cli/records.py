"""Reading what sweeps recorded: `status`, `best`, `pull`, and `ui` over the tracking store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from cluster.addresses import MLFLOW_HOST
from sweeps import tags
from sweeps.cli.app import (
    DEFAULT_CLUSTER_DIR,
    ClusterDir,
    JobAddress,
    NotFoundError,
    SweepName,
    TrackingUri,
    app,
    check_writable,
    find_sweep,
    open_tracker,
    out,
    user_errors,
)
from sweeps.cli.jobs import job_status
from sweeps.cli.render import print_best, print_pareto, print_sweeps, print_trials
from sweeps.spec import SpecError
from sweeps.tracking import Tracker


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
    cluster_dir: ClusterDir = DEFAULT_CLUSTER_DIR,
) -> None:
    """List sweeps with trial counts and best so far, or one sweep's trials, or follow a job."""
    if job is not None:
        job_status(job, address, follow, cluster_dir)
        return
    if follow:
        raise SpecError("--follow follows a job: give --job JOB_ID")
    tracker = open_tracker(tracking_uri, reading=True)
    if name is None:
        print_sweeps(tracker.uri, [(s, tracker.children(s.info.run_id, "trial")) for s in tracker.find_sweeps()])
        return
    sweep = find_sweep(tracker, name)
    trials = sorted(tracker.children(sweep.info.run_id, "trial"), key=lambda r: r.info.start_time)
    print_trials(sweep, [(t, len(tracker.client.get_metric_history(t.info.run_id, "val_acc"))) for t in trials])


@app.command()
@user_errors
def best(
    name: SweepName,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    pareto: Annotated[bool, typer.Option(
        "--pareto", help="The Pareto front of a multi-objective sweep (accuracy vs cost, "
                         "e.g. sweep.objectives: [accuracy, params]).")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """The best trial of a sweep: config, metrics, model URI (or its Pareto front)."""
    tracker = open_tracker(tracking_uri, reading=True)
    sweep = find_sweep(tracker, name)
    sweep_tags = sweep.data.tags
    if pareto:
        _show_pareto(tracker, sweep, as_json)
        return
    run_id = sweep_tags.get(tags.BEST_RUN_ID)
    if not run_id:
        raise NotFoundError(f"sweep {sweep_tags.get(tags.SWEEP)!r} has no best trial yet "
                            f"(status {sweep.info.status})")
    trial = tracker.client.get_run(run_id)
    summary = {
        "sweep": sweep_tags.get(tags.SWEEP), "status": sweep.info.status,
        "trial_id": sweep_tags.get(tags.BEST_TRIAL_ID), "run_id": run_id,
        "params": trial.data.params,
        "metrics": {k: trial.data.metrics.get(k) for k in ("val_acc_best", "test_acc", "best_epoch")},
        "sweep_metrics": sweep.data.metrics,
        "model_uri": sweep_tags.get(tags.MODEL_URI), "model_version": sweep_tags.get(tags.MODEL_VERSION),
        "champion": sweep_tags.get(tags.CHAMPION),
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    print_best(summary, sweep.data.metrics.get("baseline_test_acc"))


def _show_pareto(tracker: Tracker, sweep: Any, as_json: bool) -> None:
    if tags.PARETO_TRIAL_IDS not in sweep.data.tags:
        raise NotFoundError(f"sweep {sweep.data.tags.get(tags.SWEEP)!r} has no Pareto front "
                            "(only multi-objective sweeps, `sweep.objectives: [accuracy, params]`, have one)")
    rows = _load_json(tracker, sweep.info.run_id, "pareto.json")
    if as_json:
        out.print_json(json.dumps(rows))
        return
    print_pareto(sweep.data.tags.get(tags.SWEEP), rows)


def _load_json(tracker: Tracker, run_id: str, path: str) -> Any:
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                    tracking_uri=tracker.uri)
        return json.loads(Path(local).read_text())


PULL_RECORD = ".kdsweep-pull.json"  # in --to: the files a pull wrote and their sha256, so a later pull may replace them


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pulled_files(directory: Path) -> dict[str, str]:
    """The files an earlier pull wrote into `directory` that are still as it wrote them: {name: sha256}."""
    try:
        recorded = json.loads((directory / PULL_RECORD).read_text())["files"]
        return {name: digest for name, digest in recorded.items()
                if (directory / name).is_file() and _sha256(directory / name) == digest}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no record, or a damaged one: nothing is known to be ours


def _foreign_files(directory: Path) -> list[str]:
    """Entries of `directory` that no earlier `kdsweep pull` wrote, or that were changed since."""
    if not directory.is_dir():
        return []
    ours = _pulled_files(directory)
    return sorted(e.name for e in directory.iterdir() if e.name != PULL_RECORD and e.name not in ours)


@app.command()
@user_errors
def pull(
    name: SweepName,
    to: Annotated[Path, typer.Option("--to", help="Directory for the student files: new, empty, or "
                                                  "holding only an earlier pull's files.")],
    trial: Annotated[str | None, typer.Option(
        help="A Pareto-optimal trial of a multi-objective sweep instead of the best one.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Pull even into a directory holding other files (same names are replaced).")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Copy the best student's files into a directory: every form (student.onnx, student.pt2,
    student_state_dict.pt) and student.json, which says how to load each and preprocess its inputs."""
    import mlflow.artifacts

    check_writable(to, "--to")
    foreign = _foreign_files(to)
    if foreign and not force:
        raise SpecError(f"--to {to}: holds files that no kdsweep pull wrote ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}); pull into a new or empty directory, or pass "
                        "--force to write there anyway (files of the same name are replaced)")
    tracker = open_tracker(tracking_uri, reading=True)
    sweep = find_sweep(tracker, name)
    if tags.MODEL_URI not in sweep.data.tags:
        raise NotFoundError(f"sweep {name!r} has no exported student (status {sweep.info.status})")
    artifact_path = "export"
    if trial is not None:
        front = [t for t in sweep.data.tags.get(tags.PARETO_TRIAL_IDS, "").split(",") if t]
        if trial not in front:
            raise NotFoundError(f"trial {trial!r} is not on the Pareto front of {name!r} "
                                f"(Pareto trials: {', '.join(front) or 'none'})")
        artifact_path = f"pareto/{trial}"
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=sweep.info.run_id, artifact_path=artifact_path, dst_path=tmp, tracking_uri=tracker.uri,
        )
        ours = _pulled_files(to)
        try:
            to.mkdir(parents=True, exist_ok=True)  # only now: a failed pull leaves no empty folder
            for path in sorted(Path(local).iterdir()):
                shutil.copy2(path, to / path.name)
                ours[path.name] = _sha256(to / path.name)
                out.print(f"{to / path.name}")
            (to / PULL_RECORD).write_text(json.dumps({"sweep": sweep.data.tags.get(tags.SWEEP),
                                                      "files": ours}, indent=1))
        except OSError as error:
            raise SpecError(f"--to {to}: {error.strerror or error}: {error.filename or to}") from None
    if trial is None:
        out.print(f"model: {sweep.data.tags[tags.MODEL_URI]}", soft_wrap=True)  # the same student, in MLflow


def pinned_version(model_uri: str, version: str | None) -> tuple[str, str]:
    """(model name, version) of what a sweep recorded: `models:/NAME/N`, or (older sweeps)
    `models:/NAME@ALIAS` beside the version tag."""
    name_part = model_uri.removeprefix("models:/")
    if "@" in name_part:
        return name_part.split("@", 1)[0], version or ""
    name, _, number = name_part.rpartition("/")
    return name, number


@app.command()
@user_errors
def promote(name: SweepName, tracking_uri: TrackingUri = None) -> None:
    """Give a sweep's exported student the `champion` alias, whatever the automatic rule decided."""
    from sweeps.export import ALIAS

    tracker = open_tracker(tracking_uri, reading=True)
    sweep = find_sweep(tracker, name)
    if tags.MODEL_URI not in sweep.data.tags:
        raise NotFoundError(f"sweep {name!r} has no exported student (status {sweep.info.status})")
    model, version = pinned_version(sweep.data.tags[tags.MODEL_URI], sweep.data.tags.get(tags.MODEL_VERSION))
    tracker.client.set_registered_model_alias(model, ALIAS, version)
    tracker.set_tags(sweep.info.run_id, {tags.CHAMPION: "promoted by hand (kdsweep promote)"})
    out.print(f"models:/{model}@{ALIAS} -> models:/{model}/{version}", soft_wrap=True)


@app.command()
@user_errors
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help=f"Port on {MLFLOW_HOST}.")] = 5000,
    tracking_uri: TrackingUri = None,
) -> None:
    """Start the MLflow UI on the loopback address over the tracking store."""
    tracker = open_tracker(tracking_uri)
    if tracker.uri.startswith(("http://", "https://")):
        out.print(f"the tracking server already serves its UI: {tracker.uri}")
        return
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracker.uri,
               "--host", MLFLOW_HOST, "--port", str(port)]
    out.print(f"MLflow UI on http://{MLFLOW_HOST}:{port} (Ctrl-C stops it)")
    os.execv(sys.executable, command)
