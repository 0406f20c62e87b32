"""Ctrl-C (SIGINT) and SIGTERM on the sweep driver: the sweep stops where it is, ends KILLED with
the signal as its reason, and `kdsweep resume` continues it.

Ray 2.60's Tuner.fit catches SIGINT itself and returns normally (its results then look like a
finished sweep), and `ray.init` turns SIGTERM into `sys.exit(15)` wherever the driver is. Here
both signals are caught instead: while Tune runs, the first one asks Tune for its own orderly
stop (SIGUSR1: a last experiment snapshot, trials stopped) and `fit` is followed by
`Interrupted`; at any other moment, or on a second signal, `Interrupted` is raised at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

INTERRUPT_FILE = "interrupted"  # in the experiment directory while its driver stops on a signal
SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class Interrupted(BaseException):
    """The driver got SIGINT or SIGTERM (a BaseException, like KeyboardInterrupt: Tune lets it through)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def interruption(experiment_dir: Path) -> str | None:
    """Why the sweep's driver is stopping its trials, if it is stopping on a signal (trials read
    this to name the cause of their stop)."""
    try:
        return (experiment_dir / INTERRUPT_FILE).read_text() or None
    except OSError:
        return None


def clear_interruption(experiment_dir: Path) -> None:
    """A resumed driver is no longer stopping."""
    (experiment_dir / INTERRUPT_FILE).unlink(missing_ok=True)


class StopOnSignals:
    """Within `with`: SIGINT and SIGTERM stop the sweep as the module says; the previous handlers
    come back after."""

    def __init__(self, experiment_dir: Path) -> None:
        self.experiment_dir = experiment_dir
        self.signum: int | None = None
        self.in_tune = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignals:
        # Without this Tune replaces the SIGINT handler during fit with its own, which swallows it.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        if threading.current_thread() is threading.main_thread():  # Python sets handlers only there
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if first:  # plain file I/O: safe in a handler, and trials on any node can read it
            (self.experiment_dir / INTERRUPT_FILE).write_text(
                f"the sweep driver was interrupted ({signal.Signals(signum).name})")
        if first and self.in_tune and callable(signal.getsignal(signal.SIGUSR1)):
            signal.raise_signal(signal.SIGUSR1)  # Tune's orderly stop (its handler is set during fit)
            return
        raise Interrupted(self.signum)

    def run(self, fit: Callable[[], T]) -> T:
        """`fit()` (Tune), then Interrupted if a signal stopped it."""
        self.in_tune = True
        try:
            result = fit()
        finally:
            self.in_tune = False
        if self.signum is not None:
            raise Interrupted(self.signum)
        return result
