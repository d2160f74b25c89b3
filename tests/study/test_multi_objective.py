"""Multi-objective studies end to end (search.objectives: [final_val_acc, flops]) with halving,
and a study created before the template dimensions became Optuna params, resumed."""

from __future__ import annotations

import csv
import io

import pytest
from helpers import StudyDir, load_optuna_study, write_config

from fractal_mlops.config.objectives import pareto_front

OBJECTIVES = ["final_val_acc", "flops"]
DIRECTIONS = ["maximize", "minimize"]
# 4 points; halving: rung 1 trains 4 x 1 epoch and keeps 2, rung 2 trains them to epoch 2
FOUR_POINTS = {"blocks": [1], "columns": [1, 2], "width": [8, 16], "unit": ["conv-norm-act"]}


@pytest.fixture(scope="module")
def halved(tmp_path_factory):
    study = StudyDir(tmp_path_factory.mktemp("moo-halving"))
    config = write_config(study.root / "moo.yaml", study_name="moo", space=FOUR_POINTS,
                          training={"epochs": 2, "batch_size": 64, "lr": 0.1, "seed": 0},
                          search={"mode": "halving", "min_epochs": 1, "reduction_factor": 2,
                                  "objectives": OBJECTIVES})
    done = study.run("--config", str(config), *study.args(), "--device", "cpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return study, done


@pytest.mark.slow
def test_multi_objective_halving_keeps_the_front_of_each_rung(halved):
    study, _ = halved
    optuna_study = load_optuna_study(study.storage, "moo")
    assert [d.name for d in optuna_study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = optuna_study.trials
    assert len(trials) == 4
    points = [(t.user_attrs["rung_1_val_acc"], t.user_attrs["flops"]) for t in trials]
    front = {trials[i].number for i in pareto_front(points, DIRECTIONS)}
    kept = {t.number for t in trials if t.state.name == "COMPLETE"}
    assert len(kept) == 2
    # the rung keeps its front (or, with a front larger than the rung's room, only front points)
    assert front <= kept if len(front) <= 2 else kept <= front, (points, kept)
    for t in trials:
        if t.state.name == "COMPLETE":
            assert len(t.values) == 2 and t.values[1] == t.user_attrs["flops"]
        else:
            assert t.state.name == "PRUNED" and t.values is None
            assert "by Pareto front" in t.user_attrs["reason"]


@pytest.mark.slow
def test_the_study_run_and_leaderboard_show_the_front_of_the_complete_trials(halved):
    study, done = halved
    runs = [r for r in study.runs("moo") if r.data.tags["fractal.state"] == "COMPLETE"]
    points = [[r.data.metrics[m] for m in OBJECTIVES] for r in runs]
    front = {runs[i].info.run_id for i in pareto_front(points, DIRECTIONS)}
    [parent] = study.runs("moo", role="study")
    text = study.client().download_artifacts(parent.info.run_id, "pareto_front.csv",
                                             str(study.root / "downloaded"))
    rows = list(csv.DictReader(io.StringIO(open(text).read())))
    assert {r["run_id"] for r in rows} == front
    assert parent.data.metrics["n_pareto"] == len(front)
    assert "Pareto front of final_val_acc vs flops" in done.stdout


@pytest.mark.slow
def test_a_study_created_before_dimension_params_resumes(tmp_path):
    """The previous version's trials hold only `variant`: the point it finished stays done, the
    other one is trained, with every dimension as a param beside `variant`."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from fractal_mlops.config.experiment import load_config
    from fractal_mlops.config.space import grid
    from fractal_mlops.stores.optuna_storage import open_storage, resolve_storage

    study = StudyDir(tmp_path)
    path = write_config(tmp_path / "old.yaml", study_name="old", training={"epochs": 1},
                        space={"blocks": [1], "columns": [1], "width": [8],
                               "unit": ["conv-norm-act", "conv-act-norm"]})
    config = load_config(str(path))
    names = [v.name for v in grid(config)]
    # what the previous version wrote: the study, its config hash, one finished trial
    old = optuna.create_study(storage=open_storage(resolve_storage(study.storage, None)),
                              study_name="old", direction="maximize")
    old.set_user_attr("config_sha256", config.sha256)
    old.add_trial(optuna.trial.create_trial(
        value=0.5, params={"variant": names[0]},
        distributions={"variant": CategoricalDistribution(names)},
        user_attrs={"variant": names[0]},
        system_attrs={"search_space": {"variant": names}, "grid_id": 0}))

    done = study.run("--config", str(path), *study.args(), "--device", "cpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    trials = load_optuna_study(study.storage, "old").trials
    assert [t.params["variant"] for t in trials] == names  # nothing trained twice
    assert set(trials[0].params) == {"variant"} and trials[0].value == 0.5
    assert trials[1].state.name == "COMPLETE" and trials[1].params["unit"] == "conv-act-norm"
    assert set(trials[1].params) > {"variant", "blocks", "columns", "width", "unit", "norm"}
    assert [r.data.params["variant"] for r in study.runs("old")] == [names[1]]
