"""The main job: an Optuna study walks the template grid, prunes diverging runs, tracks in MLflow.

    python -m fractal_mlops.study [--config PATH] [--tracking-uri URI] [--storage URL]
        [--study-name NAME] [--workers N] [--device auto|cpu|cuda] [--n-trials N] [--no-report]

Each worker loops: claim a pending grid point under the study-wide claim lock (marking trials
of vanished workers FAIL "worker lost" first, so their points become pending again), train it
through train.py, report val_acc to Optuna each epoch (divergence check + optional pruner),
log everything to MLflow, tell Optuna. Re-running the command resumes; a finished grid trains
nothing. This module is the command: its flags, settings and exits; the work is in
study_loop.py, imported once the input is good, so `--help` and bad input import neither torch,
timm nor mlflow.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace

from .cli import OneLineParser
from .config import ExperimentConfig, check_study_name, load_config
from .errors import EXIT_BAD_INPUT, ConfigError, ServerFault, is_outage
from .outcome import one_line
from .sections import check_run
from .signals import InterruptGuard
from .storage import StorageSpec, check_storage, heartbeat_settings, resolve_storage
from .stores import check_tracking_uri, resolve_tracking_uri
from .trial import StopWorker
from .urls import redact
from .workers import exit_code, signal_name


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


@dataclass(frozen=True)
class StudySettings:
    config: ExperimentConfig
    study_name: str
    tracking_uri: str
    storage: StorageSpec
    device: str
    workers: int
    n_trials: int | None
    report: bool = True  # refresh the study report at the end (--no-report: don't)


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
    check_storage(storage)
    check_tracking_uri(tracking_uri)
    heartbeat_settings()  # a bad FRACTAL_HEARTBEAT_* is bad input, before any store is touched
    return StudySettings(config, study_name, tracking_uri, storage, run.device, run.workers,
                         run.n_trials)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .console import error_line, make_console
    from .urls import install_redaction

    install_redaction()

    try:
        settings = replace(resolve_settings(args), report=not args.no_report)
        from .study_loop import launch_workers, run_worker  # torch, optuna, mlflow: input is good
        from .tracking import configure

        configure(settings.tracking_uri)
        interrupts = InterruptGuard().install()  # a stop signal now raises workers.Stopped
        if settings.workers > 1:
            return launch_workers(settings, make_console())
        return run_worker(settings, make_console(), interrupts)
    except ConfigError as exc:
        error_line(redact(str(exc)))
        return EXIT_BAD_INPUT
    except (StopWorker, ServerFault) as exc:
        error_line(redact(str(exc)))
        return 1
    except Exception as exc:
        if not is_outage(exc):  # a store went away outside a trial's own handling
            raise
        error_line(f"a store stopped answering ({one_line(exc, 300)}); run the same command "
                   "again when it is back: the running trial is then recovered")
        return 1
    except KeyboardInterrupt as exc:
        if not os.environ.get("FRACTAL_WORKER_INDEX"):  # the launcher says it for its workers
            error_line(f"interrupted ({signal_name(exc)}): running trials are marked FAIL "
                       "(interrupted), or in halving mode wait to resume their rung; no worker "
                       "is left running; run the same command again to resume")
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
