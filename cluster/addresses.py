"""Loopback addresses: where a local Ray and the loopback cluster listen. Defined here only.

A sweep's local Ray runs on 127.0.0.1: only for that address does Ray bind its servers to
loopback (for any other node address it listens on all interfaces). Nodes of the loopback
cluster need one address each (Ray tells nodes apart by address), so they use other 127.x
addresses: the head on 127.0.0.2, worker i on 127.0.0.(2+i).
"""

from __future__ import annotations

LOCAL_RAY_IP = "127.0.0.1"  # a sweep's local Ray (single node)
LOOPBACK_IP = "127.0.0.2"  # the loopback cluster's head
MLFLOW_HOST = "127.0.0.1"  # MLflow servers and UIs kdsweep starts (the loopback cluster's, `kdsweep ui`)


def node_ip(index: int) -> str:
    """The address of node `index` of the loopback cluster (0: the head)."""
    return f"127.0.0.{2 + index}"
