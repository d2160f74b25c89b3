"""promote under a budget, and `promote --pareto`: the eligible trials within every --max-*
limit, and the Pareto front of the ranking metric against the cost metrics."""

from __future__ import annotations

import sys

from fractal_mlops.config.objectives import pareto_front
from fractal_mlops.tracking.registry import Candidate, within_budget

FRONT_COSTS = ("param_count", "flops", "latency_ms")  # --pareto's cost axes with no --max-*
FLAGS = {"param_count": "--max-params", "flops": "--max-flops", "latency_ms": "--max-latency-ms"}


def apply_budgets(candidates: list[Candidate], budgets: dict[str, float],
                  experiment: str) -> list[Candidate]:
    """The candidates within every budget; prints how many each budget left out, or one line
    on stderr when none is left."""
    kept, over = within_budget(candidates, budgets)
    limits = ", ".join(f"{FLAGS.get(m, m)} {limit:,.6g}" for m, limit in budgets.items())
    left_out = ", ".join(f"{n} over or without {m}" for m, n in over.items())
    if not kept:
        smallest = {m: min((c.run.data.metrics[m] for c in candidates if m in c.run.data.metrics),
                           default=None) for m in budgets}
        least = ", ".join(f"{m} {v:,.6g}" for m, v in smallest.items() if v is not None)
        print(f"nothing to promote: no eligible trial of {experiment!r} is within {limits} "
              f"(the smallest: {least or 'none recorded'})", file=sys.stderr)
        return []
    print(f"within {limits}: {len(kept)} of {len(candidates)} eligible"
          + (f" ({left_out})" if left_out else ""))
    return kept


def front_axes(candidates: list[Candidate], metric: str, budget_metrics: list[str]) -> list[str]:
    """The front's metrics: `metric`, then the budgets' metrics, else every FRONT_COSTS metric
    that some candidate recorded."""
    costs = budget_metrics or [m for m in FRONT_COSTS
                               if any(m in c.run.data.metrics for c in candidates)]
    return [metric, *(m for m in costs if m != metric)]


def front(candidates: list[Candidate], axes: list[str], maximize: bool) -> list[Candidate]:
    """The candidates on the Pareto front of `axes` (the first maximized when `maximize`, the
    costs minimized), among those that recorded every axis; best first."""
    complete = [c for c in candidates if all(m in c.run.data.metrics for m in axes)]
    points = [[c.run.data.metrics[m] for m in axes] for c in complete]
    dirs = ["maximize" if maximize else "minimize", *["minimize"] * (len(axes) - 1)]
    on_front = [complete[i] for i in pareto_front(points, dirs)]
    sign = -1.0 if maximize else 1.0
    return sorted(on_front, key=lambda c: (sign * c.run.data.metrics[axes[0]],
                                           *(c.run.data.metrics[m] for m in axes[1:])))


def print_front(candidates: list[Candidate], metric: str, maximize: bool,
                budget_metrics: list[str]) -> None:
    """The front as a table on stdout (promote --pareto registers nothing)."""
    axes = front_axes(candidates, metric, budget_metrics)
    best = front(candidates, axes, maximize)
    missing = sum(not all(m in c.run.data.metrics for m in axes) for c in candidates)
    print(f"Pareto front of {axes[0]} ({'max' if maximize else 'min'}) against "
          f"{', '.join(axes[1:]) or 'nothing'} (min): {len(best)} of {len(candidates)} eligible "
          "trials" + (f"; {missing} without every metric left out" if missing else ""))
    header = ["run_id", "trial", "variant", *axes]
    rows = [[c.run_id, c.trial, c.variant, *(_cell(c.run.data.metrics[m]) for m in axes)]
            for c in best]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("nothing registered (--pareto); promote one with --max-params / --max-flops / "
          "--max-latency-ms")


def _cell(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.6g}"
