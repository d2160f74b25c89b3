"""Optuna trials by ID: the few storage calls Optuna's public API does not offer.

Claiming needs a trial created RUNNING with its point and owner in one storage call; liveness
needs a heartbeat written from another thread; recovery and halving write the state or an
attribute of another worker's trial. `study.tell` and `trial.set_user_attr` cannot: they act on
the current process's own trials. Every private attribute these calls need (`study._storage`,
`study._study_id`, `trial._trial_id`) is read here and nowhere else; tests/study/test_claims.py pins
the GridSampler attributes that claims.claim_next writes through `create`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial, TrialState


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def create(study: optuna.Study, template: FrozenTrial) -> optuna.Trial:
    """A new trial as `template` says (state, params, attributes), in one storage call."""
    import optuna

    return optuna.Trial(study, study._storage.create_new_trial(study._study_id, template))


def resume(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """The live Trial of a stored one (halving: a WAITING point this worker has taken)."""
    import optuna

    return optuna.Trial(study, trial_id(trial))


def set_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int, key: str,
             value: Any) -> None:
    """Raises UpdateFinishedTrialError once the trial has finished."""
    study._storage.set_trial_user_attr(_id(trial), key, value)


def attrs(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int) -> dict[str, Any]:
    """The stored user attributes (a live Trial caches its own)."""
    return study._storage.get_trial_user_attrs(_id(trial))


def set_state(study: optuna.Study, trial: optuna.Trial | FrozenTrial | int, state: TrialState,
              values: list[float] | None = None) -> bool:
    """False when the storage refuses (another worker moved the trial first)."""
    return study._storage.set_trial_state_values(_id(trial), state, values)


def storage(study: optuna.Study):
    return study._storage


def _id(trial: optuna.Trial | FrozenTrial | int) -> int:
    return trial if isinstance(trial, int) else trial_id(trial)
