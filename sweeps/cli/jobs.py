"""`kdsweep submit` and `kdsweep status --job`: sweeps as Ray jobs on a cluster."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from cluster import jobs, state
from sweeps import tags
from sweeps.cli.app import (
    DEFAULT_CLUSTER_DIR,
    ClusterDir,
    JobAddress,
    MaxConcurrent,
    NotFoundError,
    NumTrials,
    app,
    err,
    out,
    user_errors,
    with_overrides,
)
from sweeps.cli.render import print_job, print_log_chunk
from sweeps.cli.sweep import SpecSets
from sweeps.spec import SpecError


def job_client(address: str | None, cluster_dir: Path) -> Any:
    """A Jobs API client for `address`, or for the loopback cluster when none is given."""
    found = state.find_local(address, cluster_dir)
    if address is None:
        if found is None:
            raise state.ClusterError(f"no --address given and no cluster recorded in {cluster_dir}: pass "
                                     "--address http://HOST:8265 or start one with `kdsweep cluster up`")
        address = found.dashboard_url
    return jobs.connect(address, jobs.token_for(found))


def job_status(job_id: str, address: str | None, follow: bool, cluster_dir: Path) -> None:
    """Print a job's status (after streaming its logs with `follow`); exit 1 if a followed job failed."""
    client = job_client(address, cluster_dir)
    try:
        final = jobs.follow(client, job_id, print_log_chunk) if follow else jobs.status(client, job_id)
    except jobs.JobNotFoundError as error:
        raise NotFoundError(str(error)) from None
    print_job(final)
    if follow and final.status != "SUCCEEDED":
        raise typer.Exit(1)


def job_spec_file(spec_path: Path, sets: list[str] | tuple[str, ...], directory: Path) -> Path:
    """The spec file a job carries: `spec_path` itself, or with `--set` items applied, written
    into `directory` (so the job runs the overridden spec, not the file on disk)."""
    if not sets:
        return spec_path
    from sweeps.spec.overrides import overridden_yaml

    path = directory / spec_path.name
    path.write_text(overridden_yaml(spec_path, sets), encoding="utf-8")
    return path


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
    num_trials: NumTrials = None,
    max_concurrent: MaxConcurrent = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Stream the job's logs until it ends (exit 1 unless it succeeds).")] = True,
    working_dir: Annotated[Path, typer.Option(
        help="Project directory shipped with the job (plugins, local modules); "
             "environments, stores and caches are left out.")] = Path("."),
    cluster_dir: ClusterDir = DEFAULT_CLUSTER_DIR,
    sets: SpecSets = None,
) -> None:
    """Run a sweep as a Ray job on a cluster: `kdsweep run` on the head, trials on every node."""
    from sweeps.pretrained import pin_teacher
    from sweeps.spec import load_spec
    from sweeps.tracking import Tracker

    found = state.find_local(address, cluster_dir)

    def job_tracking_uri() -> str:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (found.tracking_uri if found else None)
        if uri is None:
            raise SpecError("no tracking server: pass --tracking-uri http://HOST:PORT (one every node reaches)")
        return jobs.check_tracking_uri(uri)

    # A model_uri teacher is resolved where the job's trials will log; the overrides are
    # checked here and applied again on the cluster (the --set ones are in the job's spec file).
    spec = with_overrides(load_spec(spec_path, lambda s: pin_teacher(s, Tracker(job_tracking_uri()))
                                    if s.teacher and s.teacher.model_uri else s, sets or ()),
                          name, num_trials, max_concurrent)
    if not working_dir.is_dir():
        raise SpecError(f"--working-dir {working_dir}: not a directory")
    if address is not None:
        jobs.check_address(address)
    uri = job_tracking_uri()
    root = storage or (found.storage if found else None)
    if root is None:
        raise SpecError("no storage: pass --storage PATH (a shared filesystem path every node mounts)")
    root = jobs.check_storage(root)
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # as `kdsweep run` names sweeps

    client = job_client(address, cluster_dir)
    with tempfile.TemporaryDirectory(prefix="kdsweep-spec-") as tmp:
        job_spec = job_spec_file(spec_path, sets or (), Path(tmp))
        job_id = jobs.submit(client, job_spec, name=name, storage=root, tracking_uri=uri, project=working_dir,
                             metadata={tags.SWEEP: name, tags.SPEC: spec.name},
                             num_trials=num_trials, max_concurrent=max_concurrent)
    where = client.get_address()
    err.print(f"[bold]kdsweep[/] job [cyan]{escape(job_id)}[/] submitted to "
              + escape(f"{where}; tracking {uri}; storage {root}"),
              highlight=False, soft_wrap=True)
    follow_hint = f"kdsweep status --job {job_id} --address {where} --follow"
    if not wait:
        out.print(job_id)
        err.print(f"follow it: {follow_hint}", highlight=False, soft_wrap=True, markup=False)
        return
    try:
        final = jobs.follow(client, job_id, print_log_chunk)
    except KeyboardInterrupt:
        err.print(f"detached; the job goes on. Follow it: {follow_hint}", highlight=False, soft_wrap=True,
                  markup=False)
        raise typer.Exit(130) from None
    err.print(f"job {job_id}: {final.status}", highlight=False, markup=False)
    if final.status != "SUCCEEDED":
        if final.message:
            err.print(final.message.strip().splitlines()[0], highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(1)
