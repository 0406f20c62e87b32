"""A loopback multi-node Ray cluster with an MLflow tracking server, for development and tests.

`up` starts a Ray head on 127.0.0.2 and N worker nodes on 127.0.0.3, 127.0.0.4, ... (one
`ray start --block` process per node), token authentication on, the dashboard on loopback,
and `mlflow server` on 127.0.0.1 (SQLite or any SQLAlchemy backend store, artifacts proxied
by the server). Every process is started in a session of its own and carries a cluster id in
its environment, and the state file records ports, pids and URLs, so `down` stops exactly
what `up` started (`ray stop` would stop every Ray on the machine) and verifies it.

Linux only: processes are found through /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path("kdsweep_cluster")
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
HEAD_IP = "127.0.0.2"
MLFLOW_HOST = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265
CLUSTER_ID_ENV = "KDSWEEP_CLUSTER_ID"  # marks every process of one cluster, descendants included
WORKER_PORTS = 40  # per node: one port per Ray worker process
NODE_PORTS = ("node_manager", "object_manager", "dashboard_agent_listen", "dashboard_agent_grpc",
              "metrics_export", "runtime_env_agent")
HEAD_PORTS = ("gcs", "dashboard", "client_server", "autoscaler_metrics", "dashboard_metrics", "mlflow")
PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, so outgoing connections do not take them
OBJECT_STORE_BYTES = 128 * 2**20


class ClusterError(RuntimeError):
    """A cluster the user named is absent, unreachable or could not start (one line for the CLI)."""


@dataclass
class Node:
    role: str  # "head" or "worker"
    ip: str
    pid: int  # the `ray start --block` process, leader of the node's session
    ports: dict[str, int]
    log: str


@dataclass
class Cluster:
    directory: str
    cluster_id: str
    gcs_address: str  # what `ray start --address` and `ray.init(address=...)` take
    dashboard_url: str  # the Jobs API: `kdsweep submit --address`
    tracking_uri: str  # the MLflow server every trial logs to
    storage: str  # one path every node reaches
    token_file: str
    ray_temp: str  # Ray's session files, one sub-directory per node (short: socket paths)
    mlflow_pid: int = 0
    nodes: list[Node] = field(default_factory=list)

    @property
    def token(self) -> str:
        return Path(self.token_file).read_text().strip()

    def save(self) -> None:
        path = Path(self.directory) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, directory: Path) -> Cluster:
        path = directory / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no cluster started in {directory} (start one with `kdsweep cluster up`)")
        data = json.loads(path.read_text())
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return cls(**data)


# --- processes -------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(session id, start time) of a live process, None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[3]), int(fields[19])


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def cluster_processes(cluster: Cluster) -> list[int]:
    """Live processes of this cluster: in a session `up` created, or carrying its id in their
    environment (Ray puts job drivers in sessions of their own)."""
    sessions = {n.pid for n in cluster.nodes} | ({cluster.mlflow_pid} if cluster.mlflow_pid else set())
    marker = f"{CLUSTER_ID_ENV}={cluster.cluster_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is not None and (stat[0] in sessions or _has_marker(pid, marker)):
            found.append(pid)
    return found


def _session_members(leader: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] == leader:
                members.append(int(entry.name))
    return members


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(probe: Any, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := probe()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# --- ports and readiness ---------------------------------------------------------------------

def _port_free(port: int) -> bool:
    """No socket listens on `port`. Ray's gRPC servers listen on every interface, so the
    wildcard address is probed (bind only); SO_REUSEADDR ignores closed connections in
    TIME_WAIT, as the servers themselves do."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _port_block(size: int, attempts: int = 200) -> int:
    """The first port of `size` consecutive free ports in PORT_RANGE."""
    for _ in range(attempts):
        base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - size)
        if all(_port_free(p) for p in range(base, base + size)):
            return base
    raise ClusterError(f"no block of {size} free ports between {PORT_RANGE[0]} and {PORT_RANGE[1]}")


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def http_json(url: str, token: str | None = None, timeout: float = 10) -> Any:
    request = urllib.request.Request(url, headers=auth_headers(token))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _wait_for(what: str, ready: Any, timeout: float, log: str, alive: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (OSError, ValueError, KeyError):
            pass
        if not alive():
            raise ClusterError(f"{what} exited while starting; see {log}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready after {timeout:.0f}s; see {log}")
        time.sleep(1)


def list_nodes(cluster: Cluster, timeout: float = 10) -> list[dict[str, Any]]:
    """Ray's view of the nodes (state API through the dashboard): ip, state, resources."""
    reply = http_json(f"{cluster.dashboard_url}/api/v0/nodes?detail=1&limit=1000", cluster.token, timeout)
    return reply["data"]["result"]["result"]


def _alive_ips(cluster: Cluster) -> set[str]:
    return {n["node_ip"] for n in list_nodes(cluster) if n["state"] == "ALIVE"}


def _mlflow_ready(uri: str) -> bool:
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
        return response.status == 200


# --- up / down -------------------------------------------------------------------------------

def _spawn(command: list[str], env: dict[str, str], log: Path) -> int:
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


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
    timeout: float = 180,
) -> Cluster:
    """Start the head, `workers` worker nodes and the MLflow server; wait until all are ready."""
    if not 0 <= workers <= 250:
        raise ClusterError(f"--workers {workers}: use 0 to 250 (one loopback address each)")
    directory = directory.resolve()
    if (directory / STATE_FILE).exists():
        existing = Cluster.load(directory)
        if cluster_processes(existing):
            raise ClusterError(f"a cluster is already running from {directory} "
                               f"(dashboard {existing.dashboard_url}); `kdsweep cluster down` first")
        _forget(existing)
    if dashboard_port and not _port_free(dashboard_port):
        raise ClusterError(f"dashboard port {dashboard_port} is taken; choose another with --dashboard-port")
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    (directory / ".gitignore").write_text("*\n")  # state, token, stores: never committed
    storage = directory / "storage"
    storage.mkdir(exist_ok=True)
    token_file = directory / TOKEN_FILE
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)  # the token admits anyone to the cluster
    token_file.write_text(secrets.token_hex(32))

    per_node = len(NODE_PORTS) + WORKER_PORTS
    base = _port_block(len(HEAD_PORTS) + (workers + 1) * per_node)
    head_ports = dict(zip(HEAD_PORTS, range(base, base + len(HEAD_PORTS)), strict=True))
    if dashboard_port:  # 0: any free port
        head_ports["dashboard"] = dashboard_port
    cluster = Cluster(
        directory=str(directory), cluster_id=secrets.token_hex(8),
        gcs_address=f"{HEAD_IP}:{head_ports['gcs']}",
        dashboard_url=f"http://{HEAD_IP}:{head_ports['dashboard']}",
        tracking_uri=f"http://{MLFLOW_HOST}:{head_ports['mlflow']}",
        storage=str(storage), token_file=str(token_file),
        ray_temp=tempfile.mkdtemp(prefix="kdsray-", dir="/tmp"),
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    env.update({
        CLUSTER_ID_ENV: cluster.cluster_id,
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
        # A job's entrypoint runs `python`: the interpreter that has kdsweep installed.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Fixed by default in Ray (44217, 44227): clash with any other Ray on the machine.
        "AUTOSCALER_METRIC_PORT": str(head_ports["autoscaler_metrics"]),
        "DASHBOARD_METRIC_PORT": str(head_ports["dashboard_metrics"]),
    })
    cluster.save()  # from here on `down` can clean up whatever was started
    try:
        store = backend_store_uri or f"sqlite:///{directory / 'mlflow.db'}"
        mlflow_log = directory / "logs" / "mlflow.log"
        cluster.mlflow_pid = _spawn(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
             "--artifacts-destination", str(directory / "mlartifacts"),
             "--host", MLFLOW_HOST, "--port", str(head_ports["mlflow"]), "--workers", "1"],
            # Its background job runners (7 processes, for GenAI features) are not needed here.
            {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, mlflow_log)
        cluster.save()
        offset = base + len(HEAD_PORTS)
        for index in range(workers + 1):
            first = offset + index * per_node
            ports = dict(zip(NODE_PORTS, range(first, first + len(NODE_PORTS)), strict=True))
            ports.update(min_worker=first + len(NODE_PORTS), max_worker=first + per_node - 1)
            ip = f"127.0.0.{2 + index}"
            log = directory / "logs" / f"node-{ip}.log"
            node = Node("head" if index == 0 else "worker", ip, 0, ports, str(log))
            node.pid = _spawn(_node_command(node, cluster, num_cpus, head_ports), env, log)
            cluster.nodes.append(node)
            cluster.save()
            if index == 0:  # workers join a head that answers
                _wait_for("the Ray head", lambda: HEAD_IP in _alive_ips(cluster), timeout, node.log,
                          lambda: _stat(cluster.nodes[0].pid) is not None)
        expected = {n.ip for n in cluster.nodes}
        _wait_for(f"{workers} Ray worker nodes", lambda: expected <= _alive_ips(cluster), timeout,
                  str(directory / "logs"), lambda: all(_stat(n.pid) is not None for n in cluster.nodes))
        _wait_for("the MLflow server", lambda: _mlflow_ready(cluster.tracking_uri), timeout, str(mlflow_log),
                  lambda: _stat(cluster.mlflow_pid) is not None)
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
    strays = [pid for pid in running if (_stat(pid) or (0, 0))[0] not in node_sessions]
    _signal(strays, signal.SIGTERM)
    _wait_gone(lambda: [p for p in strays if _stat(p) is not None], min(timeout, 20))
    workers = [n.pid for n in reversed(cluster.nodes) if n.role == "worker"]
    head = [n.pid for n in cluster.nodes if n.role == "head"]
    deadline = time.monotonic() + timeout
    for group in (workers, head, [cluster.mlflow_pid]):
        _signal([pid for pid in group if pid in running], signal.SIGTERM)
        _wait_gone(lambda group=group: [p for leader in group for p in _session_members(leader)],
                   max(0.0, deadline - time.monotonic()))
    left = cluster_processes(cluster)
    if left:
        _signal(left, signal.SIGKILL)
        left = _wait_gone(lambda: cluster_processes(cluster), 15)
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
    members = _session_members(node.pid)
    _signal(members, signal.SIGKILL)
    if _wait_gone(lambda: _session_members(node.pid), 15):
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


def find_local(address: str | None, directory: Path = DEFAULT_DIR) -> Cluster | None:
    """The loopback cluster in `directory` if one is recorded there and `address` (if given)
    is its dashboard; else None."""
    try:
        cluster = Cluster.load(directory.resolve())
    except ClusterError:
        return None
    if address is not None and address.rstrip("/") not in (cluster.dashboard_url, cluster.gcs_address):
        return None
    return cluster

