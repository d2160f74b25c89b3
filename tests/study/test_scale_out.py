"""Several workers, several "machines": a real PostgreSQL cluster holds the Optuna study, a real
`mlflow server` (PostgreSQL backend, proxied artifacts) holds the runs. Credentials stay out of
every record."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
from helpers import LONG_TRIAL, StudyDir, kill_mid_trial_then_resume, write_config
from servers import PG_PASSWORD

TINY_SPACE = {"blocks": [1], "columns": [1, 2], "width": [8],
              "unit": ["conv-norm-act", "conv-act-norm", "norm-act-conv"]}


@pytest.mark.slow
def test_three_workers_with_separate_environments_share_one_study(
        tmp_path, postgres, mlflow_server_on_postgres):
    import mlflow
    import numpy as np
    import optuna

    server = mlflow_server_on_postgres
    storage = postgres.url("optuna", driver=None)  # plain postgresql://user:password@host/db
    config = write_config(tmp_path / "grid.yaml", study_name="three-workers", space=TINY_SPACE,
                          training={"epochs": 1})
    workers = []
    for index in range(3):
        home = tmp_path / f"machine-{index}"  # own working dir, cache and environment
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FRACTAL_"))}
        env.update(FRACTAL_STORAGE=storage, MLFLOW_TRACKING_URI=server.uri,
                   FRACTAL_MLOPS_CACHE=str(home / "cache"), FRACTAL_THREADS="1", HOME=str(home))
        workers.append(subprocess.Popen(  # 2 points each: the split does not hang on scheduling
            [sys.executable, "-m", "fractal_mlops.study", "--config", str(config), "--n-trials", "2"],
            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=900) for w in workers]
    for index, (worker, (out, err)) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 0, err
        assert PG_PASSWORD not in out + err
        assert not (tmp_path / f"machine-{index}" / "mlruns").exists()  # all records are remote

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name="three-workers",
                               storage=postgres.optuna_url).get_trials()
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    points = collections.Counter(t.params["variant"] for t in trials)
    record = [(t.number, t.params["variant"], t.state.name, t.user_attrs.get("reason"),
               t.user_attrs.get("worker")) for t in trials]
    assert len(points) == 6 and set(points.values()) == {1}, record  # every point exactly once
    per_worker = collections.Counter(t.user_attrs["worker"] for t in trials)
    assert sorted(per_worker.values()) == [2, 2, 2], per_worker  # the grid was split three ways

    client = mlflow.MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("three-workers")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trial_runs = [r for r in runs if r.data.tags["fractal.role"] == "trial"]
    assert len(trial_runs) == 6 and "RUNNING" not in {r.info.status for r in runs}
    assert len([r for r in runs if r.data.tags["fractal.role"] == "study"]) == 1
    for run in runs:
        recorded = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(PG_PASSWORD in value for value in recorded)
    assert any("://fractal:***@127.0.0.1" in r.data.params.get("storage", "") for r in runs)

    mlflow.set_tracking_uri(server.uri)
    for run in trial_runs:
        if run.data.tags["fractal.state"] != "COMPLETE":
            continue
        model = mlflow.pyfunc.load_model(run.data.tags["fractal.model_uri"])
        assert model.predict(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)
    assert any(server.artifacts_dir.rglob("MLmodel"))  # the server stored the uploads


@pytest.mark.slow
def test_kill_9_with_postgres_and_a_tracking_server(tmp_path, postgres, mlflow_server_on_postgres):
    study = StudyDir(tmp_path, tracking_uri=mlflow_server_on_postgres.uri,
                     storage=postgres.optuna_url)
    config = write_config(tmp_path / "tiny.yaml", study_name="kill-9-postgres", **LONG_TRIAL)
    kill_mid_trial_then_resume(study, config, *study.args())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["PGPASSWORD", ".pgpass"])
def test_the_password_reaches_every_worker_through_libpq_never_a_command_line(
        tmp_path, postgres, how):
    """`--storage` without a password, `--workers 2`: the workers connect with the password
    from PGPASSWORD or ~/.pgpass, and it appears in no output and no MLflow record."""
    import mlflow

    name = f"libpq-{how.strip('.').lower()}"
    storage = f"postgresql+psycopg://{postgres.user}@{postgres.host}:{postgres.port}/optuna"
    home = tmp_path / "home"
    home.mkdir()
    study = StudyDir(tmp_path, storage=storage)
    env = {**study.env(), "HOME": str(home)}
    env.pop("PGPASSWORD", None)
    if how == "PGPASSWORD":
        env["PGPASSWORD"] = PG_PASSWORD
    else:
        pgpass = home / ".pgpass"
        pgpass.write_text(f"{postgres.host}:{postgres.port}:optuna:{postgres.user}:{PG_PASSWORD}\n")
        pgpass.chmod(0o600)
    config = write_config(tmp_path / "grid.yaml", study_name=name, space=TINY_SPACE,
                          training={"epochs": 1})
    proc = subprocess.run([sys.executable, "-m", "fractal_mlops.study", "--config", str(config),
                           *study.args("--workers", "2", "--n-trials", "2")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "[worker 1]" in proc.stdout and "[worker 2]" in proc.stdout
    assert PG_PASSWORD not in proc.stdout + proc.stderr
    client = mlflow.MlflowClient(study.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len([r for r in runs if r.data.tags["fractal.role"] == "trial"]) == 2
    for run in runs:
        assert not any(PG_PASSWORD in v for v in [*run.data.params.values(),
                                                   *run.data.tags.values()])
