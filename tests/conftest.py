"""Shared fixtures: small real studies on real stores (SQLite + Optuna journal) in tmp dirs."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["servers"]  # real PostgreSQL cluster and mlflow server fixtures


def write_config(path: Path, **sections) -> Path:
    """A small digits study; `sections` override parts (e.g. space={...}, training={...})."""
    config = {
        "study_name": "tiny",
        "data": {"name": "digits"},
        "space": {"blocks": [1], "columns": [1, 2], "width": [8],
                  "unit": ["conv-norm-act", "conv-act-norm"], "drop_path": ["local+global"]},
        "training": {"epochs": 2, "batch_size": 64, "lr": 0.1, "seed": 0},
        "pruning": {"warmup_epochs": 1, "chance_margin": 0.05},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


# A grid point that trains for several seconds (~0.05 s per epoch here): a test that signals or
# kills a worker once its trial has recorded an epoch lands in the middle of the training.
LONG_TRIAL = {"space": {"blocks": [1], "columns": [2], "width": [8],
                        "unit": ["conv-norm-act", "conv-act-norm"]},
              "training": {"epochs": 40}}


def load_optuna_study(storage: str, study_name: str):
    """The study as the CLI sees it (`storage`: anything --storage accepts)."""
    import optuna

    from fractal_mlops.storage import open_storage, resolve_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name,
                             storage=open_storage(resolve_storage(storage, None)))


class StudyDir:
    """A working directory with its own stores; runs the real CLI in subprocesses."""

    def __init__(self, root: Path, tracking_uri: str | None = None,
                 storage: str | None = None) -> None:
        self.root = root
        self.tracking_uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.storage = storage or f"journal:{root / 'optuna.journal'}"

    def args(self, *extra: str) -> list[str]:
        return ["--tracking-uri", self.tracking_uri, "--storage", self.storage, *extra]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "FRACTAL_STORAGE")}
        env["FRACTAL_MLOPS_CACHE"] = str(self.root / "cache")
        return env

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fractal_mlops.study", *argv],
                                cwd=self.root, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def run(self, *argv: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        proc = self.popen(*argv, **kwargs)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def runs(self, experiment: str, role: str = "trial"):
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], f"tags.`fractal.role` = '{role}'",
                                  max_results=1000)

    def running_trial_runs(self) -> list[str]:
        """RUNNING trial runs. Fails (never answers "none") when the store cannot be read."""
        return list(self.running_trial_epochs())

    def running_trial_epochs(self) -> dict[str, int]:
        """RUNNING trial runs and the number of epochs each has recorded (SQLite: read straight
        from the file, cheap enough to poll)."""
        if not self.tracking_uri.startswith("sqlite:///"):
            client = self.client()
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(
                experiments, "attributes.status = 'RUNNING' and tags.`fractal.role` = 'trial'")
            return {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_acc"))
                    for r in runs}
        db = Path(self.tracking_uri.split(":///", 1)[1])
        if not db.is_file():
            raise AssertionError(f"no MLflow store at {db}")
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            return dict(conn.execute(
                "SELECT r.run_uuid, (SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = r.run_uuid "
                "AND m.key = 'val_acc') FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE r.status = 'RUNNING' AND t.key = 'fractal.role' AND t.value = 'trial'"))

    def wait_for_running_trial(self, proc: subprocess.Popen, epochs: int = 1,
                               timeout: float = 300) -> str:
        """The run ID of a trial that is RUNNING and has recorded at least `epochs` epochs: an
        event in the store, so a signal sent now lands in the middle of training (with a
        config of tens of epochs), whatever the speed of the machine."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                running = self.running_trial_epochs()
            except (AssertionError, sqlite3.OperationalError):  # not created yet, or busy
                running = {}
            ready = [run_id for run_id, done in running.items() if done >= epochs]
            if ready:
                return ready[0]
            if proc.poll() is not None:
                raise AssertionError(f"study ended before a trial ran: {proc.stderr.read()}")
            time.sleep(0.1)
        raise AssertionError(f"no trial recorded {epochs} epoch(s) within {timeout:.0f} s")

    def optuna_study(self, study_name: str):
        return load_optuna_study(self.storage, study_name)

    def optuna_trials(self, study_name: str):
        return self.optuna_study(study_name).get_trials()


def finished_points(trials) -> collections.Counter:
    return collections.Counter(t.params["variant"] for t in trials if t.state.is_finished()
                               and t.user_attrs.get("reason") != "worker lost")


def kill_mid_trial_then_resume(study: StudyDir, config, *argv: str) -> None:
    study_name = yaml.safe_load(config.read_text())["study_name"]
    proc = study.popen("--config", str(config), *argv)
    run_id = study.wait_for_running_trial(proc, epochs=1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert study.client().get_run(run_id).info.status == "RUNNING"  # nobody closed it yet

    resumed = study.run("--config", str(config), *argv)
    assert resumed.returncode == 0, resumed.stderr

    lost_run = study.client().get_run(run_id)
    assert lost_run.info.status == "KILLED"
    assert lost_run.data.tags["fractal.state"] == "FAIL"
    assert lost_run.data.tags["fractal.reason"] == "worker lost"
    trials = study.optuna_trials(study_name)
    # by the run's trial-number tag: the kill may land before the trial recorded its run ID
    lost = [t for t in trials if t.number == int(lost_run.data.tags["optuna.trial_number"])]
    assert len(lost) == 1 and lost[0].state.name == "FAIL"
    assert lost[0].user_attrs["reason"] == "worker lost"
    points = finished_points(trials)
    assert set(points.values()) == {1} and len(points) == 2  # every point once, the lost one too
    assert lost[0].params["variant"] in points
    assert not study.running_trial_runs()


@pytest.fixture
def study_dir(tmp_path: Path) -> StudyDir:
    return StudyDir(tmp_path)
