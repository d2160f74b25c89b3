"""Optuna study storage: which store a URL means, a lock for claiming grid points, and the
liveness records that let one worker tell that another is gone.

Stores:
- default: a journal file under mlruns/ (Optuna's JournalFileBackend: safe for several
  processes on one host);
- `--storage sqlite:///...`, `postgresql://...`, `mysql://...`: Optuna's RDBStorage;
- `--storage journal:PATH` or a path ending in .journal / .log: a journal file elsewhere.

Claiming a grid point (read what is done, pick a pending point, create its trial) runs under a
lock that spans all workers of the study: a file lock on one host, a PostgreSQL advisory lock
across hosts. So no grid point is ever trained twice at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fractal_mlops.errors import ConfigError
from fractal_mlops.stores.credentials import redact
from fractal_mlops.stores.locations import (
    advisory_lock,
    check_database_url,
    check_folder,
    check_sqlite_url,
    create_sqlite_atomically,
    file_lock,
    sqlalchemy_url,
    sqlite_path,
    store_lock,
)
from fractal_mlops.stores.outage import POSTGRES_CONNECT_ARGS, wait_for_storage
from fractal_mlops.stores.repair import check_journal, repair_journal

DEFAULT_JOURNAL = "mlruns/optuna.journal"
RDB_SCHEMES = {"sqlite", "postgresql", "postgres", "mysql"}


@dataclass(frozen=True)
class StorageSpec:
    kind: str  # "journal" or "rdb"
    location: str  # journal file path, or SQLAlchemy URL

    @property
    def display(self) -> str:
        return redact(self.location)


def resolve_storage(flag: str | None, configured: str | None) -> StorageSpec:
    """--storage, else FRACTAL_STORAGE, else the config, else the journal file under mlruns/."""
    url = flag or os.environ.get("FRACTAL_STORAGE") or configured
    if url is None:
        return StorageSpec("journal", DEFAULT_JOURNAL)
    if url.startswith("journal:"):
        path = url.split(":", 1)[1].removeprefix("//")
        return StorageSpec("journal", path)
    scheme = urlsplit(url).scheme
    base = scheme.split("+")[0]
    if not scheme and (url.endswith(".journal") or url.endswith(".log")):
        return StorageSpec("journal", url)
    if base not in RDB_SCHEMES:
        raise ConfigError(f"storage {redact(url)!r} is not understood (expected postgresql://, "
                          "mysql://, sqlite:///, or journal:PATH)")
    return StorageSpec("rdb", sqlalchemy_url(url))


def check_storage(spec: StorageSpec) -> None:
    """One clear line when the store cannot be used; creates nothing."""
    if spec.kind == "journal":
        check_folder(Path(spec.location).expanduser().absolute().parent,
                     f"storage {spec.location}")
        check_journal(Path(spec.location).expanduser())
    elif spec.location.startswith("sqlite"):
        check_sqlite_url(spec.location, "storage")
    else:
        check_database_url(spec.location, "storage")


def check_separate_stores(spec: StorageSpec, tracking_uri: str) -> None:
    """MLflow's store and Optuna's need a database (or file) each: both keep an
    alembic_version table for their own migrations, and a journal is not a database."""
    tracking_file = sqlite_path(tracking_uri)
    if spec.kind == "journal" or sqlite_path(spec.location) is not None:
        storage_file = (Path(spec.location) if spec.kind == "journal"
                        else sqlite_path(spec.location))
        same = (tracking_file is not None and storage_file is not None
                and tracking_file.expanduser().resolve() == storage_file.expanduser().resolve())
        shown = str(storage_file)
    else:
        same = sqlalchemy_url(tracking_uri) == spec.location
        shown = redact(spec.location)
    if same:
        raise ConfigError(f"--tracking-uri and --storage are the same database ({shown}): "
                          "MLflow and Optuna each need their own")


def open_storage(spec: StorageSpec):
    import optuna

    if spec.kind == "journal":
        path = Path(spec.location).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        backend = optuna.storages.journal.JournalFileBackend(
            str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    database = sqlite_path(spec.location)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if spec.location.startswith("postgresql"):
        engine_kwargs["connect_args"] = dict(POSTGRES_CONNECT_ARGS)
    with store_lock(spec.location):  # a new database's tables: one process at a time
        create_sqlite_atomically(  # whole or not at all
            spec.location, lambda url: optuna.storages.RDBStorage(url).engine.dispose())
        storage = optuna.storages.RDBStorage(spec.location, engine_kwargs=engine_kwargs)
    if spec.location.startswith("postgresql"):
        wait_for_storage(storage.engine, spec.location)
    return storage


def save_dashboard_note(spec: StorageSpec, study_name: str, section: str) -> None:
    """`section` (Markdown, from its first line, a heading) as the end of the study's note,
    which optuna-dashboard shows on its Note page: what a person wrote above an earlier copy of
    the section stays, the earlier copy and anything below it are replaced."""
    import optuna
    from optuna_dashboard import save_note
    from optuna_dashboard._note import get_note_from_system_attrs

    storage = open_storage(spec)
    study = optuna.load_study(study_name=study_name, storage=storage)
    attrs = storage.get_study_system_attrs(storage.get_study_id_from_name(study_name))
    body = get_note_from_system_attrs(attrs, None)["body"]
    heading = section.splitlines()[0]
    kept = body[: body.index(heading)] if heading in body else body
    save_note(study, f"{kept.rstrip()}\n\n{section}" if kept.strip() else section)


@contextlib.contextmanager
def claim_lock(spec: StorageSpec, study_name: str) -> Iterator[None]:
    """Mutual exclusion among all workers of one study while a grid point is claimed."""
    if spec.kind == "rdb" and spec.location.startswith("postgresql"):
        with advisory_lock(spec.location, f"fractal_mlops:{study_name}"):
            yield
        return
    database = sqlite_path(spec.location)
    if spec.kind == "journal" or database is not None:
        path = Path(spec.location).expanduser() if spec.kind == "journal" else database
    else:  # another RDB (MySQL): safe among the workers of this host only
        name = f"fractal-claim-{zlib.crc32(redact(spec.location).encode()):08x}"
        path = Path(os.environ.get("TMPDIR", "/tmp")) / name
    with file_lock(path.with_name(path.name + f".{zlib.crc32(study_name.encode()):08x}.claim")):
        yield


# -- worker liveness ------------------------------------------------------------------------

HEARTBEAT_SECONDS = 10.0
HEARTBEAT_GRACE = 60.0  # a remote worker silent this long is lost


def heartbeat_settings() -> tuple[float, float]:
    """(seconds between beats, silence after which a worker on another host is lost). Sites
    whose workers reach the store over slow links raise both with FRACTAL_HEARTBEAT_SECONDS and
    FRACTAL_HEARTBEAT_GRACE; every worker of a study must use the same values."""
    def positive(name: str, default: float) -> float:
        try:
            value = float(os.environ.get(name, default))
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got "
                              f"{os.environ[name]!r}") from None
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value:g}")
        return value

    seconds = positive("FRACTAL_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)
    grace = positive("FRACTAL_HEARTBEAT_GRACE", HEARTBEAT_GRACE)
    if grace < 2 * seconds:
        raise ConfigError(f"FRACTAL_HEARTBEAT_GRACE ({grace:g} s) must be at least twice "
                          f"FRACTAL_HEARTBEAT_SECONDS ({seconds:g} s)")
    return seconds, grace


def worker_identity() -> str:
    """host:pid:start-time: unique across pid reuse."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _process_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        return "?"


def worker_is_gone(identity: str | None, heartbeat: float | None, now: float | None = None) -> bool:
    """A worker on this host is gone when its process is; elsewhere, when its heartbeat stops."""
    if not identity:
        return False
    host, pid, started = (identity.split(":") + ["", "", ""])[:3]
    if host == socket.gethostname():
        if not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return started != "?" and _process_start(int(pid)) not in (started, "?")
    if heartbeat is None:
        return False
    return (now or time.time()) - heartbeat > heartbeat_settings()[1]
