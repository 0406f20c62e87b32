"""`kdsweep cancel` and `kdsweep delete`: stop a running sweep from another terminal; remove a
finished, failed or cancelled sweep (its runs, registered versions and storage folder)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sweeps import tags
from sweeps.cli.app import NotFoundError, TrackingUri, app, open_tracker, out, user_errors
from sweeps.interrupts import CANCEL_FILE, driver_alive, request_cancel
from sweeps.spec import SpecError

if TYPE_CHECKING:
    from sweeps.tracking import Tracker

ExactName = Annotated[str, typer.Argument(help="The sweep's exact name.")]
POLL_S = 1.0  # how often `cancel` looks whether the sweep has stopped


def exact_sweep(tracker: Tracker, name: str) -> Any:
    """The parent run of the sweep named exactly `name` (never a spec's newest sweep: these
    commands stop or destroy it); NotFoundError otherwise."""
    runs = [r for r in tracker.find_sweeps(name) if r.data.tags.get(tags.SWEEP) == name]
    if not runs:
        raise NotFoundError(f"no sweep named {name!r} at {tracker.uri}")
    return runs[0]


def sweep_folder(parent: Any, name: str) -> Path:
    """The sweep's folder: `name` directly inside the storage root recorded on its parent run."""
    root = Path(parent.data.tags.get(tags.STORAGE, ""))
    if not root.is_absolute() or name in (".", "..") or "/" in name or "\\" in name:
        raise SpecError(f"sweep {name!r}: its recorded storage {str(root)!r} does not name a folder of it")
    return root / name


def _close_dead(tracker: Tracker, parent: Any, name: str) -> None:
    """Close the runs a dead driver left RUNNING, as a resume would find them."""
    reason = f"its driver died without closing the sweep (seen by kdsweep cancel); `kdsweep resume {name}` goes on"
    for run in tracker.running_children(parent.info.run_id):
        tracker.finish(run.info.run_id, "KILLED", "orphaned: its process died with the sweep's driver")
    tracker.finish(parent.info.run_id, "KILLED", reason)


@app.command()
@user_errors
def cancel(
    name: ExactName,
    tracking_uri: TrackingUri = None,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for the sweep to stop (0: do not wait).")] = 300,
) -> None:
    """Stop a running sweep from another terminal: its trials and it end KILLED, nothing is exported,
    and `kdsweep resume NAME` continues it."""
    tracker = open_tracker(tracking_uri, reading=True, writes=True)
    parent = exact_sweep(tracker, name)
    if parent.info.status != "RUNNING":
        raise SpecError(f"sweep {name!r} is not running (status {parent.info.status}); nothing to cancel")
    folder = sweep_folder(parent, name)
    if not folder.is_dir():
        raise SpecError(f"sweep {name!r}: its folder {folder} is not reachable from here; run `kdsweep cancel` "
                        "where the sweep's storage is, or stop the Ray job that runs it (`ray job stop JOB_ID`)")
    if driver_alive(folder) is False:
        _close_dead(tracker, parent, name)
        out.print(f"sweep {name}: its driver had died; its runs are closed KILLED. `kdsweep resume {name}` "
                  "continues it", soft_wrap=True)
        return
    request_cancel(folder)  # the driver sees it within a second while trials run, then stops as on SIGTERM
    deadline = time.monotonic() + wait
    status = "RUNNING"
    while wait and time.monotonic() < deadline:
        status = tracker.client.get_run(parent.info.run_id).info.status
        if status != "RUNNING":
            break
        if driver_alive(folder) is False:  # it died meanwhile: nobody else will close its runs
            _close_dead(tracker, parent, name)
            status = "KILLED"
            break
        time.sleep(POLL_S)
    if status == "RUNNING":
        out.print(f"sweep {name}: cancel requested; its driver stops once it sees the request "
                  f"(`kdsweep status {name}` shows when)", soft_wrap=True)
        if wait:
            raise typer.Exit(1)
    elif status == "KILLED":
        out.print(f"sweep {name} cancelled: its trials and it ended KILLED, nothing exported; "
                  f"`kdsweep resume {name}` continues it", soft_wrap=True)
    else:  # the request came after the trials: the sweep ended on its own
        (folder / CANCEL_FILE).unlink(missing_ok=True)
        out.print(f"sweep {name} ended {status} before the cancel took effect", soft_wrap=True)


@app.command()
@user_errors
def delete(
    name: ExactName,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Delete a sweep that is not running: its MLflow runs, the registered model versions it
    exported and its storage folder (the stage store it shares with other sweeps stays). Its name
    is free again."""
    from sweeps.export import ALIAS

    tracker = open_tracker(tracking_uri, reading=True, writes=True)
    client = tracker.client
    parent = exact_sweep(tracker, name)
    if parent.info.status == "RUNNING":
        raise SpecError(f"sweep {name!r} is running: stop it first with `kdsweep cancel {name}` (which also "
                        "closes a sweep whose driver died)")
    runs = [parent, *tracker.children(parent.info.run_id)]
    run_ids = {r.info.run_id for r in runs}
    # Versions registered from this sweep's runs only (its export is logged under the parent run).
    versions = [v for v in client.search_model_versions(f"run_id = '{parent.info.run_id}'") if v.run_id in run_ids]
    folder = sweep_folder(parent, name)
    if folder.is_symlink():
        raise SpecError(f"sweep {name!r}: {folder} is a symbolic link out of its storage root; not deleting it "
                        "(remove the link by hand)")
    listed = ", ".join(f"{v.name}/{v.version}" for v in versions) or "none"
    out.print(f"sweep {name} ({parent.info.status}): {len(runs)} MLflow runs, registered versions: {listed}, "
              f"folder: {folder if folder.exists() else 'gone already'}", soft_wrap=True)
    if not yes:
        typer.confirm(f"delete sweep {name}?", abort=True)
    for version in versions:
        model = client.get_registered_model(version.name)
        if model.aliases.get(ALIAS) == version.version:
            client.delete_registered_model_alias(version.name, ALIAS)
            out.print(f"models:/{version.name}@{ALIAS} pointed at version {version.version}: alias removed "
                      f"(`kdsweep promote SWEEP` gives it to another sweep's student)", soft_wrap=True)
        client.delete_model_version(version.name, version.version)
        if getattr(version, "model_id", None):  # MLflow 3: the logged model it was registered from
            client.delete_logged_model(version.model_id)
    for run in runs:
        client.delete_run(run.info.run_id)
    if folder.is_dir():
        shutil.rmtree(folder)  # removes symbolic links inside, never what they point to
    out.print(f"deleted sweep {name}: {len(runs)} runs (in MLflow's trash until `mlflow gc`), "
              f"{len(versions)} registered versions, {folder}", soft_wrap=True)
