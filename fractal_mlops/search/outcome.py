"""How a trial ends: one state type, and the one policy that turns an exception into it.

    outcome_of(None)                      COMPLETE
    outcome_of(TrialStopped / TrialPruned) PRUNED, with the reason it gave
    outcome_of(KeyboardInterrupt)         FAIL "interrupted", run KILLED, the worker stops
    outcome_of(a store outage)            FAIL "<store> unavailable", run KILLED, the worker stops
    outcome_of(UpdateFinishedTrialError)  FAIL "worker lost" (another worker took it for lost)
    outcome_of(torch.OutOfMemoryError)    FAIL "CUDA out of memory": retried, OOM_TRIES at most
    outcome_of(any other CUDA error)      FAIL "CUDA error", the worker stops (its context is gone)
    outcome_of(any other error)           FAIL with the error's one line; the study goes on

A FAIL whose reason is in RETRYABLE leaves its grid point pending: the next run trains it again
(`final_failures` says when a point has failed for good). Knows nothing of MLflow or Optuna
beyond their state names (optuna is imported when asked, torch only if already loaded).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from fractal_mlops.errors import TrialStopped, chain, is_outage, one_line
from fractal_mlops.tracking.names import REASON_ATTR
from fractal_mlops.tracking.states import (
    CUDA_FAILED,
    CUDA_OOM,
    INTERRUPTED,
    OOM_TRIES,
    RETRYABLE,
    STORAGE_FAILED,
    TRACKING_FAILED,
    WORKER_LOST,
    RunStatus,
    TrialState,
)


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    reason: str | None = None
    killed: bool = False  # the run did not end on its own: MLflow status KILLED
    stops_worker: bool = False  # recorded, then the worker stops (Ctrl-C, a store outage)

    @property
    def run_status(self) -> RunStatus:
        return RunStatus.KILLED if self.killed else self.state.run_status

    @property
    def store_down(self) -> bool:
        return self.reason in (TRACKING_FAILED, STORAGE_FAILED)

    @property
    def retryable(self) -> bool:
        return self.state is TrialState.FAIL and self.reason in RETRYABLE


def outcome_of(exc: BaseException | None) -> Outcome:
    """The outcome of a trial whose training ended with `exc` (None: it ran to the end)."""
    if exc is None:
        return Outcome(TrialState.COMPLETE)
    from optuna import TrialPruned
    from optuna.exceptions import UpdateFinishedTrialError

    if isinstance(exc, (TrialStopped, TrialPruned)):
        return Outcome(TrialState.PRUNED, str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return Outcome(TrialState.FAIL, INTERRUPTED, killed=True, stops_worker=True)
    if isinstance(exc, UpdateFinishedTrialError):
        return Outcome(TrialState.FAIL, WORKER_LOST, killed=True)
    if is_outage(exc):
        reason = STORAGE_FAILED if from_optuna(exc) else TRACKING_FAILED
        return Outcome(TrialState.FAIL, reason, killed=True, stops_worker=True)
    cuda = cuda_failure(exc)
    if cuda is not None:
        return Outcome(TrialState.FAIL, cuda, stops_worker=cuda == CUDA_FAILED)
    return Outcome(TrialState.FAIL, one_line(exc))


def cuda_failure(exc: BaseException) -> str | None:
    """CUDA_OOM, CUDA_FAILED, or None for an error that is not the GPU's."""
    torch = sys.modules.get("torch")  # not loaded: the error cannot be torch's
    if torch is None or not isinstance(exc, RuntimeError):
        return None
    if isinstance(exc, torch.OutOfMemoryError):
        return CUDA_OOM
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8
    if isinstance(exc, accelerator_error) or str(exc).startswith("CUDA error"):
        return CUDA_FAILED
    return None


def final_failures(trials: Iterable) -> set[str]:
    """Grid points (variant names) whose FAIL trials mean they are done: a reason that is not
    retryable, or out of GPU memory OOM_TRIES times. `trials`: Optuna FrozenTrials."""
    fails = [(t.params.get("variant"), t.user_attrs.get(REASON_ATTR)) for t in trials
             if t.state.name == "FAIL" and "variant" in t.params]
    ooms = Counter(point for point, reason in fails if reason == CUDA_OOM)
    return {point for point, reason in fails
            if reason not in RETRYABLE or ooms[point] >= OOM_TRIES}


def from_optuna(exc: BaseException) -> bool:
    """Did the error come out of Optuna's storage (rather than MLflow)? Optuna wraps its
    database's errors in its own exception types."""
    from optuna.exceptions import OptunaError

    return any(isinstance(item, OptunaError) for item in chain(exc))


