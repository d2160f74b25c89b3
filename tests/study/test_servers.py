"""The test servers themselves: a real PostgreSQL cluster and a real `mlflow server` on it."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import TESTS

if TYPE_CHECKING:
    from servers import MlflowServer, PostgresCluster

# The fixtures `postgres` and `mlflow_server_on_postgres` (a tests/conftest.py can do the same).
# `servers` itself is imported inside the tests, after pytest has loaded it as a plugin.
pytestmark = pytest.mark.slow


def test_postgres_asks_for_the_password(postgres: PostgresCluster):
    import psycopg

    with psycopg.connect(postgres.url("optuna", driver=None)) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "fractal", "optuna")
    wrong = postgres.url("optuna", driver=None).replace(postgres.password, "wrong-pw")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong)


@pytest.mark.parametrize("driver", ["psycopg", None], ids=["postgresql+psycopg", "postgresql"])
def test_optuna_study_on_postgres(postgres: PostgresCluster, driver: str | None):
    import optuna

    storage, name = postgres.url("optuna", driver=driver), f"servers-selftest-{driver}"
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    trial = study.ask()
    trial.suggest_categorical("columns", [2, 3])
    trial.set_user_attr("mlflow_run_id", "abc")
    study.tell(trial, 0.5)

    # A second client (another worker) sees the told trial through the database.
    loaded = optuna.load_study(storage=storage, study_name=name)
    (done,) = loaded.get_trials(deepcopy=False)
    assert done.state == optuna.trial.TrialState.COMPLETE
    assert done.value == 0.5 and done.user_attrs == {"mlflow_run_id": "abc"}


def test_mlflow_server_round_trip(postgres: PostgresCluster, tmp_path: Path):
    from mlflow import MlflowClient
    from servers import mlflow_server

    artifacts = tmp_path / "mlartifacts"
    with mlflow_server(postgres.mlflow_url, artifacts) as uri:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.create_experiment("servers-selftest")
        run = client.create_run(experiment_id)
        client.log_param(run.info.run_id, "columns", "3")
        client.log_metric(run.info.run_id, "val_acc", 0.75, step=1)
        note = tmp_path / "config.yaml"
        note.write_text("columns: 3\n")
        client.log_artifact(run.info.run_id, str(note))
        client.set_terminated(run.info.run_id)

        # The server proxies artifacts: the client only ever spoke HTTP to it.
        assert client.get_experiment(experiment_id).artifact_location.startswith(
            "mlflow-artifacts:")
        stored = list(artifacts.rglob("config.yaml"))
        assert [p.read_text() for p in stored] == ["columns: 3\n"]
        assert run.info.run_id in stored[0].parts

        fetched = client.get_run(run.info.run_id)
        assert fetched.data.params == {"columns": "3"}
        assert fetched.data.metrics == {"val_acc": 0.75}
        assert fetched.info.status == "FINISHED"
        downloaded = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
        assert Path(downloaded).read_text() == "columns: 3\n"

    # Stopped on exit: nothing answers on the port any more.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{uri}/health", timeout=2)


def test_mlflow_server_checks_the_host_header(mlflow_server_on_postgres: MlflowServer):
    """MLflow 3 answers 403 to Host headers it was not told about, except on /health.

    Its defaults are localhost and private IPs; a compose service name such as `mlflow:5000`
    must be passed with --allowed-hosts (the fixture's server does), else a worker reaching
    http://mlflow:5000 is refused while the /health check of the container still passes.
    """
    uri = mlflow_server_on_postgres.uri

    def status(path: str, host: str | None = None) -> int:
        headers = {"Host": host} if host else {}
        request = urllib.request.Request(f"{uri}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(api) == 200
    assert status(api, host="mlflow:5000") == 200
    assert status(api, host="mlflow.example.org:5000") == 403
    assert status("/health", host="mlflow.example.org:5000") == 200


def test_mlflow_server_failure_shows_its_log(tmp_path: Path):
    from servers import ServerStartError, mlflow_server

    with pytest.raises(ServerStartError, match="(?s)mlflow server exited.*--no-such-flag"):
        with mlflow_server("sqlite://", tmp_path / "art", extra_args=["--no-such-flag"]):
            pass


def test_cluster_is_stopped_and_removed_on_exit():
    import psycopg
    from servers import postgres_cluster, require_postgres

    require_postgres()
    with postgres_cluster(databases=("only",)) as cluster:
        url = cluster.url("only", driver=None)
        psycopg.connect(url).close()
    assert not cluster.data_dir.parent.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)


OUTCOMES = (pytest.fail.Exception, pytest.skip.Exception)


@pytest.mark.parametrize("ci", ["true", "TRUE", "1", "", "false", None])
def test_a_missing_tool_skips_the_test_except_in_ci(ci, monkeypatch):
    from servers import missing_tool

    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci in ("true", "TRUE", "1") else pytest.skip.Exception
    with pytest.raises(OUTCOMES) as raised:  # both, so a wrong skip cannot skip this test
        missing_tool("initdb not found")
    assert raised.type is outcome and "initdb not found" in str(raised.value)


# A pytest run in which PostgreSQL's binaries cannot be found (neither on PATH nor under
# /usr/lib/postgresql: the conftest hides both), with the two fixtures that need them.
HIDDEN_POSTGRES_CONFTEST = """
import glob
import shutil

pytest_plugins = ["servers"]
shutil.which = lambda name: None
glob.glob = lambda pattern: []
"""
HIDDEN_POSTGRES_TESTS = """
def test_cluster(postgres):
    pass

def test_server(mlflow_server_on_postgres):
    pass
"""


@pytest.mark.parametrize("ci", ["true", "false"])
def test_postgres_fixtures_fail_in_ci_where_postgresql_is_not_installed(ci, tmp_path):
    (tmp_path / "conftest.py").write_text(HIDDEN_POSTGRES_CONFTEST)
    (tmp_path / "test_needs_postgres.py").write_text(HIDDEN_POSTGRES_TESTS)
    tests_dir = str(TESTS)
    pythonpath = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "CI": ci, "PYTHONPATH": pythonpath},
        capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert "'initdb' not found" in output, output
    if ci == "true":
        assert result.returncode == 1 and "2 errors" in output, output
    else:
        assert result.returncode == 0 and "2 skipped" in output, output
