"""report.html: one self-contained page (inline CSS, figures as base64 PNG, no network).

It renders the same from disk and in MLflow's artifact viewer.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from datetime import datetime, timezone
from html import escape
from typing import TYPE_CHECKING

from fractal_mlops.config.objectives import pareto_front
from fractal_mlops.stores.credentials import redact

if TYPE_CHECKING:
    from fractal_mlops.reporting.data import StudyData, TrialRecord

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f3f3; padding: 0 0.25em; } .COMPLETE { color: #2e7d32; }
.PRUNED { color: #ef6c00; } .FAIL { color: #c62828; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def render_html(data: StudyData, figures: list[tuple[str, str, bytes]]) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Study report: {escape(data.experiment)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Study report: {escape(data.experiment)}</h1>",
        f'<p class="meta">Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from '
        f"<code>{escape(redact(data.tracking_uri))}</code>"
        + (f", study run <code>{escape(data.parent_run_id)}</code>" if data.parent_run_id else "")
        + "</p>",
        _headline(data),
        _reasons(data),
        _leaderboard(data),
        _front(data),
        "<h2>Figures</h2>",
        *(_figure(name, caption, png) for name, caption, png in figures),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _headline(data: StudyData) -> str:
    counts = data.counts()
    states = ", ".join(f'<span class="{escape(s)}">{n} {escape(s)}</span>' for s, n in counts.items())
    items = [f"Grid: <b>{data.grid_size}</b> points; <b>{len(data.trials)}</b> trial runs: "
             f"{states}."]
    if data.varied:
        items.append("Dimensions that vary: " + ", ".join(
            f"<code>{escape(d)}</code> ({len({t.dims.get(d) for t in data.trials})})"
            for d in data.varied) + ".")
    if data.ranked:
        best = data.ranked[0]
        items.append(
            f"Best trial: <b>{escape(best.variant)}</b>, final val acc "
            f"<b>{best.metrics['final_val_acc']:.4f}</b>{_params(best)}, run "
            f"<code>{escape(best.run_id)}</code>"
            + (f" (trial {best.trial_number})" if best.trial_number is not None else "") + ".")
    else:
        items.append("No COMPLETE trial yet: nothing to rank.")
    champ = data.champion
    if champ:
        where = f" of experiment {escape(champ.experiment)}" if champ.experiment else ""
        items.append(f"Registry champion: <code>FractalNet@champion</code> = version "
                     f"{escape(champ.version)}: <b>{escape(champ.variant)}</b>, val acc "
                     f"{escape(_number(champ.val_acc))}, run <code>{escape(champ.run_id)}</code>"
                     f"{where}.")
    else:
        items.append("Registry champion: none yet (promote the best trial with "
                     f"<code>fractal-mlops promote --experiment {escape(data.experiment)}</code>).")
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _number(text: str) -> str:
    try:
        return f"{float(text):.4f}"
    except ValueError:
        return text


def _params(trial: TrialRecord) -> str:
    count = trial.metric("param_count")
    return f", {count:,.0f} parameters" if count is not None else ""


def _reasons(data: StudyData) -> str:
    """Why trials did not complete: reasons grouped with their numbers masked, one example each."""
    groups: Counter[tuple[str, str]] = Counter()
    example: dict[tuple[str, str], TrialRecord] = {}
    for trial in data.trials:
        if trial.state == "COMPLETE":
            continue
        key = (trial.state, re.sub(r"\d+(\.\d+)?", "#", trial.reason or "(no reason recorded)"))
        groups[key] += 1
        example.setdefault(key, trial)
    if not groups:
        return ""
    rows = "".join(
        f'<tr><td class="{escape(state)}">{escape(state)}</td><td class="num">{n}</td>'
        f"<td>{escape(example[(state, key)].reason or '(no reason recorded)')}</td>"
        f"<td>{escape(example[(state, key)].variant)}</td></tr>"
        for (state, key), n in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[1])))
    return ("<h2>Why trials did not complete</h2><table><tr><th>state</th><th>trials</th>"
            f"<th>reason (an example)</th><th>e.g. variant</th></tr>{rows}</table>")


def _leaderboard(data: StudyData) -> str:
    if not data.top:
        return ""
    dims = data.varied or data.dimensions
    head = "".join(f"<th>{escape(h)}</th>" for h in (
        "#", "variant", *dims, "final val acc", "best val acc", "params", "train s", "run ID"))
    rows = []
    for rank, t in enumerate(data.top, 1):
        cells = [str(rank), escape(t.variant), *(escape(t.dims.get(d, "")) for d in dims)]
        numbers = [_fmt(t.metric("final_val_acc"), ".4f"), _fmt(t.metric("best_val_acc"), ".4f"),
                   _fmt(t.metric("param_count"), ",.0f"), _fmt(t.metric("train_seconds"), ".1f")]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="num">{n}</td>' for n in numbers)
                    + f"<td><code>{escape(t.run_id)}</code></td></tr>")
    return (f"<h2>Leaderboard: top {len(data.top)} of {len(data.ranked)} COMPLETE trials</h2>"
            f"<p>Every trial is in <code>leaderboard.csv</code> beside this page.</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>")


FRONT_COSTS = ("param_count", "flops", "latency_ms")


def front_of(data: StudyData) -> tuple[list[str], list[TrialRecord]]:
    """The cost metrics the COMPLETE trials recorded, and the trials on the Pareto front of
    final val acc against all of them (best first), among the trials that have every one."""
    costs = [m for m in FRONT_COSTS if any(t.metric(m) is not None for t in data.ranked)]
    trials = [t for t in data.ranked if all(t.metric(m) is not None for m in costs)]
    points = [[t.metrics[m] for m in ("final_val_acc", *costs)] for t in trials]
    front = pareto_front(points, ["maximize", *["minimize"] * len(costs)])
    return costs, [trials[i] for i in front]


def _front(data: StudyData) -> str:
    costs, front = front_of(data)
    if not front or not costs:
        return ""
    head = "".join(f"<th>{escape(h)}</th>" for h in ("variant", "final val acc", *costs, "run ID"))
    rows = "".join(
        f"<tr><td>{escape(t.variant)}</td><td class=\"num\">{t.metrics['final_val_acc']:.4f}</td>"
        + "".join(f'<td class="num">{t.metrics[m]:,.4g}</td>' for m in costs)
        + f"<td><code>{escape(t.run_id)}</code></td></tr>" for t in front)
    return (f"<h2>Pareto front: final val acc against {escape(', '.join(costs))}</h2>"
            f"<p>{len(front)} of {len(data.ranked)} COMPLETE trials: no other trial is at least "
            "as accurate and as cheap on every count and better on one. <code>fractal-mlops "
            "promote --pareto</code> prints the same front; <code>--max-params</code>, "
            "<code>--max-flops</code>, <code>--max-latency-ms</code> promote within a budget.</p>"
            f"<table><tr>{head}</tr>{rows}</table>")


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _figure(name: str, caption: str, png: bytes) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{escape(name)}"><img alt="{escape(name)}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{escape(caption)} '
            f"(<code>{escape(name)}.png</code>)</figcaption></figure>")
