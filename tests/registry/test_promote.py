"""`fractal-mlops promote` on real MLflow stores made by real studies."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    LATER,
    TINY,
    Store,
    alias_version,
    clean_env,
    expected_best,
    mlflow_client,
    run_module,
    run_study,
    trial_runs,
    versions,
)


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


def all_aliases(client, name: str = "FractalNet") -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def _synthetic_trial(tracker, name: str, state: str, val_acc: float, params: int,
                     role: str = "trial", **metrics: float) -> str:
    """A trial run as the study records it (tags, metrics, a loadable model), no training.
    `metrics`: other final metrics (val_loss=..., train_seconds=...)."""
    import torch

    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags={
        "fractal.role": role, "fractal.state": state, "fractal.variant": name})
    run_id = run.info.run_id
    tracker.client.log_param(run_id, "variant", name)
    tracker.client.log_param(run_id, "dataset", "digits")  # all of them: one dataset
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    tracker.log_model(run_id, model, (1, 8, 8), 10)
    for key, value in (("final_val_acc", val_acc), ("param_count", params), *metrics.items()):
        tracker.client.log_metric(run_id, key, value)
    tracker.client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")
    return run_id


@pytest.mark.slow
def test_never_promotes_pruned_or_failed_trials_and_ties_go_to_fewer_parameters(tmp_path):
    from fractal_mlops.tracking.tracker import Tracker, configure

    store = Store(tmp_path)
    configure(store.uri)  # as promote's main does
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
@pytest.mark.parametrize("metric", ["val_loss", "train_seconds"])
def test_losses_and_seconds_are_minimized(tmp_path, metric):
    from fractal_mlops.tracking.tracker import Tracker, configure

    store = Store(tmp_path)
    configure(store.uri)  # as promote's main does
    first = Tracker(store.uri, "first")
    # each metric, and the parameter count, ranks these three differently
    ids = {
        "accurate": _synthetic_trial(first, "accurate", "COMPLETE", 0.95, 1000,
                                     val_loss=0.6, train_seconds=50.0),
        "low-loss": _synthetic_trial(first, "low-loss", "COMPLETE", 0.90, 3000,
                                     val_loss=0.1, train_seconds=20.0),
        "fast": _synthetic_trial(first, "fast", "COMPLETE", 0.80, 2000,
                                 val_loss=0.3, train_seconds=5.0),
    }
    lowest = {"val_loss": ("low-loss", 0.1), "train_seconds": ("fast", 5.0)}
    name, value = lowest[metric]

    done = promote(store, "--experiment", "first", "--metric", metric)

    assert done.returncode == 0, done.stderr
    client = mlflow_client(store.uri)
    [version] = versions(client)
    assert version.tags["source_run_id"] == ids[name], done.stdout
    assert float(version.tags[metric]) == value
    assert f"best by lowest {metric}" in done.stdout

    # against the champion, too, lower is better: a higher value stays, a lower one moves
    _synthetic_trial(Tracker(store.uri, "higher"), "higher", "COMPLETE", 0.99, 500,
                     **{metric: value * 2})
    _synthetic_trial(Tracker(store.uri, "lower"), "lower", "COMPLETE", 0.5, 5000,
                     **{metric: value / 2})
    higher = promote(store, "--experiment", "higher", "--metric", metric)
    assert higher.returncode == 0 and alias_version(client, "champion") == "1", higher.stdout
    assert "not better" in higher.stdout
    lower = promote(store, "--experiment", "lower", "--metric", metric)
    assert lower.returncode == 0 and alias_version(client, "champion") == "3", lower.stdout
    assert alias_version(client, "previous") == "1"


@pytest.mark.slow
def test_an_exact_tie_moves_the_alias_only_to_fewer_parameters(tmp_path):
    from fractal_mlops.tracking.tracker import Tracker, configure

    store = Store(tmp_path)
    configure(store.uri)  # as promote's main does
    _synthetic_trial(Tracker(store.uri, "champion"), "champion", "COMPLETE", 0.9, 2000)
    _synthetic_trial(Tracker(store.uri, "tie-more"), "more", "COMPLETE", 0.9, 3000)
    _synthetic_trial(Tracker(store.uri, "tie-fewer"), "fewer", "COMPLETE", 0.9, 1000)
    client = mlflow_client(store.uri)
    assert promote(store, "--experiment", "champion").returncode == 0
    assert alias_version(client, "champion") == "1"

    more = promote(store, "--experiment", "tie-more")
    assert more.returncode == 0, more.stderr
    assert len(versions(client)) == 2  # registered, not promoted
    assert alias_version(client, "champion") == "1", more.stdout
    assert alias_version(client, "previous") is None
    assert "stays on version 1" in more.stdout

    fewer = promote(store, "--experiment", "tie-fewer")
    assert fewer.returncode == 0, fewer.stderr
    assert alias_version(client, "champion") == "3", fewer.stdout
    assert alias_version(client, "previous") == "1"
    assert "a tie, with fewer parameters" in fewer.stdout


@pytest.mark.slow
def test_another_alias_keeps_its_own_previous_and_leaves_the_champion_alone(store):
    client = mlflow_client(store.uri)
    assert promote(store, "--experiment", TINY).returncode == 0
    assert alias_version(client, "champion") == "1"

    staged = promote(store, "--experiment", LATER, "--alias", "staging")
    assert staged.returncode == 0, staged.stderr
    assert "FractalNet@staging -> version 2" in staged.stdout
    # TINY's best beats LATER's: staging moves to it, and the outgoing version is kept
    better = promote(store, "--experiment", TINY, "--alias", "staging")
    assert better.returncode == 0, better.stderr
    assert all_aliases(client) == {"champion": "1", "staging": "1", "staging-previous": "2"}

    back = promote(store, "--alias", "staging", "--rollback")
    assert back.returncode == 0, back.stderr
    assert all_aliases(client) == {"champion": "1", "staging": "2", "staging-previous": "1"}


@pytest.mark.slow
def test_promote_through_an_mlflow_tracking_server(tmp_path):
    import mlflow
    import numpy as np
    from servers import mlflow_server

    config = {"study_name": "served", "data": {"name": "digits"},
              "space": {"blocks": [1], "columns": [1], "width": [8, 16],
                        "unit": ["conv-norm-act"]},
              "training": {"epochs": 1, "batch_size": 64, "lr": 0.1, "seed": 0}}
    local = Store(tmp_path)
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts") as uri:
        run_study(config, local, tmp_path / "optuna.journal", tracking_uri=uri)
        assert not local.db.exists()  # everything went to the server
        client = mlflow_client(uri)
        runs = trial_runs(client, "served")
        assert [r.data.tags["fractal.state"] for r in runs] == ["COMPLETE", "COMPLETE"]
        best = expected_best(runs)

        done = run_module("fractal_mlops.promote", "--experiment", "served",
                          "--tracking-uri", uri, timeout=300)

        assert done.returncode == 0, done.stdout + done.stderr
        [version] = versions(client)
        assert version.tags["source_run_id"] == best.info.run_id
        assert alias_version(client, "champion") == "1"
        model = mlflow.pyfunc.load_model("models:/FractalNet@champion")
        scores = model.predict(np.zeros((2, 1, 8, 8), dtype=np.float32))
        assert np.asarray(scores).shape == (2, 10)


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
