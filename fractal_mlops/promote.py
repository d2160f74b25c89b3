"""Promote the best FractalNet of a study in the MLflow model registry.

    python -m fractal_mlops.promote [--experiment NAME] [--metric val_acc] [--model-name FractalNet]
        [--alias champion] [--min-delta X] [--force] [--tracking-uri URI]
        [--max-params N] [--max-flops N] [--max-latency-ms X] [--pareto]
    python -m fractal_mlops.promote --rollback [--model-name FractalNet] [--alias champion]

1. Pick the best COMPLETE trial run of the experiment by its final metric (`val_acc` means
   `final_val_acc`; losses, seconds, megabytes and counts are minimized, the rest maximized);
   ties go to the run with fewer parameters. PRUNED and FAIL trials are never eligible, nor,
   under a budget (--max-params, --max-flops, --max-latency-ms), a trial over any given limit
   or without its metric; nothing within the budget: one line, exit 1. --pareto prints the
   front of the metric against the costs and stops there.
2. Register its model (the trial's LoggedModel, tag `fractal.model_uri`) as a new version of
   the registered model, with version tags `source_run_id`, `val_acc`, `variant`, its cost
   metrics and the budget (`budget.param_count`, `budget.flops`, `budget.latency_ms`). A run that is
   already registered gets no second version.
3. Move the alias to that version when there is no champion yet, when it beats the champion by
   at least --min-delta (a tie goes to fewer parameters), when the champion is outside the
   given budget, or with --force. The outgoing champion
   keeps the alias `previous`, so `--rollback` (which swaps the two) undoes a promotion.

Exit codes: 0 done (also when the champion stays), 1 nothing eligible / nothing to roll back,
2 bad input (one line on stderr; nothing is written).
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from fractal_mlops.cli import (
    add_experiment_flag,
    add_tracking_uri_flag,
    experiment_from,
    parser,
    run_command,
)
from fractal_mlops.errors import ConfigError
from fractal_mlops.stores.locations import check_existing_store, resolve_tracking_uri
from fractal_mlops.tracking.promotion import PromoteSettings

DEFAULT_MODEL_NAME, DEFAULT_ALIAS, DEFAULT_PREVIOUS = "FractalNet", "champion", "previous"
_ALIAS = re.compile(r"^[\w-]{1,255}$")
_LOWER_IS_BETTER = re.compile(r"(loss|seconds|_mb|_count|flops|latency_ms)$")
BUDGET_FLAGS = (("--max-params", "param_count", int), ("--max-flops", "flops", float),
                ("--max-latency-ms", "latency_ms", float))


def build_parser() -> argparse.ArgumentParser:
    p = parser("promote", "Register the best COMPLETE trial of a study as a new version of the "
               "registered model and move the champion alias to it when it is better.")
    add_experiment_flag(p)
    p.add_argument("--metric", default="val_acc", help="final metric to rank by; val_acc "
                   "means final_val_acc; any other run metric by name (default: val_acc)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                   help="registered model (default: FractalNet)")
    p.add_argument("--alias", default=DEFAULT_ALIAS, help="alias of the promoted version "
                   "(default: champion)")
    p.add_argument("--previous-alias", help="alias kept by the outgoing version (default: "
                   "previous; <alias>-previous for another --alias)")
    p.add_argument("--min-delta", type=float, default=0.0, help="move the alias only when "
                   "the best run beats the current one by at least this much (default 0)")
    p.add_argument("--force", action="store_true",
                   help="move the alias to the best run even when it is not better")
    p.add_argument("--rollback", action="store_true", help="give the alias back to the "
                   "version holding the previous alias (and swap them)")
    for flag, metric, kind in BUDGET_FLAGS:
        p.add_argument(flag, type=kind, metavar="N" if kind is int else "X",
                       help=f"promote the best trial whose {metric} is at most this")
    p.add_argument("--pareto", action="store_true", help="print the Pareto front of the metric "
                   "against parameters, FLOPs and latency (or the --max-* metrics); register nothing")
    add_tracking_uri_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    from fractal_mlops.tracking.promotion import promote, rollback
    from fractal_mlops.tracking.tracker import configure, open_store

    configure(settings.tracking_uri)
    client = open_store(settings.tracking_uri)
    return rollback(client, settings) if args.rollback else promote(client, settings)


def maximized(metric: str) -> bool:
    """Losses, seconds, megabytes and counts are better low; every other metric high."""
    return not _LOWER_IS_BETTER.search(metric)


def resolve_settings(args: argparse.Namespace) -> PromoteSettings:
    """Flags + environment, checked; raises ConfigError and touches no store."""
    experiment = experiment_from(args)
    metric = args.metric.strip()
    if not metric:
        raise ConfigError("--metric must not be empty")
    key = "final_val_acc" if metric == "val_acc" else metric
    name = args.model_name.strip()
    if not name or any(c in name for c in "/:'\"") or name in (".", ".."):
        raise ConfigError(f"--model-name {args.model_name!r} is not a valid registered model name "
                          "(no / : or quotes)")
    previous = args.previous_alias or (DEFAULT_PREVIOUS if args.alias == DEFAULT_ALIAS
                                       else f"{args.alias}-previous")
    for flag, alias in (("--alias", args.alias), ("--previous-alias", previous)):
        if not _ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ConfigError(f"{flag} {alias!r} is not a valid alias (letters, digits, _ and -; "
                              "not 'latest' nor v<number>)")
    if previous == args.alias:
        raise ConfigError(f"--previous-alias must differ from --alias ({args.alias!r})")
    if not math.isfinite(args.min_delta) or args.min_delta < 0:
        raise ConfigError(f"--min-delta must be a number >= 0, got {args.min_delta}")
    if args.rollback and args.force:
        raise ConfigError("--rollback and --force do not go together")
    budgets = {}
    for flag, metric, _ in BUDGET_FLAGS:
        limit = getattr(args, flag[2:].replace("-", "_"))
        if limit is not None:
            if not (math.isfinite(limit) and limit > 0):
                raise ConfigError(f"{flag} must be a number > 0, got {limit}")
            budgets[metric] = limit
    if args.rollback and (budgets or args.pareto):
        raise ConfigError("--rollback takes no --max-* or --pareto (it moves the alias back)")
    uri = resolve_tracking_uri(args.tracking_uri, None)
    check_existing_store(uri)
    return PromoteSettings(uri, experiment, key, maximized(key), name,
                           args.alias, previous, args.min_delta, args.force, budgets, args.pareto)


if __name__ == "__main__":
    sys.exit(main())
