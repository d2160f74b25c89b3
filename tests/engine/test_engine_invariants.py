"""Engine invariants that only slow end-to-end tests touched before: local drop-path's per-input
drop rate, and the normalization statistics a model's inputs are scaled with."""

from __future__ import annotations

import pytest
import torch

from fractal_mlops.config.sections import DataConfig
from fractal_mlops.engine.data import load_dataset
from fractal_mlops.engine.model import drop_rng, join

DRAWS = 20_000


@pytest.mark.parametrize("inputs", [2, 3])
def test_local_drop_path_drops_each_join_input_at_its_rate_and_keeps_one(inputs):
    """Each input is dropped with p = 0.15 independently; when all would go, one stays. So
    input i survives with 1 - p + p^n / n, and every join keeps at least one."""
    p = 0.15
    drop_rng.seed(0)
    values = list(torch.eye(inputs))  # input i is the one-hot vector e_i: the mean shows who stayed
    kept = torch.zeros(inputs)
    for _ in range(DRAWS):
        survivors = join(values, p) > 0
        assert survivors.any(), "a join kept nothing"
        kept += survivors
    expected = 1 - p + p ** inputs / inputs
    for i in range(inputs):  # +-4.5 standard deviations of a binomial proportion
        rate = float(kept[i]) / DRAWS
        assert abs(rate - expected) < 4.5 * (expected * (1 - expected) / DRAWS) ** 0.5, (i, rate)


def test_without_drop_path_a_join_is_the_mean_of_all_inputs():
    values = [torch.full((2,), v) for v in (1.0, 2.0, 6.0)]
    assert torch.equal(join(values, 0.0), torch.full((2,), 3.0))


def test_the_digits_are_normalized_with_their_training_split_statistics():
    data = load_dataset(DataConfig(name="digits"))
    scaled = data.train_x.float() / 255
    assert data.mean == pytest.approx((float(scaled.mean()),), abs=1e-6)
    assert data.std == pytest.approx((float(scaled.std()),), abs=1e-4)
    # the figures the docs give users for loading a model's inputs by hand
    assert round(data.mean[0], 6) == 0.305434 and round(data.std[0], 6) == 0.375959


def test_the_training_pass_peak_is_read_before_evaluation_starts():
    """gpu_mem_peak_mb is the training pass's: its peak is read (and reset) before the
    validation pass, whose peak is gpu_eval_mem_peak_mb (a GPU shows the difference; the order
    is what the CPU can check)."""
    from fractal_mlops.config.sections import TrainConfig
    from fractal_mlops.engine.train import Trainer

    data = load_dataset(DataConfig(name="digits", train_limit=200, val_limit=100))
    variant = dict(blocks=1, columns=1, width=4, unit="conv-act", norm="none", activation="relu",
                   dropout=0.0, drop_path="none")
    trainer = Trainer(variant, data, TrainConfig(epochs=2, batch_size=50))
    events: list[str] = []

    class Recorder:
        def reset(self):
            events.append("reset")

        def gpu_mb(self):
            events.append("peak")
            return 1.0, 2.0

        def host_mb(self):
            return 3.0

    evaluate = trainer.evaluate
    trainer.memory = Recorder()
    trainer.evaluate = lambda *a, **k: (events.append("evaluate"), evaluate(*a, **k))[1]
    results = list(trainer.epochs())
    assert events == ["reset", "peak", "evaluate", "peak"] * 2
    assert [(r.gpu_mem_peak_mb, r.gpu_eval_mem_peak_mb) for r in results] == [(1.0, 1.0)] * 2
