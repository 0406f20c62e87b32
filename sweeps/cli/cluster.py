"""`kdsweep cluster up|down|status`: the loopback multi-node Ray cluster (`cluster.local`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from cluster import local
from cluster.addresses import LOOPBACK_IP, MLFLOW_HOST, node_ip
from sweeps.cli.app import DEFAULT_CLUSTER_DIR, app, check_writable, out, user_errors
from sweeps.cli.render import print_cluster_status, print_cluster_urls
from sweeps.cli.stores import check_store
from sweeps.spec import SpecError
from sweeps.tracking import resolve_tracking_uri

cluster_app = typer.Typer(
    name="cluster", no_args_is_help=True, rich_markup_mode=None,
    help=f"A loopback multi-node Ray cluster (head on {LOOPBACK_IP}, workers on {node_ip(1)}, ...) with "
         f"token auth and an MLflow tracking server on {MLFLOW_HOST}.",
)
app.add_typer(cluster_app)
StateDir = Annotated[Path, typer.Option("--dir", help="State, logs, MLflow store and storage of the cluster.")]


@cluster_app.command("up")
@user_errors
def cluster_up(
    workers: Annotated[int, typer.Option(min=0, max=250, help="Worker nodes besides the head.")] = 2,
    num_cpus: Annotated[int, typer.Option(min=1, help="Logical CPUs each node offers to Ray.")] = 1,
    dashboard_port: Annotated[int, typer.Option(
        min=0, max=65535, help=f"Dashboard (Jobs API) port on {LOOPBACK_IP}; 0: any free port.")] = 8265,
    backend_store_uri: Annotated[str | None, typer.Option(
        help="MLflow backend store, e.g. postgresql://... [default: sqlite in --dir].")] = None,
    timeout: Annotated[float, typer.Option(min=10, help="Seconds to wait for every node.")] = 180,
    mlflow_auth: Annotated[bool, typer.Option(
        help="MLflow basic auth: user and password from MLFLOW_TRACKING_USERNAME/PASSWORD, else admin "
             "and a random password, in --dir/mlflow_auth.ini (see docs/security.md).")] = False,
    directory: StateDir = DEFAULT_CLUSTER_DIR,
) -> None:
    """Start the head, the worker nodes and the MLflow server; print the URLs."""
    check_writable(directory, "--dir")
    if backend_store_uri is not None:
        uri = resolve_tracking_uri(backend_store_uri)
        if uri.startswith(("http://", "https://")):
            raise SpecError(f"--backend-store-uri {uri}: a database URI (sqlite:///PATH, postgresql://...), "
                            "not a tracking server")
        check_store(uri, create=True)
    started = time.monotonic()
    cluster = local.up(directory, workers, num_cpus=num_cpus, dashboard_port=dashboard_port,
                       backend_store_uri=backend_store_uri, mlflow_auth=mlflow_auth, timeout=timeout)
    out.print(f"cluster up in {time.monotonic() - started:.0f}s: head {cluster.nodes[0].ip}, workers "
              f"{', '.join(n.ip for n in cluster.nodes[1:]) or 'none'}", highlight=False)
    print_cluster_urls(cluster)
    out.print(f"submit a sweep: kdsweep submit SPEC.yaml --address {cluster.dashboard_url}", highlight=False)


@cluster_app.command("down")
@user_errors
def cluster_down(directory: StateDir = DEFAULT_CLUSTER_DIR) -> None:
    """Stop exactly the processes `cluster up` started (the MLflow store and storage stay)."""
    stopped = local.down(directory)
    out.print(f"cluster in {directory} stopped ({len(stopped)} processes)", highlight=False)


@cluster_app.command("status")
@user_errors
def cluster_status(
    directory: StateDir = DEFAULT_CLUSTER_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Nodes (as Ray sees them), their resources, and the cluster's URLs."""
    report = local.status(directory)
    if as_json:
        out.print_json(json.dumps(report))
        return
    print_cluster_status(report)
