"""Loopback addresses: where a local Ray and the loopback cluster listen. Defined here only.

Ray rewrites 127.0.0.1 to the machine's external address, so Ray nodes use other 127.x
addresses: a sweep's local Ray and the cluster's head on 127.0.0.2, worker i on 127.0.0.(2+i).
"""

from __future__ import annotations

LOOPBACK_IP = "127.0.0.2"  # a local Ray's node, and the loopback cluster's head
MLFLOW_HOST = "127.0.0.1"  # MLflow servers and UIs kdsweep starts (the loopback cluster's, `kdsweep ui`)


def node_ip(index: int) -> str:
    """The address of node `index` of the loopback cluster (0: the head)."""
    return f"127.0.0.{2 + index}"
