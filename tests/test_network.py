"""What listens where: every listening TCP socket of a local sweep's Ray and of `kdsweep cluster up`.

A local sweep's Ray (`cluster.session.ray_session`, as `kdsweep run` starts it) must listen on
loopback only; the loopback cluster on loopback too, except exactly the ports
`cluster.local.ALL_INTERFACES` names (docs/security.md, "Network"). Sockets are read from
/proc (the processes' socket inodes against /proc/net/tcp and tcp6): Linux only, like the cluster.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.local import ALL_INTERFACES
from cluster.state import MLFLOW_AUTH_FILE, Cluster, cluster_processes

ROOT = Path(__file__).resolve().parent.parent
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                          "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        text = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(host, 16)))
    else:  # four little-endian 32-bit words
        text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return text, int(port, 16)


def listening_sockets(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket the processes `pids` hold."""
    listen = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listen[int(fields[9])] = _address(fields[1])
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone, or an fd closed while we looked
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in listen:
                found.add((*listen[int(link[8:-1])], pid))
    return sorted(found)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


LOCAL_SESSION = """
import json, os, sys
sys.path.insert(0, {root!r})
from cluster.session import ray_session
from sweeps.runner import WORKER_ENV
from tests.test_network import listening_sockets

def descendants(pid):
    children = {{}}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{{entry}}/stat").read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found

with ray_session(None, num_cpus=1, env_vars=WORKER_ENV):
    import ray

    @ray.remote
    class Trial:  # a Tune trial is an actor: its worker process listens too
        def node(self):
            return ray.util.get_node_ip_address()

    node = ray.get(Trial.remote().node.remote())
    print(json.dumps({{"node": node, "sockets": listening_sockets(descendants(os.getpid()))}}))
"""


def test_a_local_sweeps_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    """GCS, raylet, object manager, driver, workers, agents and metrics: all on loopback; the
    token stays in the environment (no ~/.ray/auth_token written)."""
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([sys.executable, "-c", LOCAL_SESSION.format(root=str(ROOT))], cwd=tmp_path,
                          env={**CLEAN_ENV, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["node"] == "127.0.0.1"
    assert len(report["sockets"]) >= 6  # GCS, raylet (2), driver, worker, agents, metrics
    assert [s for s in report["sockets"] if not is_loopback(s[0])] == []
    assert not (home / ".ray" / "auth_token").exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`kdsweep cluster up --workers 1 --mlflow-auth`, as a user runs it; stopped afterwards."""
    work = tmp_path_factory.mktemp("network")
    directory = work / "kdsweep_cluster"
    command = [sys.executable, "-m", "sweeps.cli", "cluster"]
    try:
        done = subprocess.run([*command, "up", "--workers", "1", "--mlflow-auth", "--dashboard-port", "0",
                               "--dir", str(directory), "--timeout", "240"],
                              cwd=work, env=CLEAN_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        yield Cluster.load(directory)
    finally:
        subprocess.run([*command, "down", "--dir", str(directory)], cwd=work, env=CLEAN_ENV,
                       capture_output=True, timeout=120)


def test_the_loopback_cluster_listens_on_loopback_but_for_the_documented_ports(cluster: Cluster) -> None:
    allowed = {cluster.head_ports[name] for name in ALL_INTERFACES["head"]}
    for node in cluster.nodes:
        allowed |= {node.ports[name] for name in ALL_INTERFACES["node"]}
        allowed |= set(range(node.ports["min_worker"], node.ports["max_worker"] + 1))
    sockets = listening_sockets(cluster_processes(cluster))
    assert len(sockets) >= 15
    assert [s for s in sockets if not is_loopback(s[0]) and s[1] not in allowed] == []
    dashboard_port = int(cluster.dashboard_url.rsplit(":", 1)[1])
    assert all(is_loopback(host) for host, port, _ in sockets if port == dashboard_port)
    mlflow_port = int(cluster.tracking_uri.rsplit(":", 1)[1])
    assert {host for host, port, _ in sockets if port == mlflow_port} == {"127.0.0.1"}


def test_the_clusters_secrets_are_private(cluster: Cluster) -> None:
    for path in (Path(cluster.token_file), Path(cluster.directory) / MLFLOW_AUTH_FILE):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert Path(cluster.ray_temp).stat().st_mode & 0o777 == 0o700  # Ray's sessions: sockets, logs, job files


def test_the_clusters_mlflow_server_asks_for_credentials(cluster: Cluster) -> None:
    url = f"{cluster.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code == 401
    credentials = cluster.mlflow_credentials()
    done = subprocess.run([sys.executable, "-c", "import mlflow; print(len(mlflow.search_experiments()))"],
                          env={**CLEAN_ENV, **credentials, "MLFLOW_TRACKING_URI": cluster.tracking_uri},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]
