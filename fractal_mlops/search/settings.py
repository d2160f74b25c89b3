"""What a worker runs with: the study's settings (config + flags, checked) and a trial's context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    import torch

    from fractal_mlops.config.experiment import ExperimentConfig
    from fractal_mlops.config.space import Variant
    from fractal_mlops.engine.data import Dataset
    from fractal_mlops.signals import InterruptGuard
    from fractal_mlops.stores.optuna_storage import StorageSpec
    from fractal_mlops.tracking.tracker import Tracker


@dataclass(frozen=True)
class StudySettings:
    """One run of the study command, resolved from the config, the flags and the environment."""

    config: ExperimentConfig
    study_name: str
    tracking_uri: str
    storage: StorageSpec
    device: str
    workers: int
    n_trials: int | None
    report: bool = True  # refresh the study report at the end (--no-report: don't)


@dataclass
class TrialContext:
    """What every trial of one worker shares: both stores, the data, the device, the grid."""

    study: optuna.Study
    tracker: Tracker
    parent_run_id: str
    settings: StudySettings
    data: Dataset
    device: torch.device
    variants: list[Variant]
    interrupts: InterruptGuard
    # engine/autotune.py's choices, once per distinct network on this worker
    precision_cache: dict = field(default_factory=dict)
