"""How long `kdsweep` takes to start: median wall time of fast commands, each in a fresh process.

Fast commands (help, a usage error, `status` of a store that does not exist) need neither torch,
Ray nor MLflow, so they should start in well under 2 s; `list methods` reads kd_core's registries
(torch) and is shown for scale. Each is timed beside `python -c pass`
(the interpreter's own start) run the same way in the same session, printed as a ratio. No
assertion: the figure depends on the machine.

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KDSWEEP = [sys.executable, "-m", "sweeps.cli"]  # what the `kdsweep` script runs, without its install


def commands(missing_store: str) -> dict[str, list[str]]:
    """Label -> command line of each fast command timed."""
    return {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "kdsweep --help": [*KDSWEEP, "--help"],
        "kdsweep run --help": [*KDSWEEP, "run", "--help"],
        "kdsweep status --help": [*KDSWEEP, "status", "--help"],
        "kdsweep cluster --help": [*KDSWEEP, "cluster", "--help"],
        "kdsweep list --help": [*KDSWEEP, "list", "--help"],
        "kdsweep run (usage error: no SPEC)": [*KDSWEEP, "run"],
        "kdsweep status (no store)": [*KDSWEEP, "status", "--tracking-uri", missing_store],
        "kdsweep list methods (needs torch)": [*KDSWEEP, "list", "methods"],  # for scale: the registries
    }


def wall_time(command: list[str], env: dict[str, str]) -> float:
    """Seconds from start to exit of one fresh process (its output discarded)."""
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command (median reported)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as tmp:
        missing = f"sqlite:///{tmp}/missing.db"
        timed = commands(missing)
        for command in timed.values():  # once untimed: the first run also fills the bytecode cache
            wall_time(command, env)
        medians = {label: statistics.median(wall_time(command, env) for _ in range(args.repeats))
                   for label, command in timed.items()}
    baseline = medians["python -c pass (baseline)"]
    print(f"median wall time of {args.repeats} fresh processes each ({os.cpu_count()} CPUs)")
    for label, seconds in medians.items():
        print(f"{label:40s} {seconds:6.2f} s  {seconds / baseline:6.1f}x python -c pass")


if __name__ == "__main__":
    main()
