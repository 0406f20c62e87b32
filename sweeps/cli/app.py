"""The `kdsweep` Typer app and what every command shares: consoles, user-error handling,
common options, opening the tracking store, finding a sweep."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from cluster.addresses import LOOPBACK_IP
from cluster.processes import ClusterError
from cluster.state import DEFAULT_DIR
from sweeps import tags
from sweeps.spec import NAME_PATTERN, SpecError, SweepSpec
from sweeps.tracking import DEFAULT_TRACKING_URI, Tracker, resolve_tracking_uri

app = typer.Typer(
    name="kdsweep", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    help="Distributed hyperparameter sweeps for knowledge distillation "
         "(Ray Tune + Optuna + MLflow).",
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class NotFoundError(LookupError):
    """A sweep, store or export the user named does not exist."""


TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help=f"MLflow tracking URI [default: $MLFLOW_TRACKING_URI or "
                           f"{DEFAULT_TRACKING_URI}]")]
SweepName = Annotated[str, typer.Argument(help="Sweep name (or spec name: its newest sweep).")]
RayAddress = Annotated[str | None, typer.Option(
    help=f"Ray cluster address [default: a local Ray on {LOOPBACK_IP}].")]
NumTrials = Annotated[int | None, typer.Option(min=1, help="Override sweep.num_trials.")]
MaxConcurrent = Annotated[int | None, typer.Option(min=1, help="Override sweep.max_concurrent.")]
ClusterDir = Annotated[Path, typer.Option(
    "--cluster-dir", help="Where `kdsweep cluster up` keeps the loopback cluster's state.")]
JobAddress = Annotated[str | None, typer.Option(
    help=f"Ray dashboard URL (Jobs API), e.g. http://{LOOPBACK_IP}:8265 "
         "[default: the loopback cluster in --cluster-dir].")]
DEFAULT_CLUSTER_DIR = DEFAULT_DIR


def user_errors(command: F) -> F:
    """Turn user errors into one line on stderr and exit status 2, without a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SpecError, NotFoundError, ClusterError) as error:
            err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def open_tracker(tracking_uri: str | None, *, reading: bool = False) -> Tracker:
    """The tracker for a URI; `reading` refuses to create a local store that is absent."""
    uri = resolve_tracking_uri(tracking_uri)
    if reading and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise NotFoundError(f"no sweeps recorded at {uri}")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise SpecError(f"tracking URI {uri}: directory {db.parent} does not exist")
    elif uri.startswith(("file:", "./", "/")) or "://" not in uri:
        raise SpecError(f"tracking URI {uri!r}: use sqlite:///PATH, http://HOST:PORT or a "
                        "database URI (MLflow 3 does not accept file stores)")
    return Tracker(uri)


def find_sweep(tracker: Tracker, name: str) -> Any:
    """The parent run of the sweep (or newest sweep of the spec) `name`; NotFoundError lists the known."""
    runs = tracker.find_sweeps(name)
    if not runs:
        known = sorted({r.data.tags.get(tags.SWEEP, "") for r in tracker.find_sweeps()})
        raise NotFoundError(f"no sweep named {name!r} at {tracker.uri}"
                            + (f" (known: {', '.join(known)})" if known else ""))
    return runs[0]


def with_overrides(spec: SweepSpec, name: str | None, num_trials: int | None,
                   max_concurrent: int | None) -> SweepSpec:
    """The spec with `--num-trials` / `--max-concurrent` applied; checks `--name`."""
    if name is not None and not NAME_PATTERN.match(name):
        raise SpecError(f"--name {name!r}: use letters, digits, '_', '.' and '-'")
    overrides = {k: v for k, v in {"num_trials": num_trials, "max_concurrent": max_concurrent}.items()
                 if v is not None}
    if overrides:
        spec = spec.model_copy(update={"sweep": spec.sweep.model_copy(update=overrides)})
    return spec
