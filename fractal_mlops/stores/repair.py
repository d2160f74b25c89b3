"""Damaged stores: checked before a command writes anything, repaired where that is safe.

- An Optuna journal is one JSON record per line, appended under a lock. A worker killed
  mid-write (or a full disk) leaves a cut-off last record; Optuna would then append the next
  record right after it and every later read dies on the joined line. Such records (and
  garbage appended to the file) are set aside in `<journal>.damaged-<time>`, with one line on
  stderr; every whole record is kept. A file with no readable record at all is not a journal:
  the command stops (exit 2) and says so.
- A SQLite store (mlflow.db, an Optuna sqlite:/// storage) that is truncated or is not a
  database, or a store file that cannot be written, stops the command with one line that names
  the file and what to do.
- A study whose config changed after its first attempt trained nothing starts afresh under the
  same name.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fractal_mlops.errors import ConfigError
from fractal_mlops.stores import optuna_trials

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import optuna


@dataclass
class JournalScan:
    good: list[bytes] = field(default_factory=list)  # whole records, in order, each with "\n"
    bad: list[tuple[int, bytes]] = field(default_factory=list)  # (byte offset, what was there)

    @property
    def damaged(self) -> bool:
        return bool(self.bad)


def _is_record(text: bytes) -> bool:
    try:
        record = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and "op_code" in record


def scan_journal(path: Path) -> JournalScan:
    """Split the journal into whole records and damage. A line that holds a cut-off record
    followed by a whole one (what Optuna's next append makes of a cut-off end) keeps the
    whole one."""
    scan = JournalScan()
    offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            whole = line.endswith(b"\n")
            if whole and _is_record(line):
                scan.good.append(line)
            else:
                start = line.rfind(b'{"op_code"')
                if whole and start > 0 and _is_record(line[start:]):
                    scan.bad.append((offset, line[:start]))
                    scan.good.append(line[start:])
                else:
                    scan.bad.append((offset, line))
            offset += len(line)
    return scan


def check_journal(path: Path) -> None:
    """Stop (ConfigError) when the journal cannot be used; reads only."""
    if not path.exists():
        return
    _check_writable(path, "Optuna journal", "--storage")
    try:
        scan = scan_journal(path)
    except OSError as exc:
        raise ConfigError(f"Optuna journal {path} cannot be read ({exc.strerror}): fix its "
                          "permissions or pass another --storage") from None
    if scan.damaged and not scan.good:
        raise ConfigError(f"{path} is not an Optuna journal (no readable record in it): move it "
                          "away, or pass another --storage")


def repair_journal(path: Path) -> None:
    """Set damaged records aside (under Optuna's own journal lock) and say so on stderr."""
    if not path.exists() or path.stat().st_size == 0:
        return
    if not scan_journal(path).damaged:  # the common case: no lock, no rewrite
        return
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        scan = scan_journal(path)
        if not scan.damaged:
            return
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        with open(aside, "ab") as handle:
            for offset, text in scan.bad:
                handle.write(f"# byte {offset} of {path.name}\n".encode() + text + b"\n")
        partial = path.with_name(f"{path.name}.repair-{os.getpid()}")
        with open(partial, "wb") as handle:
            handle.writelines(scan.good)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(partial, path.stat().st_mode & 0o777)
        partial.replace(path)
    finally:
        lock.release()
    size = sum(len(text) for _, text in scan.bad)
    log.warning("%s: set aside %d damaged record(s) (%d bytes, a write cut off or garbage "
                "appended) in %s; all %d whole records are kept", path, len(scan.bad), size,
                aside, len(scan.good))


# Tables that say whose a SQLite file is: a store is refused in a file that lacks its own, or
# holds the other store's (MLflow's and Optuna's tables in one file clash: both keep an
# alembic_version table, each for its own migrations).
STORE_TABLES = {"mlflow": {"experiments", "runs"}, "optuna": {"studies", "trials", "version_info"}}
STORE_TITLES = {"mlflow": "an MLflow tracking store", "optuna": "an Optuna storage"}


def check_sqlite_file(path: Path, what: str, flag: str, kind: str) -> None:
    """A SQLite store that exists must be a whole, writable database of the `kind` of store
    asked for ("mlflow" or "optuna"), or an empty one. Reads only."""
    if not path.exists():
        return
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file: pass another {flag}")
    _check_writable(path, what, flag)
    if path.stat().st_size == 0:
        return  # SQLite makes an empty file a new database
    tables: set[str] = set()
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            result = conn.execute("PRAGMA quick_check(1)").fetchone()
            if result is not None and result[0] == "ok":
                tables = {row[0] for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        result = (str(exc),)
    if result is None or result[0] != "ok":
        problem = result[0] if result else "unreadable"
        raise ConfigError(f"{what} {path} is damaged ({problem}): restore it from a backup, or "
                          f"move it away and pass another {flag} (`sqlite3 {path} .recover` "
                          "may rescue its records)")
    _check_store_kind(path, tables, kind, what, flag)


def _check_store_kind(path: Path, tables: set[str], kind: str, what: str, flag: str) -> None:
    """Nothing is written into another application's database, nor into the other store."""
    if not tables:
        return  # a new database
    other = "optuna" if kind == "mlflow" else "mlflow"
    if STORE_TABLES[other] <= tables:
        raise ConfigError(f"{what} {path} is {STORE_TITLES[other]}, not {STORE_TITLES[kind]}: "
                          f"pass another {flag} (the two stores need separate files)")
    if not STORE_TABLES[kind] <= tables:
        shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
        raise ConfigError(f"{what} {path} is another application's database (tables {shown}), "
                          f"not {STORE_TITLES[kind]}: pass another {flag}")


def _check_writable(path: Path, what: str, flag: str) -> None:
    if not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{what} {path} is not writable by this user: fix its permissions "
                          f"(chmod u+rw) or pass another {flag}")


# -- a study restarted after a config that trained nothing -------------------------------------

def trained_nothing(study: optuna.Study) -> bool:
    """No trial finished with a value or reported an epoch, and none is running."""
    from optuna.trial import TrialState

    return all(t.state == TrialState.FAIL and not t.intermediate_values
               for t in study.get_trials(deepcopy=False))


def restart_study(study: optuna.Study, reopen: Callable[[], optuna.Study]) -> optuna.Study:
    """Delete the Optuna study (its trials all failed before training) and create it anew.
    Their MLflow runs stay, FAILED, with the config they failed under."""
    import optuna

    name = study.study_name
    optuna.delete_study(study_name=name, storage=optuna_trials.storage(study))
    log.info("study %r: its earlier attempt under another config trained nothing; starting it "
             "afresh with this config", name)
    return reopen()
