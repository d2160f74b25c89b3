"""Credentials never leave the process, in any URL form the libraries accept; http(s) tracking
URIs with credentials work through MLflow's own variables (real PostgreSQL, real mlflow server
with its basic-auth app)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import StudyDir, write_config
from servers import mlflow_server

from fractal_mlops.stores.credentials import move_http_credentials, redact

SECRET = "Zq9-s3cr3t-Xy"


@pytest.mark.parametrize("text", [
    f"postgresql://user:{SECRET}@db:5432/optuna",
    f"postgresql+psycopg://user:{SECRET}@db/optuna",
    f"postgresql://user@db/optuna?password={SECRET}",
    f"postgresql://user@db/optuna?sslmode=require&sslpassword={SECRET}",
    f"postgresql://user@db/optuna?PassWord={SECRET}&application_name=x",
    f"https://{SECRET}@mlflow.example.com",
    f"http://admin:{SECRET}@127.0.0.1:5000/",
    f"https://host/api?token={SECRET}",
    f"https://host/api?access_token={SECRET}#frag",
    f"s3://bucket/key?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}",
    f"mysql://u:{SECRET}@h/db",
    f"postgresql://user:p@{SECRET}@db/optuna",  # an unescaped @ in the password
    f"postgresql://user:{SECRET}/x@db/optuna",  # an unescaped / in the password
    f"cannot connect to 'postgresql://u:{SECRET}@h/db': refused",
    f"host=db user=u password={SECRET} dbname=optuna",
    f"host=db password='{SECRET}'",
    f"host=db sslmode=verify-full sslpassword={SECRET} dbname=optuna",  # libpq key/value
    f"https://acct.blob.core.windows.net/c/model.pt?sv=2024&sig={SECRET}&se=2030",  # a SAS URL
    f"mysql://u:{SECRET}@h/db (and again postgresql://u@h/db?password={SECRET})",
])
def test_every_form_of_credential_is_hidden(text):
    shown = redact(text)
    assert SECRET not in shown
    assert "***" in shown


def test_redaction_keeps_what_is_not_secret():
    assert redact("sqlite:///mlruns/mlflow.db") == "sqlite:///mlruns/mlflow.db"
    assert redact("postgresql://user@db:5432/optuna?sslmode=require") == \
        "postgresql://user@db:5432/optuna?sslmode=require"
    assert redact("postgresql://user:pw@db:5432/optuna") == "postgresql://user:***@db:5432/optuna"
    assert redact("http://127.0.0.1:5000/#/experiments/1") == "http://127.0.0.1:5000/#/experiments/1"


def test_secret_environment_values_are_hidden(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", SECRET)
    assert SECRET not in redact(f"connection failed for user u (password {SECRET})")


def test_http_credentials_move_to_mlflow_variables(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert move_http_credentials("http://me:p%40ss@host:5000") == "http://host:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "me"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    assert move_http_credentials(f"https://{SECRET}@host") == "https://host"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == SECRET
    assert move_http_credentials("postgresql://u:p@h/db") == "postgresql://u:p@h/db"


def _strings_in(db: Path) -> str:
    """Every text value of the MLflow SQLite store (params, tags, run names, ...)."""
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = []
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                out.extend(str(v) for v in row if isinstance(v, (str, bytes)))
    return "\n".join(out)


@pytest.mark.slow
def test_password_as_query_parameter_reaches_no_param_tag_or_output(postgres, tmp_path):
    url = (f"postgresql+psycopg://{postgres.user}@{postgres.host}:{postgres.port}/optuna"
           f"?password={postgres.password}&application_name=fractal")
    study = StudyDir(tmp_path, storage=url)
    config = write_config(tmp_path / "c.yaml", study_name="cred-query")
    proc = study.run("--config", str(config), *study.args("--n-trials", "1"))
    assert proc.returncode == 0, proc.stderr
    assert postgres.password not in proc.stdout + proc.stderr
    stored = _strings_in(tmp_path / "mlflow.db")
    assert "password=***" in stored  # the storage param is there, redacted
    assert postgres.password not in stored


@pytest.mark.slow
def test_http_tracking_uri_with_user_and_password_works_and_is_never_shown(tmp_path, monkeypatch):
    admin_password = "Adm1n-" + SECRET
    ini = tmp_path / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/auth.db"
                   "\nadmin_username = admin\nauthorization_function = "
                   "mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 600\n")  # hash each password once
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", admin_password)
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "test-only-csrf-key")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    backend = f"sqlite:///{tmp_path}/server.db"
    with mlflow_server(backend, tmp_path / "artifacts",
                       extra_args=["--app-name", "basic-auth"], timeout=240) as uri:
        monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD")
        host = uri.removeprefix("http://")
        study = StudyDir(tmp_path, tracking_uri=f"http://admin:{admin_password}@{host}")
        config = write_config(tmp_path / "c.yaml", study_name="cred-http")

        wrong = StudyDir(tmp_path / "w", tracking_uri=f"http://admin:wrong@{host}")
        (tmp_path / "w").mkdir()
        refused = wrong.run("--config", str(config), *wrong.args("--n-trials", "1"))
        assert refused.returncode == 2
        assert "refused the credentials (HTTP 401)" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

        proc = study.run("--config", str(config), *study.args("--n-trials", "1"))
        assert proc.returncode == 0, proc.stderr
        assert admin_password not in proc.stdout + proc.stderr
        assert f"\n  {uri}/#/experiments/" in proc.stdout  # the UI URL, without credentials

        from mlflow import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("cred-http").experiment_id])
        assert {r.data.tags["fractal.role"] for r in runs} == {"study", "trial"}
        assert admin_password not in _strings_in(tmp_path / "server.db")


def test_unexpected_crash_traceback_is_redacted(tmp_path):
    code = ("from fractal_mlops.stores.credentials import install_redaction; install_redaction(); "
            f"raise RuntimeError('cannot open postgresql://u:{SECRET}@h/db')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and "RuntimeError" in proc.stderr
    assert SECRET not in proc.stderr
