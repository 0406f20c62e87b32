"""Where a sweep's Ray runs: a local Ray kept on loopback, or a cluster reached by address,
with its token. The command line opens one `ray_session` around a sweep.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.addresses import LOOPBACK_IP
from cluster.processes import ClusterError
from cluster.state import DEFAULT_DIR, find_local

TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


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


def init_ray(address: str | None, *, num_cpus: int | None = None, env_vars: dict[str, str] | None = None) -> bool:
    """Start a local Ray on LOOPBACK_IP (no dashboard), or connect to `address`; True if this
    call started or connected (False: this process already had Ray).

    `env_vars` reach every worker process. Raises ClusterError when Ray cannot start or be reached.
    """
    use_local_cluster_token(address)
    import ray  # after the token variables are set

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(env_vars or {})}
    try:
        if address:
            _token_auth_if_given(address)
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(_node_ip_address=LOOPBACK_IP, num_cpus=num_cpus, include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=False)
    except (ConnectionError, ValueError) as error:
        raise ClusterError(f"cannot start or reach Ray at {address or LOCAL_DESCRIPTION}: {error}") from None
    return True


LOCAL_DESCRIPTION = f"a local Ray on {LOOPBACK_IP}"


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
