"""What promote, the report and reproduce promise, pinned by fast tests: which way a metric
ranks, the report's Pareto front, and a reproduction that lost an epoch."""

from __future__ import annotations

import itertools
import random

import pytest

from fractal_mlops.promote import maximized
from fractal_mlops.reporting.data import TrialRecord
from fractal_mlops.reporting.figures import pareto_front
from fractal_mlops.search.comparison import EpochTable


@pytest.mark.parametrize(("metric", "better_high"), [
    ("final_val_acc", True), ("val_acc_column_1", True), ("halting_val_acc", True),
    ("val_loss", False), ("train_seconds", False), ("gpu_mem_peak_mb", False),
    ("param_count", False), ("amp_skipped_steps_count", False),
])
def test_promote_ranks_accuracies_high_and_costs_low(metric, better_high):
    assert maximized(metric) is better_high


def record(i: int, params: float, acc: float) -> TrialRecord:
    return TrialRecord(f"run{i}", f"v{i}", "COMPLETE", "", {}, {"param_count": params,
                                                                 "final_val_acc": acc}, i, i)


@pytest.mark.parametrize("seed", range(5))
def test_the_pareto_front_is_every_trial_no_other_beats_on_both_counts(seed):
    rng = random.Random(seed)
    trials = [record(i, rng.choice([1e3, 2e3, 3e3, 5e3, 8e3]), rng.choice([0.5, 0.6, 0.7, 0.8]))
              for i in range(30)]

    def dominated(t: TrialRecord) -> bool:
        return any(o.metrics["param_count"] <= t.metrics["param_count"]
                   and o.metrics["final_val_acc"] >= t.metrics["final_val_acc"]
                   and (o.metrics["param_count"], o.metrics["final_val_acc"])
                   != (t.metrics["param_count"], t.metrics["final_val_acc"]) for o in trials)

    front = {(t.metrics["param_count"], t.metrics["final_val_acc"]) for t in pareto_front(trials)}
    brute = {(t.metrics["param_count"], t.metrics["final_val_acc"]) for t in trials
             if not dominated(t)}
    assert front == brute
    # the front climbs: more parameters buy more accuracy, or they are not on it
    ordered = sorted(front)
    assert all(a[1] < b[1] for a, b in itertools.pairwise(ordered))


def test_a_reproduction_missing_an_epoch_of_the_original_does_not_match(capsys):
    original = {e: {"train_loss": 1.0 / e, "train_acc": 0.5, "val_loss": 0.4, "val_acc": 0.9}
                for e in (1, 2, 3)}
    table = EpochTable(original, atol=0.0)
    assert table.finish({e: original[e] for e in (1, 2, 3)})
    table = EpochTable(original, atol=0.0)
    assert not table.finish({e: original[e] for e in (1, 2)})
    assert "missing in the reproduction" in capsys.readouterr().out
