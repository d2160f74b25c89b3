"""One trial of the grid: claim a point, train it, record how it ended in both stores.

The order keeps every ending recoverable: the trial is claimed and its run started with
interrupts held; training ends in an exception or not, `outcome.outcome_of` says what that
means, the MLflow run is closed first and Optuna told second (a crash in between is recovered
by the next run), and only then may an interrupt or a store outage stop the worker.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, NoReturn

from rich.markup import escape

from fractal_mlops.config.space import Variant
from fractal_mlops.errors import StopWorker, disk_full, is_outage, one_line
from fractal_mlops.search.claims import (
    Heartbeat,
    claim_next,
    others_training,
    points_done,
    recover_lost_trials,
    resumable_run,
    wait_seconds,
)
from fractal_mlops.search.epochs import TrialResults, train_and_log, trial_config_yaml, trial_params
from fractal_mlops.search.outcome import Outcome, outcome_of
from fractal_mlops.search.settings import TrialContext
from fractal_mlops.stores.credentials import redact
from fractal_mlops.stores.locations import sqlite_lock
from fractal_mlops.stores.optuna_storage import claim_lock
from fractal_mlops.tracking.names import PARAM_COUNT_ATTR, REASON_ATTR, RUN_ID_ATTR
from fractal_mlops.tracking.states import CUDA_FAILED, STORAGE_FAILED, TRACKING_FAILED, TrialState

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fractal_mlops.search.progress import StudyProgress


PENDING = "its grid point stays pending and is trained then"


def claim_and_run(ctx: TrialContext, progress: StudyProgress) -> bool:
    """Claim the next pending grid point and train it; False when the grid is done. While
    other workers still train the last points this waits, and takes over the point of a worker
    that is lost (recover_lost_trials makes it pending), so that a worker ends only with the grid.

    Ctrl-C / SIGTERM wait from the claim until run_trial is ready to record them, so that an
    interrupt never leaves a claimed trial or a started run behind unclosed; while waiting they
    stop the worker at once.
    """
    settings = ctx.settings
    shown: list[str] | None = None
    while True:
        ctx.interrupts.hold()  # released inside run_trial
        try:
            with claim_lock(settings.storage, settings.study_name):
                recover_lost_trials(ctx.study, ctx.tracker)
                claimed = claim_next(ctx.study, ctx.variants)
                others = others_training(ctx.study) if claimed is None else []
            if claimed is not None:
                trial, variant, position = claimed
                progress.trial_started(position, len(ctx.variants), trial.number, variant.name)
                run_id, continued = _start_run(ctx, trial, variant,
                                               resumable_run(ctx.study, variant))
        except BaseException:
            ctx.interrupts.release(raise_pending=False)
            raise
        if claimed is not None:
            break
        ctx.interrupts.release()
        if not others:
            return False
        if others != shown:
            shown = others
            progress.console.print(
                f"{progress.prefix}no grid point left to claim; waiting for {len(others)} that "
                f"other workers train, to take over any whose worker is lost: "
                f"{escape(', '.join(others[:5]))}{' ...' if len(others) > 5 else ''}")
        time.sleep(wait_seconds())
    run_trial(ctx, trial, variant, run_id, progress, continued)
    return True


def _start_run(ctx: TrialContext, trial, variant: Variant,
               resume: str | None = None) -> tuple[str, bool]:
    """The trial's MLflow run, and whether it is `resume`, an earlier attempt's run that this
    trial continues (else a new one)."""
    import torch

    config, run_id = ctx.settings.config, None
    try:
        if resume is not None and ctx.tracker.resume_trial(resume, trial.number):
            trial.set_user_attr(RUN_ID_ATTR, resume)
            return resume, True
        run_id = ctx.tracker.start_trial(
            ctx.parent_run_id, ctx.settings.study_name, trial.number, variant.name,
            trial_params(variant, config, ctx.data, ctx.device.type, torch.get_num_threads()),
            trial_config_yaml(variant, config), config.sha256, ctx.data)
        trial.set_user_attr(RUN_ID_ATTR, run_id)
    except Exception as exc:  # noqa: BLE001 - the trial cannot be recorded: stop here
        outcome = outcome_of(exc)
        if not outcome.stops_worker:  # MLflow refused the run: no trial can be recorded
            outcome = Outcome(TrialState.FAIL, TRACKING_FAILED, killed=True, stops_worker=True)
        _record_where_possible(ctx, trial, run_id, outcome, TrialResults())
        stop_worker(trial.number, outcome, exc, PENDING)
    return run_id, False


def run_trial(ctx: TrialContext, trial, variant: Variant, run_id: str,
              progress: StudyProgress, continued: bool = False) -> None:
    """Train a claimed trial whose run has started, then record how it ended (outcome_of) in
    both stores. Called with interrupts held (see claim_and_run): they are released where an
    interrupt is recorded."""
    results, error = TrialResults(), None
    try:
        ctx.interrupts.release()  # raises a Ctrl-C that came while the trial was claimed
        with Heartbeat(ctx.study, trial):
            train_and_track(ctx, trial, variant, run_id, results, progress, continued=continued)
    except (Exception, KeyboardInterrupt) as exc:  # every ending is recorded, as outcome_of says
        error = exc
    outcome = outcome_of(error)
    with ctx.interrupts.deferred():
        if outcome.store_down:
            _record_where_possible(ctx, trial, run_id, outcome, results)
        else:
            try:
                record_end(ctx, trial, run_id, outcome, results)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                error, outcome = exc, outcome_of(exc)  # a store went away meanwhile
                _record_where_possible(ctx, trial, run_id, outcome, results)
    _release(ctx, error)
    if outcome.stops_worker:
        stop_worker(trial.number, outcome, error, PENDING)
    progress.trial_done(points_done(ctx.study), trial.number, variant.name, outcome.state,
                        results.last_val_acc, outcome.reason)
    ctx.interrupts.raise_pending()  # everything is recorded: now the worker may stop


def train_and_track(ctx: TrialContext, trial, variant: Variant, run_id: str,
                    results: TrialResults, progress: StudyProgress,
                    stop_at: int | None = None, continued: bool = False) -> bool:
    """epochs.train_and_log (shared with reproduce), plus Optuna's report and pruner; from the
    run's checkpoint when it has one. `stop_at`: a halving rung's last epoch. `continued`: the
    run is an earlier, interrupted attempt's, which this trial carries on."""
    config = ctx.settings.config
    reported: set[int] = set()
    if continued:  # the new trial learns the epochs its run trained before
        for epoch, val_acc in ctx.tracker.val_acc_history(run_id):
            report_value(ctx, trial, val_acc, epoch)
            reported.add(epoch)

    def on_epoch(result) -> str | None:
        progress.epoch_done(result.epoch, result.val_acc, variant.name)
        if result.epoch not in reported:  # an epoch logged but not saved is trained again
            report_value(ctx, trial, result.val_acc, result.epoch)
        return pruner_reason(ctx, trial, result)

    return train_and_log(ctx.tracker, run_id, variant, ctx.data, config, ctx.device, results,
                         on_epoch=on_epoch, stop_at=stop_at, checkpoints=True,
                         precision_cache=ctx.precision_cache)


def report_value(ctx: TrialContext, trial, val_acc: float, epoch: int) -> None:
    """An epoch's val_acc to Optuna; on SQLite a Ctrl-C waits for the write (stores.sqlite_lock),
    as MLflow's SQLite writes do. A multi-objective study takes no reports (Optuna refuses them:
    its pruners rank one value); MLflow has the epochs."""
    if len(ctx.study.directions) > 1:
        return
    with sqlite_lock(ctx.settings.storage.location):
        trial.report(val_acc, epoch)


def pruner_reason(ctx: TrialContext, trial, result) -> str | None:
    """Why Optuna's pruner stops the trial after this epoch, or None."""
    if len(ctx.study.directions) > 1 or not trial.should_prune():
        return None
    return (f"{ctx.settings.config.pruning.pruner} pruner: val_acc {result.val_acc:.3f} at epoch "
            f"{result.epoch} is below the other trials'")


def _release(ctx: TrialContext, error: BaseException | None) -> None:
    """The trial's GPU memory goes back before the next trial (an error's traceback holds the
    frames, and so the model and batches, of the trial that raised it)."""
    from fractal_mlops.engine.device import release_memory

    if error is not None:
        error.__traceback__ = None
    release_memory(ctx.device)


def record_end(ctx: TrialContext, trial, run_id: str, outcome: Outcome,
               results: TrialResults) -> None:
    """Close the MLflow run first, then tell Optuna (a crash in between is recovered)."""
    ctx.tracker.finish_trial(run_id, outcome.state, outcome.reason, results.metrics(),
                             status=outcome.run_status)
    _tell(ctx, trial, outcome, results)


def _record_where_possible(ctx: TrialContext, trial, run_id: str, outcome: Outcome,
                           results: TrialResults) -> None:
    """A store went away: record the end in the store that still answers. An Optuna trial
    left RUNNING is recovered by the next run; an MLflow run left RUNNING is closed by it."""
    if run_id is not None:
        with contextlib.suppress(Exception):
            ctx.tracker.finish_trial(run_id, outcome.state, outcome.reason, results.metrics(),
                                     status=outcome.run_status)
    with contextlib.suppress(Exception):
        _tell(ctx, trial, outcome, results)


def _tell(ctx: TrialContext, trial, outcome: Outcome, results: TrialResults) -> None:
    try:
        if outcome.reason:
            trial.set_user_attr(REASON_ATTR, redact(outcome.reason))
        if results.param_count is not None:
            trial.set_user_attr(PARAM_COUNT_ATTR, results.param_count)
        if outcome.state is TrialState.COMPLETE:
            ctx.study.tell(trial, objective_values(results, ctx.settings.config.search.objectives))
        else:
            ctx.study.tell(trial, state=outcome.state.optuna_state)
    except (RuntimeError, ValueError) as exc:  # declared lost by another worker meanwhile
        log.warning("trial %d: %s", trial.number, exc)


def objective_values(results: TrialResults, objectives: list[str]) -> list[float]:
    """The values Optuna is told for a COMPLETE trial, in the order of `search.objectives`."""
    metrics = {**results.metrics(), "final_val_acc": results.last_val_acc}
    return [metrics[name] for name in objectives]


def stop_worker(number: int, outcome: Outcome, error: BaseException | None,
                then: str) -> NoReturn:
    """The end is recorded; an interrupt, a store outage or a broken GPU now stops this worker,
    rather than failing every remaining grid point against a dead store or CUDA context.
    `then`: what becomes of the point when the same command runs again."""
    if isinstance(error, KeyboardInterrupt):
        raise error
    if outcome.reason == CUDA_FAILED:
        raise StopWorker(
            f"the GPU failed in trial {number} ({one_line(error, 300)}): this process's CUDA "
            "context is gone, so the worker stops; check the GPU (nvidia-smi), then run the "
            f"same command again: {then}") from None
    if error is not None and disk_full(error):
        raise StopWorker(
            f"the disk is full: trial {number} could not be recorded ({one_line(error, 300)}); "
            f"free some space, then run the same command again: {then}") from None
    store = "the Optuna storage" if outcome.reason == STORAGE_FAILED else "the tracking store"
    raise StopWorker(
        f"{store} could not record trial {number} ({one_line(error, 300)}); run the same "
        f"command again when {store} is back: {then}") from None
