"""Objectives, Pareto fronts and importance, without training: the maths against brute force,
importance on synthetic trials built so that one dimension decides, config checks."""

from __future__ import annotations

import itertools
import random

import pytest
from helpers import write_config

from fractal_mlops.config.experiment import load_config, parse_config
from fractal_mlops.config.objectives import (
    crowding_distance,
    directions,
    dominates,
    nondominated_fronts,
    pareto_front,
    pareto_ranking,
)
from fractal_mlops.errors import ConfigError
from fractal_mlops.reporting.data import TrialRecord
from fractal_mlops.reporting.importance import importances, ranking


def _brute_front(points, dirs):
    signs = [1 if d == "maximize" else -1 for d in dirs]

    def beats(a, b):
        return all(s * x >= s * y for s, x, y in zip(signs, a, b, strict=True)) and a != b

    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]


@pytest.mark.parametrize("seed", range(6))
def test_the_pareto_front_is_the_brute_force_one_in_two_and_three_objectives(seed):
    rng = random.Random(seed)
    dirs = directions(["final_val_acc", "flops", "latency_ms"][: 2 + seed % 2])
    points = [tuple(rng.choice([1, 2, 3, 4, 5]) for _ in dirs) for _ in range(25)]
    assert pareto_front(points, dirs) == _brute_front(points, dirs)
    fronts = nondominated_fronts(points, dirs)
    assert sorted(itertools.chain(*fronts)) == list(range(len(points)))
    # every point of front k+1 is dominated by one of front k, and none of front k by any later
    for better, worse in itertools.pairwise(fronts):
        assert all(any(dominates(points[b], points[w], dirs) for b in better) for w in worse)
    ranked = pareto_ranking(points, dirs)
    assert ranked[: len(fronts[0])] == sorted(fronts[0], key=ranked.index)
    assert set(ranked[: len(fronts[0])]) == set(fronts[0])


def test_directions_follow_the_metrics():
    assert directions(["final_val_acc", "flops", "latency_ms", "param_count",
                       "throughput_img_s"]) == ["maximize", "minimize", "minimize", "minimize",
                                                "maximize"]


def test_crowding_keeps_the_ends_and_prefers_the_lonely():
    distance = crowding_distance([(0.0, 0.0), (1.0, 1.0), (1.1, 1.1), (5.0, 5.0)])
    assert distance[0] == distance[3] == float("inf")
    assert distance[2] > distance[1]  # (1.1) sits nearer the far end: more room around it


def _records(decides: str, seed: int) -> list[TrialRecord]:
    """Every point of a 4 x 3 x 2 grid; accuracy set by `decides`, the rest is small noise."""
    grid = {"width": ["8", "16", "32", "64"], "activation": ["relu", "gelu", "sigmoid"],
            "columns": ["1", "2"]}
    rng = random.Random(seed)
    effect = {v: 0.3 + 0.2 * i for i, v in enumerate(grid[decides])}
    records = []
    for i, values in enumerate(itertools.product(*grid.values())):
        dims = dict(zip(grid, values, strict=True))
        acc = effect[dims[decides]] + rng.uniform(-0.01, 0.01)
        records.append(TrialRecord(f"run{i}", f"v{i}", "COMPLETE", "", dims,
                                   {"final_val_acc": acc}, i, i))
    return records


@pytest.mark.parametrize("decides, seed", [("width", 0), ("activation", 1), ("columns", 2)])
def test_importance_ranks_the_dimension_that_decides_accuracy_first(decides, seed):
    records = _records(decides, seed)
    scores = importances(records, ["width", "activation", "columns"])
    assert set(scores) == {"fanova", "ped_anova"}
    for name, by_dim in scores.items():
        assert max(by_dim, key=by_dim.get) == decides, (name, by_dim)
        assert by_dim[decides] > 0.5  # more than all the others together
    assert ranking(scores)[0] == decides


def test_importance_needs_complete_trials_and_a_varying_dimension():
    records = _records("width", 0)
    assert importances(records[:2], ["width"]) == {}
    assert importances(records, ["blocks"]) == {}  # recorded by none: does not vary


@pytest.mark.parametrize("objectives, words", [
    (["flops"], "must start with an accuracy"),
    (["final_val_acc", "val_loss"], "not a cost metric"),
    (["final_val_acc", "flops", "flops"], "twice"),
    ([], "at least one"),
])
def test_bad_objectives_are_one_config_line(objectives, words):
    with pytest.raises(ConfigError, match=words):
        parse_config({"search": {"objectives": objectives}})


def test_pruners_need_a_single_objective():
    with pytest.raises(ConfigError, match="single objective"):
        parse_config({"search": {"objectives": ["final_val_acc", "flops"]},
                      "pruning": {"pruner": "median"}})


def test_the_default_objective_keeps_the_config_hash_of_earlier_studies(tmp_path):
    """A study created before `objectives` existed has the same config hash (it resumes);
    another objective is another study."""
    for mode in ("grid", "halving"):
        plain = load_config(write_config(tmp_path / "a.yaml", search={"mode": mode}))
        default = load_config(write_config(tmp_path / "b.yaml", search={
            "mode": mode, "objectives": ["final_val_acc"]}))
        other = load_config(write_config(tmp_path / "c.yaml", search={
            "mode": mode, "objectives": ["final_val_acc", "flops"]}))
        assert "objectives" not in plain.to_yaml()
        assert plain.sha256 == default.sha256 != other.sha256


def test_the_dashboard_note_keeps_what_a_person_wrote_above_it(tmp_path):
    """The study rewrites its importance section of the note at every run; a person's notes
    above it stay (on a real journal storage, read back as optuna-dashboard reads it)."""
    import optuna
    from optuna_dashboard import save_note
    from optuna_dashboard._note import get_note_from_system_attrs

    from fractal_mlops.stores.optuna_storage import open_storage, resolve_storage, save_dashboard_note

    spec = resolve_storage(f"journal:{tmp_path / 'optuna.journal'}", None)
    study = optuna.create_study(study_name="s", storage=open_storage(spec))

    def note() -> str:
        storage = open_storage(spec)
        return get_note_from_system_attrs(storage.get_study_system_attrs(study._study_id),
                                          None)["body"]

    save_dashboard_note(spec, "s", "## Which template dimension mattered\n\nfirst\n")
    assert note() == "## Which template dimension mattered\n\nfirst\n"
    save_note(study, "Mine: rerun with seed 1.\n\n" + note())  # a person edits it in the UI
    save_dashboard_note(spec, "s", "## Which template dimension mattered\n\nsecond\n")
    assert note() == "Mine: rerun with seed 1.\n\n## Which template dimension mattered\n\nsecond\n"
