"""Promotion in the registry: pick the best eligible trial, register it, move the alias, roll back."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fractal_mlops.errors import EXIT_FAULT, EXIT_OK, ConfigError
from fractal_mlops.signals import stop_signals_held
from fractal_mlops.stores.credentials import redact
from fractal_mlops.tracking.compat import mismatch
from fractal_mlops.tracking.front import apply_budgets, print_front
from fractal_mlops.tracking.names import STATE
from fractal_mlops.tracking.registry import (
    Candidate,
    aliases,
    eligible,
    metric_tag,
    outside_budget,
    rank,
    register,
    trial_runs,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

EXIT_NOTHING = EXIT_FAULT  # nothing eligible, nothing to roll back


@dataclass(frozen=True)
class PromoteSettings:
    tracking_uri: str
    experiment: str
    metric: str  # the run metric key actually compared (val_acc -> final_val_acc)
    maximize: bool
    model_name: str
    alias: str
    previous_alias: str
    min_delta: float
    force: bool
    budgets: dict[str, float] = field(default_factory=dict)  # metric -> limit (--max-*)
    pareto: bool = False  # print the front, register nothing


def promote(client: MlflowClient, s: PromoteSettings) -> int:
    experiment = client.get_experiment_by_name(s.experiment)
    if experiment is None or experiment.lifecycle_stage != "active":
        known = [e.name for e in client.search_experiments()][:8]
        raise ConfigError(f"experiment {s.experiment!r} not found in {redact(s.tracking_uri)} "
                          f"(experiments there: {', '.join(known) or 'none'})")
    runs = trial_runs(client, experiment.experiment_id)
    candidates, skipped = eligible(runs, s.metric)
    complete = [r for r in runs if r.data.tags.get(STATE) == "COMPLETE"]
    if not candidates and complete and all(s.metric not in r.data.metrics for r in complete):
        known = sorted({k for r in complete for k in r.data.metrics})
        raise ConfigError(f"--metric {s.metric!r}: no trial of {s.experiment!r} recorded it "
                          f"(they have {', '.join(known[:12])}{', ...' if len(known) > 12 else ''})")
    others = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    print(f"experiment {s.experiment}: {len(runs)} trial runs, {len(candidates)} eligible "
          f"(COMPLETE with {s.metric})" + (f"; not eligible: {others}" if others else ""))
    if not candidates:
        print(f"nothing to promote: no COMPLETE trial in {s.experiment!r} has a model and "
              f"{s.metric}", file=sys.stderr)
        return EXIT_NOTHING
    if s.budgets:
        candidates = apply_budgets(candidates, s.budgets, s.experiment)
        if not candidates:
            return EXIT_NOTHING
    if s.pareto:
        print_front(candidates, s.metric, s.maximize, list(s.budgets))
        return EXIT_OK
    ranked = rank(candidates, s.maximize)
    best = ranked[0]
    direction = "highest" if s.maximize else "lowest"
    ties = sum(c.value == best.value for c in ranked)
    tie_note = f" ({ties} runs tie: fewest parameters, then earliest, wins)" if ties > 1 else ""
    print(f"best by {direction} {s.metric}: run {best.run_id} trial {best.trial} "
          f"{best.variant}: {s.metric} {best.value:.4f}, {best.param_count:,.0f} params"
          + tie_note)

    current = aliases(client, s.model_name)
    with stop_signals_held():  # a stop signal waits: a new version gets its alias, or no version
        return _register_and_move(client, s, best, current)


def _register_and_move(client: MlflowClient, s: PromoteSettings, best: Candidate,
                       current: dict[str, str]) -> int:
    version, created = register(client, s.model_name, best, s.metric, s.experiment, (
        "FractalNet variants promoted from fractal_mlops studies. Alias "
        f"'{s.alias}': the promoted version; '{s.previous_alias}': the one "
        "before it (fractal-mlops promote --rollback swaps them)."), s.budgets)
    v = str(version.version)
    if created:
        print(f"registered {s.model_name} version {v} from {best.model_uri} "
              f"(source_run_id {best.run_id})")
    else:
        print(f"run {best.run_id} is already {s.model_name} version {v}: no new version")

    champion = current.get(s.alias)
    if champion == v:
        print(f"{s.model_name}@{s.alias} is already version {v}: nothing to change")
        return EXIT_OK
    move, why = decide(client, s, best, champion)
    if not move:
        print(f"{s.model_name}@{s.alias} stays on version {champion}: {why}")
        return EXIT_OK
    if champion is not None:
        client.set_registered_model_alias(s.model_name, s.previous_alias, champion)
    client.set_registered_model_alias(s.model_name, s.alias, v)
    kept = (f"; version {champion} keeps @{s.previous_alias} (undo: fractal-mlops promote "
            f"--rollback)") if champion is not None else ""
    print(f"{s.model_name}@{s.alias} -> version {v}: {why}{kept}")
    print(f'load it: mlflow.pyfunc.load_model("models:/{s.model_name}@{s.alias}")')
    return EXIT_OK


def decide(client: MlflowClient, s: PromoteSettings, best: Candidate,
           champion: str | None) -> tuple[bool, str]:
    """Whether the alias moves from `champion` (a version) to `best`, and why."""
    if champion is None:
        return True, "there was no champion yet"
    held = client.get_model_version(s.model_name, champion)
    value, params = _champion_metrics(client, held, s.metric)
    other = mismatch(client, best.run, held.tags.get("source_run_id") or held.run_id)
    if other and not s.force:  # accuracies on other data say nothing about each other
        return False, (f"run {best.run_id} was trained on other data ({other}); "
                       "pass --force to promote across datasets")
    if other:
        return True, f"--force across datasets ({other})"
    outside = outside_budget(_source_metrics(client, held), s.budgets) if s.budgets else None
    if outside and not s.force:  # the best within the budget replaces a champion beyond it
        return True, f"version {champion} is outside the budget ({outside})"
    if s.force:
        return True, f"--force (version {champion} had {s.metric} {_fmt(value)})"
    if value is None:
        return False, (f"version {champion} has no {s.metric} to compare with; "
                       "pass --force to replace it")
    gain = (best.value - value) if s.maximize else (value - best.value)
    where = ""
    if held.tags.get("experiment") and held.tags["experiment"] != s.experiment:
        where = f" (of experiment {held.tags['experiment']})"
    compared = f"{s.metric} {best.value:.4f} vs {value:.4f} of version {champion}{where}"
    if s.min_delta > 0:
        if gain >= s.min_delta:
            return True, f"{compared}: better by {gain:.4f} >= min-delta {s.min_delta:g}"
        return False, f"{compared}: not better by at least min-delta {s.min_delta:g}"
    if gain > 0:
        return True, f"{compared}: better"
    if gain == 0 and params is not None and best.param_count < params:
        return True, f"{compared}: a tie, with fewer parameters ({metric_tag(best.param_count)})"
    return False, f"{compared}: not better"


def _champion_metrics(client: MlflowClient, version: ModelVersion,
                      metric: str) -> tuple[float | None, float | None]:
    """The champion's metric and parameter count, from its source run (or its version tags)."""
    metrics = _source_metrics(client, version)
    value = metrics.get(metric)
    if value is None:
        tag = version.tags.get("val_acc" if metric == "final_val_acc" else metric)
        value = _float(tag)
    params = metrics.get("param_count", _float(version.tags.get("param_count")))
    return value, params


def _source_metrics(client: MlflowClient, version: ModelVersion) -> dict[str, Any]:
    """The final metrics of the run a version came from ({} when that run is gone)."""
    from mlflow.exceptions import MlflowException

    run_id = version.tags.get("source_run_id") or version.run_id
    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException:
        return {}


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"


def rollback(client: MlflowClient, s: PromoteSettings) -> int:
    """Give the alias back to the version holding the previous alias; swap the two."""
    current = aliases(client, s.model_name)
    previous, champion = current.get(s.previous_alias), current.get(s.alias)
    if previous is None:
        print(f"nothing to roll back to: no version of {s.model_name!r} has the alias "
              f"{s.previous_alias!r}", file=sys.stderr)
        return EXIT_NOTHING
    with stop_signals_held():  # the two aliases swap together
        client.set_registered_model_alias(s.model_name, s.alias, previous)
        if champion is not None:
            client.set_registered_model_alias(s.model_name, s.previous_alias, champion)
        else:
            client.delete_registered_model_alias(s.model_name, s.previous_alias)
    print(f"rolled back: {s.model_name}@{s.alias} -> version {previous}"
          + (f" (was version {champion}, which now holds @{s.previous_alias}; the same command "
             "undoes this)" if champion is not None else ""))
    return EXIT_OK
