"""How a trial ended, as both stores name it: the states and the reasons a point stays pending."""

from __future__ import annotations

from enum import Enum

WORKER_LOST = "worker lost"
INTERRUPTED = "interrupted"
TRACKING_FAILED = "tracking store unavailable"
STORAGE_FAILED = "Optuna storage unavailable"
CUDA_OOM = "CUDA out of memory"  # often other workers' memory on the same GPU: try again later
CUDA_FAILED = "CUDA error"  # a sticky error: the process's CUDA context is broken
RETRYABLE = (WORKER_LOST, INTERRUPTED, TRACKING_FAILED, STORAGE_FAILED, CUDA_OOM, CUDA_FAILED)
OOM_TRIES = 3  # a point out of GPU memory this many times has failed for good


class _Named(str, Enum):
    """A str whose value is its name: it compares, formats and is stored as that string
    (enum.StrEnum, which Python 3.10 lacks)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class RunStatus(_Named):
    """MLflow run statuses, as the project sets them."""

    RUNNING = "RUNNING"
    SCHEDULED = "SCHEDULED"  # halving: a point waiting for its rung's ranking
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"  # interrupted, or its worker or store went away


class TrialState(_Named):
    """A finished trial, as the `fractal.state` tag, the console and the report name it."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"

    @property
    def run_status(self) -> RunStatus:
        """The MLflow run status of a trial that ended this way on its own."""
        return RunStatus.FAILED if self is TrialState.FAIL else RunStatus.FINISHED

    @property
    def optuna_state(self):
        from optuna.trial import TrialState as OptunaState

        return OptunaState[self.value]
