"""Outages are noticed in about 30 seconds, with a line that says what the worker waits for.

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits up to
120 s for each answer: a dead tracking server went unnoticed for minutes. Unless the user set
them, the bounds here are 2 retries, backoff factor 1 and 10 s per request: a refused
connection is given up in a few seconds, a server that hangs in about 30 s. Each retry prints
one line. A PostgreSQL storage gets TCP keepalives, so a server that vanishes without closing
the connection is noticed in about 25 s rather than at the kernel's default (hours).
"""

from __future__ import annotations

import logging
import os
import sys

HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
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
        from .urls import redact

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
        prefix = os.environ.get("FRACTAL_WORKER_INDEX")
        prefix = f"[worker {prefix}] " if prefix else ""
        print(f"{prefix}warning: waiting for the MLflow tracking server at {redact(self.uri)} "
              f"({reason}); the worker stops if it does not answer within about "
              f"{longest_wait_seconds():.0f} s", file=sys.stderr, flush=True)
