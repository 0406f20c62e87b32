"""A loopback multi-node Ray cluster with an MLflow tracking server, for development and tests.

`up` starts a Ray head on 127.0.0.2 and N worker nodes on 127.0.0.3, 127.0.0.4, ... (one
`ray start --block` process per node), token authentication on, the dashboard on loopback,
and `mlflow server` on 127.0.0.1 (SQLite or any SQLAlchemy backend store, artifacts proxied
by the server; with `mlflow_auth`, MLflow's basic-auth app: every request needs a user and
password). What listens where: docs/security.md. Every process is started in a session of its
own and carries a cluster id in its environment, and the state file records ports, pids and
URLs, so `down` stops exactly what `up` started (`ray stop` would stop every Ray on the machine) and verifies it.

Linux only: processes are found through /proc.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cluster.addresses import LOOPBACK_IP, MLFLOW_HOST, node_ip
from cluster.processes import (
    ClusterError,
    port_block,
    port_free,
    process_stat,
    send_signal,
    session_members,
    spawn,
    wait_for,
    wait_gone,
)
from cluster.state import (
    CLUSTER_ID_ENV,
    DEFAULT_DIR,
    STATE_FILE,
    TOKEN_FILE,
    Cluster,
    Node,
    cluster_processes,
    list_nodes,
    mlflow_auth_config,
    private_file,
)

HEAD_IP = LOOPBACK_IP
DEFAULT_DASHBOARD_PORT = 8265
WORKER_PORTS = 40  # per node: one port per Ray worker process
NODE_PORTS = ("node_manager", "object_manager", "dashboard_agent_listen", "dashboard_agent_grpc",
              "metrics_export", "runtime_env_agent")
HEAD_PORTS = ("gcs", "dashboard", "client_server", "autoscaler_metrics", "dashboard_metrics", "mlflow")
OBJECT_STORE_BYTES = 128 * 2**20
#: The cluster's ports that Ray binds to every interface, not to the node's loopback address:
#: Ray (2.60) binds a server to loopback only when the node address is 127.0.0.1 itself, and the
#: nodes need an address each. Token auth guards the gRPC ones; the metrics ones answer anyone
#: who can reach them (docs/security.md, "Network"). Worker processes' ports (min_worker to
#: max_worker) are the same. Everything else listens on a loopback address.
ALL_INTERFACES = {"head": ("gcs", "autoscaler_metrics", "dashboard_metrics"),
                  "node": ("node_manager", "object_manager", "dashboard_agent_grpc", "metrics_export")}


def _alive_ips(cluster: Cluster) -> set[str]:
    return {n["node_ip"] for n in list_nodes(cluster) if n["state"] == "ALIVE"}


def _mlflow_ready(uri: str) -> bool:
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
        return response.status == 200


# --- up / down -------------------------------------------------------------------------------

def _node_command(node: Node, cluster: Cluster, num_cpus: int, head_ports: dict[str, int]) -> list[str]:
    p = node.ports
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
        "--node-ip-address", node.ip, "--num-cpus", str(num_cpus),
        "--object-store-memory", str(OBJECT_STORE_BYTES),
        # Nodes on one machine still need their own session files: each node's runtime-env
        # agent re-extracts a job's working_dir, which would pull it from under the others.
        "--temp-dir", str(Path(cluster.ray_temp) / node.ip.rsplit(".", 1)[1]),
        "--node-manager-port", str(p["node_manager"]), "--object-manager-port", str(p["object_manager"]),
        "--dashboard-agent-listen-port", str(p["dashboard_agent_listen"]),
        "--dashboard-agent-grpc-port", str(p["dashboard_agent_grpc"]),
        "--metrics-export-port", str(p["metrics_export"]),
        "--runtime-env-agent-port", str(p["runtime_env_agent"]),
        "--min-worker-port", str(p["min_worker"]), "--max-worker-port", str(p["max_worker"]),
    ]
    if node.role == "head":
        command += ["--head", "--port", str(head_ports["gcs"]), "--include-dashboard", "true",
                    "--dashboard-host", HEAD_IP, "--dashboard-port", str(head_ports["dashboard"]),
                    "--ray-client-server-port", str(head_ports["client_server"])]
    else:
        command += ["--address", cluster.gcs_address]
    return command


def up(
    directory: Path = DEFAULT_DIR,
    workers: int = 2,
    *,
    num_cpus: int = 1,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    backend_store_uri: str | None = None,
    mlflow_auth: bool = False,
    timeout: float = 180,
) -> Cluster:
    """Start the head, `workers` worker nodes and the MLflow server; wait until all are ready.
    `mlflow_auth`: the server runs MLflow's basic-auth app (`Cluster.mlflow_credentials`)."""
    if not 0 <= workers <= 250:
        raise ClusterError(f"--workers {workers}: use 0 to 250 (one loopback address each)")
    directory = directory.resolve()
    if (directory / STATE_FILE).exists():
        existing = Cluster.load(directory)
        if cluster_processes(existing):
            raise ClusterError(f"a cluster is already running from {directory} "
                               f"(dashboard {existing.dashboard_url}); `kdsweep cluster down` first")
        _forget(existing)
    if dashboard_port and not port_free(dashboard_port):
        raise ClusterError(f"dashboard port {dashboard_port} is taken; choose another with --dashboard-port")
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    (directory / ".gitignore").write_text("*\n")  # state, token, stores: never committed
    storage = directory / "storage"
    storage.mkdir(exist_ok=True)
    token_file = directory / TOKEN_FILE
    private_file(token_file, secrets.token_hex(32))  # the token admits anyone to the cluster

    per_node = len(NODE_PORTS) + WORKER_PORTS
    base = port_block(len(HEAD_PORTS) + (workers + 1) * per_node)
    head_ports = dict(zip(HEAD_PORTS, range(base, base + len(HEAD_PORTS)), strict=True))
    if dashboard_port:  # 0: any free port
        head_ports["dashboard"] = dashboard_port
    cluster = Cluster(
        directory=str(directory), cluster_id=secrets.token_hex(8),
        gcs_address=f"{HEAD_IP}:{head_ports['gcs']}",
        dashboard_url=f"http://{HEAD_IP}:{head_ports['dashboard']}",
        tracking_uri=f"http://{MLFLOW_HOST}:{head_ports['mlflow']}",
        storage=str(storage), token_file=str(token_file),
        ray_temp=tempfile.mkdtemp(prefix="kdsray-", dir="/tmp"),  # 0700: other users cannot enter
        mlflow_auth=mlflow_auth, head_ports=head_ports,
    )
    server_env = {}
    if mlflow_auth:
        # The auth app's forms need a CSRF secret; one per server start is enough for one server.
        server_env = {"MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(directory)),
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                        "MLFLOW_TRACKING_PASSWORD")}
    env.update({
        CLUSTER_ID_ENV: cluster.cluster_id,
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
        # A job's entrypoint runs `python`: the interpreter that has kdsweep installed.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Fixed by default in Ray (44217, 44227): clash with any other Ray on the machine.
        "AUTOSCALER_METRIC_PORT": str(head_ports["autoscaler_metrics"]),
        "DASHBOARD_METRIC_PORT": str(head_ports["dashboard_metrics"]),
        **cluster.mlflow_credentials(),  # job drivers and trials inherit them from their node
    })
    cluster.save()  # from here on `down` can clean up whatever was started
    try:
        store = backend_store_uri or f"sqlite:///{directory / 'mlflow.db'}"
        mlflow_log = directory / "logs" / "mlflow.log"
        cluster.mlflow_pid = spawn(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
             "--artifacts-destination", str(directory / "mlartifacts"),
             "--host", MLFLOW_HOST, "--port", str(head_ports["mlflow"]), "--workers", "1",
             *(["--app-name", "basic-auth"] if mlflow_auth else [])],
            # Its background job runners (7 processes, for GenAI features) are not needed here.
            {**env, **server_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, mlflow_log)
        cluster.save()
        offset = base + len(HEAD_PORTS)
        for index in range(workers + 1):
            first = offset + index * per_node
            ports = dict(zip(NODE_PORTS, range(first, first + len(NODE_PORTS)), strict=True))
            ports.update(min_worker=first + len(NODE_PORTS), max_worker=first + per_node - 1)
            ip = node_ip(index)
            log = directory / "logs" / f"node-{ip}.log"
            node = Node("head" if index == 0 else "worker", ip, 0, ports, str(log))
            node.pid = spawn(_node_command(node, cluster, num_cpus, head_ports), env, log)
            cluster.nodes.append(node)
            cluster.save()
            if index == 0:  # workers join a head that answers
                wait_for("the Ray head", lambda: HEAD_IP in _alive_ips(cluster), timeout, node.log,
                          lambda: process_stat(cluster.nodes[0].pid) is not None)
        expected = {n.ip for n in cluster.nodes}
        wait_for(f"{workers} Ray worker nodes", lambda: expected <= _alive_ips(cluster), timeout,
                  str(directory / "logs"), lambda: all(process_stat(n.pid) is not None for n in cluster.nodes))
        wait_for("the MLflow server", lambda: _mlflow_ready(cluster.tracking_uri), timeout, str(mlflow_log),
                  lambda: process_stat(cluster.mlflow_pid) is not None)
    except BaseException:
        down(directory, quiet=True)
        raise
    with contextlib.suppress(OSError):  # Ray's own logs, while the cluster is up
        (directory / "ray-logs").unlink(missing_ok=True)
        (directory / "ray-logs").symlink_to(cluster.ray_temp)
    return cluster


def _forget(cluster: Cluster) -> None:
    """Remove what a stopped cluster leaves: its state file, Ray's session files, the log link."""
    directory = Path(cluster.directory)
    (directory / STATE_FILE).unlink(missing_ok=True)
    (directory / "ray-logs").unlink(missing_ok=True)
    if Path(cluster.ray_temp).name.startswith("kdsray-"):
        shutil.rmtree(cluster.ray_temp, ignore_errors=True)


def down(directory: Path = DEFAULT_DIR, *, timeout: float = 60, quiet: bool = False) -> list[int]:
    """Stop every process of the cluster started from `directory`; the pids that were running.

    Job drivers first (SIGTERM: a sweep closes its MLflow runs as KILLED), then the nodes,
    workers before the head (`ray start --block` shuts its node down on SIGTERM), then the
    MLflow server; whatever is left after `timeout` gets SIGKILL. The MLflow store, storage
    and logs stay in `directory`.
    """
    try:
        cluster = Cluster.load(directory.resolve())
    except ClusterError:
        if quiet:
            return []
        raise
    running = cluster_processes(cluster)
    node_sessions = {n.pid for n in cluster.nodes} | {cluster.mlflow_pid}
    strays = [pid for pid in running if (process_stat(pid) or (0, 0))[0] not in node_sessions]
    send_signal(strays, signal.SIGTERM)
    wait_gone(lambda: [p for p in strays if process_stat(p) is not None], min(timeout, 20))
    workers = [n.pid for n in reversed(cluster.nodes) if n.role == "worker"]
    head = [n.pid for n in cluster.nodes if n.role == "head"]
    deadline = time.monotonic() + timeout
    for group in (workers, head, [cluster.mlflow_pid]):
        send_signal([pid for pid in group if pid in running], signal.SIGTERM)
        wait_gone(lambda group=group: [p for leader in group for p in session_members(leader)],
                   max(0.0, deadline - time.monotonic()))
    left = cluster_processes(cluster)
    if left:
        send_signal(left, signal.SIGKILL)
        left = wait_gone(lambda: cluster_processes(cluster), 15)
    if left:
        raise ClusterError(f"processes {left} of the cluster in {directory} did not stop")
    _forget(cluster)
    return running


def kill_node(directory: Path, ip: str) -> list[int]:
    """SIGKILL every process of one worker node at once, as if its machine died."""
    cluster = Cluster.load(directory.resolve())
    node = next((n for n in cluster.nodes if n.ip == ip), None)
    if node is None or node.role != "worker":
        raise ClusterError(f"no worker node {ip} in {directory}")
    members = session_members(node.pid)
    send_signal(members, signal.SIGKILL)
    if wait_gone(lambda: session_members(node.pid), 15):
        raise ClusterError(f"node {ip} did not die")
    return members


def status(directory: Path = DEFAULT_DIR) -> dict[str, Any]:
    """The cluster's URLs, its nodes as Ray sees them (or why it cannot) and the MLflow server."""
    cluster = Cluster.load(directory.resolve())
    running = set(cluster_processes(cluster))
    report: dict[str, Any] = {
        "directory": cluster.directory, "dashboard": cluster.dashboard_url, "gcs": cluster.gcs_address,
        "tracking_uri": cluster.tracking_uri, "storage": cluster.storage, "token_file": cluster.token_file,
        "mlflow_running": cluster.mlflow_pid in running, "processes": len(running),
    }
    nodes = []
    try:
        seen = {n["node_ip"]: n for n in list_nodes(cluster, timeout=5)}
        report["ray_error"] = None
    except (OSError, ValueError, KeyError) as error:
        seen, report["ray_error"] = {}, f"dashboard unreachable: {error}"
    for node in cluster.nodes:
        ray_node = seen.get(node.ip, {})
        nodes.append({"role": node.role, "ip": node.ip, "pid": node.pid,
                      "process": "running" if node.pid in running else "gone",
                      "state": ray_node.get("state", "-"),
                      "resources": ray_node.get("resources_total", {})})
    report["nodes"] = nodes
    return report


