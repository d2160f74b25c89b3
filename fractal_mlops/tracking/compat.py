"""Whether two trial runs' accuracies can be compared: the same dataset and the same model
input/output signature. A study on other data (another image shape, another number of
classes) never takes the champion alias by its accuracy alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

from fractal_mlops.tracking.names import MODEL_URI


def data_signature(run: Run) -> dict[str, str]:
    """What a run's accuracy was measured on: dataset, and the model's input and output."""
    signature = {"dataset": run.data.params.get("dataset", "?")}
    uri = run.data.tags.get(MODEL_URI)
    if uri:
        try:
            from mlflow.models import get_model_info

            model = get_model_info(uri).signature
            if model is not None:
                signature["input"] = _shape(model.inputs)
                signature["output"] = _shape(model.outputs)
        except Exception:  # noqa: BLE001 - no readable model: compare the dataset alone
            pass
    return signature


def _shape(schema) -> str:
    return ",".join(str(tuple(spec.shape)[1:]) for spec in schema.inputs)


def mismatch(client: MlflowClient, best: Run, champion_run_id: str | None) -> str | None:
    """A short description of what differs, or None when the two are comparable."""
    if not champion_run_id:
        return None
    try:
        held = client.get_run(champion_run_id)
    except Exception:  # noqa: BLE001 - the champion's run is gone: nothing to compare
        return None
    ours, theirs = data_signature(best), data_signature(held)
    for key in ("dataset", "input", "output"):
        if key in ours and key in theirs and ours[key] != theirs[key]:
            return f"{key} {ours[key]} vs {theirs[key]} of the champion"
    return None
