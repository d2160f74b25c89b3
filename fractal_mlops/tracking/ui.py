"""What a study looks like in the MLflow UI: run names, run descriptions, the study run's summary,
and the URL that opens the experiment on its trials.

Everything here goes through MLflow's own fields (run name, `mlflow.note.content`, tags,
metrics), so the stock `mlflow ui` shows it. Pure functions of recorded values; tracking.py
writes what they return.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from fractal_mlops.tracking.names import BEST_RUN_ID, BEST_VARIANT, NOTE, VARIANT
from fractal_mlops.tracking.queries import role_query

LOCAL_UI = "http://127.0.0.1:5000"
TOP_IN_DESCRIPTION = 5

# MLflow refuses these characters in a logged model's name; variant names use "." between the
# parts of a unit and in decimals.
_NOT_IN_MODEL_NAMES = re.compile(r"[/:.%\"']")


def model_name(variant: str) -> str:
    """The logged model's name: the variant, e.g. b2-c2-w32-conv_batch_relu-dpLG."""
    return _NOT_IN_MODEL_NAMES.sub("_", variant)


def finished_run_name(name: str, state: str) -> str:
    """A trial run keeps its name when COMPLETE; otherwise the name says how it ended, so a
    PRUNED run (status FINISHED, a green tick) does not pass for a success in the runs table."""
    suffix = f" [{state}]"
    if state == "COMPLETE" or name.endswith(suffix):
        return name
    return name + suffix


def trial_description(state: str, reason: str | None, metrics: Mapping[str, float],
                      retryable: Sequence[str] = ()) -> str:
    """The trial run's description: its state and why, in words, and its headline numbers."""
    numbers = _numbers(metrics)
    if state == "COMPLETE":
        text = "**COMPLETE**: trained every epoch."
        if "final_val_acc" in metrics:
            text += f" Final validation accuracy **{metrics['final_val_acc']:.4f}**"
            if "best_val_acc" in metrics:
                text += f" (best epoch {metrics['best_val_acc']:.4f})"
            text += "."
        columns = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in metrics.items()
                         if k.startswith("val_acc_column_"))
        if columns:
            text += " Each column alone (anytime): " + ", ".join(
                f"column {k} {v:.4f}" for k, v in columns) + "."
        return _join(text, numbers, "Its model is in this run's *Logged models*.")
    if state == "PRUNED":
        text = (f"**PRUNED**: stopped early on purpose, not a success: {reason or 'pruned'}. "
                "The run's status is FINISHED because pruning is an expected ending; its "
                "metrics cover the epochs it trained. A PRUNED trial has no model and is "
                "never promoted.")
        return _join(text, numbers)
    text = f"**FAIL**: {reason or 'the trial raised an error'}."
    if reason in retryable:
        text += " Not the variant's fault: its grid point is trained again the next time " \
                "the study runs."
    else:
        text += " The study went on without it; this grid point is not trained again."
    return _join(text, numbers)


def _numbers(metrics: Mapping[str, float]) -> str:
    parts = []
    if "param_count" in metrics:
        parts.append(f"{int(metrics['param_count']):,} parameters")
    if "train_seconds" in metrics:
        parts.append(f"{metrics['train_seconds']:.1f} s of training")
    return ("; ".join(parts) + ".") if parts else ""


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class RankedTrial:
    run_id: str
    variant: str
    final_val_acc: float
    best_val_acc: float | None
    param_count: int | None
    train_seconds: float | None


def study_description(study_name: str, experiment_id: str, counts: Mapping[str, int],
                      grid_size: int, grid_done: int, top: Sequence[RankedTrial]) -> str:
    """The study run's description: progress, the top trials as a table, how to promote."""
    lines = [f"**Study `{study_name}`**: {grid_done} of {grid_size} grid points done: "
             f"{counts.get('n_complete', 0)} COMPLETE, {counts.get('n_pruned', 0)} PRUNED, "
             f"{counts.get('n_fail', 0)} FAIL.", ""]
    if top:
        best = top[0]
        lines += [f"Best: **{best.variant}**, final validation accuracy "
                  f"**{best.final_val_acc:.4f}** (run "
                  f"[{best.run_id}](#/experiments/{experiment_id}/runs/{best.run_id})).", "",
                  f"Top {len(top)} COMPLETE trials by final val_acc (ties: fewer parameters):", "",
                  "| # | variant | final val_acc | best epoch val_acc | params | train s | run |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        for rank, t in enumerate(top, 1):
            lines.append(
                f"| {rank} | {t.variant} | {t.final_val_acc:.4f} | {_fmt(t.best_val_acc, '.4f')} "
                f"| {_fmt(t.param_count, ',')} | {_fmt(t.train_seconds, '.1f')} "
                f"| [{t.run_id[:8]}](#/experiments/{experiment_id}/runs/{t.run_id}) |")
        lines.append("")
    else:
        lines += ["No COMPLETE trial yet.", ""]
    lines += ["Promote the best trial to the model registry (`FractalNet@champion`):", "",
              f"    python -m fractal_mlops.promote --experiment {study_name}", "",
              "This run's artifacts hold the study's `config.yaml` and, once built, the study "
              "report under `report/` (open `report/report.html`)."]
    return "\n".join(lines)


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ui_lines(tracking_uri: str, experiment_id: str) -> list[str]:
    """How to look at the study: the `mlflow ui` command (for a database store), then the URL
    that opens the experiment on its training runs (not MLflow 3's GenAI overview)."""
    # workflowType: model training, not MLflow 3's GenAI overview. A sort other than by date
    # also lists the trials flat, best first, instead of folded under the study run.
    path = (f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            "&orderByKey=metrics.%60final_val_acc%60&orderByAsc=false")
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")  # no credentials in a URL shown
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        return [base + path]
    from fractal_mlops.stores.credentials import redact
    from fractal_mlops.stores.locations import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None:
        tracking_uri = f"sqlite:///{db.absolute()}"
    return [f"mlflow ui --backend-store-uri {redact(tracking_uri)}", LOCAL_UI + path]


def top_trials(client, experiment_id: str, study_name: str,
               k: int = TOP_IN_DESCRIPTION) -> list[RankedTrial]:
    """The study's best COMPLETE trial runs, ranked as promote ranks them (final val_acc, then
    fewer parameters)."""
    runs = client.search_runs(
        [experiment_id], role_query("trial", study_name, state="COMPLETE"),
        order_by=["metrics.final_val_acc DESC", "metrics.param_count ASC"], max_results=k)
    ranked = []
    for run in runs:
        metrics = run.data.metrics
        if "final_val_acc" not in metrics:
            continue
        params = metrics.get("param_count")
        ranked.append(RankedTrial(run.info.run_id, run.data.tags.get(VARIANT, "?"),
                                  metrics["final_val_acc"], metrics.get("best_val_acc"),
                                  int(params) if params is not None else None,
                                  metrics.get("train_seconds")))
    return ranked


def write_study_summary(client, experiment_id: str, run_id: str, study_name: str,
                        counts: Mapping[str, int], grid_size: int, grid_done: int) -> None:
    """Summary metrics (n_complete, n_pruned, n_fail, grid_size, grid_done, best_final_val_acc),
    the tags fractal.best_run_id / fractal.best_variant and the description of the study run."""
    import time

    from mlflow.entities import Metric, RunTag

    top = top_trials(client, experiment_id, study_name)
    summary = {**counts, "grid_size": grid_size, "grid_done": grid_done}
    tags = [RunTag(NOTE, study_description(study_name, experiment_id, counts, grid_size,
                                           grid_done, top))]
    if top:
        summary["best_final_val_acc"] = top[0].final_val_acc
        tags += [RunTag(BEST_RUN_ID, top[0].run_id), RunTag(BEST_VARIANT, top[0].variant)]
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()],
                     tags=tags)
