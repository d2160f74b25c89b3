"""Train one rung of one grid point (search.mode: halving; the rungs are planned in halving.py).

The point's MLflow run goes on across rungs: the model, optimizer and RNG state at the end of a
rung are the run's checkpoint (Tracker.save_checkpoint), which the next rung loads, so the
epochs of a promoted point equal those of an unbroken run and none is trained twice. A rung
trains through the same epoch loop as a grid trial (trial.train_and_track).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NoReturn

from fractal_mlops.search.claims import Heartbeat
from fractal_mlops.search.epochs import (
    TrialResults,
    trial_config_yaml,
    trial_params,
)
from fractal_mlops.search.halving import Rung, RungWork, next_work, points_done
from fractal_mlops.search.outcome import outcome_of
from fractal_mlops.search.trial import record_end, stop_worker, train_and_track
from fractal_mlops.stores import optuna_trials
from fractal_mlops.tracking.names import RUN_ID_ATTR

if TYPE_CHECKING:
    from fractal_mlops.config.space import Variant
    from fractal_mlops.search.progress import StudyProgress
    from fractal_mlops.search.settings import TrialContext

def claim_and_run_rung(ctx: TrialContext, progress: StudyProgress) -> bool:
    """Claim the next rung of a point and train it; False when the study is done."""
    work = next_work(ctx, progress)
    if work is None:
        return False
    run_rung(ctx, work, progress)
    return True


def run_rung(ctx: TrialContext, work: RungWork, progress: StudyProgress) -> None:
    """Train `work.trial`'s point through `work.rung`, continuing its run from its checkpoint.
    Ends WAITING (rung done), or COMPLETE (last rung), PRUNED (diverged) or FAIL. Called with
    interrupts held (see halving.next_work): they wait until the run is open and recorded."""
    from fractal_mlops.engine.device import release_memory

    trial, variant, rung = work.trial, work.variant, work.rung
    progress.trial_started(points_done(ctx.study) + 1, len(ctx.variants), trial.number,
                           variant.name)
    results, run_id = TrialResults(), None
    try:
        run_id = _open_run(ctx, trial, variant)
    except BaseException as exc:
        ctx.interrupts.release(raise_pending=False)
        _stop(ctx, trial, run_id, exc)
    try:
        ctx.interrupts.release()  # raises a Ctrl-C that came since the claim
        with Heartbeat(ctx.study, trial):
            train_and_track(ctx, trial, variant, run_id, results, progress,
                            stop_at=work.rung.epochs)
        outcome = outcome_of(None) if work.last_rung else None  # None: waits for the ranking
    except (Exception, KeyboardInterrupt) as exc:  # the ending, as outcome_of says
        outcome = outcome_of(exc)
        if outcome.stops_worker:
            _stop(ctx, trial, run_id, exc)
    with ctx.interrupts.deferred():
        if outcome is None:
            _end_rung(ctx, trial, run_id, rung, results)
            state, reason = f"RUNG {rung.number}", (f"trained to epoch {rung.epochs}, waits for "
                                                    "the rung's ranking")
        else:
            record_end(ctx, trial, run_id, outcome, results)
            state, reason = outcome.state, outcome.reason
    release_memory(ctx.device)
    progress.trial_done(points_done(ctx.study), trial.number, variant.name, state,
                        results.last_val_acc, reason)
    ctx.interrupts.raise_pending()  # everything is recorded: now the worker may stop


def _open_run(ctx: TrialContext, trial, variant: Variant) -> str:
    """The point's MLflow run: started on its first rung, reopened on the next ones."""
    import torch

    config = ctx.settings.config
    run_id = optuna_trials.attrs(ctx.study, trial).get(RUN_ID_ATTR)
    if run_id is not None:
        ctx.tracker.reopen_run(run_id)
        return run_id
    run_id = ctx.tracker.start_trial(
        ctx.parent_run_id, ctx.settings.study_name, trial.number, variant.name,
        trial_params(variant, config, ctx.data, ctx.device.type, torch.get_num_threads()),
        trial_config_yaml(variant, config), config.sha256, ctx.data)
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    return run_id


def _stop(ctx: TrialContext, trial, run_id: str | None, exc: BaseException) -> NoReturn:
    """Interrupted, or a store is down: the point goes back to WAITING and resumes its rung on
    the next run; the worker stops."""
    with ctx.interrupts.deferred():
        _pause(ctx, trial, run_id)
    outcome = outcome_of(exc)
    if outcome.stops_worker:
        stop_worker(trial.number, outcome, exc, "the point resumes its rung")
    raise exc


def _end_rung(ctx: TrialContext, trial, run_id: str, rung: Rung, results: TrialResults) -> None:
    """Record the rung's result, then let the point wait (in this order: see `_rank...`)."""
    from optuna.trial import TrialState

    for key, value in (("best_val_acc", results.best_val_acc), ("param_count", results.param_count),
                       ("train_seconds", results.train_seconds),
                       (f"rung_{rung.number}_val_acc", results.last_val_acc),
                       *results.cost.items(),  # several objectives: the costs rank the rung too
                       ("rung_done", rung.number)):
        optuna_trials.set_attr(ctx.study, trial, key, value)
    optuna_trials.set_state(ctx.study, trial, TrialState.WAITING)
    ctx.tracker.wait_run(run_id, rung=rung.number)


def _pause(ctx: TrialContext, trial, run_id: str | None) -> None:
    """Interrupted: the point goes back to WAITING and resumes its rung on the next run."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        optuna_trials.set_state(ctx.study, trial, TrialState.WAITING)
    if run_id is not None:
        with contextlib.suppress(Exception):  # the tracking store may be the one that is down
            ctx.tracker.wait_run(run_id)
