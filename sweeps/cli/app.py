"""The `kdsweep` Typer app and what every command shares: consoles, user-error handling,
common options, opening the tracking store, finding a sweep."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from cluster.addresses import LOCAL_RAY_IP, LOOPBACK_IP
from cluster.processes import ClusterError
from cluster.state import DEFAULT_DIR
from sweeps import tags
from sweeps.cli.stores import TrackingError, check_store, first_line, redact
from sweeps.spec import SpecError
from sweeps.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri

if TYPE_CHECKING:  # Typer builds every command at import: what they need of torch, Ray or MLflow
    # is imported inside them, so `kdsweep --help` starts in a fraction of a second.
    from sweeps.spec import SweepSpec
    from sweeps.tracking import Tracker

MAX_MESSAGE = 2000  # characters of an error message; one quoting a huge input is cut, never printed whole

F = TypeVar("F", bound=Callable[..., Any])


def one_line(message: str) -> str:
    """A message as one line ("invalid spec X:" and its listed problems joined by "; "), at most MAX_MESSAGE long."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = " ".join([lines[0], "; ".join(lines[1:])]).strip() if lines else "unknown error"
    return text if len(text) <= MAX_MESSAGE else f"{text[:MAX_MESSAGE]}... ({len(text)} characters in all)"


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr, verbatim: a Text, so brackets in it (`[params]`) are never read as markup."""
    err.print(Text.assemble(("error:", "bold red"), " ", one_line(message)), highlight=False, soft_wrap=True)


class OneLineErrors(TyperGroup):
    """The `kdsweep` group: Click's usage errors (unknown option, value out of range, missing
    argument) print one line like every other user error, instead of usage + hint + message."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # Typer's (vendored) Click exceptions derive from it
            if type(error).__name__ == "NoArgsIsHelpError":  # `kdsweep` alone: the help, as Click prints it
                error.show()  # type: ignore[attr-defined]
                sys.exit(error.exit_code)
            context = getattr(error, "ctx", None)
            print_error(error.format_message() + (f" (see: {context.command_path} --help)" if context else ""))
            sys.exit(error.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# rich_markup_mode=None: help is plain text, so bracketed text ("[default: ...]", "[accuracy, params]")
# prints as written.
app = typer.Typer(
    name="kdsweep", cls=OneLineErrors, no_args_is_help=True, pretty_exceptions_enable=False,
    add_completion=False, rich_markup_mode=None,
    help="Distributed hyperparameter sweeps for knowledge distillation "
         "(Ray Tune + Optuna + MLflow).",
)
out = Console(markup=False)  # results hold user text (paths, parameter values): never markup
err = Console(stderr=True)


class NotFoundError(LookupError):
    """A sweep, store or export the user named does not exist."""


TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help=f"MLflow tracking URI [default: $MLFLOW_TRACKING_URI or "
                           f"{DEFAULT_TRACKING_URI}]")]
SweepName = Annotated[str, typer.Argument(help="Sweep name (or spec name: its newest sweep).")]
RayAddress = Annotated[str | None, typer.Option(
    help=f"Ray cluster address [default: a local Ray on {LOCAL_RAY_IP}].")]
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
        except (SpecError, TrackingError, NotFoundError, ClusterError) as error:
            print_error(str(error))
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def open_tracker(tracking_uri: str | None, *, reading: bool = False, writes: bool | None = None) -> Tracker:
    """The tracker for a URI, checked before use (`check_store`: one line, not a traceback or minutes
    of retries). `reading` refuses a local store that is absent or empty (reading never creates
    one); `writes` (default: not `reading`) also needs a writable store."""
    uri = resolve_tracking_uri(tracking_uri)
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if reading and db is not None and (not db.exists() or (db.is_file() and db.stat().st_size == 0)):
        raise NotFoundError(f"no sweeps recorded at {uri}")
    check_store(uri, create=not reading if writes is None else writes)
    from mlflow.exceptions import MlflowException  # after the cheap checks: MLflow takes seconds to import
    from sqlalchemy.exc import SQLAlchemyError

    from sweeps.tracking import Tracker

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines ("Creating initial ... tables")
    try:
        tracker = Tracker(uri)
        tracker.client.search_experiments(max_results=1)  # a damaged or foreign store fails here, in one line
    except (MlflowException, SQLAlchemyError) as error:
        raise TrackingError(f"tracking store {redact(uri)}: {first_line(error)}") from None
    return tracker


def check_writable(path: Path, option: str) -> None:
    """`path`, a folder the command will create or write, can be: its nearest existing ancestor is
    a writable folder. Checked before anything is written, so a read-only place fails in one line."""
    existing = path.absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise SpecError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"{option} {path}: {existing} is not writable")


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
    from sweeps.spec import NAME_PATTERN

    if name is not None and not NAME_PATTERN.match(name):
        raise SpecError(f"--name {name!r}: use letters, digits, '_', '.' and '-'")
    overrides = {k: v for k, v in {"num_trials": num_trials, "max_concurrent": max_concurrent}.items()
                 if v is not None}
    if overrides:
        spec = spec.model_copy(update={"sweep": spec.sweep.model_copy(update=overrides)})
    return spec
