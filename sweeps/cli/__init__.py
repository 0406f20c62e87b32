"""The `kdsweep` command line: one module per command group, rendering in `render.py`.

`sweeps.cli` is the only place where the sweep machinery (`sweeps`) and where Ray runs
(`cluster`) meet. User errors print one message and exit with status 2.
"""

# Import order = the order of `kdsweep --help`.
from sweeps.cli.app import app  # noqa: I001
from sweeps.cli import sweep  # noqa: F401  run, resume
from sweeps.cli import inspect  # noqa: F401  validate, list
from sweeps.cli import records  # noqa: F401  status, best, pull, ui
from sweeps.cli import manage  # noqa: F401  cancel, delete
from sweeps.cli import dashboard  # noqa: F401  dashboard (optuna-dashboard)
from sweeps.cli import jobs  # noqa: F401  submit, status --job
from sweeps.cli import cluster  # noqa: F401  cluster up|down|status

__all__ = ["app", "main"]


def main() -> None:
    app()
