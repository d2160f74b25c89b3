"""A tracking server that dies or hangs mid-study is noticed within MLflow's bounded retries:
the worker says what it waits for, then stops with one error line (exit 1). A real
`mlflow server`, killed or frozen (SIGSTOP) while a trial trains."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from helpers import StudyDir, finished_points, write_config
from servers import mlflow_server

from fractal_mlops.stores.outage import HTTP_BOUNDS


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
def test_a_postgresql_storage_that_goes_away_is_waited_for_then_the_rerun_recovers(tmp_path):
    from servers import postgres_cluster, require_postgres, start_cluster, stop_cluster

    require_postgres()
    config = write_config(tmp_path / "c.yaml", study_name="pg-outage",
                          space={"blocks": [2], "columns": [3], "width": [16],
                                 "unit": ["conv-norm-act"]}, training={"epochs": 30})
    with postgres_cluster() as cluster:
        study = StudyDir(tmp_path, storage=cluster.optuna_url)
        proc = study.popen("--config", str(config), *study.args())
        run_id = study.wait_for_running_trial(proc)
        stop_cluster(cluster)
        out, err = proc.communicate(timeout=240)

        assert proc.returncode == 1, err
        assert "Traceback" not in err and cluster.password not in err
        waits = [line for line in err.splitlines() if "waiting for the Optuna storage" in line]
        assert waits, err
        assert f"{cluster.host}:{cluster.port}/optuna" in waits[0], waits[0]
        # libpq's words depend on when the connect lands: refused, or closed mid-shutdown
        reasons = ("(connection refused)", "(connection closed)", "(server starting or stopping)")
        assert any(r in waits[0] for r in reasons) and "within about 30 s" in waits[0], waits[0]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "run the same command again" in errors[0], err
        assert "the Optuna storage could not record trial 0" in errors[0], errors[0]
        # MLflow still answers: the worker closed the trial's run itself, saying why
        run = study.client().get_run(run_id)
        assert run.info.status == "KILLED", run.info
        assert run.data.tags["fractal.reason"] == "Optuna storage unavailable", run.data.tags

        start_cluster(cluster)  # the database is back: the same command picks the study up
        rerun = study.run("--config", str(config), *study.args())
        assert rerun.returncode == 0, rerun.stderr
        assert cluster.password not in rerun.stdout + rerun.stderr
        trials = study.optuna_trials("pg-outage")
        points = finished_points(trials)
        assert len(points) == 1 and set(points.values()) == {1}, points  # trained once, not twice
        assert not [t for t in trials if t.state.name == "RUNNING"]
        assert [t.user_attrs.get("reason") for t in trials if t.state.name == "FAIL"] == [
            "worker lost"]  # the Optuna trial the outage left RUNNING, recovered by the rerun
        continued = study.client().get_run(run_id)  # and its run carried on by the next trial
        assert continued.info.status == "FINISHED", continued.data.tags
        assert continued.data.tags["fractal.state"] == "COMPLETE"
        assert not study.running_trial_runs()
