"""The report's figures, as PNG bytes (matplotlib's Agg canvas; no pyplot, no global state).

`figures(data)` returns (name, caption, png) for each figure that has something to show: a
study whose trials all PRUNED has no accuracy figures, one without anytime.csv no halting curve.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from fractal_mlops.reporting.data import matched

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fractal_mlops.reporting.data import StudyData, TrialRecord

STATE_COLORS = {"COMPLETE": "#2e7d32", "PRUNED": "#ef6c00", "FAIL": "#c62828"}
DPI = 100


def figures(data: StudyData) -> list[tuple[str, str, bytes]]:
    out = []
    for name, caption, make in FIGURES:
        figure = make(data)
        if figure is not None:
            out.append((name, caption, _png(figure)))
    return out


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)  # constrained layout already fits it
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _label(trial: TrialRecord, rank: int) -> str:
    return f"#{rank} {trial.variant}"


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def pareto_front(trials: list[TrialRecord], cost: str = "param_count") -> list[TrialRecord]:
    """The trials no other beats on both counts (lower `cost`, higher final val acc); of equal
    points, one."""
    points = sorted((t for t in trials if t.metric(cost) is not None),
                    key=lambda t: (t.metrics[cost], -t.metrics["final_val_acc"]))
    front, best = [], -math.inf
    for trial in points:
        if trial.metrics["final_val_acc"] > best:
            front.append(trial)
            best = trial.metrics["final_val_acc"]
    return front


# cost metric -> (axis label, title)
COST_AXES = {"param_count": ("parameters", "size"), "flops": ("forward FLOPs per image", "FLOPs"),
             "latency_ms": ("latency at batch 1, ms", "latency")}


def accuracy_vs_cost(data: StudyData, cost: str) -> Figure | None:
    """Final val acc against `cost` (log scale): the front joined and labelled, the trials it
    dominates faded."""
    points = [t for t in data.ranked if t.metric(cost) is not None]
    if not points:
        return None
    front = pareto_front(points, cost)
    on_front = {t.run_id for t in front}
    dominated = [t for t in points if t.run_id not in on_front]
    fig = _figure(8, 5)
    ax = fig.subplots()
    ax.scatter([t.metrics[cost] for t in dominated], [t.metrics["final_val_acc"] for t in dominated],
               s=14, alpha=0.25, color="#607d8b", label=f"dominated ({len(dominated)})")
    ax.plot([t.metrics[cost] for t in front], [t.metrics["final_val_acc"] for t in front],
            "-o", color="#d81b60", markersize=5, label=f"Pareto front ({len(front)})")
    if len(front) <= 12:
        for t in front:
            ax.annotate(t.variant, (t.metrics[cost], t.metrics["final_val_acc"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    from matplotlib.ticker import NullFormatter

    label, title = COST_AXES[cost]
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^4, 3x10^4, ... overlap
    ax.set(xlabel=f"{label} (log scale)", ylabel="final val acc",
           title=f"{data.experiment}: accuracy against {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def accuracy_vs_params(data: StudyData) -> Figure | None:
    return accuracy_vs_cost(data, "param_count")


def accuracy_vs_flops(data: StudyData) -> Figure | None:
    return accuracy_vs_cost(data, "flops")


def accuracy_vs_latency(data: StudyData) -> Figure | None:
    return accuracy_vs_cost(data, "latency_ms")


def parameter_importance(data: StudyData) -> Figure | None:
    """Each varying dimension's importance for final val acc, per evaluator (importance.py)."""
    from fractal_mlops.reporting.importance import EVALUATORS, LABELS, ranking

    dims = ranking(data.importance)
    if not dims:
        return None
    fig = _figure(8, 0.9 + 0.45 * len(dims))
    ax = fig.subplots()
    evaluators = [e for e in EVALUATORS if e in data.importance]
    height = 0.8 / len(evaluators)
    for i, (name, color) in enumerate(zip(evaluators, ("#1e88e5", "#fb8c00"), strict=False)):
        ax.barh([y + i * height for y in range(len(dims))],
                [data.importance[name].get(d, 0.0) for d in dims], height=height, color=color,
                label=LABELS[name])
    ax.set_yticks([y + height * (len(evaluators) - 1) / 2 for y in range(len(dims))], dims)
    ax.invert_yaxis()  # the most important on top
    ax.set(xlabel="importance for final val acc (each evaluator sums to 1)",
           title=f"{data.experiment}: which dimension mattered "
                 f"({len(data.ranked)} COMPLETE trials)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def blocks_columns_heatmap(data: StudyData) -> Figure | None:
    import numpy as np

    cells: dict[tuple[int, int], list[float]] = {}
    for t in data.ranked:
        try:
            key = (int(t.dims["blocks"]), int(t.dims["columns"]))
        except (KeyError, ValueError):
            continue
        cells.setdefault(key, []).append(t.metrics["final_val_acc"])
    if not cells:
        return None
    blocks = sorted({b for b, _ in cells})
    columns = sorted({c for _, c in cells})
    fig = _figure(4 + 2.4 * len(columns), 1.6 + 0.9 * len(blocks))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, (title, reduce) in zip(axes, (("best", max), ("mean", np.mean)), strict=True):
        grid = np.full((len(blocks), len(columns)), np.nan)
        for (b, c), values in cells.items():
            grid[blocks.index(b), columns.index(c)] = reduce(values)
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for (b, c), values in cells.items():
            value = grid[blocks.index(b), columns.index(c)]
            ax.text(columns.index(c), blocks.index(b), f"{value:.3f}\nn={len(values)}",
                    ha="center", va="center", fontsize=8,
                    color="white" if value < np.nanmean(grid) else "black")
        ax.set_xticks(range(len(columns)), [str(c) for c in columns])
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set(xlabel="columns (C)", ylabel="blocks (B)", title=f"{title} final val acc")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def _sorted_values(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def dimension_effects(data: StudyData) -> Figure | None:
    compared = {dim: {t.run_id for t in matched(data.trials, dim, data.dimensions)}
                for dim in data.varied}
    compared = {dim: ids for dim, ids in compared.items() if ids}
    if not compared:
        return None
    count = len(compared)
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    fig = _figure(4.6 * ncols, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (dim, ids) in zip(axes, compared.items(), strict=False):
        trials = [t for t in data.trials if t.run_id in ids]
        values = _sorted_values({t.dims[dim] for t in trials if dim in t.dims})
        accs = [[t.metrics["final_val_acc"] for t in data.ranked
                 if t.run_id in ids and t.dims.get(dim) == v] for v in values]
        others = [sum(1 for t in trials if t.dims.get(dim) == v and t.state != "COMPLETE")
                  for v in values]
        shown = [a if a else [math.nan] for a in accs]
        ax.boxplot(shown, positions=range(len(values)), widths=0.6, showfliers=False)
        for i, acc in enumerate(accs):
            ax.scatter([i] * len(acc), acc, s=8, alpha=0.35, color="#607d8b")
            if acc:
                ax.scatter([i], [sum(acc) / len(acc)], marker="D", color="#d81b60", zorder=3)
        labels = [f"{v}\nn={len(a)}" + (f", {o} not\ncomplete" if o else "")
                  for v, a, o in zip(values, accs, others, strict=True)]
        ax.set_xticks(range(len(values)), labels, fontsize=7,
                      rotation=30 if len(values) > 4 else 0)
        ax.set(title=dim, ylabel="final val acc")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig


def _per_trial_lines(rows: list, xlabel: str, title: str, markersize: int = 3) -> Figure:
    """One line per top trial (rows of (rank, trial, [(x, val acc), ...])), in rank colors."""
    fig = _figure(8, 5)
    ax = fig.subplots()
    for (rank, t, points), color in zip(rows, _colors(len(rows)), strict=True):
        ax.plot([x for x, _ in points], [y for _, y in points], "-o", markersize=markersize,
                color=color, label=_label(t, rank))
    ax.set(xlabel=xlabel, ylabel="val acc", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def top_curves(data: StudyData) -> Figure | None:
    curves = [(t, data.histories.get(t.run_id)) for t in data.top]
    curves = [(rank, t, h) for rank, (t, h) in enumerate(curves, 1) if h]
    if not curves:
        return None
    fig = _per_trial_lines(curves, "epoch", f"top {len(curves)}: val acc per epoch")
    fig.axes[0].xaxis.get_major_locator().set_params(integer=True)
    return fig


def anytime_columns(data: StudyData) -> Figure | None:
    rows = []
    for rank, t in enumerate(data.top, 1):
        points = [(k, t.metric(f"val_acc_column_{k}")) for k in range(1, data.max_columns + 1)]
        points = [(k, v) for k, v in points if v is not None]
        if points:
            rows.append((rank, t, points))
    if not rows:
        return None
    fig = _per_trial_lines(rows, "column k alone (1 = shallowest)",
                           f"top {len(rows)}: anytime accuracy per column", markersize=4)
    ax, whole = fig.axes[0], data.max_columns + 1
    for (_, t, _), color in zip(rows, _colors(len(rows)), strict=True):
        ax.scatter([whole], [t.metrics["final_val_acc"]], marker="*", s=80, color=color)
    ax.set_xticks([*range(1, whole), whole], [*map(str, range(1, whole)), "whole"])
    return fig


def halting_curves(data: StudyData) -> Figure | None:
    rows = [(rank, t, data.anytime[t.run_id]) for rank, t in enumerate(data.top, 1)
            if data.anytime.get(t.run_id)]
    if not rows:
        return None
    return _per_trial_lines(rows, "compute spent (fraction of the whole network)",
                            f"top {len(rows)}: halting by confidence")


def state_counts(data: StudyData) -> Figure:
    counts = data.counts()
    fig = _figure(6, 0.6 + 0.5 * len(counts))
    ax = fig.subplots()
    names = list(counts)
    bars = ax.barh(names, [counts[n] for n in names],
                   color=[STATE_COLORS.get(n, "#9e9e9e") for n in names])
    ax.bar_label(bars, padding=3)
    ax.invert_yaxis()
    ax.set(xlabel="trial runs", title=f"{len(data.trials)} trial runs of a {data.grid_size}-point grid")
    ax.margins(x=0.15)
    return fig


# (file name without .png, caption in report.html, maker), in the page's order
FIGURES: list[tuple[str, str, Callable[[StudyData], Figure | None]]] = [
    ("parameter_importance", "Which template dimension mattered: Optuna's fANOVA and PED-ANOVA "
     "importance of each varying dimension for final val acc over the COMPLETE trials "
     "(numbers: importance.csv).", parameter_importance),
    ("accuracy_vs_params", "Final val acc against parameter count; the Pareto front "
     "(no other trial is both smaller and more accurate) is joined and labelled, the trials "
     "it dominates are faded.", accuracy_vs_params),
    ("accuracy_vs_flops", "Final val acc against forward FLOPs per image; the Pareto front "
     "joined, dominated trials faded.", accuracy_vs_flops),
    ("accuracy_vs_latency", "Final val acc against inference latency at batch 1 (median, "
     "on the device each trial trained on); the Pareto front joined, dominated trials faded.",
     accuracy_vs_latency),
    ("blocks_columns_heatmap", "Blocks x columns: the best and the mean final val acc of "
     "the COMPLETE trials in each cell (n = trials).", blocks_columns_heatmap),
    ("dimension_effects", "Final val acc per value of each dimension that varies, among "
     "the variants that differ only in that dimension (so a value the grid ties to other "
     "settings, such as recursive sharing with 3+ columns, is compared with its own "
     "counterparts; a dimension with no such pairs is left out). Boxes: COMPLETE trials; "
     "diamonds: means.", dimension_effects),
    ("top_curves", "Per-epoch val acc of the top trials.", top_curves),
    ("anytime_columns", "Anytime: val acc of each column alone for the top trials "
     "(star: the whole network).", anytime_columns),
    ("halting_curves", "Confidence-halted anytime inference of the top trials: accuracy "
     "against the share of compute spent (anytime.csv).", halting_curves),
    ("state_counts", "Trials per state.", state_counts),
]
