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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .repair import check_sqlite_file
from .urls import redact


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
    flag = "--tracking-uri" if what == "tracking URI" else "--storage"
    check_sqlite_file(path, f"{what} file", flag)


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
    """One process at a time on a SQLite store (a no-op for any other store)."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".lock")):
        yield
