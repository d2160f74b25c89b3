"""The study's work after its command line is read: one worker's loop, the stores it opens, the
closing leaderboard, and the launcher of several workers on this host.

study.py parses and checks the input without importing torch, optuna or mlflow; it imports this
module only once the input is good, so the heavy imports happen here, once, at the top.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import torch
from rich.console import Console
from rich.markup import escape

from fractal_mlops.config.objectives import directions
from fractal_mlops.config.space import Variant, grid
from fractal_mlops.engine.data import load_dataset
from fractal_mlops.engine.device import resolve_device
from fractal_mlops.engine.gpus import cap_memory
from fractal_mlops.errors import ConfigError
from fractal_mlops.search.claims import close_orphaned_runs, grid_sampler, points_done, take_report
from fractal_mlops.search.halving import describe_plan
from fractal_mlops.search.halving_trial import claim_and_run_rung
from fractal_mlops.search.preflight import check_feasible
from fractal_mlops.search.progress import (
    StudyProgress,
    TrialRow,
    front_rows,
    leaderboard,
    one_per_point,
    worker_prefix,
)
from fractal_mlops.search.settings import StudySettings, TrialContext
from fractal_mlops.search.trial import claim_and_run
from fractal_mlops.signals import InterruptGuard
from fractal_mlops.stores.library_log import route_library_logs
from fractal_mlops.stores.optuna_storage import claim_lock, open_storage
from fractal_mlops.stores.repair import restart_study, trained_nothing
from fractal_mlops.tracking.names import (
    CONFIG_SHA_ATTR,
    GRID_SIZE_ATTR,
    PARAM_COUNT_ATTR,
    PARENT_RUN_ATTR,
    REASON_ATTR,
    RUN_ID_ATTR,
    VARIANT_ATTR,
)
from fractal_mlops.tracking.states import TrialState
from fractal_mlops.tracking.tracker import Tracker
from fractal_mlops.tracking.ui import ui_lines

# -- one worker ----------------------------------------------------------------------------

def run_worker(settings: StudySettings, console: Console, interrupts: InterruptGuard,
               before_summary: Callable[[], None] = lambda: None) -> int:
    """Train grid points until none is left (or --n-trials); `before_summary` runs before the
    closing lines (the study command refreshes the report there)."""
    config = settings.config
    device = resolve_device(settings.device)
    cap_memory(device)  # FRACTAL_GPU_MEMORY_SHARE: this worker's share of a shared GPU
    # on a GPU too: N workers that each start a thread pool over every core slow each other
    torch.set_num_threads(int(os.environ.get("FRACTAL_THREADS", torch.get_num_threads())))
    data = load_dataset(config.data)  # a bad dataset fails here, before any store is touched
    variants = grid(config)
    check_feasible(config, device, data, variants)

    started_at = time.monotonic()
    with interrupts.deferred():  # a Ctrl-C here would leave the study's run RUNNING
        study, tracker, parent_run_id = open_stores(settings, variants)
        close_orphaned_runs(study, tracker)
    interrupts.raise_pending()

    prefix = worker_prefix()
    live = None if not prefix else False
    done = points_done(study)
    console.print(f"{prefix}study [bold]{settings.study_name}[/]: {len(variants)} variants on "
                  f"{data.name} ({len(data.train_x)} train / {len(data.val_x)} val images), "
                  f"{done} done, device {device.type}")
    context = TrialContext(study, tracker, parent_run_id, settings, data, device, variants,
                           interrupts)
    started, grid_done = 0, False
    halving = config.search.mode == "halving"
    if halving:
        console.print(f"{prefix}{describe_plan(config, len(variants))}")
    with StudyProgress(console, len(variants), done, config.training.epochs, live=live,
                       prefix=prefix) as progress:
        while settings.n_trials is None or started < settings.n_trials:
            if not (claim_and_run_rung if halving else claim_and_run)(context, progress):
                grid_done = True  # every point finished: no other worker trains one
                break
            started += 1
    rows = _summary(study, tracker, parent_run_id, len(variants), config.search.objectives)
    if not prefix:  # a worker among several leaves the report and leaderboard to its launcher
        reporter = report_elsewhere(settings, study) if grid_done else None
        if reporter is None:
            before_summary()
        else:
            console.print(f"the grid is done; worker {escape(reporter)} writes the study report")
        show_leaderboard(console, settings, rows, len(variants), time.monotonic() - started_at,
                         tracker.experiment_id)
    return 0


def report_elsewhere(settings: StudySettings, study: optuna.Study) -> str | None:
    """The worker that writes the finished grid's report, if not this one (claims.take_report)."""
    with claim_lock(settings.storage, settings.study_name):
        return take_report(study)


def open_stores(settings: StudySettings, variants: list[Variant]):
    """The Optuna study, the MLflow experiment and the study's parent run, created once."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    route_library_logs("optuna")  # its warnings to the log file: the worker says its own
    config = settings.config
    with claim_lock(settings.storage, settings.study_name):
        # The study first: a config that does not match it is refused before the tracking
        # store (a new --tracking-uri's database, say) is created.
        study = _load_or_create_study(settings, variants)
        tracker = Tracker(settings.tracking_uri, settings.study_name)
        parent_run_id = tracker.study_run(
            settings.study_name, study.user_attrs.get(PARENT_RUN_ATTR),
            _study_params(settings, variants), config.to_yaml(), config.sha256)
        if study.user_attrs.get(PARENT_RUN_ATTR) != parent_run_id:
            study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
    return study, tracker, parent_run_id


def _load_or_create_study(settings: StudySettings, variants: list[Variant]) -> optuna.Study:
    config = settings.config
    study = optuna.create_study(
        storage=open_storage(settings.storage), study_name=settings.study_name,
        directions=directions(config.search.objectives), load_if_exists=True,
        sampler=grid_sampler()({"variant": [v.name for v in variants]}, seed=0),
        pruner=_optuna_pruner(config.pruning.pruner),
    )
    recorded = study.user_attrs.get(CONFIG_SHA_ATTR)
    if recorded not in (None, config.sha256) and trained_nothing(study):
        study = restart_study(study, lambda: _load_or_create_study(settings, variants))
        recorded = study.user_attrs.get(CONFIG_SHA_ATTR)
    if recorded is None:
        study.set_user_attr(CONFIG_SHA_ATTR, config.sha256)
        study.set_user_attr(GRID_SIZE_ATTR, len(variants))
    elif recorded != config.sha256:
        raise ConfigError(f"study {settings.study_name!r} already exists with a different "
                          "config and trained under it; pass another --study-name to start a "
                          "new study")
    if study.metric_names is None:  # optuna-dashboard then names its axes, not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental since Optuna 3.2
            study.set_metric_names(list(config.search.objectives))
    return study


def _optuna_pruner(name: str):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _study_params(settings: StudySettings, variants: list[Variant]) -> dict:
    config = settings.config
    params: dict[str, Any] = {"grid_size": len(variants), "dataset": config.data.name,
                              "storage": settings.storage.display,
                              "config_source": config.source}
    params.update({f"space.{k}": ",".join(map(str, v)) for k, v in config.space.items()})
    params.update({f"training.{k}": v for k, v in config.to_dict()["training"].items()})
    params.update({f"pruning.{k}": v for k, v in config.to_dict()["pruning"].items()})
    params.update({f"search.{k}": v for k, v in config.to_dict().get("search", {}).items()})
    return params


# -- the end: leaderboard -------------------------------------------------------------------

def _summary(study: optuna.Study, tracker: Tracker | None, parent_run_id: str | None,
             grid_size: int, objectives: list[str]):
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        complete = t.state.name == "COMPLETE" and t.values
        rows.append(TrialRow(t.number, t.user_attrs.get(VARIANT_ATTR, "?"), t.state.name,
                             t.values[0] if complete else None,
                             t.user_attrs.get(PARAM_COUNT_ATTR), seconds, t.user_attrs.get(REASON_ATTR),
                             tuple(t.values) if complete else None, t.user_attrs.get(RUN_ID_ATTR)))
    rows = one_per_point(rows)
    if tracker is not None and parent_run_id:
        counts = {f"n_{s.lower()}": sum(r.state == s for r in rows)
                  for s in TrialState}
        tracker.update_study_summary(parent_run_id, study.study_name, counts, grid_size,
                                     points_done(study))
        if len(objectives) > 1:
            tracker.log_pareto_front(parent_run_id, objectives, [
                (r.variant, r.number, r.run_id, r.values) for r in front_rows(rows, objectives)])
    return rows


def show_leaderboard(console, settings: StudySettings, rows, grid_size: int,
                     wall_seconds: float, experiment_id: str) -> None:
    leaderboard(console, settings.study_name, rows, grid_size, wall_seconds,
                "\n  ".join(ui_lines(settings.tracking_uri, experiment_id)),
                objectives=settings.config.search.objectives)
