"""The study report: what a study found, as files and as artifacts of the study's MLflow run.

    python -m fractal_mlops.report [--experiment NAME] [--tracking-uri URI] [--out DIR] [--top K]

Reads the experiment's trial runs (tag `fractal.role=trial`, paged: two queries for 1,520
runs), the val_acc history and the `anytime.csv` of the top K only, and the registry's
champion. Writes to DIR (default `mlruns/reports/<experiment>/`) and logs on the study run
(tag `fractal.role=study`) under `report/`: `report.html` (self-contained), `leaderboard.csv`
(one row per trial run) and the PNG figures of report_figures.py. The study refreshes the
report at its end (`study_finished`); `study --no-report` turns that off.

Exit codes: 0 written, 2 bad input (unknown experiment, missing store, no trials): one line on
stderr and nothing written.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import OneLineParser
from .errors import ConfigError
from .stores import check_existing_store, resolve_tracking_uri
from .urls import redact

if TYPE_CHECKING:
    from .report_data import StudyData

EXIT_OK, EXIT_BAD_INPUT = 0, 2
DEFAULT_TOP = 10
FINAL_METRICS = ("final_val_acc", "best_val_acc")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fractal-mlops report",
        description="Summarise a study: leaderboard.csv, figures and a self-contained "
                    "report.html, written to --out and logged on the study's MLflow run "
                    "under report/.")
    parser.add_argument("--experiment", help="MLflow experiment = study name "
                        "(default: the quickstart's, fractalnet-quickstart)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--out", help="folder for the files (default: mlruns/reports/<experiment>/)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"trials in the leaderboard and the per-trial figures (default {DEFAULT_TOP})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .console import error_line
    from .tracking import configure, mlflow_error_line

    try:
        uri, experiment, out, top = resolve_settings(args)
        configure(uri)
        written = build_report(uri, experiment, out, top)
    except ConfigError as exc:
        error_line(redact(str(exc)))
        return EXIT_BAD_INPUT
    except Exception as exc:
        message = mlflow_error_line(exc)
        if message is None:
            raise
        error_line(message)
        return EXIT_BAD_INPUT
    print(written.summary())
    return EXIT_OK


def resolve_settings(args: argparse.Namespace) -> tuple[str, str, Path, int]:
    """(tracking URI, experiment, out dir, top K), checked; raises ConfigError, writes nothing."""
    experiment = args.experiment
    if experiment is None:
        from .config import load_config

        experiment = load_config(None).study_name
    if not experiment.strip():
        raise ConfigError("--experiment must not be empty")
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    out = Path(args.out) if args.out else default_out_dir(experiment.strip())
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    uri = resolve_tracking_uri(args.tracking_uri, None)
    check_existing_store(uri)
    return uri, experiment.strip(), out, args.top


def default_out_dir(experiment: str) -> Path:
    return Path("mlruns") / "reports" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)


# -- what the report writes --------------------------------------------------------------------

def leaderboard_csv(data: StudyData) -> str:
    """One row per trial run: COMPLETE best first, then the others by trial number."""
    columns = [f"val_acc_column_{k}" for k in range(1, data.max_columns + 1)]
    header = ["variant", *data.dimensions, "state", "reason", *FINAL_METRICS, *columns,
              "param_count", "train_seconds", "run_id"]
    ranked = {t.run_id for t in data.ranked}
    rest = sorted((t for t in data.trials if t.run_id not in ranked),
                  key=lambda t: (t.trial_number is None, t.trial_number or 0, t.start_time))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for t in [*data.ranked, *rest]:
        writer.writerow([t.variant, *(t.dims.get(d, "") for d in data.dimensions), t.state,
                         t.reason, *(_cell(t.metric(k)) for k in (*FINAL_METRICS, *columns)),
                         _cell(t.metric("param_count")), _cell(t.metric("train_seconds")),
                         t.run_id])
    return out.getvalue()


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() and abs(value) > 1 else repr(value)


@dataclass
class Written:
    out: Path | None  # None: logged on the study run only
    files: list[str]
    data: StudyData
    logged: bool

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.data.counts().items())
        best = self.data.ranked[0] if self.data.ranked else None
        lines = [f"report of {self.data.experiment}: {len(self.data.trials)} trial runs "
                 f"({counts}); wrote {len(self.files)} files to {self.out}"]
        if best:
            lines.append(f"best: {best.variant} final_val_acc {best.metrics['final_val_acc']:.4f} "
                         f"(run {best.run_id})")
        if self.logged:
            lines.append(f"logged on the study run {self.data.parent_run_id} under report/ "
                         "(MLflow UI: the study run's Artifacts tab, report/report.html)")
        else:
            lines.append("not logged: the experiment has no study run (tag fractal.role=study)")
        lines.append(f"open it: {(self.out / 'report.html').absolute()}")
        return "\n".join(lines)


def build_report(tracking_uri: str, experiment: str, out: Path | None, top: int) -> Written:
    """Collect, render, write to `out` (None: no local copy) and log on the study run.
    Nothing is written before the store has answered with at least one trial."""
    from .report_data import collect
    from .report_figures import FIGURES, figures
    from .report_html import render_html
    from .tracking import open_store

    client = open_store(tracking_uri)
    data = collect(client, experiment, tracking_uri, top)
    pngs = figures(data)
    files = {"leaderboard.csv": leaderboard_csv(data).encode(),
             **{f"{name}.png": png for name, _, png in pngs},
             "report.html": render_html(data, pngs).encode()}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fractal-report-") as staging:
        for name, content in files.items():
            (Path(staging) / name).write_bytes(content)
        for stale in {f"{name}.png" for name, _, _ in FIGURES} - set(files):
            if out is not None:
                (out / stale).unlink(missing_ok=True)  # a figure this report no longer has
        for name in files:
            if out is not None:
                shutil.copyfile(Path(staging) / name, out / name)
        if data.parent_run_id:
            client.log_artifacts(data.parent_run_id, staging, "report")
    return Written(out, sorted(files), data, data.parent_run_id is not None)


def study_finished(tracking_uri: str, experiment: str) -> None:
    """The study's end: refresh its report. Never fails the study (a warning line instead)."""
    # A worker recording into a tracking server keeps nothing on its own disk: the report is
    # on the study run. With a local store, a copy goes beside it.
    local = not tracking_uri.startswith(("http://", "https://", "databricks"))
    try:
        written = build_report(tracking_uri, experiment,
                               default_out_dir(experiment) if local else None, DEFAULT_TOP)
    except Exception as exc:  # noqa: BLE001 - the report is a view; the study's work is done
        text = " ".join(str(exc).split())[:300]
        print(f"warning: the study report was not built: {redact(text)}", file=sys.stderr)
        return
    logged = "the study run (Artifacts: report/report.html)" if written.logged else ""
    if written.out is None:
        print(f"report: on {logged}")
    else:
        where = f" and on {logged}" if logged else ""
        print(f"report: {(written.out / 'report.html').absolute()}{where}")


if __name__ == "__main__":
    sys.exit(main())
