"""kill -9 of a worker in the middle of a trial: the next run marks it FAIL ("worker lost"),
closes its MLflow run, trains the point again and completes the grid with no duplicates."""

from __future__ import annotations

import collections
import os
import signal

import pytest

from conftest import StudyDir, write_config


def finished_points(trials) -> collections.Counter:
    return collections.Counter(t.params["variant"] for t in trials if t.state.is_finished()
                               and t.user_attrs.get("reason") != "worker lost")


def kill_mid_trial_then_resume(study: StudyDir, config, *argv: str) -> None:
    proc = study.popen("--config", str(config), *argv)
    run_id = study.wait_for_running_trial(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert study.client().get_run(run_id).info.status == "RUNNING"  # nobody closed it yet

    resumed = study.run("--config", str(config), *argv)
    assert resumed.returncode == 0, resumed.stderr

    lost_run = study.client().get_run(run_id)
    assert lost_run.info.status == "KILLED"
    assert lost_run.data.tags["fractal.state"] == "FAIL"
    assert lost_run.data.tags["fractal.reason"] == "worker lost"
    trials = study.optuna_trials("tiny")
    lost = [t for t in trials if t.user_attrs.get("mlflow_run_id") == run_id]
    assert len(lost) == 1 and lost[0].state.name == "FAIL"
    assert lost[0].user_attrs["reason"] == "worker lost"
    points = finished_points(trials)
    assert set(points.values()) == {1} and len(points) == 3  # every point once, the lost one too
    assert lost[0].params["variant"] in points
    assert not study.running_trial_runs()


@pytest.mark.slow
def test_kill_9_with_the_local_store(study_dir: StudyDir):
    config = write_config(study_dir.root / "tiny.yaml",
                          space={"blocks": [2], "columns": [2], "width": [16],
                                 "unit": ["conv-norm-act", "conv-act-norm", "norm-act-conv"]},
                          training={"epochs": 3})
    kill_mid_trial_then_resume(study_dir, config, *study_dir.args())
