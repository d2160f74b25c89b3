"""Searching an experiment's runs: every page of a query, and the queries the project asks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fractal_mlops.tracking.names import ROLE, STATE, STUDY_NAME

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

PAGE = 1000


def role_query(role: str, study_name: str | None = None, state: str | None = None,
               status: str | None = None) -> str:
    """A search filter for the runs of one role (trial, study), of a study, in a state."""
    parts = [f"tags.`{ROLE}` = '{role}'"]
    if study_name is not None:
        parts.append(f"tags.`{STUDY_NAME}` = '{study_name}'")
    if state is not None:
        parts.append(f"tags.`{STATE}` = '{state}'")
    if status is not None:
        parts.append(f"attributes.status = '{status}'")
    return " and ".join(parts)


def search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    """Every run that matches, page after page."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
