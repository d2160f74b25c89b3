"""How a trial ends: one state type, and the one policy that turns an exception into it.

    outcome_of(None)                      COMPLETE
    outcome_of(TrialStopped / TrialPruned) PRUNED, with the reason it gave
    outcome_of(KeyboardInterrupt)         FAIL "interrupted", run KILLED, the worker stops
    outcome_of(a store outage)            FAIL "<store> unavailable", run KILLED, the worker stops
    outcome_of(UpdateFinishedTrialError)  FAIL "worker lost" (another worker took it for lost)
    outcome_of(any other error)           FAIL with the error's one line; the study goes on

A FAIL whose reason is in RETRYABLE leaves its grid point pending: the next run trains it again.
Knows nothing of MLflow or Optuna beyond their state names (optuna is imported when asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .errors import chain, is_outage
from .runner import TrialStopped

WORKER_LOST = "worker lost"
INTERRUPTED = "interrupted"
TRACKING_FAILED = "tracking store unavailable"
STORAGE_FAILED = "Optuna storage unavailable"
RETRYABLE = (WORKER_LOST, INTERRUPTED, TRACKING_FAILED, STORAGE_FAILED)


class TrialState(StrEnum):
    """A finished trial, as the `fractal.state` tag, the console and the report name it."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"

    @property
    def run_status(self) -> str:
        """The MLflow run status of a trial that ended this way on its own."""
        return "FAILED" if self is TrialState.FAIL else "FINISHED"

    @property
    def optuna_state(self):
        from optuna.trial import TrialState as OptunaState

        return OptunaState[self.value]


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    reason: str | None = None
    killed: bool = False  # the run did not end on its own: MLflow status KILLED
    stops_worker: bool = False  # recorded, then the worker stops (Ctrl-C, a store outage)

    @property
    def run_status(self) -> str:
        return "KILLED" if self.killed else self.state.run_status

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
    return Outcome(TrialState.FAIL, one_line(exc))


def from_optuna(exc: BaseException) -> bool:
    """Did the error come out of Optuna's storage (rather than MLflow)? Optuna wraps its
    database's errors in its own exception types."""
    from optuna.exceptions import OptunaError

    return any(isinstance(item, OptunaError) for item in chain(exc))


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """`Type: message` on one line, as a FAIL reason."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]
