"""Which template dimension mattered: Optuna's fANOVA and PED-ANOVA importance evaluators on
`final_val_acc` over the COMPLETE trials, from what MLflow recorded.

The trials are read from MLflow (as the rest of the report is), put into an in-memory Optuna
study with each varying dimension as a categorical param over the values the trials have, and
handed to `optuna.importance.get_param_importances`. Each evaluator's importances sum to 1.

    scores = importances(data.ranked, data.varied)   # {"fanova": {dim: x}, "ped_anova": {...}}
    importance_csv(scores)                          # dimension,fanova,ped_anova
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fractal_mlops.reporting.data import TrialRecord

EVALUATORS = ("fanova", "ped_anova")
LABELS = {"fanova": "fANOVA", "ped_anova": "PED-ANOVA"}
MIN_TRIALS = 3  # fewer COMPLETE trials say nothing about importance
TOP_TRIALS = 3  # PED-ANOVA's "good" trials: the top 10 %, but at least this many
log = logging.getLogger(__name__)


def _evaluator(name: str, n_trials: int):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if name == "fanova":
        return FanovaImportanceEvaluator(seed=0)
    # the top trials against all of them: Optuna's top 10 %, but at least TOP_TRIALS (with
    # 12 trials its 10 % is the best trial alone, and every param of that one trial "matters");
    # evaluate_on_local off: the grid is the whole space, not a region around the best trials
    quantile = min(0.5, max(0.1, TOP_TRIALS / n_trials))
    return PedAnovaImportanceEvaluator(target_quantile=quantile, evaluate_on_local=False)


def importances(trials: list[TrialRecord], dimensions: list[str]) -> dict[str, dict[str, float]]:
    """{evaluator: {dimension: importance}} for `dimensions` (those that vary), most important
    first; {} when fewer than MIN_TRIALS trials have final_val_acc or no dimension varies."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "a new study created" line
    scored = [t for t in trials if t.metric("final_val_acc") is not None]
    dims = [d for d in dimensions if len({t.dims.get(d) for t in scored}) > 1]
    if len(scored) < MIN_TRIALS or not dims:
        return {}
    choices = {d: sorted({t.dims.get(d, "") for t in scored}) for d in dims}
    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    study.add_trials([optuna.trial.create_trial(
        params={d: t.dims.get(d, "") for d in dims},
        distributions={d: CategoricalDistribution(choices[d]) for d in dims},
        value=t.metrics["final_val_acc"]) for t in scored])
    out = {}
    for name in EVALUATORS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API warnings
                out[name] = dict(optuna.importance.get_param_importances(
                    study, evaluator=_evaluator(name, len(scored)), params=dims))
        except Exception as exc:  # noqa: BLE001 - one evaluator failing leaves the other
            log.warning("parameter importance (%s) not computed: %s", name, exc)
    return out


def ranking(scores: dict[str, dict[str, float]]) -> list[str]:
    """Dimensions, most important first (by the first evaluator that has a result)."""
    for name in EVALUATORS:
        if name in scores:
            return sorted(scores[name], key=lambda d: -scores[name][d])
    return []


def importance_csv(scores: dict[str, dict[str, float]]) -> str:
    """dimension,fanova,ped_anova: one row per dimension, most important first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dimension", *EVALUATORS])
    for dim in ranking(scores):
        writer.writerow([dim, *(f"{scores[e][dim]:.6f}" if dim in scores.get(e, {}) else ""
                                for e in EVALUATORS)])
    return out.getvalue()


def importance_markdown(scores: dict[str, dict[str, float]], n_trials: int,
                        parent_run_id: str | None) -> str:
    """The panel as Markdown, for the study's note in optuna-dashboard (beside its own
    importance card, which is PED-ANOVA with the dashboard's settings and counts `variant`)."""
    order = ranking(scores)
    first = next(e for e in EVALUATORS if e in scores)
    lines = ["## Which template dimension mattered", "",
             f"**{order[0]}** mattered most ({LABELS[first]} {scores[first][order[0]]:.2f}).", "",
             f"fANOVA and PED-ANOVA on `final_val_acc` over the {n_trials} COMPLETE trials, "
             "each summing to 1, most important first (fractal_mlops' study report, "
             "refreshed when a study run ends):", "",
             "| dimension | fANOVA | PED-ANOVA |", "|---|---|---|"]
    for dim in order:
        cells = [f"{scores[e][dim]:.2f}" if dim in scores.get(e, {}) else "-" for e in EVALUATORS]
        lines.append(f"| {dim} | {' | '.join(cells)} |")
    lines += ["",
              "- fANOVA: the share of the accuracy's variance over the grid that the dimension "
              "explains.",
              "- PED-ANOVA: how far the best trials (the top 10 %, at least 3) differ from all "
              "of them in that dimension: what the best networks share.",
              "- The **Hyperparameter Importance** card on the study's first page is "
              "optuna-dashboard's own PED-ANOVA: its top 10 % (about "
              f"{max(1, round(n_trials / 10))} of these {n_trials} networks) around the best "
              "ones, with `variant` among the params (every trial holds its own value of it)."]
    if parent_run_id:
        lines += ["", f"The full report: MLflow run `{parent_run_id}` (the study run), "
                  "Artifacts: `report/report.html`."]
    return "\n".join(lines) + "\n"
