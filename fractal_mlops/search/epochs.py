"""Train one variant into one MLflow run: the per-epoch loop that the study and reproduce share.

    results = TrialResults()
    try:
        train_and_log(tracker, run_id, variant, data, config, device, results, on_epoch=hook)
        state, reason = "COMPLETE", None
    except TrialStopped as stopped:        # non-finite loss, divergence, or the hook said stop
        state, reason = "PRUNED", str(stopped)
    tracker.finish_trial(run_id, state, reason, results.metrics())

Each epoch is logged (step = epoch) before anything decides to stop, so a stopped run keeps the
epochs it trained. The divergence check is a function of the config and the metrics only, so a
re-run of the same trial stops at the same epoch. Knows nothing of Optuna.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fractal_mlops.errors import TrialStopped
from fractal_mlops.signals import stop_signals_held

if TYPE_CHECKING:
    import torch

    from fractal_mlops.config.experiment import ExperimentConfig
    from fractal_mlops.config.sections import PruningConfig
    from fractal_mlops.config.space import Variant
    from fractal_mlops.engine.data import Dataset
    from fractal_mlops.engine.precision import Precision
    from fractal_mlops.engine.train import EpochResult, Trainer
    from fractal_mlops.tracking.tracker import Tracker

# The anytime curve of a COMPLETE trial: threshold, accuracy, compute_fraction, halted_column_<k>
ANYTIME_ARTIFACT = "anytime.csv"

# Called after each logged epoch; returns a reason to stop (PRUNED) or None to go on.
EpochHook = Callable[["EpochResult"], "str | None"]


def trial_params(variant: Variant, config: ExperimentConfig, data: Dataset, device: str,
                 threads: int) -> dict[str, Any]:
    """The trial's MLflow params: every dimension, the training settings, the variant name,
    the normalization the logged model expects its inputs to have had, and the runtime
    (device.runtime_params). The precision is logged when training starts (train_and_log)."""
    import torch

    from fractal_mlops.engine.device import runtime_params
    from fractal_mlops.engine.gpus import placement_params

    params: dict[str, Any] = {k: v for k, v in variant.to_dict().items() if k != "name"}
    training = config.to_dict()["training"]
    training.pop("memory_format", None)  # the param is the format trained in (train_and_log)
    params.update(training, compile=config.training.compile)
    params["halting_threshold"] = config.evaluation.halting_threshold
    params.update(dataset=data.name, variant=variant.name, device=device, threads=threads,
                  data_mean=_rounded(data.mean), data_std=_rounded(data.std))
    params.update(runtime_params(torch.device(device)))
    params.update(placement_params(device))  # the launcher's GPU for this worker
    return params


def _rounded(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.6g}" for v in values)


def trial_config_yaml(variant: Variant, config: ExperimentConfig) -> str:
    import yaml

    resolved = config.to_dict()
    resolved["space"] = {k: [v] for k, v in variant.to_dict().items() if k != "name"}
    resolved["variant"] = variant.to_dict()
    return yaml.safe_dump(resolved, sort_keys=False)


@dataclass
class TrialResults:
    """What a trial produced so far (kept when it stops early)."""

    final: dict[str, float] | None = None
    last_val_acc: float | None = None
    best_val_acc: float | None = None
    param_count: int | None = None
    train_seconds: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val_acc)
    cost: dict[str, float] = field(default_factory=dict)  # flops, latency_ms, throughput_img_s

    def metrics(self) -> dict[str, float]:
        out = dict(self.final or {})
        for key in ("best_val_acc", "param_count", "train_seconds"):
            value = getattr(self, key)
            if value is not None:
                out.setdefault(key, value)
        return out


def divergence_reason(val_acc: float, epoch: int, chance: float,
                      pruning: PruningConfig) -> str | None:
    if epoch <= pruning.warmup_epochs:
        return None
    if val_acc <= chance + pruning.chance_margin:
        return (f"diverged: val_acc {val_acc:.3f} at epoch {epoch} is within "
                f"{pruning.chance_margin:g} of chance ({chance:.3f})")
    return None


def record_epoch(tracker: Tracker, run_id: str, result: EpochResult, results: TrialResults,
                 train_seconds: float) -> None:
    """Log one epoch and keep what the trial has produced; a non-finite loss stops it."""
    tracker.log_epoch(run_id, result)
    results.train_seconds = train_seconds
    if result.stop_reason:
        raise TrialStopped(result.stop_reason)
    results.last_val_acc = result.val_acc
    results.best_val_acc = max(result.val_acc, results.best_val_acc or 0.0)
    results.history.append((result.epoch, result.val_acc))


def train_and_log(tracker: Tracker, run_id: str, variant: Variant, data: Dataset,
                  config: ExperimentConfig, device: torch.device, results: TrialResults,
                  on_epoch: EpochHook | None = None, stop_at: int | None = None,
                  checkpoints: bool = False, precision: Precision | None = None,
                  precision_cache: dict | None = None) -> bool:
    """Train `variant` and log every epoch, the final metrics' inputs, the anytime curve
    (confidence-halted inference at `evaluation.halting_threshold`) and the model to `run_id`.

    The precision: the one the run recorded (a trial continued), else `precision` (reproduce
    replays the original's), else the config's, timed per network when it says auto
    (engine/autotune.py, once per network in `precision_cache`); logged as params.
    `checkpoints`: continue from the run's checkpoint if it has one, and save the training
    state at every epoch end before the last and at most every `training.checkpoint_minutes`
    within an epoch. `stop_at`: stop after that epoch (a halving rung; needs `checkpoints`).
    Returns True when the trial trained to its last epoch (`results.final` holds the final
    metrics; the caller closes the run with `tracker.finish_trial(run_id, ..., results.metrics())`),
    False when it stopped at `stop_at`. Raises TrialStopped (after logging that epoch) on a
    non-finite loss, on divergence, or when `on_epoch` returns a reason.
    """
    from fractal_mlops.engine.autotune import choose
    from fractal_mlops.engine.precision import Precision
    from fractal_mlops.engine.train import Trainer

    settings = config.training
    recorded = tracker.run_params(run_id)
    if "amp_dtype" in recorded:  # a trial continued: the choice it made
        precision = Precision.from_params(recorded, settings, device)
    else:
        choice = choose(variant.to_dict(), data, settings, device, precision_cache,
                        fixed_precision=precision)
        tracker.log_params(run_id, choice.params())
        precision = choice.precision
    trainer = Trainer(variant.to_dict(), data, settings, device, flip=config.data.use_flip,
                      precision=precision)
    results.param_count = trainer.param_count
    saved = tracker.load_checkpoint(run_id) if checkpoints else None
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
        results.last_val_acc, results.best_val_acc = saved["last_val_acc"], saved["best_val_acc"]
        results.history = [tuple(item) for item in saved.get("history", [])]
        results.train_seconds = trainer.train_seconds

    def save(trainer_state: dict) -> None:
        tracker.save_checkpoint(run_id, {"trainer": trainer_state, "history": results.history,
                                         "last_val_acc": results.last_val_acc,
                                         "best_val_acc": results.best_val_acc})

    if checkpoints:
        trainer.checkpoint_seconds = settings.checkpoint_minutes * 60 or None
        trainer.on_checkpoint = save
    chance = 1.0 / data.num_classes
    for result in trainer.epochs(stop=stop_at):
        # an epoch's log and its checkpoint go together: a Ctrl-C between them would train the
        # epoch again on resume and log it twice, so it waits for the save
        with stop_signals_held():
            record_epoch(tracker, run_id, result, results, trainer.train_seconds)
            hook_reason = on_epoch(result) if on_epoch is not None else None
            reason = divergence_reason(result.val_acc, result.epoch, chance, config.pruning)
            if reason or hook_reason:
                raise TrialStopped(reason or hook_reason)
            if checkpoints and trainer.epochs_done < settings.epochs:
                save(trainer.state_dict())
    if trainer.epochs_done < settings.epochs:
        if len(config.search.objectives) > 1:  # a halving rung ranks by the costs too
            results.cost = trainer.inference_cost()
        return False
    finish_training(tracker, run_id, trainer, data, config, results)
    return True


def finish_training(tracker: Tracker, run_id: str, trainer: Trainer, data: Dataset,
                    config: ExperimentConfig, results: TrialResults) -> None:
    """A trial trained to its last epoch: final metrics (each column alone, halting at
    `evaluation.halting_threshold`, the inference cost: engine/cost.py) into `results.final`,
    anytime.csv and the model logged."""
    final = {"final_val_acc": results.last_val_acc, "best_val_acc": results.best_val_acc,
             "param_count": trainer.param_count, "train_seconds": trainer.train_seconds}
    threshold = config.evaluation.halting_threshold
    column_accuracies, halting, curve = trainer.anytime(threshold)
    final.update({f"val_acc_column_{k}": acc for k, acc in column_accuracies.items()})
    final.update(halting_val_acc=halting.accuracy, halting_compute=halting.compute_fraction)
    results.cost = trainer.inference_cost()
    final.update(results.cost)
    results.final = final
    tracker.log_text(run_id, curve, ANYTIME_ARTIFACT)
    tracker.log_model(run_id, trainer.model, tuple(data.train_x.shape[1:]), data.num_classes)
