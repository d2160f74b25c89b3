"""The main job: an Optuna study walks the template grid, prunes diverging runs, tracks in MLflow.

    python -m fractal_mlops.study [--config PATH] [--tracking-uri URI] [--storage URL]
        [--study-name NAME] [--workers N] [--device auto|cpu|cuda] [--n-trials N] [--no-report]

Each worker loops: claim a pending grid point under the study-wide claim lock (marking trials
of vanished workers FAIL "worker lost" first, so their points become pending again), train it
through the engine's Trainer, report val_acc to Optuna each epoch (divergence check + optional pruner),
log everything to MLflow, tell Optuna. Re-running the command resumes; a finished grid trains
nothing. This module is the command: its flags, settings and exits; the work is in search/
(worker.py, launcher.py), imported once the input is good, so `--help` and bad input import
neither torch, timm nor mlflow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

from fractal_mlops.cli import OneLineParser, make_console, run_command
from fractal_mlops.config.experiment import check_study_name, load_config
from fractal_mlops.config.sections import check_run
from fractal_mlops.engine.gpus import injected_gpu_count, memory_share
from fractal_mlops.search.settings import StudySettings
from fractal_mlops.signals import InterruptGuard
from fractal_mlops.stores.locations import check_tracking_uri, resolve_tracking_uri
from fractal_mlops.stores.optuna_storage import (
    check_separate_stores,
    check_storage,
    heartbeat_settings,
    resolve_storage,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fractal-mlops study",
        description="Walk a FractalNet template grid with Optuna, prune diverging variants and "
                    "track every trial in MLflow. With no arguments: the shipped quickstart "
                    "(digits, offline) into sqlite:///mlruns/mlflow.db and mlruns/.",
    )
    parser.add_argument("--config", help="experiment YAML (default: quickstart.yaml)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--storage", help="Optuna storage: postgresql://..., sqlite:///..., or "
                        "journal:PATH (default: $FRACTAL_STORAGE, else mlruns/optuna.journal)")
    parser.add_argument("--study-name", help="study and MLflow experiment name "
                        "(default: the config's study_name)")
    parser.add_argument("--workers", type=int, help="worker processes on this host (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--n-trials", type=int, help="train at most N grid points in this run")
    parser.add_argument("--no-report", action="store_true", help="do not refresh the study "
                        "report (fractal-mlops report) at the end")
    return parser


def resolve_settings(args: argparse.Namespace) -> StudySettings:
    """Config + flags + environment, checked; raises ConfigError and touches no store."""
    config = load_config(args.config)
    overrides = {k: getattr(args, k) for k in ("device", "workers", "n_trials")
                 if getattr(args, k) is not None}
    run = check_run(replace(config.run, **overrides))
    study_name = config.study_name if args.study_name is None else check_study_name(args.study_name)
    config = replace(config, study_name=study_name, run=run)
    tracking_uri = resolve_tracking_uri(args.tracking_uri, run.tracking_uri)
    storage = resolve_storage(args.storage, run.storage)
    check_separate_stores(storage, tracking_uri)
    check_storage(storage)
    check_tracking_uri(tracking_uri)
    heartbeat_settings()  # a bad FRACTAL_HEARTBEAT_* is bad input, before any store is touched
    injected_gpu_count(), memory_share()  # so is a bad FRACTAL_GPU_COUNT / _MEMORY_SHARE
    return StudySettings(config, study_name, tracking_uri, storage, run.device, run.workers,
                         run.n_trials)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args),
                       "running trials are closed (interrupted) with their last saved state, "
                       "or in halving mode wait to resume their rung; no worker is left "
                       "running; run the same command again to resume them from that state",
                       quiet_interrupt=bool(os.environ.get("FRACTAL_WORKER_INDEX")))  # the launcher says it


def _run(args: argparse.Namespace) -> int:
    settings = replace(resolve_settings(args), report=not args.no_report)
    from fractal_mlops.reporting.build import study_finished
    from fractal_mlops.reporting.importance import importance_markdown
    from fractal_mlops.search.launcher import launch_workers
    from fractal_mlops.search.worker import run_worker  # torch, optuna, mlflow: input is good
    from fractal_mlops.tracking.tracker import configure

    def refresh_report() -> None:  # before the closing lines, which end with the UI's URL
        if not settings.report:
            return
        written = study_finished(settings.tracking_uri, settings.study_name)
        if written is not None and written.data.importance:
            dashboard_note(settings, importance_markdown(
                written.data.importance, len(written.data.ranked), written.data.parent_run_id))

    configure(settings.tracking_uri)
    interrupts = InterruptGuard().install()  # a stop signal now raises errors.Stopped
    if settings.workers > 1:
        return launch_workers(settings, make_console(), refresh_report)
    return run_worker(settings, make_console(), interrupts, refresh_report)


def dashboard_note(settings: StudySettings, body: str) -> None:
    """The importance panel as the study's note in optuna-dashboard; like the report, never
    fails the study."""
    from fractal_mlops.stores.optuna_storage import save_dashboard_note

    try:
        save_dashboard_note(settings.storage, settings.study_name, body)
    except Exception as exc:  # noqa: BLE001 - a view of work that is done
        log.warning("the optuna-dashboard note was not written: %s",
                    " ".join(str(exc).split())[:300])


if __name__ == "__main__":
    sys.exit(main())
