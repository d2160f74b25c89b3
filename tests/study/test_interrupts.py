"""Ctrl-C at the worst moments: while a trial's run is being started, and while it is being
closed. Real stores, the worker's own claim-and-run loop, a real SIGINT sent to this process at
exactly that moment (from inside the store call), so the race is hit every time."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import StudyDir, write_config


@pytest.fixture(params=["journal"])
def worker(request, study_dir: StudyDir):
    """The pieces run_worker builds, on a one-point digits study; SIGINT restored after.
    Optuna's storage: the default journal file, or (parametrized "sqlite") a SQLite database."""
    import torch

    from fractal_mlops.cli import make_console
    from fractal_mlops.config.space import grid
    from fractal_mlops.engine.data import load_dataset
    from fractal_mlops.search.progress import StudyProgress
    from fractal_mlops.search.settings import TrialContext
    from fractal_mlops.search.worker import open_stores
    from fractal_mlops.signals import InterruptGuard
    from fractal_mlops.study import build_parser, resolve_settings
    from fractal_mlops.tracking.tracker import configure

    if request.param == "sqlite":
        study_dir.storage = f"sqlite:///{study_dir.root / 'optuna.db'}"
    config = write_config(study_dir.root / "one.yaml", study_name="one",
                          space={"blocks": [1], "columns": [1], "width": [8],
                                 "unit": ["conv-norm-act"]}, training={"epochs": 1})
    settings = resolve_settings(build_parser().parse_args(
        ["--config", str(config), *study_dir.args("--device", "cpu")]))
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    configure(settings.tracking_uri)  # as the study's main does
    interrupts = InterruptGuard().install()
    variants = grid(settings.config)
    study, tracker, parent = open_stores(settings, variants)
    context = TrialContext(study, tracker, parent, settings, load_dataset(settings.config.data),
                           torch.device("cpu"), variants, interrupts)
    progress = StudyProgress(make_console(), len(variants), 0, 1, live=False)
    try:
        yield context, progress
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def interrupt_during(tracker, method: str) -> None:
    """SIGINT to this process from inside `tracker.<method>`, after the store call is done."""
    original = getattr(tracker, method)

    def with_ctrl_c(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    setattr(tracker, method, with_ctrl_c)


def test_ctrl_c_while_the_run_starts_closes_it_as_interrupted(worker, study_dir: StudyDir):
    from fractal_mlops.search.trial import claim_and_run

    context, progress = worker
    interrupt_during(context.tracker, "start_trial")
    with pytest.raises(KeyboardInterrupt):
        claim_and_run(context, progress)
    [trial] = study_dir.optuna_trials("one")
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"] == "interrupted"
    run = study_dir.client().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["fractal.reason"] == "interrupted"
    assert not study_dir.running_trial_runs()


def test_ctrl_c_while_the_run_closes_keeps_the_finished_trial(worker, study_dir: StudyDir):
    from fractal_mlops.search.trial import claim_and_run

    context, progress = worker
    interrupt_during(context.tracker, "finish_trial")
    with pytest.raises(KeyboardInterrupt):  # the worker stops, once everything is recorded
        claim_and_run(context, progress)
    [trial] = study_dir.optuna_trials("one")
    assert trial.state.name == "COMPLETE"
    run = study_dir.client().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["fractal.state"] == "COMPLETE"
    assert not study_dir.running_trial_runs()


@pytest.mark.parametrize("worker", ["sqlite"], indirect=True)
def test_ctrl_c_inside_an_epochs_optuna_write_on_sqlite_lands_once_it_is_written(
        worker, study_dir: StudyDir):
    """A KeyboardInterrupt inside a SQLite write can leave its connection holding the write
    lock, so that closing the trial finds the database locked. The epoch's report to Optuna
    waits for its write; then the trial closes interrupted in both stores."""
    from fractal_mlops.search.trial import claim_and_run

    context, progress = worker
    storage = context.study._storage
    original = storage.set_trial_intermediate_value

    def ctrl_c_then_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the write begins
        return original(*args, **kwargs)

    storage.set_trial_intermediate_value = ctrl_c_then_write
    with pytest.raises(KeyboardInterrupt):
        claim_and_run(context, progress)
    [trial] = study_dir.optuna_trials("one")
    assert list(trial.intermediate_values) == [1]  # the epoch reported before the interrupt
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"] == "interrupted"
    run = study_dir.client().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["fractal.reason"] == "interrupted"
    assert not study_dir.running_trial_runs()


def test_a_held_interrupt_waits_for_the_release():
    from fractal_mlops.signals import InterruptGuard

    saved = signal.getsignal(signal.SIGINT)
    guard = InterruptGuard().install()
    try:
        guard.hold()
        os.kill(os.getpid(), signal.SIGINT)  # noted, not raised
        with guard.deferred():  # holds nest: the inner end does not raise either
            pass
        with pytest.raises(KeyboardInterrupt):
            guard.release()
        guard.hold()  # nothing pending any more: a new hold and release are quiet
        guard.release()
        with pytest.raises(KeyboardInterrupt):  # not held: raised at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, saved)
