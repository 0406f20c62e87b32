"""Checks of the tracking store a command names, before it uses it: the URI's scheme, its database
driver, a server that answers, an SQLite file that is a whole MLflow store. Each failure is a
one-line `TrackingError`, never a traceback from deep in SQLAlchemy or minutes of MLflow's HTTP
retries. Nothing here writes."""

from __future__ import annotations

import os
import sqlite3
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit


class TrackingError(ValueError):
    """A tracking URI or store that cannot be used; the message names it and says why, in one line."""


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
#: pip packages of the database drivers SQLAlchemy imports for MLflow, by module name.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "pyodbc": "pyodbc", "pymssql": "pymssql"}
PROBE_SECONDS = 5.0  # a tracking server that does not answer by then is reported, not retried for minutes
SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store(uri: str, *, create: bool) -> None:
    """Raise TrackingError unless MLflow can use the store at `uri` (absolute, `resolve_tracking_uri`):
    a known scheme, its database driver installed, a tracking server that answers, an SQLite file
    that is an undamaged MLflow store (or, with `create`, one that can be created). Writes nothing."""
    shown = redact(uri)
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {shown!r}: use sqlite:///PATH, http://HOST:PORT or a "
                            "database URI (MLflow 3 does not accept file stores)")
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        _check_sqlite(Path(uri.removeprefix("sqlite:///")), create=create)
    elif scheme in ("http", "https"):
        _check_server(uri, shown)
    elif scheme in DATABASE_SCHEMES:
        _check_driver(uri)
    elif scheme != "databricks":
        raise TrackingError(f"tracking URI {shown!r}: unknown scheme {scheme + '://'!r} (use sqlite:///PATH, "
                            "http(s)://HOST:PORT, postgresql://, mysql:// or mssql://)")


def _check_sqlite(db: Path, *, create: bool) -> None:
    """An SQLite tracking store: an MLflow database, whole; or a new file in a writable folder."""
    where = f"tracking store sqlite:///{db}"
    if db.is_dir():
        raise TrackingError(f"{where}: is a directory, not an SQLite file")
    if not db.exists():
        if not db.parent.is_dir():
            raise TrackingError(f"{where}: directory {db.parent} does not exist")
        if create and not os.access(db.parent, os.W_OK | os.X_OK):
            raise TrackingError(f"{where}: directory {db.parent} is not writable")
        return
    if create and not os.access(db, os.W_OK):
        raise TrackingError(f"{where}: the file is not writable")
    with db.open("rb") as file:
        header = file.read(100)
    if not header:
        return  # an empty file is an empty database: MLflow creates its tables (reading commands refuse it first)
    if not header.startswith(SQLITE_MAGIC) or len(header) < 100:
        raise TrackingError(f"{where}: not an SQLite database (damaged or another kind of file)")
    # The page count in the header is valid when its "version-valid-for" equals the change counter;
    # a file shorter than it claims was truncated (SQLite itself may notice only much later).
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and db.stat().st_size < pages * page_size:
        raise TrackingError(f"{where}: truncated ({db.stat().st_size} of {pages * page_size} bytes)")
    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as error:
        raise TrackingError(f"{where}: damaged SQLite database ({error})") from None
    if tables and "experiments" not in tables:
        raise TrackingError(f"{where}: an SQLite database but not an MLflow tracking store "
                            f"(tables: {', '.join(sorted(tables)[:5])})")


def redact(uri: str) -> str:
    """`uri` without its password, for messages."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        return uri
    return uri.replace(f":{password}@", ":***@", 1) if password else uri


def _check_server(uri: str, shown: str) -> None:
    """A tracking server answers within PROBE_SECONDS (any HTTP status will do: MLflow judges the rest);
    MLflow itself would retry a dead address for minutes."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as error:
        if isinstance(error.reason, ssl.SSLError):
            return  # it answers; TLS settings are MLflow's (MLFLOW_TRACKING_INSECURE_TLS, ...)
        raise TrackingError(f"tracking server {shown} is not reachable: {error.reason}") from None
    except (OSError, ValueError) as error:  # a timeout while reading, a malformed URL
        raise TrackingError(f"tracking server {shown} is not reachable: {error or type(error).__name__}") from None


def _check_driver(uri: str) -> None:
    """The database driver SQLAlchemy would import for `uri` is installed (MLflow would fail with a
    traceback deep in SQLAlchemy otherwise)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        shown = url.render_as_string(hide_password=True)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as error:
        raise TrackingError(f"tracking URI {redact(uri)}: not a valid database URI ({error})") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = (error.name or "").split(".")[0]
        package = DRIVER_PACKAGES.get(module, module)
        raise TrackingError(f"tracking URI {shown}: its database driver is not installed (no module "
                            f"{module!r}): pip install {package}") from None


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (SQLAlchemy and MLflow add pages of context)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
