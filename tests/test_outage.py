"""A tracking server that dies or hangs mid-study is noticed within MLflow's bounded retries:
the worker says what it waits for, then stops with one error line (exit 1). A real
`mlflow server`, killed or frozen (SIGSTOP) while a trial trains."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from conftest import StudyDir, write_config
from servers import mlflow_server

from fractal_mlops.outage import HTTP_BOUNDS


def server_group(port: str) -> int:
    """The process group of the `mlflow server` listening on `port` (its own session)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"server" in argv and b"--port" in argv and port.encode() in argv:
                return os.getpgid(int(entry.name))
    raise AssertionError(f"no mlflow server on port {port}")


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_an_outage_is_announced_and_stops_the_worker(tmp_path, monkeypatch, outage):
    for name in HTTP_BOUNDS:  # the shipped bounds, not a test's
        monkeypatch.delenv(name, raising=False)
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts"
    config = write_config(tmp_path / "c.yaml", study_name="outage",
                          space={"blocks": [2], "columns": [3], "width": [16],
                                 "unit": ["conv-norm-act", "conv-act-norm"]},
                          training={"epochs": 30})
    with mlflow_server(backend, artifacts, timeout=240) as uri:
        study = StudyDir(tmp_path, tracking_uri=uri)
        proc = study.popen("--config", str(config), *study.args())
        study.wait_for_running_trial(proc)
        if outage == "frozen":
            group = server_group(uri.rsplit(":", 1)[1])
            os.killpg(group, signal.SIGSTOP)
            try:
                out, err = proc.communicate(timeout=240)
            finally:
                os.killpg(group, signal.SIGCONT)
    if outage == "killed":
        out, err = proc.communicate(timeout=240)

    assert proc.returncode == 1, err
    assert "Traceback" not in err
    waits = [line for line in err.splitlines() if "waiting for the MLflow tracking server" in line]
    assert waits and uri in waits[0] and "within about" in waits[0], err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tracking store is back" in errors[0], err
    trials = study.optuna_trials("outage")
    assert [t.user_attrs.get("reason") for t in trials] == ["tracking store unavailable"]


@pytest.mark.slow
def test_a_postgresql_storage_that_goes_away_stops_the_worker_with_one_line(tmp_path):
    from servers import _run_as, _stop_cluster, find_pg_binary, postgres_cluster

    config = write_config(tmp_path / "c.yaml", study_name="pg-outage",
                          space={"blocks": [2], "columns": [3], "width": [16],
                                 "unit": ["conv-norm-act"]}, training={"epochs": 30})
    try:
        cluster_context = postgres_cluster()
        cluster = cluster_context.__enter__()
    except Exception as exc:  # noqa: BLE001 - PostgreSQL not installed here
        pytest.skip(str(exc))
    try:
        study = StudyDir(tmp_path, storage=cluster.optuna_url)
        proc = study.popen("--config", str(config), *study.args())
        study.wait_for_running_trial(proc)
        _stop_cluster(find_pg_binary("pg_ctl"), cluster.data_dir, _run_as())
        out, err = proc.communicate(timeout=240)
    finally:
        cluster_context.__exit__(None, None, None)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run the same command again" in errors[0], err
    assert cluster.password not in err
