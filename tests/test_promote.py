"""`fractal-mlops promote` on real MLflow stores made by real studies."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_registry import (
    LATER,
    TINY,
    Store,
    alias_version,
    clean_env,
    expected_best,
    mlflow_client,
    run_module,
    store,
    studied_store,
    trial_runs,
    versions,
)

__all__ = ["store", "studied_store"]  # pytest fixtures used below


def promote(store: Store, *args: str, via_cli: bool = False):
    argv = ["promote"] if via_cli else []
    module = "fractal_mlops.cli" if via_cli else "fractal_mlops.promote"
    return run_module(module, *argv, "--tracking-uri", store.uri, *args, timeout=300)


@pytest.mark.slow
def test_promote_registers_the_best_complete_trial_as_champion(store):
    client = mlflow_client(store.uri)
    runs = trial_runs(client, TINY)
    states = sorted(r.data.tags["fractal.state"] for r in runs)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"], states
    best = expected_best(runs)
    pruned = next(r for r in runs if r.data.tags["fractal.state"] == "PRUNED")

    done = promote(store, "--experiment", TINY, via_cli=True)

    assert done.returncode == 0, done.stderr
    [version] = versions(client)
    assert version.tags["source_run_id"] == best.info.run_id != pruned.info.run_id
    assert float(version.tags["val_acc"]) == best.data.metrics["final_val_acc"]
    assert version.tags["variant"] == best.data.params["variant"]
    assert best.info.run_id in version.description
    assert alias_version(client, "champion") == str(version.version) == "1"
    assert version.run_id == best.info.run_id
    assert "FractalNet@champion -> version 1" in done.stdout
    assert "no champion yet" in done.stdout


@pytest.mark.slow
def test_promoting_the_same_run_twice_creates_one_version(store):
    first = promote(store, "--experiment", TINY)
    second = promote(store, "--experiment", TINY)

    assert first.returncode == second.returncode == 0, second.stderr
    client = mlflow_client(store.uri)
    assert len(versions(client)) == 1
    assert "no new version" in second.stdout
    assert alias_version(client, "champion") == "1"


@pytest.mark.slow
def test_a_later_worse_run_does_not_take_the_alias_until_forced_and_rollback_undoes(store):
    client = mlflow_client(store.uri)
    tiny_best = expected_best(trial_runs(client, TINY)).data.metrics["final_val_acc"]
    later_best = expected_best(trial_runs(client, LATER)).data.metrics["final_val_acc"]
    assert later_best < tiny_best, "premise: the later study is worse"
    assert promote(store, "--experiment", TINY).returncode == 0

    worse = promote(store, "--experiment", LATER)
    assert worse.returncode == 0, worse.stderr
    assert [v.version for v in versions(client)] == [1, 2]  # registered, but not promoted
    assert alias_version(client, "champion") == "1"
    assert "stays on version 1" in worse.stdout and "not better" in worse.stdout

    forced = promote(store, "--experiment", LATER, "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(versions(client)) == 2
    assert alias_version(client, "champion") == "2"
    assert alias_version(client, "previous") == "1"

    back = promote(store, "--rollback")
    assert back.returncode == 0, back.stderr
    assert alias_version(client, "champion") == "1"
    assert alias_version(client, "previous") == "2"
    assert "rolled back" in back.stdout

    # the better run takes the alias back only when it beats the champion by --min-delta
    assert promote(store, "--rollback").returncode == 0
    assert alias_version(client, "champion") == "2"
    gain = tiny_best - later_best
    kept = promote(store, "--experiment", TINY, "--min-delta", f"{gain + 0.01:.4f}")
    assert kept.returncode == 0 and alias_version(client, "champion") == "2", kept.stdout
    moved = promote(store, "--experiment", TINY, "--min-delta", f"{gain - 0.01:.4f}")
    assert moved.returncode == 0 and alias_version(client, "champion") == "1", moved.stdout
    assert alias_version(client, "previous") == "2"
    assert len(versions(client)) == 2


def _synthetic_trial(tracker, name: str, state: str, val_acc: float, params: int,
                     role: str = "trial") -> str:
    """A trial run as the study records it (tags, metrics, a loadable model), no training."""
    import torch

    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags={
        "fractal.role": role, "fractal.state": state, "fractal.variant": name})
    run_id = run.info.run_id
    tracker.client.log_param(run_id, "variant", name)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    tracker.log_model(run_id, model, (1, 8, 8), 10)
    for key, value in (("final_val_acc", val_acc), ("param_count", params)):
        tracker.client.log_metric(run_id, key, value)
    tracker.client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")
    return run_id


@pytest.mark.slow
def test_never_promotes_pruned_or_failed_trials_and_ties_go_to_fewer_parameters(tmp_path):
    from fractal_mlops.tracking import Tracker

    store = Store(tmp_path)
    tracker = Tracker(store.uri, "synthetic")
    _synthetic_trial(tracker, "big", "COMPLETE", 0.9, 2000)
    small = _synthetic_trial(tracker, "small", "COMPLETE", 0.9, 1000)
    _synthetic_trial(tracker, "pruned", "PRUNED", 0.99, 10)
    _synthetic_trial(tracker, "failed", "FAIL", 0.995, 10)
    _synthetic_trial(tracker, "reproduced", "COMPLETE", 1.0, 10, role="reproduction")
    bad = Tracker(store.uri, "nothing-eligible")
    _synthetic_trial(bad, "pruned", "PRUNED", 0.99, 10)
    _synthetic_trial(bad, "failed", "FAIL", 0.995, 10)

    done = promote(store, "--experiment", "synthetic")
    assert done.returncode == 0, done.stderr
    client = mlflow_client(store.uri)
    [version] = versions(client)
    assert version.tags["source_run_id"] == small
    assert "not eligible: 1 FAIL, 1 PRUNED" in done.stdout
    assert "2 runs tie: fewest parameters" in done.stdout

    nothing = promote(store, "--experiment", "nothing-eligible")
    assert nothing.returncode == 1
    assert "nothing to promote" in nothing.stderr
    assert len(versions(client)) == 1 and alias_version(client, "champion") == "1"


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--experiment", "no-such-study"], "no-such-study"),
    (["--experiment", TINY, "--metric", "val_accuracy"], "val_accuracy"),
])
def test_unknown_experiment_or_metric_is_bad_input_and_writes_nothing(store, args, words):
    done = promote(store, *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    client = mlflow_client(store.uri)
    assert client.search_registered_models() == []


@pytest.mark.parametrize("args, words", [
    (["--min-delta", "-0.1"], "--min-delta"),
    (["--alias", "latest"], "--alias"),
    (["--alias", "champion", "--previous-alias", "champion"], "--previous-alias"),
    (["--model-name", "a/b"], "--model-name"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, words):
    done = run_module("fractal_mlops.promote", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                      *args, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_or_unreachable_store_exits_2_and_creates_nothing(tmp_path: Path):
    missing = run_module("fractal_mlops.promote", "--tracking-uri",
                         f"sqlite:///{tmp_path}/nowhere/mlflow.db", cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "no MLflow store" in missing.stderr
    assert list(tmp_path.iterdir()) == []
    # with no --tracking-uri, MLFLOW_TRACKING_URI is the store
    unreachable = run_module("fractal_mlops.promote", cwd=tmp_path, timeout=120,
                             env=clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert unreachable.returncode == 2
    assert "cannot reach" in unreachable.stderr and unreachable.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
