"""The one command-line layer: the table of commands, the flags they share, the exit codes, and
the one ladder that turns an error into a line on stderr and an exit code.

    fractal-mlops <command> ...        (the console script)
    python -m fractal_mlops <command>  (the same dispatch)
    python -m fractal_mlops.<command>  (each command on its own)

Imports nothing heavy (no torch, optuna or mlflow), so `--help` and bad input stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from rich.console import Console

from fractal_mlops.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAULT,
    EXIT_OK,
    ConfigError,
    ServerFault,
    StopWorker,
    disk_full,
    exit_code_for,
    is_outage,
    one_line,
    os_error,
    os_error_line,
)
from fractal_mlops.signals import STOP_SIGNALS, InterruptGuard, signal_name
from fractal_mlops.signals import exit_code as signal_exit_code

from .stores.credentials import install_redaction, redact

COMMANDS = {
    "study": "run or resume a study over a template grid (the main job)",
    "space": "print the size and the variants of a template grid",
    "promote": "register the best trial's model and move the champion alias",
    "reproduce": "re-run a trial from its MLflow run ID and compare the metrics",
    "report": "write a study's report (leaderboard.csv, figures, report.html) and log it",
}

# Exit codes (errors.py): EXIT_OK 0; EXIT_FAULT 1, a store went away or a server failed: run the
# same command again later (also "nothing eligible" for promote, "the metrics differ" for
# reproduce); EXIT_BAD_INPUT 2, one line on stderr and nothing written; 128 + N after a stop
# signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).

DEFAULT_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parser(command: str, description: str) -> OneLineParser:
    return OneLineParser(prog=f"fractal-mlops {command}", description=description)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (default: the shipped quickstart.yaml)")


def add_tracking_uri_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help=DEFAULT_TRACKING_HELP)


def add_experiment_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", help="MLflow experiment = study name "
                        "(default: the quickstart's, fractalnet-quickstart)")


def experiment_from(args: argparse.Namespace) -> str:
    """--experiment, or the shipped quickstart's study name; never empty."""
    experiment = args.experiment
    if experiment is None:
        from fractal_mlops.config.experiment import load_config  # pydantic, yaml: when needed

        experiment = load_config(None).study_name
    if not experiment.strip():
        raise ConfigError("--experiment must not be empty")
    return experiment.strip()


def make_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


MAX_ERROR_CHARS = 1000


def error_line(message: str) -> None:
    """`error: <message>` on stderr: one line, credentials redacted, at most MAX_ERROR_CHARS
    (a value quoted from a huge config stays readable)."""
    text = " ".join(redact(message).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " ..."
    print(f"error: {text}", file=sys.stderr)


class _OneLine(logging.Handler):
    """The package's own log records (loggers `fractal_mlops.*`) as one line each on stderr:
    `warning: ...` (or `note: ...` for INFO), led by `[worker N] ` in a worker among several."""

    def emit(self, record: logging.LogRecord) -> None:
        index = os.environ.get("FRACTAL_WORKER_INDEX")
        prefix = f"[worker {index}] " if index else ""
        kind = "note" if record.levelno < logging.WARNING else "warning"
        print(f"{prefix}{kind}: {redact(record.getMessage())}", file=sys.stderr, flush=True)


def setup_logging() -> None:
    """Once per process, by each command's `main`: credentials redacted in every log record,
    and the package's own notes and warnings printed as one line each. Command results go to
    stdout with print."""
    install_redaction()
    logger = logging.getLogger("fractal_mlops")
    if not any(isinstance(h, _OneLine) for h in logger.handlers):
        logger.addHandler(_OneLine(logging.INFO))
        logger.setLevel(logging.INFO)
        logger.propagate = False


def mlflow_message(exc: BaseException) -> str | None:
    """One redacted line for an MlflowException (None for any other error); mlflow is only
    looked at when it is loaded (an error cannot be MLflow's otherwise)."""
    module = sys.modules.get("mlflow.exceptions")
    if module is None or not isinstance(exc, module.MlflowException):
        return None
    return f"MLflow: {redact(' '.join(str(exc.message).split()))[:500]}"


def run_command(work: Callable[[], int], interrupted: str = "", quiet_interrupt: bool = False) -> int:
    """Run a command's work under the one error ladder:

    bad input (ConfigError)                 one line, exit 2
    a worker stopped, a server's 5xx        one line, exit 1
    a store outage, a full disk             one line, exit 1: run the same command again
    any other MLflow error                  one line, exit 1 (a server's fault) or 2 (refused)
    any other OS error (a file unwritable)  one line, exit 1
    a stop signal (Ctrl-C, SIGTERM, SIGHUP) `interrupted (SIGINT): <interrupted>`, exit 128 + N
    anything else                           a bug: its traceback

    SIGTERM and SIGHUP stop the command as Ctrl-C does (signals.InterruptGuard), so whatever it
    does on Ctrl-C (close its runs) it does on them too; once the work is over, a stop signal
    ends the process at once, without a traceback from the interpreter's exit.
    """
    setup_logging()
    if threading.current_thread() is threading.main_thread():
        InterruptGuard().install()
    try:
        return _work_with_one_line_errors(work, interrupted, quiet_interrupt)
    finally:
        exit_quietly_on_stop_signals()


def _work_with_one_line_errors(work: Callable[[], int], interrupted: str,
                               quiet_interrupt: bool) -> int:
    try:
        return work()
    except ConfigError as exc:
        error_line(str(exc))
        return EXIT_BAD_INPUT
    except (StopWorker, ServerFault) as exc:
        error_line(str(exc))
        return EXIT_FAULT
    except KeyboardInterrupt as exc:
        if not quiet_interrupt:
            error_line(f"interrupted ({signal_name(exc)})" + (f": {interrupted}" if interrupted else ""))
        return signal_exit_code(exc)
    except Exception as exc:
        if disk_full(exc):
            error_line(f"the disk is full ({one_line(exc, 300)}); free some space, then run the "
                       "same command again: the running trial is then recovered")
            return EXIT_FAULT
        if is_outage(exc):  # a store went away outside a trial's own handling
            error_line(f"a store stopped answering ({one_line(exc, 300)}); run the same command "
                       "again when it is back: the running trial is then recovered")
            return EXIT_FAULT
        message = mlflow_message(exc)
        if message is not None:
            error_line(message)
            return exit_code_for(exc)  # a server's fault: 1; a refused request: 2
        system = os_error(exc)
        if system is None:
            raise
        error_line(os_error_line(system))
        return EXIT_FAULT


def exit_quietly_on_stop_signals() -> None:
    """After the work: a stop signal ends the process at once with 128 + N (an interrupt in
    the interpreter's exit handlers would print a traceback of MLflow's or Python's)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: os._exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fractal-mlops {" + ",".join(COMMANDS) + "} ...\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return EXIT_OK if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (expected one of {', '.join(COMMANDS)})",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return importlib.import_module(f"fractal_mlops.{command}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
