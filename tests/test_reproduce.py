"""`fractal-mlops reproduce RUN_ID` on real MLflow stores made by real studies."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_registry import (
    TINY,
    Store,
    clean_env,
    mlflow_client,
    run_module,
    store,
    studied_store,
    trial_runs,
)

__all__ = ["store", "studied_store"]  # pytest fixtures used below

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def reproduce(store: Store, run_id: str, *args: str, via_cli: bool = False):
    argv = ["reproduce"] if via_cli else []
    module = "fractal_mlops.cli" if via_cli else "fractal_mlops.reproduce"
    return run_module(module, *argv, run_id, "--tracking-uri", store.uri, *args, timeout=600)


def history(client, run_id: str) -> dict[tuple[str, int], float]:
    return {(key, m.step): m.value for key in EPOCH_METRICS
            for m in client.get_metric_history(run_id, key)}


def reproduction_of(client, experiment: str, run_id: str):
    runs = [r for r in trial_runs(client, experiment, role="reproduction")
            if r.data.tags.get("fractal.reproduces") == run_id]
    assert len(runs) == 1, f"expected one reproduction of {run_id}, found {len(runs)}"
    return runs[0]


@pytest.mark.slow
def test_reproducing_a_quickstart_trial_gives_identical_per_epoch_metrics(tmp_path: Path):
    store = Store(tmp_path)
    # the shipped quickstart, first two grid points; the second trains after the first in the
    # same process, the harder case for determinism
    study = run_module("fractal_mlops.study", "--tracking-uri", store.uri, "--storage",
                       f"journal:{tmp_path}/optuna.journal", "--n-trials", "2", cwd=tmp_path)
    assert study.returncode == 0, study.stderr[-2000:]
    client = mlflow_client(store.uri)
    runs = trial_runs(client, "fractalnet-quickstart")
    original = next(r for r in runs if r.data.tags["optuna.trial_number"] == "1")
    assert original.data.tags["fractal.state"] == "COMPLETE"

    done = reproduce(store, original.info.run_id, via_cli=True)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "MATCH: the metrics are identical" in done.stdout
    copy = reproduction_of(client, "fractalnet-quickstart", original.info.run_id)
    assert copy.info.experiment_id == original.info.experiment_id
    assert copy.info.status == "FINISHED" and copy.data.tags["fractal.state"] == "COMPLETE"
    assert copy.data.tags["fractal.variant"] == original.data.tags["fractal.variant"]
    before, after = history(client, original.info.run_id), history(client, copy.info.run_id)
    assert len(before) == 4 * len(EPOCH_METRICS)  # quickstart: 4 epochs
    assert after == before  # identical, not close
    for key in ("final_val_acc", "best_val_acc", "param_count", "val_acc_column_1"):
        assert copy.data.metrics[key] == original.data.metrics[key], key
    assert copy.data.tags["fractal.model_uri"] != original.data.tags["fractal.model_uri"]
    for epoch in range(1, 5):
        assert any(line.split()[:1] == [str(epoch)] and line.endswith("same")
                   for line in done.stdout.splitlines()), done.stdout
    # a reproduction is not a trial of the study: the study's trial runs are unchanged
    assert len(trial_runs(client, "fractalnet-quickstart")) == 2


@pytest.mark.slow
def test_reproducing_a_pruned_trial_stops_at_the_same_epoch(store):
    client = mlflow_client(store.uri)
    pruned = next(r for r in trial_runs(client, TINY)
                  if r.data.tags["fractal.state"] == "PRUNED")

    done = reproduce(store, pruned.info.run_id)

    assert done.returncode == 0, done.stdout + done.stderr
    copy = reproduction_of(client, TINY, pruned.info.run_id)
    assert copy.data.tags["fractal.state"] == "PRUNED"
    assert copy.data.tags["fractal.reason"] == pruned.data.tags["fractal.reason"]
    assert history(client, copy.info.run_id) == history(client, pruned.info.run_id)
    assert "fractal.model_uri" not in copy.data.tags


@pytest.mark.slow
def test_metrics_that_differ_exit_1_and_a_changed_commit_is_warned_about(store):
    """A run whose record says epoch 2 reached another val_acc than its config trains to."""
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow_client(store.uri)
    source = next(r for r in trial_runs(client, TINY)
                  if r.data.tags["fractal.state"] == "COMPLETE")
    forged = client.create_run(source.info.experiment_id, run_name="forged").info.run_id
    tags = {**source.data.tags, "mlflow.source.git.commit": "0" * 40}
    tags.pop("mlflow.runName", None)
    client.log_batch(forged, tags=[RunTag(k, v) for k, v in tags.items()],
                     params=[Param(k, v) for k, v in source.data.params.items()])
    client.log_text(forged, Path(client.download_artifacts(
        source.info.run_id, "config.yaml", str(store.root))).read_text(), "config.yaml")
    recorded = [Metric(key, value + (1e-6 if (key, step) == ("val_acc", 2) else 0.0), 0, step)
                for (key, step), value in history(client, source.info.run_id).items()]
    client.log_batch(forged, metrics=recorded)
    client.set_terminated(forged, "FINISHED")

    done = reproduce(store, forged)

    assert done.returncode == 1, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()
            if line.split()[:1] in (["1"], ["2"])}
    assert rows["1"].endswith("same") and "DIFFERS" in rows["2"], done.stdout
    assert "DIFFERENT" in done.stdout
    assert "git commit 000000000000" in done.stderr


@pytest.mark.slow
def test_unknown_run_or_a_run_that_is_not_a_trial_exits_2_and_writes_nothing(store):
    client = mlflow_client(store.uri)
    experiment = client.get_experiment_by_name(TINY).experiment_id
    before = len(client.search_runs([experiment]))
    study_run = client.search_runs([experiment], "tags.`fractal.role` = 'study'")[0]

    for run_id, words in [("0123456789abcdef0123456789abcdef", "not found"),
                          ("not-a-run", "not found"),
                          (study_run.info.run_id, "not a trial run")]:
        done = reproduce(store, run_id)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert len(client.search_runs([experiment])) == before


def test_unreachable_or_missing_store_exits_2_and_creates_nothing(tmp_path):
    run_id = "0123456789abcdef0123456789abcdef"
    missing = run_module("fractal_mlops.reproduce", run_id, "--tracking-uri",
                         f"sqlite:///{tmp_path}/nowhere/mlflow.db", cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "no MLflow store" in missing.stderr
    unreachable = run_module("fractal_mlops.reproduce", run_id, cwd=tmp_path, timeout=120,
                             env=clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert unreachable.returncode == 2
    assert "cannot reach" in unreachable.stderr and unreachable.stderr.count("\n") == 1
    no_run = run_module("fractal_mlops.reproduce", cwd=tmp_path, timeout=120)
    assert no_run.returncode == 2 and no_run.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
