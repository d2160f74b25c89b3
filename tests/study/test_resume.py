"""An interrupted trial continues where it stopped, in the same MLflow run, and ends with the
metrics an unbroken run has (bit for bit on a CPU); its saved state goes when it ends."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import StudyDir, write_config

# one point, 12 epochs, dropout and drop-path (every random stream in play)
ONE_POINT = {"space": {"blocks": [1], "columns": [2], "width": [8], "unit": ["conv-norm-act-drop"],
                       "dropout": [0.1], "drop_path": ["local+global"]},
             "training": {"epochs": 12, "memory_format": "auto"}}
DETERMINISTIC = ("train_loss", "train_acc", "val_loss", "val_acc")
FINAL = ("final_val_acc", "best_val_acc", "param_count", "val_acc_column_1", "val_acc_column_2",
         "halting_val_acc", "halting_compute")


def history(study: StudyDir, run_id: str) -> dict[str, dict[int, float]]:
    client = study.client()
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
            for key in DETERMINISTIC}


def only_run(study: StudyDir):
    [run] = study.runs("tiny")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_an_interrupted_trial_continues_in_its_run_and_ends_as_an_unbroken_one(tmp_path, how):
    unbroken = StudyDir(tmp_path / "unbroken")
    unbroken.root.mkdir()
    config = write_config(tmp_path / "tiny.yaml", **ONE_POINT)
    done = unbroken.run("--config", str(config), *unbroken.args())
    assert done.returncode == 0, done.stderr
    expected = only_run(unbroken)

    broken = StudyDir(tmp_path / "broken")
    broken.root.mkdir()
    proc = broken.popen("--config", str(config), *broken.args())
    run_id = broken.wait_for_running_trial(proc, epochs=3)
    os.kill(proc.pid, how)
    proc.communicate(timeout=120)
    interrupted = history(broken, run_id)["val_acc"]
    assert 3 <= len(interrupted) < 12
    again = broken.run("--config", str(config), *broken.args())
    assert again.returncode == 0, again.stderr

    run = only_run(broken)  # one run for the point: the interrupted one, carried on
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["fractal.state"] == "COMPLETE"
    assert history(broken, run_id) == history(unbroken, expected.info.run_id)
    assert {k: run.data.metrics[k] for k in FINAL} == {k: expected.data.metrics[k] for k in FINAL}
    # the precision `auto` chose on the first attempt, replayed by the second
    assert run.data.params["memory_format"] in ("contiguous", "channels_last")
    assert any(key.startswith("step_ms.") for key in run.data.params)
    artifacts = {a.path for a in broken.client().list_artifacts(run_id)}
    assert "checkpoint" not in artifacts  # the saved state is gone, the model stays
    assert run.data.tags["fractal.model_uri"]
    trials = broken.optuna_trials("tiny")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    # the new trial knows the epochs its run trained before it (Optuna's intermediate values)
    assert sorted(trials[1].intermediate_values) == list(range(1, 13))
