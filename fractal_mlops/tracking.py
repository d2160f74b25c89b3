"""Everything MLflow: stores, the study's parent run, trial runs, metrics, models, tags, redaction.

Names follow the contract in DESIGN.md (tags `fractal.*`, `optuna.*`; metrics per epoch with
step = epoch; final metrics; the trial's config.yaml; a pyfunc-loadable model).
The module imports mlflow lazily so that URI checks and `--help` stay cheap.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import ConfigError, ServerFault, is_unique_violation
from .outage import bound_http_retries
from .outcome import RETRYABLE, TrialState
from .stores import (
    check_database_url,
    check_sqlite_url,
    sqlalchemy_url,
    sqlite_lock,
    sqlite_path,
)
from .ui import (
    CUSTOM_MODEL_DEVELOPMENT,
    EXPERIMENT_KIND,
    NOTE,
    finished_run_name,
    model_name,
    trial_description,
)
from .urls import http_auth_header, move_http_credentials, redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from .data import Dataset
    from .train import EpochResult

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TRACKING_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks"}
ROLE, STATE, REASON, VARIANT = "fractal.role", "fractal.state", "fractal.reason", "fractal.variant"
MODEL_URI, CONFIG_SHA, REPRODUCES = "fractal.model_uri", "fractal.config_sha256", "fractal.reproduces"



def resolve_tracking_uri(flag: str | None, configured: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the config, else the local SQLite store.
    Credentials in an http(s) URI move to MLFLOW_TRACKING_USERNAME / _PASSWORD (or _TOKEN),
    where MLflow reads them, so the URI that is shown and passed on holds none."""
    uri = move_http_credentials(
        flag or os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI)
    bound_http_retries(uri)  # an outage is noticed in about 30 s, not minutes
    return uri


def check_tracking_uri(uri: str) -> None:
    """Fail with one clear line (ConfigError) when the store cannot be used; create nothing."""
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme == "file" or (scheme == "" and not uri.startswith("databricks")):
        raise ConfigError(f"tracking URI {redact(uri)!r}: MLflow 3 refuses the plain file store; "
                          f"use {DEFAULT_TRACKING_URI} or an http(s):// tracking server")
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking URI {redact(uri)!r}: unknown scheme {scheme!r} "
                          "(expected sqlite:///, postgresql://, http(s)://)")
    if scheme == "sqlite":
        check_sqlite_url(uri, "tracking URI")
    elif scheme in ("http", "https"):
        _check_tracking_server(move_http_credentials(uri).rstrip("/"))
    elif scheme in ("postgresql", "mysql", "mssql"):
        check_database_url(sqlalchemy_url(uri), "tracking URI")


def _check_tracking_server(base: str) -> None:
    """/health answers, and an authenticated read is not refused (401/403: the credentials)."""
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        request = urllib.request.Request(base + path, headers=http_auth_header())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ConfigError(
                    f"the MLflow tracking server at {redact(base)} refused the credentials "
                    f"(HTTP {exc.code}): set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or put user:password@ "
                    "in the URI") from None
            if exc.code >= 500:
                raise ServerFault(f"the MLflow tracking server at {redact(base)} failed: HTTP "
                                  f"{exc.code} on {path.split('?')[0]}") from None
            if path == "/health":
                raise ConfigError(f"the MLflow tracking server at {redact(base)} answered "
                                  f"HTTP {exc.code} on {path.split('?')[0]}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"cannot reach the MLflow tracking server at {redact(base)}: "
                              f"{redact(str(reason))}") from None


def check_existing_store(uri: str) -> None:
    """The store must be reachable and, for SQLite, exist already: reading commands create no
    database (a typo in the path would otherwise give an empty store)."""
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        path = sqlite_path(uri)
        if path is None or not path.is_file():
            raise ConfigError(f"no MLflow store at {path} (tracking URI {uri}): run a study "
                              "first, or pass --tracking-uri / set MLFLOW_TRACKING_URI")


def open_store(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`. The registry's SQL store resolves `models:/m-...` sources
    through MLflow's process-wide tracking URI, so that is set too."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local SQLite stores keep artifacts beside the database: mlruns/artifacts/."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None  # a tracking server (or remote database) decides
    return (db.absolute().parent / "artifacts").as_uri()


def git_commit() -> str | None:
    """The commit of the code that runs (this package's checkout, else the working dir)."""
    for folder in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                 text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0:
            return out.stdout.strip()
    return None


class _OneWriterAtATime:
    """An MlflowClient whose calls take the SQLite store's lock, one process at a time.

    MLflow's SQL store reads, then writes, in one deferred transaction (log_batch updates the
    latest metrics). When two workers do that at the same moment, SQLite cannot upgrade both
    read locks and answers "database is locked" at once, whatever the busy timeout: two
    workers closing their trials together after a Ctrl-C hit that. Calls are short, so taking
    turns costs nothing a user notices.
    """

    def __init__(self, client: MlflowClient, uri: str) -> None:
        self._client, self._uri = client, uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with sqlite_lock(self._uri):
                return attr(*args, **kwargs)
        return call


class Tracker:
    """MLflow records of one experiment (= one study), through an explicit MlflowClient."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        import logging

        import mlflow

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables"
        self.uri = tracking_uri
        # log_model and pyfunc loading go through MLflow's process-wide settings
        mlflow.set_tracking_uri(tracking_uri)
        self.client: MlflowClient = mlflow.MlflowClient(tracking_uri)
        if tracking_uri.startswith("sqlite:///"):
            self.client = _OneWriterAtATime(self.client, tracking_uri)  # type: ignore[assignment]
        with sqlite_lock(tracking_uri):  # first use creates the tables: one process at a time
            self.experiment_id = self._experiment(experiment_name)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        self.commit = git_commit()
        self._trials: dict[str, _TrialRecord] = {}  # runs this process started
        self._worked_for: set[str] = set()  # study runs this process finished a trial of

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                self.client.restore_experiment(existing.experiment_id)
            if EXPERIMENT_KIND not in existing.tags:
                self.client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND,
                                               CUSTOM_MODEL_DEVELOPMENT)
            return existing.experiment_id
        root = artifact_root_for(self.uri)
        location = f"{root}/{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}" if root else None
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND: CUSTOM_MODEL_DEVELOPMENT})
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    # -- the study's parent run -------------------------------------------------------------
    def study_run(self, study_name: str, existing_id: str | None, params: dict[str, Any],
                  config_yaml: str, config_sha: str) -> str:
        """The parent run of the study, created once. It is never left RUNNING: its children
        carry the state; the parent holds the study's config and its summary. Its start time
        stays; its end time moves forward as the study works (`touch_study_run`)."""
        if existing_id:
            try:
                if self.client.get_run(existing_id).info.lifecycle_stage == "active":
                    return existing_id
            except Exception:  # noqa: BLE001 - deleted or from another store: make a new one
                pass
        tags = {ROLE: "study", "optuna.study_name": study_name, CONFIG_SHA: config_sha,
                "mlflow.runName": study_name, NOTE: f"Study `{study_name}`: no trial finished yet.",
                **self._source_tags()}
        run = self.client.create_run(self.experiment_id, run_name=study_name, tags=tags)
        run_id = run.info.run_id
        self._log_params(run_id, params)
        self.client.log_text(run_id, config_yaml, "config.yaml")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def update_study_summary(self, run_id: str, study_name: str, counts: dict[str, int],
                             grid_size: int, grid_done: int) -> None:
        """The study run's summary metrics, best-trial tags and description; its end time."""
        from .ui import write_study_summary

        write_study_summary(self.client, self.experiment_id, run_id, study_name, counts,
                            grid_size, grid_done)
        if run_id in self._worked_for:  # a run that trained nothing leaves the duration alone
            self.touch_study_run(run_id)

    def touch_study_run(self, run_id: str) -> None:
        """Move the study run's end time to now: its duration spans the study's work so far."""
        self.client.set_terminated(run_id, "FINISHED")

    # -- trial runs -------------------------------------------------------------------------
    def start_trial(self, parent_run_id: str, study_name: str, trial_number: int,
                    variant_name: str, params: dict[str, Any], config_yaml: str,
                    config_sha: str, dataset: Dataset, extra_tags: dict[str, str] | None = None,
                    ) -> str:
        """A nested run for one trial (`extra_tags` may override, e.g. for a reproduction)."""
        tags = {
            ROLE: "trial", "mlflow.parentRunId": parent_run_id, VARIANT: variant_name,
            "optuna.study_name": study_name, "optuna.trial_number": str(trial_number),
            CONFIG_SHA: config_sha, "mlflow.runName": variant_name,
            **self._source_tags(), **(extra_tags or {}),
        }
        run_name = tags["mlflow.runName"]
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        self._trials[run_id] = _TrialRecord(
            variant_name, run_name, parent_run_id if tags[ROLE] == "trial" else None,
            dataset.name, dataset.digest, {k: redact(str(v))[:6000] for k, v in params.items()})
        try:
            self._log_params(run_id, params)
            self.client.log_text(run_id, config_yaml, "config.yaml")
            self._log_dataset(run_id, dataset)
        except Exception as exc:
            with contextlib.suppress(Exception):  # leave no RUNNING run behind, if the store lets us
                self.finish_trial(run_id, TrialState.FAIL, f"recording the trial failed: {exc}")
            raise
        return run_id

    def log_epoch(self, run_id: str, result: EpochResult) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, result.epoch) for k, v in result.metrics().items()]
        self.client.log_batch(run_id, metrics=metrics)

    def log_model(self, run_id: str, model, input_shape: tuple[int, ...],
                  num_classes: int) -> str:
        """Log a pyfunc-loadable PyTorch model; returns the URI that loads it.

        The "pickle" format costs ~0.1 s here, against 3.5-10 s for MLflow 3's default "pt2"
        export; an explicit signature and pip requirements skip inference of both.
        """
        import logging

        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
        )
        # MLflow warns about pickle on every call; loading runs this project's own code only
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        record = self._record(run_id)
        # Named after the variant, with the trial's params, so the Models tab tells them apart
        with sqlite_lock(self.uri):  # MLflow's own calls, not through self.client
            info = mlflow.pytorch.log_model(
                model.eval().cpu(), name=model_name(record.variant) if record else "model",
                run_id=run_id, signature=signature, serialization_format="pickle",
                pip_requirements=_pip_requirements(), params=record.params if record else None,
                tags={VARIANT: record.variant} if record else None,
            )
        if record:
            record.model_id = info.model_id
        self.client.set_tag(run_id, MODEL_URI, info.model_uri)
        return info.model_uri

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def finish_trial(self, run_id: str, state: str, reason: str | None = None,
                     final_metrics: dict[str, float] | None = None,
                     status: str | None = None) -> None:
        from mlflow.entities import Metric, RunTag


        now = int(time.time() * 1000)
        reason = redact(reason)[:5000] if reason else None
        final_metrics = {k: float(v) for k, v in (final_metrics or {}).items()}
        record = self._record(run_id)
        self._trials.pop(run_id, None)
        name = record.name if record else self.client.get_run(run_id).info.run_name
        tags = [RunTag(STATE, state), RunTag("mlflow.runName", finished_run_name(name, state)),
                RunTag(NOTE, trial_description(state, reason, final_metrics, RETRYABLE))]
        if reason:
            tags.append(RunTag(REASON, reason))
        # Linked to the logged model (and the dataset), the final metrics rank the Models tab
        model = {"model_id": record.model_id, "dataset_name": record.dataset_name,
                 "dataset_digest": record.dataset_digest} if record and record.model_id else {}
        metrics = [Metric(k, v, now, 0, **model) for k, v in final_metrics.items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, status or TrialState(state).run_status)
        if record and record.parent_run_id:
            self.touch_study_run(record.parent_run_id)
            self._worked_for.add(record.parent_run_id)

    def running_trial_runs(self, study_name: str) -> list[tuple[str, int]]:
        """(run ID, Optuna trial number) of the study's trial runs that are RUNNING."""
        runs = self.client.search_runs(
            [self.experiment_id], f"attributes.status = 'RUNNING' and tags.`{ROLE}` = 'trial' "
            f"and tags.`optuna.study_name` = '{study_name}'", max_results=10000)
        return [(r.info.run_id, int(r.data.tags["optuna.trial_number"])) for r in runs]

    # -- helpers ----------------------------------------------------------------------------
    def _record(self, run_id: str) -> _TrialRecord | None:
        """The trial's record; rebuilt from the run when another process started it (a
        halving rung resumed elsewhere, a run closed for a lost worker)."""
        if run_id in self._trials:
            return self._trials[run_id]
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - the caller falls back to plain records
            return None
        tags, inputs = run.data.tags, run.inputs.dataset_inputs if run.inputs else []
        if VARIANT not in tags or not inputs:
            return None
        models = run.outputs.model_outputs if run.outputs else []
        record = _TrialRecord(
            tags[VARIANT], run.info.run_name or tags[VARIANT],
            tags.get("mlflow.parentRunId") if tags.get(ROLE) == "trial" else None,
            inputs[0].dataset.name, inputs[0].dataset.digest, dict(run.data.params),
            models[-1].model_id if models else None)
        self._trials[run_id] = record
        return record

    def _source_tags(self) -> dict[str, str]:
        tags = {"mlflow.source.name": "fractal_mlops.study", "mlflow.source.type": "LOCAL"}
        if self.commit:
            tags["mlflow.source.git.commit"] = self.commit
        return tags

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _log_dataset(self, run_id: str, dataset: Dataset) -> None:
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        source = CodeDatasetSource(tags={"source": redact(dataset.source)})
        meta = MetaDataset(source=source, name=dataset.name, digest=dataset.digest)
        inputs = [DatasetInput(meta._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])]
        # MLflow inserts an experiment's dataset row on first use with check-then-insert, so two
        # workers logging the same dataset at once can collide on its unique key. The loser's
        # transaction is rolled back; trying again finds the row and only links the run to it.
        for attempt in range(5):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except Exception as exc:
                if attempt == 4 or not is_unique_violation(exc):
                    raise
                time.sleep(0.2 * (attempt + 1))


@dataclass
class _TrialRecord:
    """What the UI-facing records of a trial run need from its start until its end."""

    variant: str
    name: str
    parent_run_id: str | None  # the study run, whose end time a finished trial moves
    dataset_name: str
    dataset_digest: str
    params: dict[str, str]
    model_id: str | None = None


def mlflow_error_line(exc: BaseException) -> str | None:
    """One redacted line for an MlflowException (None for any other error)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    return f"MLflow: {redact(' '.join(str(exc.message).split()))[:500]}"


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "timm", "fractal-mlops")]


@contextlib.contextmanager
def no_artifact_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded artifact: noise between our own lines."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
