"""Build a study's report: collect the runs, render the figures and the page, write them to a
folder and log them on the study run under `report/`."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fractal_mlops.reporting.data import StudyData, collect
from fractal_mlops.reporting.figures import FIGURES, figures
from fractal_mlops.reporting.html import render_html
from fractal_mlops.reporting.importance import importance_csv, importances
from fractal_mlops.reporting.paths import DEFAULT_TOP, default_out_dir
from fractal_mlops.tracking.tracker import open_store

FINAL_METRICS = ("final_val_acc", "best_val_acc")
log = logging.getLogger(__name__)


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
    client = open_store(tracking_uri)
    data = collect(client, experiment, tracking_uri, top)
    data.importance = importances(data.ranked, data.varied)
    pngs = figures(data)
    files = {"leaderboard.csv": leaderboard_csv(data).encode(),
             **({"importance.csv": importance_csv(data.importance).encode()}
                if data.importance else {}),
             **{f"{name}.png": png for name, _, png in pngs},
             "report.html": render_html(data, pngs).encode()}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fractal-report-") as staging:
        for name, content in files.items():
            (Path(staging) / name).write_bytes(content)
        for stale in ({f"{name}.png" for name, _, _ in FIGURES} | {"importance.csv"}) - set(files):
            if out is not None:
                (out / stale).unlink(missing_ok=True)  # a file this report no longer has
        for name in files:
            if out is not None:
                shutil.copyfile(Path(staging) / name, out / name)
        if data.parent_run_id:
            client.log_artifacts(data.parent_run_id, staging, "report")
    return Written(out, sorted(files), data, data.parent_run_id is not None)


def study_finished(tracking_uri: str, experiment: str) -> Written | None:
    """The study's end: refresh its report. Never fails the study (a warning line instead,
    and None)."""
    # A worker recording into a tracking server keeps nothing on its own disk: the report is
    # on the study run. With a local store, a copy goes beside it.
    local = not tracking_uri.startswith(("http://", "https://", "databricks"))
    try:
        written = build_report(tracking_uri, experiment,
                               default_out_dir(experiment) if local else None, DEFAULT_TOP)
    except Exception as exc:  # noqa: BLE001 - the report is a view; the study's work is done
        log.warning("the study report was not built: %s", " ".join(str(exc).split())[:300])
        return None
    logged = "the study run (Artifacts: report/report.html)" if written.logged else ""
    if written.out is None:
        print(f"report: on {logged}")
    else:
        where = f" and on {logged}" if logged else ""
        print(f"report: {(written.out / 'report.html').absolute()}{where}")
    return written
