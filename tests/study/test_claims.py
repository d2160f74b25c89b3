"""Claiming grid points: workers racing on one store never take a point twice.

Three real processes claim points of one study as fast as the store allows, with the study's
own lock and claiming code, and finish each trial at once, so that trials of one worker finish
while another claims. (A claim that read the trials twice, once for finished points and once for
running ones, missed a trial that finished between the two reads and trained its point again.)
"""

from __future__ import annotations

import collections
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import load_optuna_study

WORKER = Path(__file__).with_name("claim_worker.py")
POINTS = 60


def race(storage: str, study_name: str, workers: int = 3) -> list:
    procs = [subprocess.Popen([sys.executable, str(WORKER), storage, study_name, str(POINTS),
                               str(seed)], stderr=subprocess.PIPE, text=True)
             for seed in range(workers)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return load_optuna_study(storage, study_name).get_trials()


@pytest.fixture(params=["journal", "sqlite", "postgresql"])
def storage(request, tmp_path) -> str:
    if request.param == "journal":
        return f"journal:{tmp_path / 'optuna.journal'}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return request.getfixturevalue("postgres").optuna_url


def test_racing_workers_claim_every_point_exactly_once(storage):
    trials = race(storage, f"claims-{uuid.uuid4().hex[:8]}")
    points = collections.Counter(t.params["variant"] for t in trials)
    twice = {point: n for point, n in points.items() if n > 1}
    assert not twice, f"points claimed more than once: {twice}"
    assert len(points) == POINTS
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert len({t.user_attrs["worker"] for t in trials}) > 1  # the workers really shared the grid


def test_claimed_points_count_as_visited_by_optunas_grid_sampler(tmp_path):
    """claim_next writes the GridSampler's own bookkeeping (the private system attrs
    `search_space` and `grid_id`), so the sampler sees each claimed point as the one it holds
    and never assigns a grid point of its own (it would pick one at random). This pins that
    contract: an Optuna that renames those attributes fails here, not in a user's study."""
    import optuna

    from fractal_mlops.config.space import canonical
    from fractal_mlops.search.claims import claim_next, grid_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    variants = [canonical(blocks=1, columns=1, width=i + 1, unit="conv", norm="none",
                          activation="none", dropout=0.0, drop_path="none") for i in range(8)]
    names = [v.name for v in variants]
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="pin", direction="maximize",
        sampler=grid_sampler()({"variant": names}))
    # the first claim is interrupted, so trial numbers and grid points part ways after it
    trial, variant, _ = claim_next(study, variants)
    trial.set_user_attr("reason", "interrupted")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    for expected in variants:
        assert not study.sampler.is_exhausted(study)
        trial, variant, _ = claim_next(study, variants)
        assert variant is expected
        study.tell(trial, 0.5)
    assert study.sampler.is_exhausted(study)
    assert claim_next(study, variants) is None
    assert [(t.params["variant"], t.system_attrs["grid_id"]) for t in study.trials] == [
        (names[0], 0)] + [(name, index) for index, name in enumerate(names)]
