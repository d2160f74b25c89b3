"""Drop-path in static shapes, for a compiled training step (`training.compile`).

The eager form (model.join, FractalNet._drop_plan) skips what it drops: which units run depends
on Python draws, so every step has a different graph and torch.compile cannot capture it. In
this form every unit runs on every step, and each join averages the inputs its mask keeps. The
masks are drawn on the device inside the step, so the host reads nothing back and the graph is
the same on every step: torch.compile captures it once, and with `reduce-overhead` CUDA graphs
replay it.

The decisions keep the eager form's statistics: with local+global, half of the mini-batches
pick one column uniformly for the whole network; otherwise each join input is dropped with
probability p, and when all are, one drawn uniformly is kept. They come from torch's generator
(seeded by train.seed_everything), not from drop_rng.

What masking changes against skipping (measured on digits in benchmarks/bench_compile.py):
- Norm statistics: a masked unit still runs, so its batch norms update their running
  statistics with the batch it would have seen had it been kept. They estimate the same
  distribution as in the eager form; they are only refreshed on more steps. Left as is.
- Optimizer: a masked unit's parameters get a zero gradient, not none. Eager SGD leaves a
  skipped unit's weights alone; here momentum and weight decay still move them on the steps
  they are masked (as if the unit had been kept with a zero gradient). Left as is: restoring
  the skipped behaviour would take a per-parameter mask in the optimizer step.
- Cost: the units the eager form skips run anyway, so a step does the full network's work.
"""

from __future__ import annotations

import torch
from torch import Tensor


class MaskPlan:
    """The drop-path draws of one training forward, all on `device`.

    `column` is the global column (1..C) the whole network uses when `global_on`; a join is
    given the column relative to its own inputs (input i is column i + 1; below 1: the join is
    on no global column's path, and its output is unused)."""

    def __init__(self, columns: int, drop_path: str, local_drop_prob: float,
                 device: torch.device) -> None:
        draw = torch.rand(2, device=device)
        self.global_on = (draw[0] < 0.5) & (drop_path == "local+global")
        self.column = (draw[1] * columns).long().clamp(max=columns - 1) + 1
        self.local_drop_prob = local_drop_prob
        self.device = device

    def mask(self, n: int, column: Tensor) -> Tensor:
        """Which of a join's n inputs it keeps (bool, shape (n,); never all False)."""
        index = torch.arange(n, device=self.device)
        on_path = (index == column - 1) | (column < 1)
        draw = torch.rand(n + 1, device=self.device)
        keep = draw[:n] >= self.local_drop_prob
        rescue = index == (draw[n] * n).long().clamp(max=n - 1)  # kept when all are dropped
        return torch.where(self.global_on, on_path, keep | (rescue & ~keep.any()))

    def join(self, inputs: list[Tensor], column: Tensor) -> Tensor:
        """The join of `inputs` under this plan (a single input passes through, undrawn)."""
        return inputs[0] if len(inputs) == 1 else masked_join(inputs, self.mask(len(inputs), column))


def masked_join(inputs: list[Tensor], mask: Tensor) -> Tensor:
    """Mean of the inputs `mask` keeps. A masked input contributes zero and gets a zero
    gradient; torch.where, not a product, so that a non-finite masked input stays out."""
    total = torch.where(mask[0], inputs[0], 0.0)
    for i, x in enumerate(inputs[1:], 1):
        total = total + torch.where(mask[i], x, 0.0)
    return total / mask.sum()
