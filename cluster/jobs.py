"""Sweeps as Ray jobs: submit `kdsweep run` to a cluster's Jobs API, follow it, read its status.

The job carries the project directory (minus environments, stores and caches) and the spec as
its working_dir, and the MLflow tracking URI in its runtime environment, so the driver and
every trial on every node log to the same server. Storage must be one path that every node
mounts (a shared filesystem: NFS, a ReadWriteMany PVC, EFS/Filestore).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.addresses import LOOPBACK_IP
from cluster.processes import ClusterError, auth_headers
from cluster.state import STATE_FILE, Cluster

JOB_SPEC = "kdsweep_job_spec.yaml"  # the spec's name inside the job's working_dir
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never shipped with a job: environments, local stores and caches (paths relative to the project).
EXCLUDES = (".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
            "kdsweep_storage", "kdsweep_cluster", "mlartifacts", "mlruns", "mlflow.db", "*.db-journal",
            "benchmarks/results")


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    metadata: dict[str, str]


class JobNotFoundError(LookupError):
    """No job with that id on the cluster."""


def token_for(cluster: Cluster | None) -> str | None:
    """The cluster token a client sends: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, the
    local cluster's, else Ray's default file ~/.ray/auth_token; None for a cluster without auth."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as error:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: {error.strerror}") from None
    if cluster is not None:
        return cluster.token
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else None


def check_address(address: str) -> str:
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address!r}: use the Ray dashboard URL, e.g. http://{LOOPBACK_IP}:8265")
    return address.rstrip("/")


def check_tracking_uri(uri: str) -> str:
    """A job's trials run on many machines: only a tracking server or a database they all
    reach will do, never a local SQLite file or file store."""
    if not uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql", "databricks")):
        raise ClusterError(f"tracking URI {uri!r}: a cluster job needs an MLflow tracking server every node "
                           "reaches (http://HOST:PORT) or a database URI, not a local store")
    return uri


def check_storage(storage: str) -> str:
    if "://" in storage:
        raise ClusterError(f"--storage {storage!r}: use a shared filesystem path mounted at the same place "
                           "on every node (the stage store locks files, which object stores cannot)")
    path = Path(storage).expanduser()
    return str(path if path.is_absolute() else Path.cwd() / path)


def connect(address: str, token: str | None) -> Any:
    """A JobSubmissionClient for the dashboard at `address`, or a one-line ClusterError."""
    from ray.job_submission import JobSubmissionClient  # Ray only when talking to a cluster

    try:
        return JobSubmissionClient(check_address(address), headers=auth_headers(token))
    except (ConnectionError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {first}") from None


def _ignore(project: Path) -> Callable[[str, list[str]], set[str]]:
    def ignore(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(project)
        return {name for name in names
                if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(str(relative / name), p) for p in EXCLUDES)
                or (Path(directory, name, STATE_FILE)).is_file()}  # a loopback cluster's dir: its token

    return ignore


def entrypoint(name: str, storage: str, num_trials: int | None, max_concurrent: int | None) -> str:
    """`kdsweep run` on the cluster: `--address auto` joins the job's cluster; the tracking
    URI comes from the job's environment."""
    args = ["python", "-m", "sweeps.cli", "run", JOB_SPEC, "--name", name, "--address", "auto",
            "--storage", storage]
    if num_trials is not None:
        args += ["--num-trials", str(num_trials)]
    if max_concurrent is not None:
        args += ["--max-concurrent", str(max_concurrent)]
    return shlex.join(args)


def submit(
    client: Any,
    spec_path: Path,
    *,
    name: str,
    storage: str,
    tracking_uri: str,
    project: Path,
    metadata: dict[str, str],
    num_trials: int | None = None,
    max_concurrent: int | None = None,
) -> str:
    """Submit the sweep as a job whose submission id is the sweep name; returns it. `metadata`
    labels the job (the sweep and spec names)."""
    project = project.resolve()
    with tempfile.TemporaryDirectory(prefix="kdsweep-job-") as tmp:
        work = Path(tmp) / "project"
        shutil.copytree(project, work, ignore=_ignore(project), symlinks=True)
        shutil.copyfile(spec_path, work / JOB_SPEC)
        try:
            return client.submit_job(
                entrypoint=entrypoint(name, storage, num_trials, max_concurrent),
                submission_id=name,
                runtime_env={"working_dir": str(work), "env_vars": {
                    "MLFLOW_TRACKING_URI": tracking_uri,
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # job logs are not a terminal
                }},
                metadata=metadata,
            )
        except RuntimeError as error:  # e.g. a job with this id exists, or the upload failed
            raise ClusterError(f"the cluster refused job {name!r}: {str(error).strip().splitlines()[-1]}") from None


def status(client: Any, job_id: str) -> JobStatus:
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            raise JobNotFoundError(f"no job {job_id!r} on {client.get_address()}") from None
        raise ClusterError(f"cannot read job {job_id!r}: {str(error).strip().splitlines()[0]}") from None

    def seconds(ms: int | None) -> float | None:
        return ms / 1000 if ms else None

    return JobStatus(job_id, str(info.status.value if hasattr(info.status, "value") else info.status),
                     info.entrypoint, info.message or "", seconds(info.start_time), seconds(info.end_time),
                     dict(info.metadata or {}))


def follow(client: Any, job_id: str, write: Callable[[str], None], poll_s: float = 2.0) -> JobStatus:
    """Stream the job's logs until it ends; then its final status."""
    status(client, job_id)  # a clear error for an unknown id before streaming

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError):  # the log stream dropped: fall back to polling the status
        pass
    while (current := status(client, job_id)).status not in TERMINAL:
        time.sleep(poll_s)
    return current

