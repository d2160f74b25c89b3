"""The study report: what a study found, as files and as artifacts of the study's MLflow run.

    python -m fractal_mlops.report [--experiment NAME] [--tracking-uri URI] [--out DIR] [--top K]

Reads the experiment's trial runs (tag `fractal.role=trial`, paged: two queries for 1,520
runs), the val_acc history and the `anytime.csv` of the top K only, and the registry's
champion. Writes to DIR (default `mlruns/reports/<experiment>/`) and logs on the study run
(tag `fractal.role=study`) under `report/`: `report.html` (self-contained), `leaderboard.csv`
(one row per trial run) and the PNG figures of reporting/figures.py. The study refreshes the
report at its end (`study_finished`); `study --no-report` turns that off.

Exit codes: 0 written, 2 bad input (unknown experiment, missing store, no trials): one line on
stderr and nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fractal_mlops.cli import (
    add_experiment_flag,
    add_tracking_uri_flag,
    experiment_from,
    parser,
    run_command,
)
from fractal_mlops.errors import EXIT_OK, ConfigError
from fractal_mlops.reporting.paths import DEFAULT_TOP, default_out_dir
from fractal_mlops.stores.locations import check_existing_store, check_folder, resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    p = parser("report", "Summarise a study: leaderboard.csv, figures and a self-contained "
               "report.html, written to --out and logged on the study's MLflow run under report/.")
    add_experiment_flag(p)
    add_tracking_uri_flag(p)
    p.add_argument("--out", help="folder for the files (default: mlruns/reports/<experiment>/)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP,
                   help=f"trials in the leaderboard and the per-trial figures (default {DEFAULT_TOP})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    uri, experiment, out, top = resolve_settings(args)
    from fractal_mlops.reporting.build import build_report
    from fractal_mlops.tracking.tracker import configure

    configure(uri)
    print(build_report(uri, experiment, out, top).summary())
    return EXIT_OK


def resolve_settings(args: argparse.Namespace) -> tuple[str, str, Path, int]:
    """(tracking URI, experiment, out dir, top K), checked; raises ConfigError, writes nothing."""
    experiment = experiment_from(args)
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    out = Path(args.out) if args.out else default_out_dir(experiment)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    check_folder(out, f"--out {out}")
    uri = resolve_tracking_uri(args.tracking_uri, None)
    check_existing_store(uri)
    return uri, experiment, out, args.top


if __name__ == "__main__":
    sys.exit(main())
