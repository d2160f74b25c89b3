"""Outages are noticed in about 30 seconds, with a line that says what the worker waits for.

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits up to
120 s for each answer: a dead tracking server went unnoticed for minutes. Unless the user set
them, the bounds here are 2 retries, backoff factor 1 and 10 s per request: a refused
connection is given up in a few seconds, a server that hangs in about 30 s. Each retry prints
one line. A PostgreSQL storage gets TCP keepalives, so a server that vanishes without closing
the connection is noticed in about 25 s rather than at the kernel's default (hours), and a
new connection to a storage that cannot be reached is retried for about 30 s, one line per
try, before the error goes up (the worker then stops with one line; the rerun recovers).
"""

from __future__ import annotations

import logging
import os
import time

from fractal_mlops.stores.credentials import redact

log = logging.getLogger(__name__)

HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
STORAGE_WAIT_SECONDS, STORAGE_RETRY_SECONDS = 30.0, 5.0
# libpq's words for a server it cannot reach (not for one that refuses the login)
_UNREACHABLE = {"Connection refused": "connection refused", "timeout expired": "no answer in time",
                "the database system is": "server starting or stopping",
                "server closed the connection": "connection closed",
                "No route to host": "no route to host", "Connection reset": "connection reset"}
# libpq: first connection attempt, then keepalive probes after 10 s idle, 3 probes 5 s apart
POSTGRES_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                         "keepalives_interval": 5, "keepalives_count": 3}


def bound_http_retries(tracking_uri: str) -> None:
    """Set MLflow's retry bounds (variables the user set win) and announce each retry."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(h, _RetryNotice) for h in logger.handlers):
        logger.addHandler(_RetryNotice(tracking_uri))
        logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))


def longest_wait_seconds() -> float:
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    return (retries + 1) * timeout + sum(factor * 2 ** (n - 1) for n in range(2, retries + 1))


class _RetryNotice(logging.Handler):
    """urllib3's "Retrying (...) after connection broken by ..." -> one line for a person."""

    def __init__(self, uri: str) -> None:
        super().__init__(logging.WARNING)
        self.uri = uri

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith("Retrying"):
            return
        reason = "no answer"
        for kind in ("ConnectionRefused", "ReadTimeout", "ConnectTimeout", "NameResolution",
                     "RemoteDisconnected", "ProtocolError"):
            if kind in message:
                reason = {"ConnectionRefused": "connection refused",
                          "ReadTimeout": "no answer in time", "ConnectTimeout": "no answer in time",
                          "NameResolution": "name not found",
                          "RemoteDisconnected": "connection closed",
                          "ProtocolError": "connection broken"}[kind]
                break
        _announce(f"the MLflow tracking server at {redact(self.uri)}", reason,
                  longest_wait_seconds())


def wait_for_storage(engine, url: str) -> None:
    """A new connection to an Optuna storage that cannot be reached is retried for about
    STORAGE_WAIT_SECONDS, saying so each time; a refused login or a bad URL is not retried."""
    from sqlalchemy import event

    @event.listens_for(engine, "do_connect")
    def _connect(dialect, record, cargs, cparams):
        deadline = time.monotonic() + STORAGE_WAIT_SECONDS
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except Exception as exc:  # noqa: BLE001 - the driver's own error type
                reason = next((words for text, words in _UNREACHABLE.items()
                               if text.lower() in str(exc).lower()), None)
                if reason is None or time.monotonic() + STORAGE_RETRY_SECONDS > deadline:
                    raise
                _announce(f"the Optuna storage at {redact(url)}", reason, STORAGE_WAIT_SECONDS)
                time.sleep(STORAGE_RETRY_SECONDS)


def _announce(what: str, reason: str, within: float) -> None:
    log.warning("waiting for %s (%s); the worker stops if it does not answer within about "
                "%.0f s", what, reason, within)
