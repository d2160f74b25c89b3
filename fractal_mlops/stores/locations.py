"""Store URLs and files, for MLflow's tracking store and Optuna's storage alike: what a URL
points at, whether it can be used (one line and exit 2 if not, nothing created), and the file
locks that let several processes of one host share a SQLite file or a journal.

No MLflow and no Optuna here: both stores' modules build on this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fractal_mlops.errors import ConfigError, ServerFault
from fractal_mlops.signals import stop_signals_held
from fractal_mlops.stores.credentials import http_auth_header, move_http_credentials, redact
from fractal_mlops.stores.outage import bound_http_retries
from fractal_mlops.stores.repair import check_sqlite_file

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TRACKING_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks"}


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for any other URL, or no file)."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError:
        return None
    if not database or database == ":memory:":
        return None
    return Path(database).expanduser()


def sqlalchemy_url(url: str) -> str:
    """postgresql:// means psycopg2 to SQLAlchemy; this project ships psycopg 3."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def check_folder(folder: Path, what: str) -> None:
    """The folder a store file goes in is writable, or can be created."""
    if folder.exists() and not os.access(folder, os.W_OK):
        raise ConfigError(f"{what}: the folder {folder} is not writable")
    if not folder.exists() and not _creatable(folder):
        raise ConfigError(f"{what}: the folder {folder} does not exist and cannot be created")


def _creatable(folder: Path) -> bool:
    for ancestor in folder.absolute().parents:
        if ancestor.exists():
            return ancestor.is_dir() and os.access(ancestor, os.W_OK)
    return False


def check_sqlite_url(url: str, what: str) -> None:
    """A SQLite store: a file (not :memory:) in a usable folder, not damaged."""
    path = sqlite_path(url)
    if path is None:
        raise ConfigError(f"{what} {url!r}: give a database file, e.g. sqlite:///mlruns/mlflow.db")
    check_folder(path.parent, f"{what} {url!r}")
    flag, kind = ("--tracking-uri", "mlflow") if what == "tracking URI" else ("--storage", "optuna")
    check_sqlite_file(path, f"{what} file", flag, kind)


def check_database_url(url: str, what: str) -> None:
    """A database server answers and takes the credentials."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_timeout(url))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver error is "cannot connect"
        message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"cannot connect to the {what} {redact(url)}: {redact(message)}") from None


def connect_timeout(url: str) -> dict[str, Any]:
    return {"connect_timeout": 10} if url.startswith("postgresql") else {}


_HELD: dict[Path, tuple[threading.RLock, list[int]]] = {}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among the processes of this host (flock on `path`, created if need
    be). Re-entrant within a process, so a locked section may call code that locks again."""
    path = path.expanduser().absolute()
    lock, depth = _HELD.setdefault(path, (threading.RLock(), [0]))
    with lock:
        if depth[0]:
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            depth[0] = 1
            try:
                yield
            finally:
                depth[0] = 0
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """One process at a time on a SQLite store, and no stop signal in the middle of its write
    (signals.stop_signals_held); a no-op for any other store."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".lock")), stop_signals_held():
        yield


@contextlib.contextmanager
def advisory_lock(url: str, key_text: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock named by `key_text`: one holder at a time across
    every host that uses the database."""
    import sqlalchemy

    from fractal_mlops.stores.outage import POSTGRES_CONNECT_ARGS

    key = zlib.crc32(key_text.encode())
    engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=dict(POSTGRES_CONNECT_ARGS))
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Around opening a store that may be new: MLflow and Optuna create and migrate a new
    database's tables when they first open it, and two processes doing that at once on one
    database fail (alembic's duplicate tables, SQLite's lock). SQLite: the store file's lock
    (sqlite_lock); PostgreSQL: an advisory lock of the database; anything else: nothing."""
    if url.startswith(("postgresql", "postgres:")):
        with advisory_lock(url, "fractal_mlops:store-schema"):
            yield
        return
    with sqlite_lock(url):
        yield


def create_sqlite_atomically(url: str, create: Callable[[str], None]) -> None:
    """A new SQLite store (no file, or an empty one) is created whole or not at all: `create`
    builds its tables in a temporary file beside it (given that file's URL), which then takes
    the store's name. MLflow's and Optuna's table creation commit table by table, so a full
    disk or a kill in the middle would leave a store that neither can open or create again.
    Call it under store_lock; any other store is left alone."""
    path = sqlite_path(url)
    if path is None or (path.exists() and path.stat().st_size > 0):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.new-{os.getpid()}")
    try:
        create(f"sqlite:///{temporary.absolute()}")
        os.replace(temporary, path)
    finally:
        for leftover in (temporary, temporary.with_name(temporary.name + "-journal")):
            leftover.unlink(missing_ok=True)


# -- the MLflow tracking store ------------------------------------------------------------

def resolve_tracking_uri(flag: str | None, configured: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the config, else the local SQLite store.
    Credentials in an http(s) URI move to MLFLOW_TRACKING_USERNAME / _PASSWORD (or _TOKEN),
    where MLflow reads them, so the URI that is shown and passed on holds none."""
    uri = move_http_credentials(
        flag or os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI)
    bound_http_retries(uri)  # an outage is noticed in about 30 s, not minutes
    return uri


def check_tracking_uri(uri: str) -> None:
    """Fail with one clear line (ConfigError) when the store cannot be used; create nothing."""
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme == "file" or (scheme == "" and not uri.startswith("databricks")):
        raise ConfigError(f"tracking URI {redact(uri)!r}: MLflow 3 refuses the plain file store; "
                          f"use {DEFAULT_TRACKING_URI} or an http(s):// tracking server")
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking URI {redact(uri)!r}: unknown scheme {scheme!r} "
                          "(expected sqlite:///, postgresql://, http(s)://)")
    if scheme == "sqlite":
        check_sqlite_url(uri, "tracking URI")
    elif scheme in ("http", "https"):
        _check_tracking_server(move_http_credentials(uri).rstrip("/"))
    elif scheme in ("postgresql", "mysql", "mssql"):
        check_database_url(sqlalchemy_url(uri), "tracking URI")


def _check_tracking_server(base: str) -> None:
    """/health answers, and an authenticated read is not refused (401/403: the credentials)."""
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        request = urllib.request.Request(base + path, headers=http_auth_header())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ConfigError(
                    f"the MLflow tracking server at {redact(base)} refused the credentials "
                    f"(HTTP {exc.code}): set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or put user:password@ "
                    "in the URI") from None
            if exc.code >= 500:
                raise ServerFault(f"the MLflow tracking server at {redact(base)} failed: HTTP "
                                  f"{exc.code} on {path.split('?')[0]}") from None
            if path == "/health":
                raise ConfigError(f"the MLflow tracking server at {redact(base)} answered "
                                  f"HTTP {exc.code} on {path.split('?')[0]}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"cannot reach the MLflow tracking server at {redact(base)}: "
                              f"{redact(str(reason))}") from None


def check_existing_store(uri: str) -> None:
    """The store must be reachable and, for SQLite, exist already: reading commands create no
    database (a typo in the path would otherwise give an empty store)."""
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        path = sqlite_path(uri)
        if path is None or not path.is_file():
            raise ConfigError(f"no MLflow store at {path} (tracking URI {uri}): run a study "
                              "first, or pass --tracking-uri / set MLFLOW_TRACKING_URI")


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local SQLite stores keep artifacts beside the database: mlruns/artifacts/."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None  # a tracking server (or remote database) decides
    return (db.absolute().parent / "artifacts").as_uri()
