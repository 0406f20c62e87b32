"""Where a sweep's Ray runs: a local Ray kept on loopback, or a cluster reached by address,
with its token. The command line opens one `ray_session` around a sweep.

A local Ray listens on loopback only: its node address is 127.0.0.1, the one address for which
Ray binds its gRPC servers, agents and metrics endpoints to loopback rather than to every
interface. Ray replaces 127.0.0.1 by the machine's external address unless multi-node clusters
are off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), which is what a single local node is. Its
token lives only in the environment of this process and of Ray's (readable by this user
alone), so Ray writes no world-readable token file. docs/security.md lists every socket.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import MemoryHandler
from pathlib import Path

from cluster.addresses import LOCAL_RAY_IP
from cluster.processes import ClusterError
from cluster.state import DEFAULT_DIR, find_local

TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # read by Ray at import; "0": single-node only
DRIVER_LOG = "kdsweep_driver.log"  # Ray's and Tune's messages to this process, in the Ray session's logs folder
# A local Ray's daemons share the sweep's CPUs: no metrics nobody reads (a local Ray has no
# dashboard), no usage reports, the log monitor looks for new log files every 0.5 s, not 0.1 s,
# and no idle workers prestarted, one per CPU: Tune gives its trial actors a runtime env of their
# own, so they never take one, and each idle worker costs about 1% of a CPU.
LOCAL_RAY_ENV = {"RAY_enable_metrics_collection": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "RAY_prestart_worker_first_driver": "0"}


class DriverLog(logging.FileHandler):
    """Where the `ray` logger (Ray, Tune) of this process writes instead of the console."""


def ray_log_path() -> Path | None:
    """The file Ray's and Tune's log messages of this process go to, once `init_ray` has run."""
    found = [h for h in logging.getLogger("ray").handlers if isinstance(h, DriverLog)]
    return Path(found[0].baseFilename) if found else None


@contextmanager
def _ray_logs_to_file() -> Iterator[None]:
    """Around `ray.init`: the `ray` logger's messages (Ray's, Tune's) go to DRIVER_LOG, not the
    console. Held in memory until Ray has started (its session folder is not known before); if it
    does not start, they go to the console after all (they may say why)."""
    import ray

    logger = logging.getLogger("ray")
    console = [h for h in logger.handlers if not isinstance(h, DriverLog)]
    earlier = [h for h in logger.handlers if isinstance(h, DriverLog)]
    held = MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    logger.handlers = [held]
    try:
        yield
    except BaseException:
        logger.handlers = console + earlier
        for record in held.buffer:
            logger.handle(record)
        raise
    node = ray._private.worker._global_node  # None for a Ray Client connection
    folder = Path(node.get_logs_dir_path()) if node is not None else Path(tempfile.gettempdir())
    try:
        log = DriverLog(folder / DRIVER_LOG, encoding="utf-8")
    except OSError:  # a session folder this user cannot write (another user's cluster)
        log = DriverLog(Path(tempfile.gettempdir()) / f"kdsweep_driver_{os.getpid()}.log", encoding="utf-8")
    log.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s:%(lineno)s -- %(message)s"))
    for record in held.buffer:
        log.handle(record)
    for handler in earlier:  # an earlier session's file
        handler.close()
    logger.handlers = [log]


def use_local_cluster_token(address: str | None, directory: Path = DEFAULT_DIR) -> None:
    """`address` of the loopback cluster recorded in `directory`: use its token (unless one is
    set). Must run before Ray is imported, which reads RAY_AUTH_MODE once."""
    if not address or address == "auto" or set(TOKEN_VARIABLES) & os.environ.keys():
        return
    found = find_local(address, directory)
    if found is not None:
        os.environ["RAY_AUTH_TOKEN_PATH"] = found.token_file
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _token_auth_if_given(address: str) -> None:
    """Ray turns token auth on by itself only for address "auto"; for an explicit address
    (a `kdsweep cluster up` or KubeRay cluster) it must be on whenever a token was given."""
    if address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return
    if set(TOKEN_VARIABLES) & os.environ.keys():
        # Ray's own switch: sets RAY_AUTH_MODE and refreshes the config it read at import.
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


def _start_local(num_cpus: int | None, runtime_env: dict) -> None:
    """`ray.init` of a single node on LOCAL_RAY_IP, every server on loopback, with a private token."""
    import ray
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    if not set(TOKEN_VARIABLES) & os.environ.keys():
        # In the environment only: Ray would otherwise write ~/.ray/auth_token readable by all.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    if "RAY_AUTH_MODE" not in os.environ:
        _enable_token_auth()  # what Ray does by default, but on purpose: without its console warning
    for name, value in LOCAL_RAY_ENV.items():  # Ray's processes inherit this process's environment
        os.environ.setdefault(name, value)
    # Ray's processes read the switch from their environment; this process read it at import.
    saved = os.environ.get(CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_SWITCH], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(_node_ip_address=LOCAL_RAY_IP, num_cpus=num_cpus, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(CLUSTER_SWITCH)
        else:
            os.environ[CLUSTER_SWITCH] = saved[0]
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOCAL_RAY_IP:  # Ray would listen on every interface: refuse rather than run so
        ray.shutdown()
        raise ClusterError(f"the local Ray took node address {node_ip}, not {LOCAL_RAY_IP}")


def init_ray(address: str | None, *, num_cpus: int | None = None, env_vars: dict[str, str] | None = None) -> bool:
    """Start a local Ray on LOCAL_RAY_IP (no dashboard, loopback only), or connect to `address`;
    True if this call started or connected (False: this process already had Ray).

    `env_vars` reach every worker process. Raises ClusterError when Ray cannot start or be reached.
    """
    use_local_cluster_token(address)
    import ray  # after the token variables are set
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(env_vars or {})}
    # Not in this process: its C++ stack dump on SIGTERM would reach the console (the driver stops
    # on signals in Python: sweeps.interrupts). Ray's own processes, which read their environment, keep it.
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        with _ray_logs_to_file():
            if address:
                _token_auth_if_given(address)
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
            else:
                _start_local(num_cpus, runtime_env)
    except (ConnectionError, ValueError) as error:
        raise ClusterError(f"cannot start or reach Ray at {address or LOCAL_DESCRIPTION}: {error}") from None
    return True


LOCAL_DESCRIPTION = f"a local Ray on {LOCAL_RAY_IP}"


@contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None,
                env_vars: dict[str, str] | None = None) -> Iterator[None]:
    """`init_ray` for the duration of the block; shuts Ray down after it if this call started it."""
    started = init_ray(address, num_cpus=num_cpus, env_vars=env_vars)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
