"""Shared fixtures and helpers for the registry tests (promote, reproduce, serve).

Real stores made by real studies: `studied_store` runs two tiny studies on the digits (once
per test session, in one SQLite MLflow database):

- `registry-tiny`: 4 variants x 2 epochs, width 16. The sigmoid variant without a norm stays at
  chance and is PRUNED by the divergence check; the other three end COMPLETE with clearly
  different val_acc.
- `registry-later`: one weaker variant (a sigmoid net, 1 epoch): "a later, worse run".

`store` gives each test a private copy of that database (the artifacts stay shared; tests only
read them or add new runs), so registry changes never leak from one test into another.

Import the fixtures into a test module: `from helpers_registry import store, studied_store`.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY, LATER = "registry-tiny", "registry-later"

TINY_CONFIG = {
    "study_name": TINY,
    "data": {"name": "digits"},
    "space": {"blocks": [2], "columns": [2], "width": [16], "unit": ["conv-norm-act", "conv-act"],
              "norm": ["batch"], "activation": ["relu", "sigmoid"]},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.1, "seed": 0},
}
LATER_CONFIG = {
    "study_name": LATER,
    "data": {"name": "digits"},
    "space": {"blocks": [2], "columns": [2], "width": [16], "unit": ["conv-norm-act"],
              "norm": ["batch"], "activation": ["sigmoid"]},
    "training": {"epochs": 1, "batch_size": 32, "lr": 0.1, "seed": 0},
}


@dataclass(frozen=True)
class Store:
    """A local MLflow store: its SQLite database (artifacts live where its experiments say)."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a command, without the caller's MLflow / Optuna store settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "FRACTAL_STORAGE", "FRACTAL_THREADS")}
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in a fresh interpreter, as a user would run it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO,
                          env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_study(config: dict, store: Store, journal: Path,
              tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    """The study of `config` into `store` (or into `tracking_uri`, e.g. a tracking server)."""
    path = store.root / f"{config['study_name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = run_module("fractal_mlops.study", "--config", str(path),
                      "--tracking-uri", tracking_uri or store.uri,
                      "--storage", f"journal:{journal}", "--device", "cpu", cwd=store.root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def copy_store(source: Store, target_dir: Path) -> Store:
    """A consistent copy of the MLflow database (SQLite's backup API)."""
    target = Store(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(source.db) as src, sqlite3.connect(target.db) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return target


@pytest.fixture(scope="session")
def studied_store(tmp_path_factory) -> Store:
    """The two tiny studies, run once per session (also when several modules import this)."""
    store = Store(tmp_path_factory.getbasetemp() / "registry-studies")
    marker = store.root / "studies-done"
    if not marker.exists():
        store.root.mkdir(parents=True, exist_ok=True)
        for config in (TINY_CONFIG, LATER_CONFIG):
            run_study(config, store, store.root / "optuna.journal")
        marker.touch()
    return store


@pytest.fixture
def store(studied_store: Store, tmp_path: Path) -> Store:
    """A private copy of the studied MLflow database for one test."""
    return copy_store(studied_store, tmp_path / "store")


def mlflow_client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)  # the registry's SQL store resolves models:/ URIs through it
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def trial_runs(client, experiment: str, role: str = "trial") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`fractal.role` = '{role}'",
                              max_results=1000)


def expected_best(runs: list) -> object:
    """What promote must pick: the COMPLETE trial with the highest final_val_acc (ties: fewer
    parameters), computed here straight from the runs."""
    complete = [r for r in runs if r.data.tags.get("fractal.state") == "COMPLETE"]
    return min(complete, key=lambda r: (-r.data.metrics["final_val_acc"],
                                        r.data.metrics["param_count"]))


def versions(client, name: str = "FractalNet") -> list:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def alias_version(client, alias: str, name: str = "FractalNet") -> str | None:
    aliases = client.get_registered_model(name).aliases
    return str(aliases[alias]) if alias in aliases else None
