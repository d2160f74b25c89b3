"""Claiming grid points among workers, and telling live workers from lost ones.

A worker claims the next pending point under the study-wide claim lock (storage.claim_lock):
one storage call creates its trial RUNNING with the point, the worker's identity and a first
heartbeat. While the trial trains, a thread refreshes the heartbeat. A RUNNING trial whose
worker is gone (its process, on this host; its heartbeat, elsewhere) is marked FAIL
"worker lost" by the next worker that claims, so its point becomes pending again.

A worker that finds no point left to claim while other workers still train waits (`others_training`
says for what), taking over the point of any of them that is lost, and ends only when the grid
is: so the last worker to exit, on any host, is one that saw the grid done (a Kubernetes Job
whose pods exit 0 is then a finished grid).

Optuna keeps no public API for creating a trial with its state and attributes in one call or
for writing an attribute of a trial by ID from another thread: optuna_trials has those calls.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fractal_mlops.config.space import Variant, dimension_values
from fractal_mlops.search.outcome import final_failures
from fractal_mlops.stores import optuna_trials
from fractal_mlops.stores.optuna_storage import heartbeat_settings, worker_identity, worker_is_gone
from fractal_mlops.tracking import states
from fractal_mlops.tracking.names import (
    HEARTBEAT_ATTR,
    PARAM_COUNT_ATTR,
    REASON_ATTR,
    REPORTER_ATTR,
    RUN_ID_ATTR,
    VARIANT_ATTR,
    WORKER_ATTR,
)
from fractal_mlops.tracking.states import RETRYABLE, WORKER_LOST

log = logging.getLogger(__name__)
WAIT_SECONDS = 2.0  # at most this long between two looks of a worker waiting for the others

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from fractal_mlops.tracking.tracker import Tracker


def grid_sampler():
    import optuna

    class ClaimedGridSampler(optuna.samplers.GridSampler):
        """Optuna's GridSampler over the variant names. Points are claimed by `claim_next`
        under the study's lock, so it never picks one itself, and it leaves stopping to the
        worker loop (its own `study.stop()` only works inside `study.optimize`)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return ClaimedGridSampler


def finished_points(trials: list[FrozenTrial]) -> set[str]:
    """Variants that have their final COMPLETE / PRUNED / FAIL trial."""
    from optuna.trial import TrialState

    return final_failures(trials) | {t.params["variant"] for t in trials if "variant" in t.params
                                     and t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


def points_done(study: optuna.Study) -> int:
    return len(finished_points(study.get_trials(deepcopy=False)))


def claim_next(study: optuna.Study, variants: list[Variant]) -> tuple[Any, Variant, int] | None:
    """Create the trial of the next pending grid point (call under the claim lock)."""
    from optuna.trial import TrialState

    # One read of the trials: another worker's trial that finishes meanwhile is seen either
    # RUNNING or finished, never neither (two reads once let its point be claimed again).
    trials = study.get_trials(deepcopy=False)
    taken = finished_points(trials) | {
        t.params["variant"] for t in trials if t.state == TrialState.RUNNING and "variant" in t.params}
    pending = [v for v in variants if v.name not in taken]
    if not pending:
        return None
    choice = pending[0]
    trial = create_trial(study, variants, choice)
    position = len(variants) - len(pending) + 1
    return trial, choice, position


def others_training(study: optuna.Study) -> list[str]:
    """The points other workers train now ("variant (worker)"); call between trials, under the
    claim lock, after recover_lost_trials."""
    from optuna.trial import TrialState

    return [f"{t.params.get(VARIANT_ATTR, '?')} ({t.user_attrs.get(WORKER_ATTR, '?')})"
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def wait_seconds() -> float:
    """How often a worker with nothing to claim looks again: a lost worker cannot be noticed
    sooner than its heartbeat lapses, and a finished grid should end every worker promptly."""
    return min(WAIT_SECONDS, heartbeat_settings()[0])


def take_report(study: optuna.Study) -> str | None:
    """Whether this worker writes the report of the finished grid: None if it does, else the
    worker that does. Workers that find the grid done together (the pods of one Job) leave it
    to the first; a later run on the same finished grid, or one after that worker was lost,
    writes it again. Call under the claim lock."""
    mine = {"worker": worker_identity(), "heartbeat": time.time(),
            "trials": len(study.get_trials(deepcopy=False))}
    taken = study.user_attrs.get(REPORTER_ATTR)
    if (isinstance(taken, dict) and taken.get("trials") == mine["trials"]
            and not worker_is_gone(taken.get("worker"), taken.get("heartbeat"))):
        return str(taken.get("worker"))
    study.set_user_attr(REPORTER_ATTR, mine)
    return None


def resumable_run(study: optuna.Study, variant: Variant) -> str | None:
    """The MLflow run of the point's last attempt when that attempt was cut short (interrupted,
    its worker lost, a store or the GPU away): its trial continues in it, from its checkpoint."""
    from optuna.trial import TrialState

    attempts = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.params.get(VARIANT_ATTR) == variant.name]
    if not attempts:
        return None
    last = max(attempts, key=lambda t: t.number)
    if last.user_attrs.get(REASON_ATTR) not in RETRYABLE:
        return None
    return last.user_attrs.get(RUN_ID_ATTR)


def create_trial(study: optuna.Study, variants: list[Variant], choice: Variant,
                 **user_attrs: Any) -> optuna.Trial:
    """A RUNNING trial of `choice`, owned by this worker, in one storage call: its point, owner
    and the GridSampler's bookkeeping (grid_id: the sampler sees the point as visited and never
    picks one itself). No WAITING trial and no queue in between that another worker could pop.
    Its params: `variant` and every template dimension (categorical over the grid's values),
    so that Optuna's importance evaluators and optuna-dashboard's plots see the dimensions; the
    sampler's search space stays `variant` alone, as in studies created before the dimensions."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    names = [v.name for v in variants]
    params, distributions = {VARIANT_ATTR: choice.name}, {VARIANT_ATTR: CategoricalDistribution(names)}
    for dim, values in dimension_values(variants).items():  # for importance and the dashboard
        params[dim] = getattr(choice, dim)
        distributions[dim] = CategoricalDistribution(values)
    template = optuna.trial.FrozenTrial(
        number=-1, trial_id=-1, state=TrialState.RUNNING, value=None, values=None,
        datetime_start=datetime.now(), datetime_complete=None,
        params=params, distributions=distributions,
        user_attrs={VARIANT_ATTR: choice.name, WORKER_ATTR: worker_identity(),
                    HEARTBEAT_ATTR: time.time(), **user_attrs},
        system_attrs={"search_space": {VARIANT_ATTR: names}, "grid_id": names.index(choice.name)},
        intermediate_values={})
    return optuna_trials.create(study, template)


def recover_lost_trials(study: optuna.Study, tracker: Tracker) -> list[int]:
    """Mark RUNNING trials whose worker is gone FAIL ("worker lost"), close their MLflow runs."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not worker_is_gone(t.user_attrs.get(WORKER_ATTR), t.user_attrs.get(HEARTBEAT_ATTR)):
            continue
        try:
            if not _tell_recorded_end(study, t, tracker):
                optuna_trials.set_attr(study, t, REASON_ATTR, WORKER_LOST)
                study.tell(t.number, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # its worker finished it after all
            continue
        lost.append(t.number)
    if lost:
        close_orphaned_runs(study, tracker)
    return lost


def _tell_recorded_end(study: optuna.Study, t, tracker: Tracker) -> bool:
    """A worker that closed its trial's run COMPLETE or PRUNED and was lost before Optuna heard
    it (killed in between, or the journal's last record cut by a full disk) finished the
    trial: Optuna is told what the run recorded, so the point is neither trained again nor
    counted as a failure. False when the run recorded no such end."""
    from optuna.trial import TrialState

    if len(study.directions) > 1:  # several objectives: the point is trained again, as before
        return False
    end = tracker.recorded_end(t.user_attrs.get(RUN_ID_ATTR), t.number)
    if end is None:
        return False
    if end.param_count is not None:
        optuna_trials.set_attr(study, t, PARAM_COUNT_ATTR, int(end.param_count))
    if end.state is states.TrialState.COMPLETE:
        study.tell(t.number, end.final_val_acc)
    else:
        if end.reason:
            optuna_trials.set_attr(study, t, REASON_ATTR, end.reason)
        study.tell(t.number, state=TrialState.PRUNED)
    log.warning("trial %d of a lost worker had recorded its end in MLflow (%s): "
                "Optuna now has it too", t.number, end.state.value)
    return True


def close_orphaned_runs(study: optuna.Study, tracker: Tracker) -> None:
    """Close RUNNING trial runs whose Optuna trial has finished: their worker was lost, or a
    tracking outage stopped it before MLflow heard the end. Found by tags, so that a worker
    killed before it recorded its run ID is covered too."""
    finished = {t.number: t for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for run_id, number in tracker.running_trial_runs(study.study_name):
        if number in finished:
            reason = finished[number].user_attrs.get(REASON_ATTR) or "finished while unrecorded"
            tracker.finish_trial(run_id, states.TrialState.FAIL, reason,
                                 status=states.RunStatus.KILLED)


class Heartbeat:
    """Refreshes the trial's `heartbeat` user attr, so workers on other hosts see it alive."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        args=(study, optuna_trials.trial_id(trial)))

    def _beat(self, study: optuna.Study, trial_id: int) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        interval = heartbeat_settings()[0]
        while not self._stop.wait(interval):
            try:
                optuna_trials.set_attr(study, trial_id, HEARTBEAT_ATTR, time.time())
            except UpdateFinishedTrialError:  # finished, or declared lost by another worker
                return
            except Exception:  # noqa: BLE001 - the store hiccuped: beat again next time
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
