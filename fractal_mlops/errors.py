"""What kind of failure an exception is: classified by its type, MLflow error code and HTTP
status first, by its message only as a fallback (kept for drivers that wrap everything).

- outage:   the store cannot be reached (connection refused/reset, timeout, 502/503/504,
            a database that went away) or its disk is full: a worker stops, the rerun resumes;
- conflict: a unique key taken by a concurrent writer: try again;
- fault:    the server failed (another 5xx): exit 1;
- refused:  the request itself was refused (4xx, invalid parameter, not found): exit 2.
"""

from __future__ import annotations

import errno
import re
import signal
from collections.abc import Iterator

OUTAGE, CONFLICT, FAULT, REFUSED = "outage", "conflict", "fault", "refused"
# The exit codes every command shares (cli.py); 128 + N after a stop signal N.
EXIT_OK, EXIT_FAULT, EXIT_BAD_INPUT = 0, 1, 2
OUTAGE_STATUS = {502, 503, 504}
OUTAGE_CODES = {"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED"}
CONFLICT_CODES = {"RESOURCE_ALREADY_EXISTS"}

# Fallback texts, each pinned by a test: MLflow's REST client, SQLite, PostgreSQL.
_OUTAGE_TEXT = re.compile(r"API request to .* failed with exception|failed with error code 5\d\d"
                          r"|OperationalError|database is locked|server closed the connection"
                          r"|Connection refused|could not connect to server")
_RETRIED_STATUS = re.compile(r"too many (\d{3}) error responses")
_CONFLICT_TEXT = re.compile(r"UNIQUE constraint failed|duplicate key value")
# A full disk (or quota), as the OS says it and as SQLite / PostgreSQL wrap it.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_TEXT = re.compile(r"database or disk is full|No space left on device|could not extend file"
                        r"|Disk quota exceeded")


class ConfigError(ValueError):
    """Bad user input: reported as one line on stderr with exit code 2."""


class ServerFault(Exception):
    """A server answered with an error of its own (5xx): exit 1, not bad input."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and every cause / context behind it (MLflow wraps driver errors)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        stack.extend([item.__cause__, item.__context__])


def http_status(exc: BaseException) -> int | None:
    """The status the server answered: from a response, from urllib3 giving up on retrying a
    status, else from MLflow's error code."""
    for item in chain(exc):
        status = getattr(getattr(item, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        if type(item).__name__ in ("MaxRetryError", "RetryError"):
            retried = _retried_in_text(f"{getattr(item, 'reason', '')} {item}")
            if retried is not None:
                return retried
    return _retried_in_text(str(exc))  # MLflow re-raises it as text only


def code_status(exc: BaseException) -> int | None:
    """The HTTP status MLflow maps its error code to (INTERNAL_ERROR, the default, is 500)."""
    for item in chain(exc):
        if hasattr(item, "get_http_status_code") and getattr(item, "error_code", None):
            try:
                return int(item.get_http_status_code())
            except (TypeError, ValueError):
                continue
    return None


def classify(exc: BaseException) -> str | None:
    import requests
    import sqlalchemy.exc

    if disk_full(exc):  # like an outage: the worker stops, the point stays pending
        return OUTAGE
    for item in chain(exc):
        if isinstance(item, ServerFault):
            return FAULT
        if isinstance(item, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                             ConnectionError, TimeoutError)):
            return OUTAGE
        if isinstance(item, sqlalchemy.exc.IntegrityError):
            return CONFLICT if _CONFLICT_TEXT.search(str(item)) or _unique_type(item) else None
        if isinstance(item, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return OUTAGE
        if _unique_type(item):
            return CONFLICT
        code = getattr(item, "error_code", None)
        if code in OUTAGE_CODES:
            return OUTAGE
        if code in CONFLICT_CODES:
            return CONFLICT
    status = http_status(exc)
    if status is None:
        text = str(exc)  # a local store's driver error, wrapped without its type
        if _CONFLICT_TEXT.search(text):
            return CONFLICT
        if _OUTAGE_TEXT.search(text):
            return OUTAGE
        status = code_status(exc)
    if status in OUTAGE_STATUS:
        return OUTAGE
    if status is not None and status >= 500:
        return FAULT
    if status is not None and 400 <= status < 500:
        return REFUSED
    return None


def _retried_in_text(text: str) -> int | None:
    found = _RETRIED_STATUS.search(text)
    return int(found.group(1)) if found else None


def _unique_type(item: BaseException) -> bool:
    name = type(item).__name__
    return name == "UniqueViolation" or (name == "IntegrityError" and "UNIQUE" in str(item))


def disk_full(exc: BaseException) -> bool:
    """The disk (or the quota) of a store or of the artifacts is full."""
    return any((isinstance(item, OSError) and item.errno in _DISK_ERRNOS)
               or bool(_DISK_TEXT.search(str(item))) for item in chain(exc))


def is_outage(exc: BaseException) -> bool:
    return classify(exc) == OUTAGE


def is_unique_violation(exc: BaseException) -> bool:
    return classify(exc) == CONFLICT


def exit_code_for(exc: BaseException) -> int:
    """1 for a fault or an outage (try again later), 2 for a refused request."""
    return EXIT_FAULT if classify(exc) in (OUTAGE, FAULT) else EXIT_BAD_INPUT


class TrialStopped(Exception):
    """Training stopped early on purpose; the message is the reason (the trial is PRUNED)."""


class StopWorker(Exception):
    """A store went away or the GPU failed while a trial trained: the worker stops with one
    line (exit 1); its point stays pending."""


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; `signum` says which."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def os_error(exc: BaseException) -> OSError | None:
    """The operating system's error behind `exc` (a file that cannot be written, a full disk),
    or None."""
    return next((item for item in chain(exc) if isinstance(item, OSError)
                 and item.errno is not None), None)


def os_error_line(error: OSError) -> str:
    """`<what the OS said>: <file>`, as a user reads it."""
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """`Type: message` on one line, as a FAIL reason."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]
