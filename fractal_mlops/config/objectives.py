"""What a study optimizes (`search.objectives`) and the Pareto maths every layer shares.

The first objective is an accuracy (maximized); the others are cost metrics, each with the
direction a user expects: fewer parameters, FLOPs and milliseconds are better, more images per
second is better. Points are tuples of metric values in the order of `objectives`.

    front = pareto_front(points, directions(["final_val_acc", "flops"]))   # indices
    fronts = nondominated_fronts(points, dirs)   # front 0, then front 1, ...
    crowding_distance([points[i] for i in fronts[0]])

Pure Python (no numpy, no torch), so the search, promote and the report use one definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fractal_mlops.errors import ConfigError

ACCURACY_METRICS = ("final_val_acc", "best_val_acc")
# cost metric -> maximized?
COST_METRICS = {"param_count": False, "flops": False, "latency_ms": False, "throughput_img_s": True}
DEFAULT_OBJECTIVES = ("final_val_acc",)


def maximized(metric: str) -> bool:
    return metric in ACCURACY_METRICS or COST_METRICS.get(metric, False)


def directions(objectives: Sequence[str]) -> list[str]:
    """Optuna's study directions of the objectives."""
    return ["maximize" if maximized(m) else "minimize" for m in objectives]


def check_objectives(objectives: Sequence[str], where: str = "search.objectives") -> None:
    """An accuracy first, then distinct cost metrics; ConfigError (one line) otherwise."""
    if not objectives:
        raise ConfigError(f"{where} must name at least one metric, e.g. [final_val_acc]")
    if objectives[0] not in ACCURACY_METRICS:
        raise ConfigError(f"{where} must start with an accuracy ({', '.join(ACCURACY_METRICS)}), "
                          f"got {objectives[0]!r}")
    for metric in objectives[1:]:
        if metric not in COST_METRICS:
            raise ConfigError(f"{where}: {metric!r} is not a cost metric (expected one of "
                              f"{', '.join(COST_METRICS)})")
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"{where} names a metric twice: {list(objectives)}")


def _signed(point: Sequence[float], dirs: Sequence[str]) -> tuple[float, ...]:
    """The point with every objective turned into one to maximize."""
    return tuple(v if d == "maximize" else -v for v, d in zip(point, dirs, strict=True))


def dominates(a: Sequence[float], b: Sequence[float], dirs: Sequence[str]) -> bool:
    """a is at least as good as b in every objective and better in one."""
    sa, sb = _signed(a, dirs), _signed(b, dirs)
    return all(x >= y for x, y in zip(sa, sb, strict=True)) and sa != sb


def pareto_front(points: Sequence[Sequence[float]], dirs: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (equal points are all on the front)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, dirs) for j, q in enumerate(points) if j != i)]


def nondominated_fronts(points: Sequence[Sequence[float]], dirs: Sequence[str]) -> list[list[int]]:
    """Non-dominated sorting: front 0 is the Pareto front, front 1 the front of the rest, ..."""
    left = list(range(len(points)))
    fronts = []
    while left:
        front = [left[i] for i in pareto_front([points[k] for k in left], dirs)]
        fronts.append(front)
        left = [k for k in left if k not in front]
    return fronts


def crowding_distance(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance of each point of one front (the ends: infinite)."""
    n = len(points)
    distance = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for m in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][m])
        low, high = points[order[0]][m], points[order[-1]][m]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for k in range(1, n - 1):
            distance[order[k]] += (points[order[k + 1]][m] - points[order[k - 1]][m]) / (high - low)
    return distance


def pareto_ranking(points: Sequence[Sequence[float]], dirs: Sequence[str]) -> list[int]:
    """All indices, best first: by front, then by crowding distance (larger first), then by
    index (the caller's order, e.g. the grid's)."""
    ranked = []
    for front in nondominated_fronts(points, dirs):
        crowd = crowding_distance([points[i] for i in front])
        ranked.extend(i for _, i in sorted(zip(crowd, front, strict=True), key=lambda ci: (-ci[0], ci[1])))
    return ranked
