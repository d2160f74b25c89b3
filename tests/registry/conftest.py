"""The registry tests' fixtures: real stores made by real studies.

`studied_store` runs two tiny studies on the digits (once per test session, in one SQLite MLflow
database):

- `registry-tiny` (helpers.TINY): 4 variants x 2 epochs, width 16. The sigmoid variant without a
  norm stays at chance and is PRUNED by the divergence check; the other three end COMPLETE with
  clearly different val_acc.
- `registry-later` (helpers.LATER): one weaker variant (a sigmoid net, 1 epoch): "a later, worse
  run".

`store` gives each test a private copy of that database (the artifacts stay shared; tests only
read them or add new runs), so registry changes never leak from one test into another.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from helpers import LATER, TINY, Store, run_study

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
    """The two tiny studies, run once per session."""
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
