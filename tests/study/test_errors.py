"""Errors classified by type, MLflow error code and HTTP status first, text as a fallback:
real exceptions from a real SQLite database, a closed port, and an HTTP server answering
what a failing MLflow server answers; a server's 5xx is exit 1, not bad input."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import StudyDir, write_config
from servers import free_port

from fractal_mlops.errors import CONFLICT, FAULT, OUTAGE, REFUSED, classify, exit_code_for


@pytest.fixture
def answering():
    """An HTTP server on 127.0.0.1 that answers /health with 200 and anything else with the
    (status, body) set in `answers["api"]`."""
    answers = {"api": (500, {"error_code": "INTERNAL_ERROR", "message": "boom"})}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, body = (200, "OK") if self.path == "/health" else answers["api"]
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()


def mlflow_error(uri: str, monkeypatch) -> BaseException:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as info:
        MlflowClient(uri).get_experiment_by_name("x")
    return info.value


@pytest.mark.parametrize("status, body, kind", [
    (500, {"error_code": "INTERNAL_ERROR", "message": "boom"}, FAULT),
    (503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "later"}, OUTAGE),
    (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "no"}, REFUSED),
    (403, {"error_code": "PERMISSION_DENIED", "message": "no"}, REFUSED),
    (502, "<html>Bad Gateway</html>", OUTAGE),
])
def test_mlflow_answers_are_classified_by_code_and_status(answering, monkeypatch,
                                                          status, body, kind):
    uri, answers = answering
    answers["api"] = (status, body)
    exc = mlflow_error(uri, monkeypatch)
    assert classify(exc) == kind, repr(exc)
    assert exit_code_for(exc) == (2 if kind == REFUSED else 1)


def test_a_closed_port_is_an_outage_by_type(monkeypatch):
    exc = mlflow_error(f"http://127.0.0.1:{free_port()}", monkeypatch)
    assert classify(exc) == OUTAGE


def test_a_unique_key_taken_is_a_conflict_by_type(tmp_path):
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'u.db'}")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE t (k TEXT PRIMARY KEY)"))
        conn.execute(sqlalchemy.text("INSERT INTO t VALUES ('a')"))
    with pytest.raises(sqlalchemy.exc.IntegrityError) as info, engine.begin() as conn:
        conn.execute(sqlalchemy.text("INSERT INTO t VALUES ('a')"))
    assert classify(info.value) == CONFLICT
    with pytest.raises(sqlite3.IntegrityError) as raw:
        with sqlite3.connect(tmp_path / "u.db") as conn:
            conn.execute("INSERT INTO t VALUES ('a')")
    assert classify(raw.value) == CONFLICT


@pytest.mark.parametrize("message, kind", [  # the fallback texts, pinned
    ("API request to http://h/api/2.0/mlflow/runs/get failed with exception "
     "HTTPConnectionPool(host='h', port=5000): Max retries exceeded", OUTAGE),
    ("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 502 != 200",
     OUTAGE),
    ("(sqlite3.OperationalError) database is locked", OUTAGE),
    ("(psycopg.OperationalError) server closed the connection unexpectedly", OUTAGE),
    ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id", CONFLICT),
    ('duplicate key value violates unique constraint "dataset_pk"', CONFLICT),
])
def test_fallback_texts(message, kind):
    from mlflow.exceptions import MlflowException

    assert classify(MlflowException(message, error_code="INTERNAL_ERROR")) == kind
    assert classify(Exception(message)) == kind


@pytest.mark.parametrize("command", ["study", "promote"])
def test_a_server_5xx_is_exit_1_not_bad_input(answering, tmp_path, command):
    uri, answers = answering
    answers["api"] = (500, {"error_code": "INTERNAL_ERROR", "message": "boom"})
    study = StudyDir(tmp_path, tracking_uri=uri)
    argv = ["--config", str(write_config(tmp_path / "c.yaml")), *study.args("--n-trials", "1")] \
        if command == "study" else ["--tracking-uri", uri, "--experiment", "tiny"]
    proc = subprocess.run([sys.executable, "-m", f"fractal_mlops.{command}", *argv],
                          cwd=tmp_path, env=study.env(), capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "500" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"] if command == "study" else True


@pytest.mark.slow
def test_a_postgresql_unique_violation_is_a_conflict_by_type(postgres):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres.url("optuna"))
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS fractal_u (k TEXT PRIMARY KEY)"))
        conn.execute(sqlalchemy.text("DELETE FROM fractal_u"))
        conn.execute(sqlalchemy.text("INSERT INTO fractal_u VALUES ('a')"))
    with pytest.raises(sqlalchemy.exc.IntegrityError) as info, engine.begin() as conn:
        conn.execute(sqlalchemy.text("INSERT INTO fractal_u VALUES ('a')"))
    assert type(info.value.orig).__name__ == "UniqueViolation"
    assert classify(info.value) == CONFLICT
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP TABLE fractal_u"))
    engine.dispose()
