"""search.mode: halving: rungs, reasons, every grid point accounted for once, with two workers,
through a kill -9 in the middle of a rung, and bad `search:` values."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from helpers import StudyDir, write_config

from fractal_mlops.config.sections import SearchConfig
from fractal_mlops.search.halving import Rung, planned_epochs, rung_plan

# 3 columns x 3 unit orders = 9 points; rungs: 9 points x 1 epoch, then the best 3 x 3 epochs
NINE_POINTS = {"blocks": [1], "columns": [1, 2, 3], "width": [16],
               "unit": ["conv-norm-act", "conv-act-norm", "norm-act-conv"]}
REASON = re.compile(r"^halving: rung 1 \(1 epoch\), rank (\d+) of 9, kept the top 3$")


def halving_config(study: StudyDir, name: str = "tiny", batch_size: int = 32, **search):
    return write_config(study.root / f"{name}.yaml", study_name=name, space=NINE_POINTS,
                        training={"epochs": 3, "batch_size": batch_size, "lr": 0.05},
                        search={"mode": "halving", **search})


# Batches of 4: an epoch takes seconds, not a tenth of one, so a signal sent once rung 2 has
# started lands inside it on any machine (with batches of 32, rung 2 could end first).
SLOW_BATCHES = 4


def test_the_rung_plan_keeps_a_third_per_rung_up_to_the_full_epochs():
    plan = rung_plan(36, SearchConfig("halving", 1, 3), 9)
    assert plan == [Rung(1, 1, 36, 12), Rung(2, 3, 12, 4), Rung(3, 9, 4, 4)]
    assert planned_epochs(plan) == 36 + 12 * 2 + 4 * 6
    assert rung_plan(9, SearchConfig("halving", 1, 3), 3) == [Rung(1, 1, 9, 3), Rung(2, 3, 3, 3)]
    # min_epochs == epochs: one rung, every point trained in full (the grid's cost)
    assert rung_plan(5, SearchConfig("halving", 4, 2), 4) == [Rung(1, 4, 5, 5)]


def test_a_resumed_rung_trains_the_epochs_of_an_unbroken_run():
    """The promise behind "continues from where it stopped": weights, optimizer and RNG state
    saved after epoch 1 and loaded into a fresh trainer give epochs 2-3 of a straight run."""
    import io

    import torch

    from fractal_mlops.config.experiment import parse_config
    from fractal_mlops.config.space import grid
    from fractal_mlops.engine.data import load_dataset
    from fractal_mlops.engine.train import Trainer

    config = parse_config({"training": {"epochs": 3, "lr": 0.1},
                           "space": {"blocks": [1], "columns": [2], "width": [8]}})
    data, variant = load_dataset(config.data), grid(config)[0].to_dict()
    straight = [r.metrics() for r in Trainer(variant, data, config.training).epochs()]
    first = Trainer(variant, data, config.training)
    head = [r.metrics() for r in first.epochs(stop=1)]
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    second = Trainer(variant, data, config.training)
    second.load_state_dict(torch.load(saved, weights_only=False))
    tail = [r.metrics() for r in second.epochs()]
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert len(head) == 1 and len(tail) == 2
    assert [[m[k] for k in keys] for m in head + tail] == [[m[k] for k in keys] for m in straight]


def check_halved_study(study: StudyDir, name: str) -> dict:
    """Every point exactly once, the rung-1 losers PRUNED by halving with their rank, the best 3
    COMPLETE, each run's epochs logged once and no run left open. Returns trials by variant."""
    from fractal_mlops.config.experiment import load_config
    from fractal_mlops.config.space import grid

    variants = {v.name for v in grid(load_config(str(study.root / f"{name}.yaml")))}
    trials = study.optuna_trials(name)
    assert sorted(t.params["variant"] for t in trials) == sorted(variants)  # once each
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert len(by_state["COMPLETE"]) == 3 and len(by_state["PRUNED"]) == 6, \
        [(t.state.name, t.user_attrs.get("reason")) for t in trials]
    ranks = sorted(int(REASON.match(t.user_attrs["reason"]).group(1)) for t in by_state["PRUNED"])
    assert ranks == [4, 5, 6, 7, 8, 9]
    worst_kept = min(t.user_attrs["rung_1_val_acc"] for t in by_state["COMPLETE"])
    assert all(t.user_attrs["rung_1_val_acc"] <= worst_kept for t in by_state["PRUNED"])

    client = study.client()
    runs = {r.data.tags["fractal.variant"]: r for r in study.runs(name)}
    assert set(runs) == variants and len(study.runs(name)) == 9  # one run per point
    for t in trials:
        run = runs[t.params["variant"]]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert run.info.status == "FINISHED"
        assert run.data.tags["fractal.state"] == t.state.name
        if t.state.name == "COMPLETE":
            assert sorted(steps) == [1, 2, 3]  # rung 2 continued the same run from epoch 2
            assert "fractal.model_uri" in run.data.tags
            assert run.data.metrics["final_val_acc"] == pytest.approx(t.value)
        else:
            assert steps == [1]
            assert run.data.tags["fractal.reason"] == t.user_attrs["reason"]
    return {t.params["variant"]: t for t in trials}


@pytest.mark.slow
def test_halving_with_two_workers(study_dir: StudyDir):
    config = halving_config(study_dir)
    result = study_dir.run("--config", str(config), "--workers", "2", *study_dir.args())
    assert result.returncode == 0, result.stderr
    assert "halving: rungs (points x epochs) 9 x 1, 3 x 3: 15 epochs, 56%" in result.stdout
    check_halved_study(study_dir, "tiny")
    again = study_dir.run("--config", str(config), *study_dir.args())  # a finished study
    assert again.returncode == 0, again.stderr
    assert len(study_dir.optuna_trials("tiny")) == 9


@pytest.mark.slow
def test_halving_with_workers_on_two_machines_sharing_postgres(
        tmp_path, postgres, mlflow_server_on_postgres):
    """Two "machines" (own working dir and environment): the rungs and their ranking live in
    PostgreSQL, the checkpoints travel through the tracking server's artifact store."""
    import subprocess
    import sys

    study = StudyDir(tmp_path, tracking_uri=mlflow_server_on_postgres.uri,
                     storage=postgres.optuna_url)
    config = halving_config(study, "halving-hosts")
    workers = []
    for index in range(2):
        home = tmp_path / f"machine-{index}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FRACTAL_"))}
        env.update(FRACTAL_STORAGE=postgres.optuna_url, MLFLOW_TRACKING_URI=study.tracking_uri,
                   FRACTAL_MLOPS_CACHE=str(home / "cache"), FRACTAL_THREADS="1", HOME=str(home))
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "fractal_mlops.study", "--config", str(config)],
            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=900) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    check_halved_study(study, "halving-hosts")


def wait_for_trial(study: StudyDir, name: str, proc, condition, timeout: float = 300):
    """Poll the Optuna store until a trial satisfies `condition` (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"study ended first: {proc.stderr.read()[-2000:]}")
        try:
            for t in study.optuna_trials(name):
                if condition(t):
                    return t
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError("the awaited trial never appeared")


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_rung_then_resume(study_dir: StudyDir):
    config = halving_config(study_dir, batch_size=SLOW_BATCHES)
    args = ["--config", str(config), *study_dir.args()]
    proc = study_dir.popen(*args)
    in_rung_2 = wait_for_trial(study_dir, "tiny", proc, lambda t: t.state.name == "RUNNING"
                               and t.user_attrs.get("rung") == 2 and "mlflow_run_id" in t.user_attrs)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed = next(t for t in study_dir.optuna_trials("tiny") if t.number == in_rung_2.number)
    assert killed.state.name == "RUNNING"  # the kill landed inside rung 2
    run_id = killed.user_attrs["mlflow_run_id"]

    resumed = study_dir.run(*args)
    assert resumed.returncode == 0, resumed.stderr
    trials = check_halved_study(study_dir, "tiny")
    after = trials[killed.params["variant"]]
    assert after.number == killed.number and after.state.name == "COMPLETE"  # the same trial...
    assert after.user_attrs["mlflow_run_id"] == run_id  # ...and run, resumed from rung 1's end
    assert not study_dir.running_trial_runs()


@pytest.mark.slow
def test_ctrl_c_in_a_rung_leaves_the_point_waiting_and_resume_finishes(study_dir: StudyDir):
    config = halving_config(study_dir, batch_size=SLOW_BATCHES)
    args = ["--config", str(config), *study_dir.args()]
    proc = study_dir.popen(*args)
    training = wait_for_trial(study_dir, "tiny", proc, lambda t: t.state.name == "RUNNING"
                              and "mlflow_run_id" in t.user_attrs)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    stopped = next(t for t in study_dir.optuna_trials("tiny") if t.number == training.number)
    assert stopped.state.name == "WAITING"  # not FAIL: the point resumes its rung
    run = study_dir.client().get_run(stopped.user_attrs["mlflow_run_id"])
    assert run.info.status == "SCHEDULED"
    assert not study_dir.running_trial_runs()

    resumed = study_dir.run(*args)
    assert resumed.returncode == 0, resumed.stderr
    trials = check_halved_study(study_dir, "tiny")
    assert trials[stopped.params["variant"]].number == stopped.number


@pytest.mark.parametrize(("search", "message"), [
    ({"mode": "random"}, "search.mode 'random' is unknown (expected one of grid, halving)"),
    ({"mode": "halving", "min_epochs": 0}, "search.min_epochs must be between 1 and"),
    ({"mode": "halving", "min_epochs": 4}, "search.min_epochs must be between 1 and "
                                           "training.epochs (3), got 4"),
    ({"mode": "halving", "reduction_factor": 1}, "search.reduction_factor must be at least 2"),
    ({"reduction_factor": "three"}, "search.reduction_factor must be int"),
])
def test_bad_search_values_give_one_line_and_write_nothing(study_dir: StudyDir, search, message):
    config = write_config(study_dir.root / "bad.yaml", training={"epochs": 3}, search=search)
    result = study_dir.run("--config", str(config), *study_dir.args())
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (study_dir.root / "mlflow.db").exists()
    assert not (study_dir.root / "optuna.journal").exists()


@pytest.mark.slow
def test_a_one_rung_plan_trains_every_point_to_the_end(study_dir: StudyDir):
    """min_epochs == epochs: the first rung is the last, so its points end COMPLETE (not
    WAITING for a ranking that never comes)."""
    config = write_config(study_dir.root / "one.yaml", study_name="one",
                          space={"blocks": [1], "columns": [1, 2], "width": [8],
                                 "unit": ["conv-norm-act"]},
                          training={"epochs": 1, "batch_size": 64},
                          search={"mode": "halving", "min_epochs": 1})
    done = study_dir.run("--config", str(config), *study_dir.args(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert [t.state.name for t in study_dir.optuna_trials("one")] == ["COMPLETE", "COMPLETE"]
    runs = study_dir.runs("one")
    assert sorted((r.info.status, r.data.tags["fractal.state"]) for r in runs) == [
        ("FINISHED", "COMPLETE")] * 2
