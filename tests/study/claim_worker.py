"""One worker of tests/study/test_claims.py: claims grid points with the study's own claiming
code and finishes each at once (no training), so that claims race as fast as the store allows.

    python tests/study/claim_worker.py STORAGE STUDY_NAME N_POINTS SEED
"""

from __future__ import annotations

import random
import sys
import time

import optuna
from optuna.trial import TrialState

from fractal_mlops.config.space import canonical
from fractal_mlops.search.claims import claim_next, grid_sampler
from fractal_mlops.stores.optuna_storage import claim_lock, open_storage, resolve_storage


def main(storage: str, study_name: str, n_points: int, seed: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = resolve_storage(storage, None)
    # real grid points (each trial records their dimensions), one width each: no training
    variants = [canonical(blocks=1, columns=1, width=i + 1, unit="conv", norm="none",
                          activation="none", dropout=0.0, drop_path="none")
                for i in range(n_points)]
    with claim_lock(spec, study_name):
        study = optuna.create_study(
            storage=open_storage(spec), study_name=study_name, direction="maximize",
            load_if_exists=True, sampler=grid_sampler()({"variant": [v.name for v in variants]}))
    rnd = random.Random(seed)
    while True:
        with claim_lock(spec, study_name):
            claimed = claim_next(study, variants)
        if claimed is None:
            return
        time.sleep(rnd.random() * 0.02)  # others claim while this trial finishes
        if rnd.random() < 0.7:
            study.tell(claimed[0], rnd.random())
        else:
            study.tell(claimed[0], state=TrialState.PRUNED)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
