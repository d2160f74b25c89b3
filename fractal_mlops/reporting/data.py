"""What the study report reads from MLflow: trial runs, the study run, top-K histories, the champion.

One paged query for the trial runs (1,000 a page: two for 1,520 trials), one for the study run;
the val_acc history and `anytime.csv` are fetched for the top K trials only.
"""

from __future__ import annotations

import csv
import io
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fractal_mlops.config.experiment import DIMENSIONS
from fractal_mlops.errors import ConfigError
from fractal_mlops.stores.credentials import redact
from fractal_mlops.tracking.names import REASON, ROLE, STATE, TRIAL_NUMBER, VARIANT
from fractal_mlops.tracking.queries import role_query, search_all

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

MODEL_NAME, CHAMPION = "FractalNet", "champion"
ANYTIME_ARTIFACT = "anytime.csv"
STATES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class TrialRecord:
    run_id: str
    variant: str
    state: str
    reason: str
    dims: dict[str, str]
    metrics: dict[str, float]
    start_time: int
    trial_number: int | None

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return value if value is not None and math.isfinite(value) else None


@dataclass
class Champion:
    version: str
    variant: str
    val_acc: str
    run_id: str
    experiment: str


@dataclass
class StudyData:
    experiment: str
    tracking_uri: str
    parent_run_id: str | None
    grid_size: int
    trials: list[TrialRecord]
    dimensions: list[str]  # the template dimensions the trials record, in DIMENSIONS order
    varied: list[str]  # those with more than one value
    max_columns: int
    ranked: list[TrialRecord]  # COMPLETE with final_val_acc: best first, ties to fewer params
    top: list[TrialRecord]
    champion: Champion | None
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    anytime: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (compute, acc)
    importance: dict[str, dict[str, float]] = field(default_factory=dict)  # importance.py

    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in STATES}
        for trial in self.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        return counts


def collect(client: MlflowClient, experiment_name: str, tracking_uri: str, top: int) -> StudyData:
    """Everything the report shows; ConfigError for an unknown experiment or one with no trials."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None or experiment.lifecycle_stage != "active":
        known = [e.name for e in client.search_experiments()][:8]
        raise ConfigError(f"experiment {experiment_name!r} not found in {redact(tracking_uri)} "
                          f"(experiments there: {', '.join(known) or 'none'})")
    runs = search_all(client, experiment.experiment_id, role_query("trial"))
    if not runs:
        raise ConfigError(f"experiment {experiment_name!r} has no trial runs (tag {ROLE}=trial): "
                          "run its study first")
    trials = _one_per_point([_record(run) for run in runs])
    dimensions = [d for d in _dimensions() if any(d in t.dims for t in trials)]
    varied = [d for d in dimensions if len({t.dims.get(d) for t in trials}) > 1]
    columns = [int(k.rsplit("_", 1)[1]) for t in trials for k in t.metrics
               if re.fullmatch(r"val_acc_column_\d+", k)]
    ranked = sorted((t for t in trials if t.state == "COMPLETE" and t.metric("final_val_acc")
                     is not None),
                    key=lambda t: (-t.metrics["final_val_acc"],
                                   t.metric("param_count") or math.inf, t.start_time))
    parents = search_all(client, experiment.experiment_id, role_query("study"))
    parent = max(parents, key=lambda r: r.info.start_time) if parents else None
    grid_size = _grid_size(parent) or len({t.variant for t in trials})
    data = StudyData(experiment_name, tracking_uri, parent.info.run_id if parent else None,
                     grid_size, trials, dimensions, varied, max(columns, default=0), ranked,
                     ranked[:top], champion(client))
    for trial in data.top:
        history = client.get_metric_history(trial.run_id, "val_acc")
        data.histories[trial.run_id] = sorted((m.step, m.value) for m in history)
        curve = _anytime_curve(client, trial.run_id)
        if curve:
            data.anytime[trial.run_id] = curve
    return data


def _one_per_point(trials: list[TrialRecord]) -> list[TrialRecord]:
    """A grid point trained in more than one run (an attempt interrupted before trials
    continued their run, a lost worker's run) counts once: as its COMPLETE run, else its
    latest. The other attempts stay in MLflow; the report is about the grid."""
    kept: dict[str, TrialRecord] = {}
    for trial in sorted(trials, key=lambda t: t.start_time):
        held = kept.get(trial.variant)
        if held is None or trial.state == "COMPLETE" or held.state != "COMPLETE":
            kept[trial.variant] = trial
    chosen = {id(trial) for trial in kept.values()}
    return [trial for trial in trials if id(trial) in chosen]  # in the order given


def matched(trials: list[TrialRecord], dim: str, dimensions: list[str]) -> list[TrialRecord]:
    """The trials that take part in a fair comparison of `dim`'s values: those whose other
    settings also occur with another value of `dim`.

    The grid normalises some points (drop-path is "none" with one column; recursive sharing
    needs three columns or more), so comparing all trials per value would compare other
    settings too. A dimension that follows from `dim` (drop-path from columns) is not held
    fixed: each value of `dim` brings its own.
    """
    def follows(other: str) -> bool:
        seen: dict[str | None, str | None] = {}
        return all(seen.setdefault(t.dims.get(dim), t.dims.get(other)) == t.dims.get(other)
                   for t in trials)

    held = [d for d in dimensions if d != dim and not follows(d)]
    groups: dict[tuple, set[str | None]] = {}
    for t in trials:
        groups.setdefault(tuple(t.dims.get(d) for d in held), set()).add(t.dims.get(dim))
    return [t for t in trials if len(groups[tuple(t.dims.get(d) for d in held)]) > 1]


def _dimensions() -> list[str]:
    # Other helpers add dimensions (weight_sharing) to the config; any recorded one is shown.
    return [*DIMENSIONS, *(d for d in ("weight_sharing",) if d not in DIMENSIONS)]


def _record(run: Run) -> TrialRecord:
    tags, params = run.data.tags, run.data.params
    state = tags.get(STATE) or ("RUNNING" if run.info.status == "RUNNING" else run.info.status)
    number = tags.get(TRIAL_NUMBER, "")
    return TrialRecord(
        run_id=run.info.run_id, variant=params.get("variant") or tags.get(VARIANT, "?"),
        state=state, reason=tags.get(REASON, ""),
        dims={d: params[d] for d in _dimensions() if d in params},
        metrics=dict(run.data.metrics), start_time=run.info.start_time or 0,
        trial_number=int(number) if number.isdigit() else None)


def _grid_size(parent: Run | None) -> int | None:
    if parent is None:
        return None
    text = parent.data.params.get("grid_size")
    value = parent.data.metrics.get("grid_size")
    if text and text.isdigit():
        return int(text)
    return int(value) if value is not None else None


def champion(client: MlflowClient) -> Champion | None:
    """The registry's FractalNet@champion, or None (no registry, no model, no alias)."""
    try:
        version = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except Exception:  # noqa: BLE001 - no champion is a normal state of a young store
        return None
    tags = version.tags
    return Champion(str(version.version), tags.get("variant", "?"), tags.get("val_acc", "?"),
                    tags.get("source_run_id") or version.run_id or "?", tags.get("experiment", ""))


def _anytime_curve(client: MlflowClient, run_id: str) -> list[tuple[float, float]]:
    """(compute fraction, accuracy) points of a trial's anytime.csv; [] when it has none."""
    try:
        if ANYTIME_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
            return []
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(run_id, ANYTIME_ARTIFACT, folder)
            rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    except Exception:  # noqa: BLE001 - an optional figure: a missing curve only drops it
        return []
    if not rows:
        return []
    names = list(rows[0])
    acc = next((n for n in names if "acc" in n.lower()), None)
    compute = next((n for n in names if re.search(r"compute|cost|flop", n, re.I)), None)
    if acc is None or compute is None:
        return []
    points = []
    for row in rows:
        try:
            points.append((float(row[compute]), float(row[acc])))
        except (TypeError, ValueError):
            continue
    return sorted(points)
