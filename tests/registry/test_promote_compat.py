"""Promotion never compares accuracies across datasets or model signatures without --force
(real studies on digits and on the synthetic 3x8x8 set, in one real SQLite store)."""

from __future__ import annotations

import pytest
from helpers import TINY, alias_version, mlflow_client, run_module, run_study

OTHER = {
    "study_name": "registry-synthetic",
    "data": {"name": "synthetic"},
    "space": {"blocks": [2], "columns": [2], "width": [16], "unit": ["conv-norm-act"]},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.1, "seed": 0},
}


def promote(store, *args: str):
    return run_module("fractal_mlops.promote", "--tracking-uri", store.uri, *args, timeout=300)


@pytest.mark.slow
def test_a_study_on_other_data_needs_force_to_take_the_champion(store):
    run_study(OTHER, store, store.root / "other.journal")
    first = promote(store, "--experiment", TINY)
    assert first.returncode == 0, first.stderr
    client = mlflow_client(store.uri)
    champion = alias_version(client, "champion")

    refused = promote(store, "--experiment", OTHER["study_name"])
    assert refused.returncode == 0, refused.stderr
    assert alias_version(client, "champion") == champion
    line = next(x for x in refused.stdout.splitlines() if "stays on version" in x)
    assert "other data" in line and "synthetic vs digits" in line and "--force" in line

    forced = promote(store, "--experiment", OTHER["study_name"], "--force")
    assert forced.returncode == 0, forced.stderr
    assert alias_version(client, "champion") != champion
    assert "--force across datasets" in forced.stdout
