"""What the study's parts promise, pinned by fast tests on real stores (an in-memory or journal
Optuna study, a SQLite MLflow store): halving's plan and rung records, lost workers, orphaned
runs, the worker-count check, the leaderboard's order, per-epoch steps, restarts."""

from __future__ import annotations

import io
import os
import socket
import time
from types import SimpleNamespace

import optuna
import pytest
from rich.console import Console

from fractal_mlops.config.sections import SearchConfig
from fractal_mlops.errors import ConfigError
from fractal_mlops.search import preflight
from fractal_mlops.search.halving import Rung, rung_plan
from fractal_mlops.stores.optuna_storage import _process_start, open_storage, resolve_storage, worker_is_gone

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- halving's plan -----------------------------------------------------------------------------

def test_a_rung_keeps_the_floor_of_its_size_over_the_reduction_factor():
    """10 points, factor 3: 3 go on (not 4), then 1."""
    assert rung_plan(10, SearchConfig("halving", 1, 3), 9) == [
        Rung(1, 1, 10, 3), Rung(2, 3, 3, 1), Rung(3, 9, 1, 1)]
    assert rung_plan(2, SearchConfig("halving", 1, 3), 3) == [Rung(1, 1, 2, 1), Rung(2, 3, 1, 1)]


def test_a_plan_whose_first_rung_has_every_epoch_is_that_one_last_rung():
    [only] = rung_plan(7, SearchConfig("halving", 5, 3), 5)
    assert only == Rung(1, 5, 7, 7)


# -- a store to record in -----------------------------------------------------------------------

@pytest.fixture
def tracker(tmp_path):
    from fractal_mlops.tracking.tracker import Tracker, configure

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    configure(uri)
    return Tracker(uri, "pinned")


def a_trial_run(tracker, number: int, study_name: str = "pinned") -> str:
    from fractal_mlops.tracking.names import ROLE, STUDY_NAME, TRIAL_NUMBER, VARIANT

    tags = {ROLE: "trial", STUDY_NAME: study_name, TRIAL_NUMBER: str(number), VARIANT: "v"}
    return tracker.client.create_run(tracker.experiment_id, tags=tags).info.run_id


def test_a_rung_records_the_val_acc_of_its_last_epoch_not_its_best(tracker):
    from fractal_mlops.search.epochs import TrialResults
    from fractal_mlops.search.halving_trial import _end_rung

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    run_id = a_trial_run(tracker, trial.number)
    results = TrialResults(last_val_acc=0.61, best_val_acc=0.83, param_count=10, train_seconds=1)
    _end_rung(SimpleNamespace(study=study, tracker=tracker), trial, run_id, Rung(1, 2, 9, 3),
              results)
    attrs = study.trials[0].user_attrs
    assert attrs["rung_1_val_acc"] == 0.61 and attrs["best_val_acc"] == 0.83
    assert study.trials[0].state.name == "WAITING"
    run = tracker.client.get_run(run_id)
    assert run.info.status == "SCHEDULED" and run.data.tags["fractal.rung"] == "1"


# -- lost workers, orphaned runs ----------------------------------------------------------------

def test_a_live_process_whose_pid_was_reused_is_a_lost_worker():
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert not worker_is_gone(f"{me}:{_process_start(os.getpid())}", None)
    assert worker_is_gone(f"{me}:{int(_process_start(os.getpid())) + 1}", None)  # another start
    assert not worker_is_gone(f"{me}:?", None)  # a start time it could not read: alive


def test_the_heartbeat_goes_on_after_a_store_error(monkeypatch):
    from fractal_mlops.search import claims
    from fractal_mlops.stores import optuna_trials

    monkeypatch.setenv("FRACTAL_HEARTBEAT_SECONDS", "0.05")
    monkeypatch.setenv("FRACTAL_HEARTBEAT_GRACE", "1")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    real, failures = optuna_trials.set_attr, []

    def flaky(study_, trial_, key, value):
        if len(failures) < 2:  # the store hiccups twice
            failures.append(key)
            raise RuntimeError("database is locked")
        return real(study_, trial_, key, value)

    monkeypatch.setattr(optuna_trials, "set_attr", flaky)
    with claims.Heartbeat(study, trial):
        deadline = time.monotonic() + 30
        while "heartbeat" not in study.trials[0].user_attrs:
            assert time.monotonic() < deadline, "the heartbeat stopped after the store's error"
            time.sleep(0.02)
    assert failures == ["heartbeat", "heartbeat"]


def test_orphaned_runs_are_matched_by_the_studys_own_trial_numbers(tmp_path, tracker):
    """Two studies in one journal: trial numbers repeat, storage-wide trial IDs do not."""
    from fractal_mlops.search.claims import close_orphaned_runs

    storage = open_storage(resolve_storage(f"journal:{tmp_path / 'optuna.journal'}", None))
    first = optuna.create_study(storage=storage, study_name="first", direction="maximize")
    for _ in range(3):  # IDs 0, 1, 2 in the storage
        first.tell(first.ask(), 0.5)
    second = optuna.create_study(storage=storage, study_name="pinned", direction="maximize")
    finished = second.ask()  # number 0, storage-wide ID 3
    second.tell(finished, state=optuna.trial.TrialState.FAIL)
    orphan = a_trial_run(tracker, finished.number)  # left RUNNING by a worker that died
    close_orphaned_runs(second, tracker)
    assert tracker.client.get_run(orphan).info.status == "KILLED"


# -- the worker count, the leaderboard ----------------------------------------------------------

def test_the_memory_check_counts_every_worker(monkeypatch):
    monkeypatch.setattr(preflight, "usable_cores", lambda: 8)
    monkeypatch.setattr(preflight, "available_memory", lambda: 2 * 2**30)  # 0.75 GiB each
    preflight.check_workers(2)
    with pytest.raises(ConfigError, match=r"--workers 3: .* at most 2 workers"):
        preflight.check_workers(3)
    with pytest.raises(ConfigError, match=r"--workers 2: .* at most 1 workers"):
        preflight.check_workers(2, data_bytes=2**30)  # the dataset, in every worker


def test_the_leaderboard_lists_the_best_first():
    from fractal_mlops.search.progress import TrialRow, leaderboard

    rows = [TrialRow(0, "middle", "COMPLETE", 0.7, 100, 1.0, None),
            TrialRow(1, "best", "COMPLETE", 0.9, 300, 1.0, None),
            TrialRow(2, "worst", "COMPLETE", 0.5, 100, 1.0, None),
            TrialRow(3, "tie-smaller", "COMPLETE", 0.9, 200, 1.0, None),
            TrialRow(4, "pruned", "PRUNED", None, 100, 1.0, "diverged")]
    out = io.StringIO()
    leaderboard(Console(file=out, width=200), "pinned", rows, 5, 1.0, "mlflow ui")
    text = out.getvalue()
    order = [name for name in ("tie-smaller", "best", "middle", "worst") if name in text]
    assert sorted(order, key=text.index) == ["tie-smaller", "best", "middle", "worst"]
    assert "4 COMPLETE" in text and "1 PRUNED" in text


# -- per-epoch records, restarts ----------------------------------------------------------------

def test_each_epoch_is_logged_at_its_epoch_number(tracker):
    from fractal_mlops.engine.train import EpochResult

    run_id = a_trial_run(tracker, 0)
    for epoch in (1, 2, 3):
        tracker.log_epoch(run_id, EpochResult(epoch, 1.0 / epoch, 0.5, 0.9, 0.1 * epoch, 1.0,
                                              100.0, 500.0))
    history = tracker.client.get_metric_history(run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.30000000000000004)]


def test_a_study_that_reported_an_epoch_trained_something():
    from fractal_mlops.stores.repair import trained_nothing

    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    assert trained_nothing(study)
    trial = study.ask()
    trial.report(0.4, 1)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert not trained_nothing(study)


def test_a_point_continues_the_run_of_its_last_attempt_only_when_that_was_cut_short():
    from fractal_mlops.config.space import canonical
    from fractal_mlops.search.claims import create_trial, resumable_run

    variants = [canonical(1, 1, 8, "conv", "none", "none", 0.0, "none"),
                canonical(1, 2, 8, "conv", "none", "none", 0.0, "none")]
    study = optuna.create_study(direction="maximize")

    def attempt(variant, reason: str, run_id: str) -> None:
        trial = create_trial(study, variants, variant)
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("mlflow_run_id", run_id)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)

    assert resumable_run(study, variants[0]) is None  # never tried
    attempt(variants[0], "interrupted", "run-a")
    attempt(variants[1], "ValueError: a shape error", "run-b")
    assert resumable_run(study, variants[0]) == "run-a"
    assert resumable_run(study, variants[1]) is None  # failed for good: nothing to continue
    attempt(variants[0], "worker lost", "run-c")
    assert resumable_run(study, variants[0]) == "run-c"  # the latest attempt's run
