"""Reproduce a trial: rebuild it from what its run recorded, train it again into a new run
through the epoch loop, and compare the metrics epoch by epoch."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fractal_mlops.config.experiment import ExperimentConfig, parse_config
from fractal_mlops.config.space import Variant
from fractal_mlops.errors import EXIT_FAULT, EXIT_OK, ConfigError
from fractal_mlops.search.comparison import EPOCH_METRICS, EpochTable, compare_finals
from fractal_mlops.signals import stop_signals_held
from fractal_mlops.stores.credentials import redact
from fractal_mlops.tracking.names import (
    CONFIG_SHA,
    GIT_COMMIT,
    PARENT_RUN_ID,
    REASON,
    REPRODUCES,
    ROLE,
    RUN_NAME,
    SOURCE_NAME,
    STATE,
    STUDY_NAME,
    TRIAL_NUMBER,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from fractal_mlops.engine.precision import Precision

EXIT_MATCH, EXIT_DIFFER = EXIT_OK, EXIT_FAULT
# + val_acc_column_<k>; halting_* on runs recorded since anytime halting exists; flops since
# cost metrics exist (latency_ms and throughput_img_s are timings: never compared)
FINAL_METRICS = ("final_val_acc", "best_val_acc", "param_count", "halting_val_acc",
                 "halting_compute", "flops")
CUDA_ATOL = 1e-3
REPRODUCIBLE_ROLES = ("trial", "reproduction")


# -- what the original run recorded ----------------------------------------------------------

@dataclass
class RecordedTrial:
    run: Run
    experiment_name: str
    config: ExperimentConfig
    config_yaml: str
    variant: Variant
    epochs: dict[int, dict[str, float]]  # epoch -> {metric: value}
    final: dict[str, float] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def state(self) -> str:
        return self.tags.get(STATE, "?")

    @property
    def last_epoch(self) -> int:
        return max(self.epochs, default=0)


def load_original(client: MlflowClient, run_id: str, uri: str) -> RecordedTrial:
    """The run, its config.yaml and its metrics; ConfigError when it cannot be reproduced."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run {run_id!r} not found in {redact(uri)}") from None
    role = run.data.tags.get(ROLE)
    if role not in REPRODUCIBLE_ROLES:
        raise ConfigError(f"run {run_id} is not a trial run (fractal.role={role or 'unset'}): "
                          "nothing to reproduce")
    if run.info.status in ("RUNNING", "SCHEDULED"):
        raise ConfigError(f"run {run_id} is still {run.info.status}; reproduce it once it ended")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        except (MlflowException, OSError):
            raise ConfigError(f"run {run_id} has no config.yaml artifact to rebuild it "
                              "from") from None
    config, variant = parse_trial_config(text, run_id)
    recorded = run.data.params.get("variant")
    if recorded is not None and recorded != variant.name:
        raise ConfigError(f"run {run_id}: config.yaml builds variant {variant.name}, but the run "
                          f"recorded variant {recorded}")
    epochs: dict[int, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        for metric in sorted(client.get_metric_history(run_id, key),
                             key=lambda m: (m.step, m.timestamp)):
            epochs.setdefault(metric.step, {})[key] = metric.value
    final = {k: v for k, v in run.data.metrics.items()
             if k in FINAL_METRICS or k.startswith("val_acc_column_")}
    experiment = client.get_experiment(run.info.experiment_id).name
    return RecordedTrial(run, experiment, config, text, variant, epochs, final)



def parse_trial_config(text: str, run_id: str) -> tuple[ExperimentConfig, Variant]:
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"run {run_id}: config.yaml is not valid YAML") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("variant"), dict):
        raise ConfigError(f"run {run_id}: config.yaml has no variant section (not a trial "
                          "config of fractal_mlops.study)")
    raw = dict(raw)
    variant_values = raw.pop("variant")
    config = parse_config(raw, source=f"runs:/{run_id}/config.yaml")
    try:
        variant = Variant.from_dict(variant_values)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"run {run_id}: config.yaml has a bad variant section ({exc})") from None
    return config, variant


# -- the reproduction ------------------------------------------------------------------------

def reproduce(client: MlflowClient, uri: str, original: RecordedTrial, atol: float | None,
              device_flag: str | None) -> int:
    import torch

    from fractal_mlops.engine.data import load_dataset
    from fractal_mlops.engine.device import resolve_device, runtime_params
    from fractal_mlops.search.epochs import TrialResults, train_and_log, trial_params
    from fractal_mlops.search.outcome import outcome_of
    from fractal_mlops.tracking.tracker import Tracker, git_commit

    recorded_device = original.params.get("device", "cpu")
    if device_flag is None and recorded_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run {original.run_id} trained on cuda, which is not available here; "
                          f"pass --device cpu to re-run it on the CPU (compared within --atol, "
                          f"default {CUDA_ATOL:g})")
    device = resolve_device(device_flag or recorded_device)
    threads = _int(original.params.get("threads")) or torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    tolerance = atol if atol is not None else (
        0.0 if device.type == recorded_device == "cpu" else CUDA_ATOL)
    data = load_dataset(original.config.data)  # a missing dataset fails before any write

    precision = _recorded_precision(original, device)
    runtime = {**runtime_params(device), **precision.params()}
    for warning in _warnings(original, data.digest, git_commit(), device.type, recorded_device,
                             runtime):
        log.warning("%s", warning)
    trial = original.tags.get(TRIAL_NUMBER, "?")
    print(f"reproducing run {original.run_id} (trial {trial} of {original.experiment_name}, "
          f"{original.state}): {original.variant.name}, seed {original.config.training.seed}, "
          f"{original.config.training.epochs} epochs, {device.type}"
          + (f" with {threads} threads" if device.type == "cpu" else ""))

    tracker = Tracker(uri, original.experiment_name)
    table = EpochTable(original.epochs, tolerance)

    def on_epoch(result) -> str | None:
        table.print_row(result.epoch, result.metrics())
        if original.state != "COMPLETE" and result.epoch >= original.last_epoch:
            if original.last_epoch == 0:
                return "the original run recorded no epoch to compare with"
            why = original.tags.get(REASON, "")
            return (f"stopped at epoch {result.epoch}, where the original run stopped "
                    f"({original.state}{': ' + why if why else ''})")
        return None

    # A stop signal (Ctrl-C, SIGTERM, SIGHUP: cli.run_command makes each an interrupt) waits
    # while the run is created and closed, so that it is never left RUNNING.
    results, error, run_id = TrialResults(), None, None
    try:
        with stop_signals_held():
            run_id = tracker.start_trial(
                original.tags.get(PARENT_RUN_ID, ""), original.tags.get(STUDY_NAME, ""),
                _int(trial) or 0, original.variant.name,
                trial_params(original.variant, original.config, data, device.type, threads),
                original.config_yaml, original.tags.get(CONFIG_SHA, original.config.sha256),
                data, extra_tags=_reproduction_tags(original))
        print(f"new run {run_id} in experiment {original.experiment_name} "
              f"(tag {REPRODUCES}={original.run_id})")
        table.print_header()
        train_and_log(tracker, run_id, original.variant, data, original.config, device, results,
                      on_epoch=on_epoch, precision=precision)
    except (Exception, KeyboardInterrupt) as exc:  # a failed re-run is a result, recorded
        if run_id is None:
            raise
        error = exc
    outcome = outcome_of(error)
    state, reason = outcome.state, outcome.reason
    with stop_signals_held():
        tracker.finish_trial(run_id, state, reason, results.metrics(), status=outcome.run_status)
    if isinstance(error, KeyboardInterrupt):
        raise error
    new_epochs = _epochs_of(client, run_id)  # what the new run recorded, read back
    # an epoch that stopped on a non-finite loss never reached on_epoch: print it now
    for epoch in sorted(set(new_epochs) - table.printed):
        table.print_row(epoch, new_epochs[epoch])
    epochs_match = table.finish(new_epochs)
    finals_match = compare_finals(original.final, results.metrics(), tolerance)
    same = epochs_match and finals_match
    states = f"original {original.state}, reproduction {state}" + (f" ({reason})" if reason
                                                                      else "")
    how = "identical" if tolerance == 0 else f"equal within atol {tolerance:g}"
    if same:
        print(f"MATCH: the metrics are {how} ({states})")
        return EXIT_MATCH
    print(f"DIFFERENT: the metrics are not {how} ({states}); see the rows marked DIFFERS")
    return EXIT_DIFFER


def _recorded_precision(original: RecordedTrial, device) -> Precision:
    """The precision the original trained in (amp: auto chose it by timing): replayed, where
    this device has it (an fp16 CUDA run re-run on the CPU takes the CPU's own)."""
    from fractal_mlops.engine.precision import Precision, fixed

    recorded = Precision.from_params(original.params, original.config.training, device)
    if device.type == "cpu" and str(recorded.amp_dtype) == "torch.float16":
        return fixed(original.config.training, device)
    return recorded


def _warnings(original: RecordedTrial, digest: str, commit: str | None, device: str,
              recorded_device: str, runtime: dict[str, str]) -> list[str]:
    out = []
    recorded_commit = original.tags.get(GIT_COMMIT)
    if recorded_commit and commit and recorded_commit != commit:
        out.append(f"run {original.run_id} was trained at git commit {recorded_commit[:12]}, "
                   f"this code is at {commit[:12]}: the metrics may differ")
    elif not recorded_commit:
        out.append(f"run {original.run_id} recorded no git commit: cannot tell whether the "
                   "code changed since")
    digests = {d.dataset.digest for d in original.run.inputs.dataset_inputs}
    if digests and digest not in digests:
        out.append(f"the dataset here (digest {digest}) differs from the one the run used "
                   f"({', '.join(sorted(digests))})")
    if device != recorded_device:
        out.append(f"run {original.run_id} trained on {recorded_device}, this one on {device}: "
                   "expect small differences")
    for key, here in runtime.items():  # runs recorded before these params have none
        recorded = original.params.get(key)
        if recorded is not None and recorded != here:
            out.append(f"run {original.run_id} trained with {key} {recorded}, this one with "
                       f"{here}: the metrics may differ")
    return out


def _reproduction_tags(original: RecordedTrial) -> dict[str, str]:
    name = original.run.info.run_name or original.run_id
    return {ROLE: "reproduction", REPRODUCES: original.run_id,
            RUN_NAME: f"reproduce-{name}", SOURCE_NAME: "fractal_mlops.reproduce"}


def _epochs_of(client: MlflowClient, run_id: str) -> dict[int, dict[str, float]]:
    epochs: dict[int, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        for metric in sorted(client.get_metric_history(run_id, key),
                             key=lambda m: (m.step, m.timestamp)):
            epochs.setdefault(metric.step, {})[key] = metric.value
    return epochs


def _int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
