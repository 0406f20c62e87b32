"""Where a sweep's time goes, recorded by the code itself (benchmarks/sweep_overhead.py prints it).

A trial keeps a `PhaseTimes` of its own (logged as its run's `time_*` metrics), its actor's
start among them (`process_start_seconds`). The driver's parts (Optuna, MLflow, progress,
checkpoint pruning) add their CPU time to `DRIVER_CPU` through `driver_part`; what the driver
spends beyond them is Tune's own loop, loggers and snapshots.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psutil

Method = TypeVar("Method", bound=Callable[..., Any])


class PhaseTimes:
    """Seconds per named phase, summed over calls (threads may add to it, each to its own names)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the wall time of the block to `name`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def metrics(self, **more: float) -> dict[str, float]:
        """{"time_<phase>": seconds}, with `more` phases measured so far but not added: a trial
        run's MLflow metrics of its overhead breakdown."""
        return {f"time_{name}": seconds for name, seconds in {**self.seconds, **more}.items()}

    def since(self, earlier: dict[str, float]) -> dict[str, float]:
        """Seconds per phase added after `earlier` (a copy of `seconds`)."""
        return {name: value - earlier.get(name, 0.0) for name, value in self.seconds.items()}


def process_start_seconds() -> float:
    """Seconds from this process's start to now on the first call in the process, 0.0 on later
    calls: in a trial, the start of its Ray actor (worker process, imports, Tune's set-up) for the
    first trial an actor runs; a reused actor's later trials start at no such cost. A worker
    that Ray started earlier and left idle would count its idle time too (trial actors get new
    processes today: their runtime env differs from the prestarted workers')."""
    global _process_start_counted
    if _process_start_counted:
        return 0.0
    _process_start_counted = True
    return max(0.0, time.time() - psutil.Process().create_time())


_process_start_counted = False

DRIVER_CPU = PhaseTimes()  # this process's CPU seconds in the sweep's driver-side code, by part


def driver_part(name: str) -> Callable[[Method], Method]:
    """A method of a driver-side callback or searcher whose CPU time counts to `DRIVER_CPU[name]`."""

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                DRIVER_CPU.add(name, time.thread_time() - started)

        return timed  # type: ignore[return-value]

    return decorate
