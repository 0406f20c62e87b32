"""Ctrl-C (SIGINT) and SIGTERM on the sweep driver: the sweep stops where it is, ends KILLED with
the signal as its reason, and `kdsweep resume` continues it.

Ray 2.60's Tuner.fit catches SIGINT itself and returns normally (its results then look like a
finished sweep), and `ray.init` turns SIGTERM into `sys.exit(15)` wherever the driver is. Here
both signals are caught instead: while Tune runs, the first one asks Tune for its own orderly
stop (SIGUSR1: a last experiment snapshot, trials stopped) and `fit` is followed by
`Interrupted`; at any other moment, or on a second signal, `Interrupted` is raised at once.

`kdsweep cancel` (another process, maybe on another host) takes the same path: it writes a
cancel request into the experiment directory; the driver looks for it every second of Tune's
loop (`sweeps.callbacks.CancelWatch`) and once more when `fit` returns, and stops as on a first
SIGTERM. Once the trials have ended (baseline, confirmation, export) a request is too late: the
sweep finishes, so an export is never cut in half. A request file rather than a signal: it needs
no process id (which a dead driver's successor may reuse), it reaches a driver on any node that
shares the storage, and it stays on record. `driver.json` (host, pid, start time) lets `cancel`
tell a live driver from one that died.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

INTERRUPT_FILE = "interrupted"  # in the experiment directory while its driver stops on a signal
CANCEL_FILE = "cancel-requested"  # written by `kdsweep cancel`: the reason, for the runs it stops
DRIVER_FILE = "driver.json"  # who drives the sweep now: host, pid, process start time
CANCELLED = "cancelled with `kdsweep cancel`"  # how the driver's last line names the stop
CANCEL_POLL_S = 1.0  # how often the driver looks for a cancel request
SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class Interrupted(BaseException):
    """The driver got SIGINT or SIGTERM (a BaseException, like KeyboardInterrupt: Tune lets it through)."""

    def __init__(self, signum: int, reason: str | None = None) -> None:
        self.signum = signum
        super().__init__(reason or f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def signal_cause(error: BaseException) -> BaseException:
    """The `Interrupted` behind `error` when a signal arrived inside native code (Ray's `ray.get`
    then raises SystemError "returned a result with an exception set", the Interrupted as its
    cause); else `error` itself."""
    seen: BaseException | None = error
    while isinstance(seen, SystemError):
        seen = seen.__cause__ or seen.__context__
    return seen if isinstance(seen, Interrupted) else error


def interruption(experiment_dir: Path) -> str | None:
    """Why the sweep's driver is stopping its trials, if it is stopping on a signal (trials read
    this to name the cause of their stop)."""
    try:
        return (experiment_dir / INTERRUPT_FILE).read_text() or None
    except OSError:
        return None


def clear_interruption(experiment_dir: Path) -> None:
    """A resumed driver is no longer stopping, nor asked to."""
    (experiment_dir / INTERRUPT_FILE).unlink(missing_ok=True)
    (experiment_dir / CANCEL_FILE).unlink(missing_ok=True)


def request_cancel(experiment_dir: Path) -> None:
    """Ask the sweep's driver to stop as on SIGTERM (`CancelWatch`); the file says who asked."""
    who = f"{socket.gethostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
    (experiment_dir / CANCEL_FILE).write_text(f"the sweep was cancelled (kdsweep cancel from {who})")


def cancel_requested(experiment_dir: Path) -> str | None:
    """The reason of a pending cancel request, if there is one."""
    try:
        return (experiment_dir / CANCEL_FILE).read_text() or "the sweep was cancelled"
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None if
    there is no such process: with the pid, it names one process for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def record_driver(experiment_dir: Path) -> None:
    """This process drives the sweep now (read by `driver_alive`)."""
    pid = os.getpid()
    (experiment_dir / DRIVER_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}))


def driver_alive(experiment_dir: Path) -> bool | None:
    """Whether the sweep's last recorded driver still runs: None when that cannot be told from
    here (another host, no record). A pid now used by another process counts as dead."""
    try:
        driver: dict[str, Any] = json.loads((experiment_dir / DRIVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if driver.get("host") != socket.gethostname() or driver.get("start") is None:
        return None
    return _process_start(int(driver["pid"])) == driver["start"]


class StopOnSignals:
    """Within `with`: SIGINT and SIGTERM stop the sweep as the module says; the previous handlers
    come back after."""

    def __init__(self, experiment_dir: Path) -> None:
        self.experiment_dir = experiment_dir
        self.signum: int | None = None
        self.message: str | None = None  # Interrupted's, when not "interrupted by SIGNAL"
        self.in_tune = False
        self.polled = 0.0  # monotonic time of the last look for a cancel request
        self.previous: dict[int, object] = {}

    active: StopOnSignals | None = None  # the one in this process, for `poll_cancel`

    def __enter__(self) -> StopOnSignals:
        # Without this Tune replaces the SIGINT handler during fit with its own, which swallows it.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        StopOnSignals.active = self
        if threading.current_thread() is threading.main_thread():  # Python sets handlers only there
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        StopOnSignals.active = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None and self._stop(signum, f"the sweep driver was interrupted ({name})"):
            return
        raise Interrupted(self.signum or signum, self.message)

    def _stop(self, signum: int, reason: str, message: str | None = None) -> bool:
        """Begin the stop (first signal or cancel); True if Tune's orderly stop will end `fit`."""
        self.signum, self.message = signum, message
        # plain file I/O: safe in a handler, and trials on any node can read it
        (self.experiment_dir / INTERRUPT_FILE).write_text(reason)
        if self.in_tune and callable(signal.getsignal(signal.SIGUSR1)):
            signal.raise_signal(signal.SIGUSR1)  # Tune's orderly stop (its handler is set during fit)
            return True
        return False

    def poll_cancel(self) -> None:
        """Stop as on a first SIGTERM if `kdsweep cancel` asked; looks at most every CANCEL_POLL_S."""
        if self.signum is None and time.monotonic() - self.polled >= CANCEL_POLL_S:
            self.polled = time.monotonic()
            if (reason := cancel_requested(self.experiment_dir)) is not None:
                self._stop(signal.SIGTERM, reason, CANCELLED)

    def run(self, fit: Callable[[], T]) -> T:
        """`fit()` (Tune), then Interrupted if a signal stopped it."""
        self.in_tune = True
        try:
            result = fit()
        finally:
            self.in_tune = False
        if self.signum is None and (reason := cancel_requested(self.experiment_dir)) is not None:
            self._stop(signal.SIGTERM, reason, CANCELLED)  # asked after Tune's last look: nothing is exported
        if self.signum is not None:
            raise Interrupted(self.signum, self.message)
        return result


def poll_cancel() -> None:
    """Called at every step of Tune's loop (`sweeps.callbacks.CancelWatch`): the active
    `StopOnSignals` of this process looks for a cancel request. Through the class, not a reference
    held by the callback: Tune copies and pickles its callbacks."""
    if StopOnSignals.active is not None:
        StopOnSignals.active.poll_cancel()
