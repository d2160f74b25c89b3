"""The stores' libraries (MLflow, Optuna, SQLAlchemy, alembic) log to a file, not the console.

When a store fails (a full disk, a database that went away) MLflow logs every retry with its
traceback: 175 lines on stderr for one full disk. The command already says what happened in
one line (cli.run_command), so the libraries' own records go to a log file, kept for whoever
wants the detail:

    $FRACTAL_LOG_FILE, else <temp dir>/fractal-mlops-<user>.log

A record that cannot be written (that disk is full too, the folder is read-only) is dropped
without a word: the log is detail, never a reason to fail.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
from pathlib import Path

LIBRARY_LOGGERS = ("mlflow", "alembic", "sqlalchemy", "optuna")


def log_file() -> Path:
    configured = os.environ.get("FRACTAL_LOG_FILE")
    if configured:
        return Path(configured).expanduser()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a name
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"fractal-mlops-{user}.log"


class _QuietFileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass  # a full disk or a read-only folder: the record is dropped


_HANDLER: list[logging.Handler] = []


def handler() -> logging.Handler:
    """One file handler per process, opened on the first record."""
    if not _HANDLER:
        file_handler = _QuietFileHandler(log_file(), delay=True, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
        _HANDLER.append(file_handler)
    return _HANDLER[0]


def route_library_logs(*names: str) -> None:
    """The named loggers (default: all of LIBRARY_LOGGERS) write to the log file only. Call it
    after the library is imported: MLflow and Optuna install their console handlers then."""
    for name in names or LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h is not handler()]:
            logger.removeHandler(old)
        if handler() not in logger.handlers:
            logger.addHandler(handler())
        logger.propagate = False
