"""How a trial ends, decided in one place (outcome.outcome_of), without servers: the exceptions
are the real ones that Optuna and MLflow raise."""

from __future__ import annotations

import sqlite3

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState as OptunaState

from fractal_mlops.errors import TrialStopped
from fractal_mlops.search.claims import finished_points
from fractal_mlops.search.outcome import final_failures, outcome_of
from fractal_mlops.tracking.states import (
    CUDA_FAILED,
    CUDA_OOM,
    INTERRUPTED,
    OOM_TRIES,
    STORAGE_FAILED,
    TRACKING_FAILED,
    WORKER_LOST,
    TrialState,
)


def test_a_trial_that_ran_to_the_end_is_complete():
    outcome = outcome_of(None)
    assert (outcome.state, outcome.reason, outcome.run_status) == ("COMPLETE", None, "FINISHED")
    assert not outcome.stops_worker and not outcome.retryable


@pytest.mark.parametrize("stop", [TrialStopped("diverged: val_acc 0.1"),
                                  optuna.TrialPruned("diverged: val_acc 0.1")])
def test_a_stopped_trial_is_pruned_with_its_reason(stop):
    outcome = outcome_of(stop)
    assert (outcome.state, outcome.reason, outcome.run_status) == (
        "PRUNED", "diverged: val_acc 0.1", "FINISHED")
    assert not outcome.stops_worker and not outcome.retryable


def test_ctrl_c_fails_the_trial_for_a_retry_and_stops_the_worker():
    outcome = outcome_of(KeyboardInterrupt())
    assert (outcome.state, outcome.reason, outcome.run_status) == ("FAIL", INTERRUPTED, "KILLED")
    assert outcome.stops_worker and outcome.retryable and not outcome.store_down


def test_a_trial_taken_for_lost_is_closed_and_the_worker_goes_on():
    outcome = outcome_of(UpdateFinishedTrialError("Trial#3 has already finished"))
    assert (outcome.state, outcome.reason, outcome.run_status) == ("FAIL", WORKER_LOST, "KILLED")
    assert not outcome.stops_worker and outcome.retryable


def test_an_error_of_the_trial_fails_it_and_the_study_goes_on():
    outcome = outcome_of(RuntimeError("mat1 and mat2 shapes\n cannot be multiplied"))
    assert outcome.state == "FAIL" and outcome.run_status == "FAILED"
    assert outcome.reason == "RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    assert not outcome.stops_worker and not outcome.retryable


def test_out_of_gpu_memory_is_retried_and_the_worker_goes_on():
    outcome = outcome_of(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert (outcome.state, outcome.reason) == ("FAIL", CUDA_OOM)
    assert outcome.retryable and not outcome.stops_worker


@pytest.mark.parametrize("error", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered")])  # torch before AcceleratorError
def test_any_other_cuda_error_stops_the_worker_for_a_retry(error):
    outcome = outcome_of(error)
    assert (outcome.state, outcome.reason) == ("FAIL", CUDA_FAILED)
    assert outcome.retryable and outcome.stops_worker and not outcome.store_down


def test_final_failures_counts_out_of_memory_per_point():
    study = optuna.create_study()
    dist = {"variant": CategoricalDistribution(["a", "b", "c", "d"])}
    fails = ([("a", CUDA_OOM)] * (OOM_TRIES - 1) + [("b", CUDA_OOM)] * OOM_TRIES
             + [("c", "ValueError: bad"), ("d", WORKER_LOST)])
    for point, reason in fails:
        study.add_trial(optuna.trial.create_trial(
            params={"variant": point}, distributions=dist, state=OptunaState.FAIL,
            user_attrs={"reason": reason}))
    # a: tries left, still pending; b: out of memory on every try; c: not retryable; d: retried
    assert final_failures(study.get_trials()) == {"b", "c"}
    assert finished_points(study.get_trials()) == {"b", "c"}


def test_an_optuna_storage_that_went_away_is_named_and_stops_the_worker(tmp_path):
    db = tmp_path / "optuna.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    trial = study.ask()
    with sqlite3.connect(db) as conn:  # the database loses what Optuna writes to
        conn.execute("DROP TABLE trial_intermediate_values")
    with pytest.raises(Exception) as raised:
        trial.report(0.5, 1)
    outcome = outcome_of(raised.value)
    assert (outcome.state, outcome.reason, outcome.run_status) == (
        "FAIL", STORAGE_FAILED, "KILLED")
    assert outcome.stops_worker and outcome.store_down and outcome.retryable


def test_an_unreachable_tracking_server_is_named_and_stops_the_worker(monkeypatch):
    from mlflow import MlflowClient
    from servers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(Exception) as raised:
        client.log_metric("0" * 32, "val_acc", 0.5)
    outcome = outcome_of(raised.value)
    assert (outcome.state, outcome.reason, outcome.run_status) == (
        "FAIL", TRACKING_FAILED, "KILLED")
    assert outcome.stops_worker and outcome.store_down and outcome.retryable


def test_each_state_names_its_mlflow_status_and_optuna_state():
    assert {s: (s.run_status, s.optuna_state) for s in TrialState} == {
        "COMPLETE": ("FINISHED", OptunaState.COMPLETE),
        "PRUNED": ("FINISHED", OptunaState.PRUNED),
        "FAIL": ("FAILED", OptunaState.FAIL)}
    assert f"{TrialState.PRUNED}" == "PRUNED"  # as the fractal.state tag and the console write it
