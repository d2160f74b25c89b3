"""The end of a grid shared by several workers: exactly one of the workers that find it done
writes the study report; a later run, or one after that worker is lost, writes it again."""

from __future__ import annotations

import time


def _study(tmp_path):
    import optuna

    from fractal_mlops.stores.optuna_storage import open_storage, resolve_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(resolve_storage(f"journal:{tmp_path / 'optuna.journal'}", None))
    return optuna.create_study(storage=storage, study_name="end", direction="maximize")


def test_the_first_worker_to_find_the_grid_done_writes_the_report(tmp_path):
    from fractal_mlops.search.claims import take_report
    from fractal_mlops.stores.optuna_storage import worker_identity

    study = _study(tmp_path)
    study.tell(study.ask(), 0.5)
    assert take_report(study) is None  # this worker writes it
    # another worker finds the same finished grid while this one (alive) writes: it does not
    assert take_report(study) == worker_identity()


def test_the_report_is_written_again_for_new_trials_or_when_its_writer_is_gone(tmp_path):
    from fractal_mlops.search.claims import take_report
    from fractal_mlops.tracking.names import REPORTER_ATTR

    study = _study(tmp_path)
    study.tell(study.ask(), 0.5)
    assert take_report(study) is None
    study.tell(study.ask(), 0.6)  # the grid has trials it did not report
    assert take_report(study) is None
    # written by a worker on another host whose heartbeat has long stopped
    study.set_user_attr(REPORTER_ATTR, {"worker": "elsewhere:1:1", "heartbeat": time.time() - 3600,
                                        "trials": 2})
    assert take_report(study) is None
    study.set_user_attr(REPORTER_ATTR, {"worker": "elsewhere:1:1", "heartbeat": time.time(),
                                        "trials": 2})
    assert take_report(study) == "elsewhere:1:1"  # alive, and at it
