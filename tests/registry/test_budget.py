"""`promote --max-params / --max-flops / --max-latency-ms / --pareto` on a real MLflow store:
the answers are checked against a brute-force computation over the recorded runs."""

from __future__ import annotations

import random

import pytest
from helpers import Store, alias_version, mlflow_client, run_module, trial_runs, versions

EXPERIMENT = "budgets"
COSTS = ("param_count", "flops", "latency_ms")


def _trial(tracker, name: str, state: str, metrics: dict[str, float]) -> str:
    """A trial run as a study records it (tags, metrics, a loadable model), no training."""
    import torch

    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags={
        "fractal.role": "trial", "fractal.state": state, "fractal.variant": name})
    run_id = run.info.run_id
    tracker.client.log_param(run_id, "variant", name)
    tracker.client.log_param(run_id, "dataset", "digits")
    tracker.log_model(run_id, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                      (1, 8, 8), 10)
    for key, value in metrics.items():
        tracker.client.log_metric(run_id, key, value)
    tracker.client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def budget_store(tmp_path_factory) -> Store:
    """Ten COMPLETE trials whose accuracy and costs disagree (seeded), one PRUNED trial that
    beats them all and costs nothing, one COMPLETE trial recorded before cost metrics."""
    from fractal_mlops.tracking.tracker import Tracker, configure

    store = Store(tmp_path_factory.mktemp("budgets"))
    configure(store.uri)
    tracker = Tracker(store.uri, EXPERIMENT)
    rng = random.Random(23)
    for i in range(10):
        _trial(tracker, f"net{i}", "COMPLETE", {
            "final_val_acc": round(rng.uniform(0.5, 0.95), 4),
            "param_count": rng.randrange(1_000, 100_000),
            "flops": float(rng.randrange(10_000, 5_000_000)),
            "latency_ms": round(rng.uniform(0.2, 9.0), 3)})
    _trial(tracker, "pruned", "PRUNED", {"final_val_acc": 0.99, "param_count": 10, "flops": 10.0,
                                         "latency_ms": 0.01})
    _trial(tracker, "legacy", "COMPLETE", {"final_val_acc": 0.97, "param_count": 500})
    return store


def _promote(store: Store, *args: str):
    return run_module("fractal_mlops.promote", "--tracking-uri", store.uri, "--experiment",
                      EXPERIMENT, *args, timeout=300)


def _complete(store: Store) -> list:
    return [r for r in trial_runs(mlflow_client(store.uri), EXPERIMENT)
            if r.data.tags["fractal.state"] == "COMPLETE"]


def _brute_best(runs: list, budgets: dict[str, float]):
    fits = [r for r in runs if all(r.data.metrics.get(m, float("inf")) <= limit
                                   for m, limit in budgets.items())]
    return max(fits, key=lambda r: r.data.metrics["final_val_acc"]) if fits else None


def _brute_front(runs: list) -> set[str]:
    """Runs with every metric that no other such run beats or equals everywhere and beats once."""
    full = [r for r in runs if all(m in r.data.metrics for m in COSTS)]

    def as_good(a, b):  # a at least as good as b everywhere
        return (a.data.metrics["final_val_acc"] >= b.data.metrics["final_val_acc"]
                and all(a.data.metrics[m] <= b.data.metrics[m] for m in COSTS))

    return {r.info.run_id for r in full
            if not any(as_good(o, r) and not as_good(r, o) for o in full)}


def _quantile(runs: list, metric: str, q: float) -> float:
    values = sorted(r.data.metrics[metric] for r in runs if metric in r.data.metrics)
    return values[int(q * (len(values) - 1))]


@pytest.mark.slow
def test_promote_under_each_budget_picks_the_brute_force_answer(budget_store):
    runs = _complete(budget_store)
    client = mlflow_client(budget_store.uri)
    # the unconstrained champion first: each budget then has to replace it (or keep it)
    first = _promote(budget_store)
    assert first.returncode == 0, first.stderr
    budgets = [
        ({"param_count": int(_quantile(runs, "param_count", 0.3))}, "--max-params"),
        ({"flops": _quantile(runs, "flops", 0.3)}, "--max-flops"),
        ({"latency_ms": _quantile(runs, "latency_ms", 0.3)}, "--max-latency-ms"),
        ({"param_count": int(_quantile(runs, "param_count", 0.7)),
          "flops": _quantile(runs, "flops", 0.7),
          "latency_ms": _quantile(runs, "latency_ms", 0.7)}, None),
    ]
    flags = {"param_count": "--max-params", "flops": "--max-flops", "latency_ms": "--max-latency-ms"}
    for budget, _ in budgets:
        args = [a for m, limit in budget.items() for a in (flags[m], repr(limit))]
        done = _promote(budget_store, *args, "--model-name", "Edge")
        assert done.returncode == 0, done.stdout + done.stderr
        expected = _brute_best(runs, budget)
        assert expected is not None
        # the best within this budget holds the alias: the previous one was outside the budget
        # or not better
        version = client.get_model_version("Edge", alias_version(client, "champion", "Edge"))
        assert version.tags["source_run_id"] == expected.info.run_id, done.stdout
        for metric, limit in budget.items():
            assert float(version.tags[f"budget.{metric}"]) == pytest.approx(limit)
            assert float(version.tags[metric]) <= limit
    # the budgeted versions never took the unconstrained champion's alias
    assert alias_version(client, "champion") == "1"


@pytest.mark.slow
def test_nothing_within_the_budget_is_one_line_and_exit_1(budget_store):
    runs = _complete(budget_store)
    smallest = min(r.data.metrics["flops"] for r in runs if "flops" in r.data.metrics)
    done = _promote(budget_store, "--max-flops", repr(smallest / 2), "--model-name", "Nothing")
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--max-flops" in done.stderr
    assert versions(mlflow_client(budget_store.uri), "Nothing") == []


@pytest.mark.slow
def test_pareto_prints_the_brute_force_front_and_registers_nothing(budget_store):
    runs = _complete(budget_store)
    done = _promote(budget_store, "--pareto", "--model-name", "Front")
    assert done.returncode == 0, done.stderr
    ids = {r.info.run_id for r in runs}
    printed = {line.split()[0] for line in done.stdout.splitlines()
               if line.split() and line.split()[0] in ids}
    assert printed == _brute_front(runs)
    assert "1 without every metric left out" in done.stdout  # the legacy run
    assert versions(mlflow_client(budget_store.uri), "Front") == []


@pytest.mark.parametrize("args, words", [
    (["--max-flops", "0"], "--max-flops"),
    (["--max-latency-ms", "nan"], "--max-latency-ms"),
    (["--max-params", "1.5"], "--max-params"),
    (["--rollback", "--pareto"], "--rollback"),
])
def test_bad_budgets_exit_2_with_one_line(tmp_path, args, words):
    done = run_module("fractal_mlops.promote", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                      *args, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
