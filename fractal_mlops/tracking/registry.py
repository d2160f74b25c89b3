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
             experiment_name: str, model_description: str) -> tuple[ModelVersion, bool]:
    """The version of `best`'s model: the existing one, else a new one. (version, created).
    `model_description` describes the registered model when this creates it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for version in model_versions(client, name):
        if best.run_id in (version.tags.get("source_run_id"), version.run_id):
            return version, False
    try:
        client.create_registered_model(name, description=model_description)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {"source_run_id": best.run_id, "val_acc": metric_tag(best.val_acc), "variant": best.variant,
            "experiment": experiment_name, "param_count": metric_tag(best.param_count)}
    if metric != "final_val_acc":
        tags[metric] = metric_tag(best.value)
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
