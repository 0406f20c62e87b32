"""`kdsweep run` and `kdsweep resume`: a sweep in this process, on a local Ray or a cluster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from cluster.session import ray_session, use_local_cluster_token
from sweeps.cli.app import (
    MaxConcurrent,
    NumTrials,
    RayAddress,
    TrackingUri,
    app,
    check_writable,
    err,
    open_tracker,
    user_errors,
    with_overrides,
)

if TYPE_CHECKING:  # the spec's schema imports torch: commands import it when they run
    from sweeps.spec import SweepSpec

SpecSets = Annotated[list[str] | None, typer.Option(
    "--set", metavar="PATH=VALUE",
    help="Change one spec value before it is validated, e.g. --set sweep.num_trials=4 "
         "--set search.method.T.high=8 (VALUE is YAML; repeatable, a later one wins).")]


@app.command()
@user_errors
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="Sweep spec (YAML).")],
    name: Annotated[str | None, typer.Option(help="Sweep name [default: SPEC-NAME-TIMESTAMP].")] = None,
    num_trials: NumTrials = None,
    max_concurrent: MaxConcurrent = None,
    address: RayAddress = None,
    tracking_uri: TrackingUri = None,
    storage: Annotated[Path, typer.Option(
        help="Storage root: Tune experiments, stage store, studies, exports.")] = Path("kdsweep_storage"),
    sets: SpecSets = None,
) -> None:
    """Run a sweep and print the best trial beside the CE-only student."""
    from sweeps.spec import load_spec

    spec = with_overrides(load_spec(spec_path, lambda s: _pin(s, tracking_uri), sets or ()), name, num_trials,
                          max_concurrent)
    check_writable(storage, "--storage")
    runner = _runner(address)
    runner.check_before_start(spec, address)  # data, models, resources: before Ray starts, before any write
    tracker = open_tracker(tracking_uri)
    name = name or runner.default_sweep_name(spec)
    runner.check_new_sweep(tracker, name, storage.resolve(), spec)  # before Ray starts
    _in_ray_session(address, name, lambda: runner.run_sweep(
        spec, name=name, storage=storage, tracking_uri=tracker.uri, console=err))


@app.command()
@user_errors
def resume(
    name: Annotated[str, typer.Argument(help="The sweep to continue (its exact name).")],
    address: RayAddress = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Continue a sweep whose driver was interrupted or killed, then print its result."""
    tracker = open_tracker(tracking_uri, reading=True, writes=True)
    runner = _runner(address)
    context = runner.resumable(name, tracker, address)  # before Ray starts
    check_writable(Path(context.storage) / name, "storage")
    _in_ray_session(address, name, lambda: runner.resume_sweep(context, console=err))


def _pin(spec: SweepSpec, tracking_uri: str | None) -> SweepSpec:
    """A model_uri teacher resolved in the tracking store (opened only then: a spec without one
    writes nothing before it is valid)."""
    if spec.teacher is None or spec.teacher.model_uri is None:
        return spec
    from sweeps.pretrained import pin_teacher

    return pin_teacher(spec, open_tracker(tracking_uri, reading=True))


def _runner(address: str | None) -> ModuleType:
    """`sweeps.runner`, imported (with Ray) only after the input is validated and the token
    of a loopback cluster's `address` is in the environment."""
    use_local_cluster_token(address)
    from sweeps import runner

    return runner


def _in_ray_session(address: str | None, name: str, drive: Callable[[], Any]) -> None:
    """Run `drive()` with Ray up; print its outcome, or exit 1 if no trial finished, or 128 +
    the signal number (130, 143) if SIGINT or SIGTERM interrupted it."""
    from sweeps import runner

    with ray_session(address, env_vars=runner.WORKER_ENV):
        try:
            outcome = drive()
        except runner.SweepFailedError as error:
            err.print(f"[bold red]sweep failed:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except runner.Interrupted as error:
            err.print(f"[bold yellow]sweep {escape(str(error))}:[/] continue it with `kdsweep resume {name}`",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
    from sweeps.cli.render import print_outcome

    print_outcome(outcome)
