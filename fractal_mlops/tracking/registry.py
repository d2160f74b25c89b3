"""The model registry for promote: the trial runs that may be promoted, ranked, and the
registered model's versions and aliases.

mlflow is imported where it is called, so that `promote --help` stays fast.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fractal_mlops.tracking.names import MODEL_URI, STATE, STUDY_NAME, TRIAL_NUMBER, VARIANT
from fractal_mlops.tracking.queries import role_query, search_all

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion


COST_TAGS = ("flops", "latency_ms", "throughput_img_s")  # version tags when the run has them


# -- picking the best run ---------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    run: Run
    value: float
    param_count: float

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def variant(self) -> str:
        return self.run.data.params.get("variant") or self.run.data.tags.get(VARIANT, "?")

    @property
    def trial(self) -> str:
        return self.run.data.tags.get(TRIAL_NUMBER, "?")

    @property
    def model_uri(self) -> str:
        return self.run.data.tags[MODEL_URI]

    @property
    def val_acc(self) -> float | None:
        return self.run.data.metrics.get("final_val_acc")


def trial_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    return search_all(client, experiment_id, role_query("trial"))


def rank(candidates: list[Candidate], maximize: bool) -> list[Candidate]:
    """Best first: the metric, then fewer parameters, then the earlier run."""
    sign = -1.0 if maximize else 1.0
    return sorted(candidates, key=lambda c: (sign * c.value, c.param_count, c.run.info.start_time))


def eligible(runs: list[Run], metric: str) -> tuple[list[Candidate], dict[str, int]]:
    """COMPLETE, FINISHED trial runs with a model and the metric; plus counts of the others."""
    candidates, skipped = [], {}
    for run in runs:
        state = run.data.tags.get(STATE) or "RUNNING"
        value = run.data.metrics.get(metric)
        if state != "COMPLETE" or run.info.status != "FINISHED":
            why = state if state in ("PRUNED", "FAIL") else "unfinished"
        elif MODEL_URI not in run.data.tags:
            why = "without a model"
        elif value is None or not math.isfinite(value):
            why = f"without {metric}"
        else:
            params = run.data.metrics.get("param_count", math.inf)
            candidates.append(Candidate(run, value, params))
            continue
        skipped[why] = skipped.get(why, 0) + 1
    return candidates, skipped


def within_budget(candidates: list[Candidate], budgets: dict[str, float]
                  ) -> tuple[list[Candidate], dict[str, int]]:
    """The candidates whose metric is <= the budget for every budget {metric: limit}; plus
    how many each budget left out (a run that lacks the metric, e.g. recorded before cost
    metrics existed, is left out by it too)."""
    kept, over = [], {}
    for c in candidates:
        broken = [m for m, limit in budgets.items()
                  if not c.run.data.metrics.get(m, math.inf) <= limit]
        if broken:
            over[broken[0]] = over.get(broken[0], 0) + 1
        else:
            kept.append(c)
    return kept, over


def outside_budget(metrics: dict[str, float], budgets: dict[str, float]) -> str | None:
    """Why a run with these metrics is outside the budgets, or None."""
    for metric, limit in budgets.items():
        value = metrics.get(metric)
        if value is None:
            return f"it has no {metric}"
        if value > limit:
            return f"its {metric} {value:,.6g} exceeds {limit:,.6g}"
    return None


# -- the registry ----------------------------------------------------------------------------

def model_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    versions: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return sorted(versions, key=lambda v: int(v.version))


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def register(client: MlflowClient, name: str, best: Candidate, metric: str,
             experiment_name: str, model_description: str,
             budgets: dict[str, float] | None = None) -> tuple[ModelVersion, bool]:
    """The version of `best`'s model: the existing one, else a new one. (version, created).
    `model_description` describes the registered model when this creates it. `budgets`
    ({metric: limit}, from promote --max-*) become version tags `budget.<metric>`, beside
    the run's cost metrics; an existing version gets them too."""
    import mlflow
    from mlflow.exceptions import MlflowException

    budget_tags = {f"budget.{m}": metric_tag(limit) for m, limit in (budgets or {}).items()}
    for version in model_versions(client, name):
        if best.run_id in (version.tags.get("source_run_id"), version.run_id):
            for key, value in budget_tags.items():
                client.set_model_version_tag(name, version.version, key, value)
            return client.get_model_version(name, version.version), False
    try:
        client.create_registered_model(name, description=model_description)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {"source_run_id": best.run_id, "val_acc": metric_tag(best.val_acc), "variant": best.variant,
            "experiment": experiment_name, "param_count": metric_tag(best.param_count)}
    if metric != "final_val_acc":
        tags[metric] = metric_tag(best.value)
    tags.update({m: metric_tag(best.run.data.metrics[m]) for m in COST_TAGS
                 if m in best.run.data.metrics}, **budget_tags)
    study = best.run.data.tags.get(STUDY_NAME, experiment_name)
    # MLflow's own registration (the version is linked to its LoggedModel, which the UI shows);
    # it talks to the process-wide tracking URI (tracking.configure), and narrates on stderr
    with contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(best.model_uri, name, tags=tags)
    description = (
        f"FractalNet {best.variant} from MLflow run {best.run_id} (trial {best.trial} of study "
        f"{study}, experiment {experiment_name}): final val_acc {metric_tag(best.val_acc)}, "
        f"{metric_tag(best.param_count)} parameters. Takes float32 images (batch, C, H, W) normalized "
        "with the training set's mean/std; returns class scores (batch, classes). Reproduce "
        f"it with: fractal-mlops reproduce {best.run_id}")
    version = client.update_model_version(name, version.version, description=description)
    return client.get_model_version(name, version.version), True


def metric_tag(value: float | None) -> str:
    """A metric as a tag: counts as integers, other values exactly (repr)."""
    if value is None:
        return "?"
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) > 1 else repr(value)
