"""The loopback cluster's recorded state: nodes, ports, URLs, token and MLflow credentials
(`cluster.json` in its directory), and what can be read from it: its live processes, its nodes
as Ray sees them."""

from __future__ import annotations

import configparser
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.processes import ClusterError, has_marker, http_json, process_stat

DEFAULT_DIR = Path("kdsweep_cluster")
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
MLFLOW_AUTH_FILE = "mlflow_auth.ini"  # `up --mlflow-auth`: the server's auth config, admin credentials (0600)
CLUSTER_ID_ENV = "KDSWEEP_CLUSTER_ID"  # marks every process of one cluster, descendants included


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
    mlflow_auth: bool = False  # basic auth on the tracking server: credentials in MLFLOW_AUTH_FILE
    head_ports: dict[str, int] = field(default_factory=dict)  # the head's own ports (local.HEAD_PORTS)
    nodes: list[Node] = field(default_factory=list)

    def mlflow_credentials(self) -> dict[str, str]:
        """MLFLOW_TRACKING_USERNAME/PASSWORD for the tracking server ({} without basic auth)."""
        if not self.mlflow_auth:
            return {}
        config = configparser.ConfigParser(interpolation=None)
        config.read(Path(self.directory) / MLFLOW_AUTH_FILE)
        return {"MLFLOW_TRACKING_USERNAME": config["mlflow"]["admin_username"],
                "MLFLOW_TRACKING_PASSWORD": config["mlflow"]["admin_password"]}

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


def private_file(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only (created 0600: never readable by others)."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)


def mlflow_auth_config(directory: Path) -> Path:
    """MLflow's basic-auth config for the server: its user store beside the tracking store and
    the admin's credentials, from MLFLOW_TRACKING_USERNAME/PASSWORD when set, else `admin` and
    a random password. Kept after `down` so that the next `up` finds the same users."""
    path = directory / MLFLOW_AUTH_FILE
    if path.exists():
        return path
    username = os.environ.get("MLFLOW_TRACKING_USERNAME", "admin")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or secrets.token_urlsafe(24)
    private_file(path, "\n".join([
        "[mlflow]", "default_permission = READ", f"database_uri = sqlite:///{directory / 'mlflow_auth.db'}",
        f"admin_username = {username}", f"admin_password = {password}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", ""]))
    return path


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
        stat = process_stat(pid)
        if stat is not None and (stat[0] in sessions or has_marker(pid, marker)):
            found.append(pid)
    return found


def list_nodes(cluster: Cluster, timeout: float = 10) -> list[dict[str, Any]]:
    """Ray's view of the nodes (state API through the dashboard): ip, state, resources."""
    reply = http_json(f"{cluster.dashboard_url}/api/v0/nodes?detail=1&limit=1000", cluster.token, timeout)
    return reply["data"]["result"]["result"]


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
