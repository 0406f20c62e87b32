"""`kdsweep dashboard NAME`: optuna-dashboard on the loopback address over a sweep's Optuna study,
opened read-only (the dashboard's edits, such as deleting a trial, are refused by SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from cluster.addresses import MLFLOW_HOST
from sweeps import tags
from sweeps.cli.app import NotFoundError, SweepName, TrackingUri, app, find_sweep, open_tracker, out, user_errors
from sweeps.spec import SpecError


def study_path(sweep: Any) -> Path:
    """The SQLite file of the Optuna study of `sweep` (its parent run): STUDY_FILE in the sweep's
    folder of its storage root. NotFoundError when the run names no storage or the file is gone."""
    from sweeps.search import STUDY_FILE

    name, storage = sweep.data.tags.get(tags.SWEEP), sweep.data.tags.get(tags.STORAGE)
    if not storage:
        raise NotFoundError(f"sweep {name!r} records no storage folder (tag {tags.STORAGE})")
    path = Path(storage) / name / STUDY_FILE
    if not path.is_file():
        raise NotFoundError(f"sweep {name!r} has no Optuna study at {path} (the sweep's folder was moved or deleted?)")
    return path


def open_study_read_only(path: Path, study_name: str) -> Any:
    """Optuna's RDB storage over `path` opened read-only (SQLite `mode=ro`), checked to hold the
    study `study_name` with readable trials; NotFoundError (one line) for a missing or damaged study."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    # SQLite URI filename: read-only, so nothing the dashboard does can change the study.
    url = f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        study = optuna.load_study(study_name=study_name, storage=storage)
        study.get_trials(deepcopy=False)  # a damaged file fails here, not in the browser
    except KeyError:
        raise NotFoundError(f"{path} holds no Optuna study named {study_name!r}") from None
    except (SQLAlchemyError, optuna.exceptions.OptunaError, ValueError) as error:
        cause = error.__cause__ or error  # Optuna wraps SQLite's own words ("file is not a database")
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise NotFoundError(f"the Optuna study {path} cannot be read ({message})") from None
    return storage


@app.command()
@user_errors
def dashboard(
    name: SweepName,
    port: Annotated[int, typer.Option(min=1, max=65535, help=f"Port on {MLFLOW_HOST}.")] = 8080,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve optuna-dashboard for a sweep's Optuna study (read-only) on the loopback address."""
    import socket

    import optuna_dashboard

    sweep = find_sweep(open_tracker(tracking_uri, reading=True), name)
    study_name = sweep.data.tags.get(tags.SWEEP)
    path = study_path(sweep)
    storage = open_study_read_only(path, study_name)
    with socket.socket() as probe:  # a busy port fails here in one line, not inside the server
        try:
            probe.bind((MLFLOW_HOST, port))
        except OSError as error:
            raise SpecError(f"--port {port}: cannot listen on {MLFLOW_HOST}:{port} ({error.strerror})") from None
    out.print(f"optuna-dashboard for sweep {study_name!r} ({path}) on http://{MLFLOW_HOST}:{port} "
              "(Ctrl-C stops it)", soft_wrap=True)
    optuna_dashboard.run_server(storage, host=MLFLOW_HOST, port=port)
