"""MLflow's records of a study: its parent run, trial runs, metrics, models and tags, through
an explicit MlflowClient; and MLflow's process-wide settings (`configure`).

Names follow the contract in DESIGN.md (tags `fractal.*`, `optuna.*`; metrics per epoch with
step = epoch; final metrics; the trial's config.yaml; a pyfunc-loadable model). Store URLs are
checked in stores.py, without MLflow; commands import this module after parsing their
arguments, so that `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from fractal_mlops.config.experiment import study_folder
from fractal_mlops.errors import is_unique_violation
from fractal_mlops.stores.credentials import redact
from fractal_mlops.stores.library_log import route_library_logs
from fractal_mlops.stores.locations import (
    artifact_root_for,
    create_sqlite_atomically,
    sqlite_lock,
    store_lock,
)
from fractal_mlops.tracking.names import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CONFIG_SHA,
    CUSTOM_MODEL_DEVELOPMENT,
    EXPERIMENT_KIND,
    GIT_COMMIT,
    LEGACY_CHECKPOINT_DIRS,
    MODEL_URI,
    NOTE,
    PARENT_RUN_ID,
    PARETO_ARTIFACT,
    PARETO_FRONT,
    REASON,
    ROLE,
    RUN_NAME,
    RUNG,
    SOURCE_NAME,
    SOURCE_TYPE,
    STATE,
    STUDY_NAME,
    TRIAL_NUMBER,
    VARIANT,
)
from fractal_mlops.tracking.queries import role_query, search_all
from fractal_mlops.tracking.states import RETRYABLE, RunStatus, TrialState
from fractal_mlops.tracking.ui import finished_run_name, model_name, trial_description

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fractal_mlops.engine.data import Dataset
    from fractal_mlops.engine.train import EpochResult


def configure(uri: str) -> None:
    """MLflow's process-wide settings, set once by each command's main, before any store call.

    - The tracking URI: `log_model`, pyfunc loading and the registry's resolution of
      `models:/m-...` sources go through it, not through a client.
    - No progress bar per downloaded artifact, and no "Creating tables" line: noise between
      our own lines.
    - No warning about the pickle format on every logged model: loading it runs this project's
      own code only.
    - MLflow's own log records (a failing store logs every retry with its traceback) go to
      the log file of stores/library_log.py: the command says what happened in one line.
    """
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    route_library_logs("mlflow", "alembic", "sqlalchemy")  # a log file, not the console


def open_store(uri: str) -> MlflowClient:
    with store_lock(uri):  # MLflow migrates an older store's tables when it opens it
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _create_store(uri: str) -> None:
    """A new SQLite store's tables, made whole before the store file appears (see
    stores.locations.create_sqlite_atomically). Called under store_lock."""
    def create(temporary_uri: str) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(temporary_uri, artifact_root_for(uri)).engine.dispose()

    create_sqlite_atomically(uri, create)


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


@dataclass(frozen=True)
class RecordedEnd:
    """A trial's end as its MLflow run recorded it (see Tracker.recorded_end)."""

    state: TrialState
    final_val_acc: float | None
    reason: str | None
    param_count: float | None


class Tracker:
    """MLflow records of one experiment (= one study), through an explicit MlflowClient."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        if mlflow.get_tracking_uri() != tracking_uri:  # log_model can only go through that one
            raise RuntimeError("MLflow's process-wide tracking URI is not the tracker's: call "
                               "tracking.configure(uri) first")
        self.uri = tracking_uri
        with store_lock(tracking_uri):  # a new store's tables are created: one process at a time
            _create_store(tracking_uri)
            self.client: MlflowClient = MlflowClient(tracking_uri)
            self.experiment_id = self._experiment(experiment_name)
        if tracking_uri.startswith("sqlite:///"):
            self.client = _OneWriterAtATime(self.client, tracking_uri)  # type: ignore[assignment]
        mlflow.set_experiment(experiment_id=self.experiment_id)
        self.commit = git_commit()
        self._trials: dict[str, _TrialRecord] = {}  # runs this process started
        self._worked_for: set[str] = set()  # study runs this process finished a trial of

    def _experiment(self, name: str) -> str:
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                self.client.restore_experiment(existing.experiment_id)
            if EXPERIMENT_KIND not in existing.tags:
                self.client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND,
                                               CUSTOM_MODEL_DEVELOPMENT)
            return existing.experiment_id
        root = artifact_root_for(self.uri)
        location = f"{root}/{study_folder(name)}" if root else None
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
        tags = {ROLE: "study", STUDY_NAME: study_name, CONFIG_SHA: config_sha,
                RUN_NAME: study_name, NOTE: f"Study `{study_name}`: no trial finished yet.",
                **self._source_tags()}
        run = self.client.create_run(self.experiment_id, run_name=study_name, tags=tags)
        run_id = run.info.run_id
        self._log_params(run_id, params)
        self.client.log_text(run_id, config_yaml, "config.yaml")
        self.client.set_terminated(run_id, RunStatus.FINISHED)
        return run_id

    def update_study_summary(self, run_id: str, study_name: str, counts: dict[str, int],
                             grid_size: int, grid_done: int) -> None:
        """The study run's summary metrics, best-trial tags and description; its end time."""
        from fractal_mlops.tracking.ui import write_study_summary

        write_study_summary(self.client, self.experiment_id, run_id, study_name, counts,
                            grid_size, grid_done)
        if run_id in self._worked_for:  # a run that trained nothing leaves the duration alone
            self.touch_study_run(run_id)

    def log_pareto_front(self, run_id: str, objectives: list[str],
                         front: list[tuple[str, int, str | None, tuple[float, ...]]]) -> None:
        """A multi-objective study's Pareto front on its run: the artifact PARETO_ARTIFACT
        (variant, trial, run_id, one column per objective), the metric `n_pareto` and the tag
        PARETO_FRONT (the front's variants)."""
        lines = [",".join(["variant", "trial", "run_id", *objectives])]
        lines += [",".join([variant, str(number), run or "", *(repr(float(v)) for v in values)])
                  for variant, number, run, values in front]
        self.client.log_text(run_id, "\n".join(lines) + "\n", PARETO_ARTIFACT)
        self.client.log_metric(run_id, "n_pareto", len(front))
        variants = " ".join(variant for variant, *_ in front)
        self.client.set_tag(run_id, PARETO_FRONT, variants if len(variants) <= 4000
                            else variants[:3990] + " ...")

    def touch_study_run(self, run_id: str) -> None:
        """Move the study run's end time to now: its duration spans the study's work so far."""
        self.client.set_terminated(run_id, RunStatus.FINISHED)

    # -- trial runs -------------------------------------------------------------------------
    def start_trial(self, parent_run_id: str, study_name: str, trial_number: int,
                    variant_name: str, params: dict[str, Any], config_yaml: str,
                    config_sha: str, dataset: Dataset, extra_tags: dict[str, str] | None = None,
                    ) -> str:
        """A nested run for one trial (`extra_tags` may override, e.g. for a reproduction)."""
        tags = {
            ROLE: "trial", PARENT_RUN_ID: parent_run_id, VARIANT: variant_name,
            STUDY_NAME: study_name, TRIAL_NUMBER: str(trial_number),
            CONFIG_SHA: config_sha, RUN_NAME: variant_name,
            **self._source_tags(), **(extra_tags or {}),
        }
        run_name = tags[RUN_NAME]
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
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, result.epoch) for k, v in result.metrics().items()]
        self.client.log_batch(run_id, metrics=metrics)

    def log_model(self, run_id: str, model, input_shape: tuple[int, ...],
                  num_classes: int) -> str:
        """Log a pyfunc-loadable PyTorch model; returns the URI that loads it.

        The "pickle" format costs ~0.1 s here, against 3.5-10 s for MLflow 3's default "pt2"
        export; an explicit signature and pip requirements skip inference of both.
        """
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
        )
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

    def finish_trial(self, run_id: str, state: TrialState, reason: str | None = None,
                     final_metrics: dict[str, float] | None = None,
                     status: RunStatus | None = None) -> None:
        """Close a trial run: its state, reason, final metrics (linked to its logged model and
        dataset), run name and description; status FINISHED / FAILED as the state says, or
        `status` (KILLED for a trial that did not end on its own)."""

        now = int(time.time() * 1000)
        reason = redact(reason)[:5000] if reason else None
        final_metrics = {k: float(v) for k, v in (final_metrics or {}).items()}
        record = self._record(run_id)
        self._trials.pop(run_id, None)
        name = record.name if record else self.client.get_run(run_id).info.run_name
        tags = [RunTag(STATE, state), RunTag(RUN_NAME, finished_run_name(name, state)),
                RunTag(NOTE, trial_description(state, reason, final_metrics, RETRYABLE))]
        if reason:
            tags.append(RunTag(REASON, reason))
        # Linked to the logged model (and the dataset), the final metrics rank the Models tab
        model = {"model_id": record.model_id, "dataset_name": record.dataset_name,
                 "dataset_digest": record.dataset_digest} if record and record.model_id else {}
        metrics = [Metric(k, v, now, 0, **model) for k, v in final_metrics.items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, status or TrialState(state).run_status)
        if not (state == TrialState.FAIL and reason in RETRYABLE):  # a retried trial resumes
            self.delete_checkpoint(run_id)
        if record and record.parent_run_id:
            self.touch_study_run(record.parent_run_id)
            self._worked_for.add(record.parent_run_id)

    def run_params(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.params)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._log_params(run_id, params)
        record = self._trials.get(run_id)
        if record is not None:  # the logged model carries the trial's params
            record.params.update({k: redact(str(v))[:6000] for k, v in params.items()})

    def resume_trial(self, run_id: str, trial_number: int) -> bool:
        """An interrupted trial's run trains on, now for Optuna trial `trial_number`: RUNNING
        again, named after its variant, its earlier ending cleared. False when the run is not
        there to continue (deleted, or in another store)."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        tags = run.data.tags
        if run.info.lifecycle_stage != "active" or VARIANT not in tags:
            return False
        for key in (STATE, REASON):
            if key in tags:
                self.client.delete_tag(run_id, key)
        epochs = len(self.client.get_metric_history(run_id, "val_acc"))
        self.client.log_batch(run_id, tags=[
            RunTag(RUN_NAME, tags[VARIANT]), RunTag(TRIAL_NUMBER, str(trial_number)),
            RunTag(NOTE, f"**RUNNING** again (Optuna trial {trial_number}), from its last saved "
                         f"state; {epochs} epoch(s) recorded before it was interrupted.")])
        self.client.update_run(run_id, status=RunStatus.RUNNING)
        return True

    def val_acc_history(self, run_id: str) -> list[tuple[int, float]]:
        """(epoch, val_acc) the run recorded, one per epoch (the last value of a step)."""
        history = sorted(self.client.get_metric_history(run_id, "val_acc"),
                         key=lambda m: (m.step, m.timestamp))
        return sorted({m.step: m.value for m in history}.items())

    def reopen_run(self, run_id: str) -> None:
        """A waiting trial run trains again (halving: its next rung)."""
        self.client.update_run(run_id, status=RunStatus.RUNNING)

    def wait_run(self, run_id: str, rung: int | None = None) -> None:
        """The trial run waits (SCHEDULED) to be trained further: a finished halving rung,
        or a trial whose worker stopped before it ended."""
        if rung is not None:
            self.client.set_tag(run_id, RUNG, str(rung))
        self.client.update_run(run_id, status=RunStatus.SCHEDULED)

    # -- the training state of a trial, to continue it --------------------------------------
    def save_checkpoint(self, run_id: str, state: dict[str, Any]) -> None:
        """The state a trial continues from (model, optimizer, RNG streams, epoch): the run's
        artifact `checkpoint/checkpoint.pt`, replaced at each save."""
        import torch

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / CHECKPOINT_FILE
            torch.save(state, path)
            self.client.log_artifact(run_id, str(path), CHECKPOINT_DIR)

    def load_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        """The run's last saved training state, or None when it has none."""
        import torch

        for folder in (CHECKPOINT_DIR, *LEGACY_CHECKPOINT_DIRS):
            artifact = f"{folder}/{CHECKPOINT_FILE}"
            if artifact in {a.path for a in self.client.list_artifacts(run_id, folder)}:
                with tempfile.TemporaryDirectory() as local:
                    path = self.client.download_artifacts(run_id, artifact, local)
                    return torch.load(path, map_location="cpu", weights_only=False)
        return None

    def delete_checkpoint(self, run_id: str) -> None:
        """A finished trial's saved state goes (its logged model stays); a store that cannot
        delete artifacts keeps it, with a warning."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            run = self.client.get_run(run_id)
            names = {a.path for folder in (CHECKPOINT_DIR, *LEGACY_CHECKPOINT_DIRS)
                     for a in self.client.list_artifacts(run_id, folder)}
            if not names:
                return
            repository = get_artifact_repository(run.info.artifact_uri)
            for folder in (CHECKPOINT_DIR, *LEGACY_CHECKPOINT_DIRS):
                if any(name.startswith(f"{folder}/") for name in names):
                    repository.delete_artifacts(folder)
        except Exception as exc:  # noqa: BLE001 - the trial's result stands; only space is lost
            log.warning("run %s: its training checkpoint was not removed (%s)", run_id,
                        " ".join(str(exc).split())[:200])

    def recorded_end(self, run_id: str | None, trial_number: int) -> RecordedEnd | None:
        """How trial `trial_number` ended, as its run recorded it: the run is closed (FINISHED)
        with the state COMPLETE or PRUNED, for that trial. None otherwise (no such run, still
        running, waiting for a rung, failed, or continued by a later trial)."""
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        tags = run.data.tags
        if (run.info.status != RunStatus.FINISHED.value or tags.get(TRIAL_NUMBER) != str(trial_number)
                or tags.get(STATE) not in (TrialState.COMPLETE.value, TrialState.PRUNED.value)):
            return None
        state = TrialState(tags[STATE])
        value = run.data.metrics.get("final_val_acc")
        if state is TrialState.COMPLETE and value is None:
            return None
        return RecordedEnd(state, value, tags.get(REASON), run.data.metrics.get("param_count"))

    def running_trial_runs(self, study_name: str) -> list[tuple[str, int]]:
        """(run ID, Optuna trial number) of the study's trial runs that are RUNNING."""
        runs = search_all(self.client, self.experiment_id,
                          role_query("trial", study_name, status=RunStatus.RUNNING))
        return [(r.info.run_id, int(r.data.tags[TRIAL_NUMBER])) for r in runs]

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
            tags.get(PARENT_RUN_ID) if tags.get(ROLE) == "trial" else None,
            inputs[0].dataset.name, inputs[0].dataset.digest, dict(run.data.params),
            models[-1].model_id if models else None)
        self._trials[run_id] = record
        return record

    def _source_tags(self) -> dict[str, str]:
        tags = {SOURCE_NAME: "fractal_mlops.study", SOURCE_TYPE: "LOCAL"}
        if self.commit:
            tags[GIT_COMMIT] = self.commit
        return tags

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _log_dataset(self, run_id: str, dataset: Dataset) -> None:
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
    if not isinstance(exc, MlflowException):
        return None
    return f"MLflow: {redact(' '.join(str(exc.message).split()))[:500]}"


def _pip_requirements() -> list[str]:
    """What a logged model needs to load: torch, timm, and this package (whose classes its
    pickle names), at the versions that trained it. From a source checkout that pip has not
    installed (PYTHONPATH), this package's version is its own `__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    from fractal_mlops import __version__

    try:
        ours = version("fractal-mlops")
    except PackageNotFoundError:
        ours = __version__
    return [f"torch=={version('torch')}", f"timm=={version('timm')}", f"fractal-mlops=={ours}"]
