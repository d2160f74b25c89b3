"""An interrupted trial continues where it stopped, in the same MLflow run, and ends with the
metrics an unbroken run has (bit for bit on a CPU); its saved state goes when it ends."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import StudyDir, write_config

# one point, 20 epochs of 90 steps, dropout and drop-path (every random stream in play)
ONE_POINT = {"space": {"blocks": [1], "columns": [2], "width": [8], "unit": ["conv-norm-act-drop"],
                       "dropout": [0.1], "drop_path": ["local+global"]},
             "training": {"epochs": 20, "batch_size": 16, "memory_format": "auto"}}
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
    broken = StudyDir(tmp_path / "broken")
    broken.root.mkdir()
    config = write_config(tmp_path / "tiny.yaml", **ONE_POINT)
    proc = broken.popen("--config", str(config), *broken.args())
    run_id = broken.wait_for_running_trial(proc, epochs=3)
    os.kill(proc.pid, how)
    proc.communicate(timeout=120)
    interrupted = history(broken, run_id)["val_acc"]
    assert 3 <= len(interrupted) < 20
    chosen = broken.client().get_run(run_id).data.params["memory_format"]  # timed by `auto`

    # the same trial unbroken, in the memory format the first attempt chose
    unbroken = StudyDir(tmp_path / "unbroken")
    unbroken.root.mkdir()
    fixed = write_config(tmp_path / "fixed.yaml", **{**ONE_POINT, "training": {
        **ONE_POINT["training"], "memory_format": chosen}})
    done = unbroken.run("--config", str(fixed), *unbroken.args())
    assert done.returncode == 0, done.stderr
    expected = only_run(unbroken)

    again = broken.run("--config", str(config), *broken.args())
    assert again.returncode == 0, again.stderr
    assert "trains in" not in again.stderr  # the choice is replayed, not timed again

    run = only_run(broken)  # one run for the point: the interrupted one, carried on
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["fractal.state"] == "COMPLETE"
    assert history(broken, run_id) == history(unbroken, expected.info.run_id)
    # from its saved state, not from scratch: the epochs before the cut were not trained again
    # (one may be, when the kill fell between logging an epoch and saving the state after it)
    assert len(broken.client().get_metric_history(run_id, "val_acc")) <= 20 + 1
    assert {k: run.data.metrics[k] for k in FINAL} == {k: expected.data.metrics[k] for k in FINAL}
    assert run.data.params["memory_format"] == chosen
    assert any(key.startswith("step_ms.") for key in run.data.params)  # what `auto` measured
    artifacts = {a.path for a in broken.client().list_artifacts(run_id)}
    assert "checkpoint" not in artifacts  # the saved state is gone, the model stays
    assert run.data.tags["fractal.model_uri"]
    trials = broken.optuna_trials("tiny")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    # the new trial knows the epochs its run trained before it (Optuna's intermediate values)
    assert sorted(trials[1].intermediate_values) == list(range(1, 21))
