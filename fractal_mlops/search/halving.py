"""Successive halving over the template grid (`search.mode: halving`), kept in the Optuna storage.

Rung r trains its points up to min_epochs * reduction_factor**(r-1) epochs (the last rung: to
training.epochs). When every point of rung r has finished it, its points are ranked by val_acc
at the rung's last epoch (ties: grid order; with several `search.objectives`, by Pareto front
over that val_acc and the cost metrics, then crowding distance: `rank_rung`); the best
1/reduction_factor go on to rung r+1, the others end PRUNED, reason "halving: rung r
(E epochs), rank K of N, kept the top M". The points of the last rung end COMPLETE. Ranking
waits for the whole rung, so the result does not depend on the order in which workers happen
to finish (unlike Optuna's asynchronous pruners).

A grid point is one Optuna trial and one MLflow run for its whole life. Its state lives in the
Optuna storage, so that workers on one host or several (PostgreSQL) share it and a kill -9
loses nothing that was recorded:
- trial state RUNNING while a worker trains it; WAITING between rungs, and after its worker was
  lost or interrupted (it then resumes its rung); COMPLETE / PRUNED / FAIL at the end;
- user attrs `rung` (the rung it is in), `rung_done` (the last rung it finished) and
  `rung_<r>_val_acc` (its val_acc at the end of rung r);
- moving a point WAITING -> RUNNING, and ranking a finished rung, happen under the study's claim
  lock. A ranking is a function of recorded values only: one cut short by a kill is made again.

At the end of each rung the model, optimizer and RNG state go to the run's artifact
`halving/checkpoint.pt`; the next rung loads it and continues the same run, so no epoch is
trained twice (only the unfinished part of a rung whose worker was lost is trained again, from
the rung's start).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fractal_mlops.config.objectives import directions, pareto_ranking
from fractal_mlops.search.claims import create_trial
from fractal_mlops.stores import optuna_trials
from fractal_mlops.stores.optuna_storage import claim_lock, worker_identity, worker_is_gone
from fractal_mlops.tracking import states
from fractal_mlops.tracking.names import (
    HEARTBEAT_ATTR,
    REASON_ATTR,
    RUN_ID_ATTR,
    RUNG_ATTR,
    RUNG_DONE_ATTR,
    WORKER_ATTR,
)
from fractal_mlops.tracking.states import WORKER_LOST

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from fractal_mlops.config.experiment import ExperimentConfig
    from fractal_mlops.config.sections import SearchConfig
    from fractal_mlops.config.space import Variant
    from fractal_mlops.search.progress import StudyProgress
    from fractal_mlops.search.settings import TrialContext

WAIT_SECONDS = 1.0  # poll interval of a worker waiting for the rest of a rung


@dataclass(frozen=True)
class Rung:
    number: int  # 1-based
    epochs: int  # a point of this rung is trained up to this epoch
    size: int  # points planned to enter it
    keep: int  # points it sends on to the next rung (its size, for the last rung)


def rung_plan(grid_size: int, search: SearchConfig, epochs: int) -> list[Rung]:
    rungs: list[Rung] = []
    size, rung_epochs = grid_size, min(search.min_epochs, epochs)
    while rung_epochs < epochs:
        keep = max(1, size // search.reduction_factor)
        rungs.append(Rung(len(rungs) + 1, rung_epochs, size, keep))
        size, rung_epochs = keep, min(rung_epochs * search.reduction_factor, epochs)
    rungs.append(Rung(len(rungs) + 1, epochs, size, size))
    return rungs


def planned_epochs(plan: list[Rung]) -> int:
    """Epochs a halved study trains when no point diverges (each epoch trained once)."""
    return sum(r.size * (r.epochs - (plan[i - 1].epochs if i else 0)) for i, r in enumerate(plan))


def describe_plan(config: ExperimentConfig, grid_size: int) -> str:
    epochs = config.training.epochs
    plan = rung_plan(grid_size, config.search, epochs)
    spent = planned_epochs(plan)
    return (f"halving: rungs (points x epochs) {', '.join(f'{r.size} x {r.epochs}' for r in plan)}"
            f": {spent} epochs, {spent / (grid_size * epochs):.0%} of the full grid's "
            f"{grid_size * epochs}")


@dataclass
class RungWork:
    trial: Any  # optuna.Trial, RUNNING and owned by this worker
    variant: Variant
    rung: Rung
    last_rung: bool


# -- claiming (under the claim lock) ------------------------------------------------------------

def next_work(ctx: TrialContext, progress: StudyProgress) -> RungWork | None:
    """The next rung to train, waiting while the rest of a rung is still being trained by other
    workers; None when the study is done. Returns with interrupts held (run_rung releases
    them where it can record an interrupt), so a Ctrl-C never strands a claimed point."""
    settings = ctx.settings
    waiting_since = None
    while True:
        with ctx.interrupts.deferred():
            with claim_lock(settings.storage, settings.study_name):
                recover_lost(ctx.study, ctx.tracker)
                work, running = _claim(ctx, progress)
            if work is not None:
                ctx.interrupts.hold()
                return work
        ctx.interrupts.raise_pending()
        if not running:
            return None
        if waiting_since is None:
            waiting_since = time.monotonic()
            progress.console.print(f"{progress.prefix}waiting for {running} point(s) that other "
                                   "workers train to the end of this rung, to take over any "
                                   "whose worker is lost")
        time.sleep(WAIT_SECONDS)


def _claim(ctx: TrialContext, progress: StudyProgress) -> tuple[RungWork | None, int]:
    """(work, 0), or (None, number of points other workers are training), or (None, 0): done."""
    from optuna.trial import TrialState

    config = ctx.settings.config
    plan = rung_plan(len(ctx.variants), config.search, config.training.epochs)
    _rank_finished_rungs(ctx, plan, progress)
    points = _current_trials(ctx.study.get_trials(deepcopy=False))
    for variant in ctx.variants:
        t = points.get(variant.name)
        if t is None:
            trial = create_trial(ctx.study, ctx.variants, variant, **{RUNG_ATTR: 1, RUNG_DONE_ATTR: 0})
            return RungWork(trial, variant, plan[0], len(plan) == 1), 0
        if t.state == TrialState.WAITING and _done(t) < _rung(t):
            trial = _take(ctx.study, t)
            if trial is not None:
                return RungWork(trial, variant, plan[_rung(t) - 1], _rung(t) == len(plan)), 0
    running = sum(t.state == TrialState.RUNNING for t in points.values())
    if not running and any(t.state == TrialState.WAITING for t in points.values()):
        raise RuntimeError("halving: points wait for a rung that nobody trains (a bug)")
    return None, running


def _rung(t: FrozenTrial) -> int:
    return int(t.user_attrs.get(RUNG_ATTR, 1))


def _done(t: FrozenTrial) -> int:
    return int(t.user_attrs.get(RUNG_DONE_ATTR, 0))


def _current_trials(trials: list[FrozenTrial]) -> dict[str, FrozenTrial]:
    """Each started point's trial (a FAIL that the grid mode would retry does not count)."""
    from optuna.trial import TrialState

    from fractal_mlops.search.outcome import final_failures
    from fractal_mlops.tracking.states import RETRYABLE

    final = final_failures(trials)
    points: dict[str, FrozenTrial] = {}
    for t in trials:
        if (t.state == TrialState.FAIL and t.user_attrs.get(REASON_ATTR) in RETRYABLE
                and t.params.get("variant") not in final):
            continue
        if "variant" in t.params:
            points[t.params["variant"]] = t
    return points


def _rank_finished_rungs(ctx: TrialContext, plan: list[Rung],
                         progress: StudyProgress) -> None:
    """Promote the best of each rung that all its points have finished; prune the rest."""
    from optuna.trial import TrialState

    points = _current_trials(ctx.study.get_trials(deepcopy=False))
    if len(points) < len(ctx.variants):
        return  # some points have not even started the first rung
    order = {v.name: i for i, v in enumerate(ctx.variants)}
    for rung in plan[:-1]:
        members = [t for t in points.values() if _rung(t) >= rung.number]
        if any(_rung(t) == rung.number and not t.state.is_finished() and _done(t) < rung.number
               for t in members):
            return  # the rung is still being trained
        key = f"rung_{rung.number}_val_acc"
        ranked = rank_rung([t for t in members if key in t.user_attrs], key, order,
                           ctx.settings.config.search.objectives)
        how = "" if len(ctx.settings.config.search.objectives) == 1 else " by Pareto front"
        for rank, t in enumerate(ranked, 1):
            if t.state != TrialState.WAITING or _rung(t) != rung.number:
                continue  # already decided
            if rank <= rung.keep:
                optuna_trials.set_attr(ctx.study, t, RUNG_ATTR, rung.number + 1)
            else:
                reason = (f"halving: rung {rung.number} ({_epochs(rung.epochs)}), rank {rank} "
                          f"of {len(ranked)}{how}, kept the top {rung.keep}")
                _prune(ctx, t, reason, t.user_attrs[key])
                progress.trial_done(points_done(ctx.study), t.number, t.params["variant"],
                                    "PRUNED", t.user_attrs[key], reason)
        points = _current_trials(ctx.study.get_trials(deepcopy=False))


def rank_rung(members: list[FrozenTrial], key: str, order: dict[str, int],
              objectives: list[str]) -> list[FrozenTrial]:
    """A finished rung's points, best first. One objective: by val_acc at the rung's end (`key`),
    ties in grid order. Several: by non-dominated sorting of (that val_acc, the cost metrics),
    within a front by crowding distance (NSGA-II), then grid order; so the front's points go on
    before any point they dominate."""
    members = sorted(members, key=lambda t: order[t.params["variant"]])
    if len(objectives) == 1:
        return sorted(members, key=lambda t: -t.user_attrs[key])
    accuracy = key if objectives[0] == "final_val_acc" else objectives[0]
    points = [(t.user_attrs[accuracy], *(t.user_attrs[m] for m in objectives[1:])) for t in members]
    return [members[i] for i in pareto_ranking(points, directions(objectives))]


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def points_done(study: optuna.Study) -> int:
    """How many grid points have ended (COMPLETE, PRUNED, or FAIL for good)."""
    return sum(t.state.is_finished() for t in _current_trials(study.get_trials(deepcopy=False))
               .values())


def _prune(ctx: TrialContext, t: FrozenTrial, reason: str, value: float) -> None:
    """MLflow first, then Optuna: a kill in between leaves the point WAITING, ranked again."""
    from optuna.trial import TrialState

    run_id = t.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        metrics = {k: t.user_attrs[k] for k in ("best_val_acc", "param_count", "train_seconds")
                   if k in t.user_attrs}
        ctx.tracker.finish_trial(run_id, states.TrialState.PRUNED, reason, metrics)
    optuna_trials.set_attr(ctx.study, t, REASON_ATTR, reason)
    # a pruned trial's value: its last val_acc (single objective, as Optuna's own tell does)
    single = len(ctx.study.directions) == 1
    optuna_trials.set_state(ctx.study, t, TrialState.PRUNED, [value] if single else None)


def _take(study: optuna.Study, t: FrozenTrial):
    """WAITING -> RUNNING for this worker (the storage refuses if another worker took it)."""
    from optuna.trial import TrialState

    optuna_trials.set_attr(study, t, WORKER_ATTR, worker_identity())
    optuna_trials.set_attr(study, t, HEARTBEAT_ATTR, time.time())
    if not optuna_trials.set_state(study, t, TrialState.RUNNING):
        return None
    return optuna_trials.resume(study, t)


def recover_lost(study: optuna.Study, tracker) -> list[int]:
    """RUNNING points whose worker is gone go back to WAITING (they resume their rung from its
    last checkpoint); their MLflow run waits too (SCHEDULED), an unrecorded one is closed."""
    from optuna.trial import TrialState

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_is_gone(t.user_attrs.get(WORKER_ATTR), t.user_attrs.get(HEARTBEAT_ATTR)):
            optuna_trials.set_state(study, t, TrialState.WAITING)
            lost.append(t.number)
    if lost:
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for run_id, number in tracker.running_trial_runs(study.study_name):
            t = trials.get(number)
            if t is None or t.state != TrialState.WAITING:
                continue
            if t.user_attrs.get(RUN_ID_ATTR) == run_id:
                tracker.wait_run(run_id)
            else:  # created by a worker killed before it recorded the run's ID
                tracker.finish_trial(run_id, states.TrialState.FAIL, WORKER_LOST,
                                     status=states.RunStatus.KILLED)
    return lost

