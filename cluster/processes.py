"""Processes and ports of the loopback cluster, found through /proc (Linux only)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, so outgoing connections do not take them


class ClusterError(RuntimeError):
    """A cluster the user named is absent, unreachable or could not start (one line for the CLI)."""


def process_stat(pid: int) -> tuple[int, int] | None:
    """(session id, start time) of a live process, None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[3]), int(fields[19])


def has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def session_members(leader: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = process_stat(int(entry.name))
            if stat is not None and stat[0] == leader:
                members.append(int(entry.name))
    return members


def send_signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(probe: Any, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := probe()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left



def port_free(port: int) -> bool:
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


def port_block(size: int, attempts: int = 200) -> int:
    """The first port of `size` consecutive free ports in PORT_RANGE."""
    for _ in range(attempts):
        base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - size)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise ClusterError(f"no block of {size} free ports between {PORT_RANGE[0]} and {PORT_RANGE[1]}")


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def http_json(url: str, token: str | None = None, timeout: float = 10) -> Any:
    request = urllib.request.Request(url, headers=auth_headers(token))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def wait_for(what: str, ready: Any, timeout: float, log: str, alive: Any) -> None:
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


def spawn(command: list[str], env: dict[str, str], log: Path) -> int:
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid
