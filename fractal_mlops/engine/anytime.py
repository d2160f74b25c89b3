"""Anytime inference that halts by confidence: columns run shallowest first, and each image
stops at the first column whose top softmax probability reaches a threshold.

Cost is counted in FLOPs (convolutions and the linear head, as torch's FlopCounterMode counts
them; norms and activations are left out), relative to running the deepest column alone. In
single-column mode every block runs column k, so column k shares no unit with the shallower
columns: an image that halts at column k has paid for columns 1..k. An image that never
reaches the threshold pays for all C columns and keeps column C's answer, so the compute
fraction ranges from FLOPs(column 1) / FLOPs(column C) (threshold 0) to more than 1.

    outputs = trainer.column_outputs()          # every column on the whole validation set
    flops = column_flops(model, (1, 8, 8))      # per image, column 1..C
    point = halting_point(outputs, flops, 0.9)  # accuracy, compute, where images halted
    curve_csv(anytime_curve(outputs, flops, 0.9))   # the artifact anytime.csv

`halting_predict` is the real thing for one batch (only the images still undecided run the
next column); benchmarks/bench_halting.py measures its wall time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The curve's thresholds; the configured one is added. Above 1 nothing halts early.
CURVE_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99,
                    0.995, 0.999, 1.0)
CSV_COLUMNS = ("threshold", "accuracy", "compute_fraction")  # then halted_column_<k>


@dataclass(frozen=True)
class ColumnOutputs:
    """Each column's answer on every validation image: (columns, images) tensors."""

    confidence: Tensor  # top softmax probability
    prediction: Tensor  # arg max class
    labels: Tensor  # (images,)

    @property
    def columns(self) -> int:
        return self.confidence.shape[0]

    def accuracy(self, column: int) -> float:
        return share_correct(self.prediction[column - 1], self.labels)


def share_correct(prediction: Tensor, labels: Tensor) -> float:
    """correct / images, as a Python float (the same value Trainer.evaluate reports)."""
    return int((prediction == labels).sum()) / len(labels)


@dataclass(frozen=True)
class HaltingPoint:
    threshold: float
    accuracy: float
    compute_fraction: float  # mean FLOPs per image / FLOPs of the deepest column alone
    halted: tuple[float, ...]  # share of the images that halted at column 1..C


def collect(logits_per_column: list[Tensor], labels: Tensor) -> ColumnOutputs:
    """ColumnOutputs from each column's logits (float) on the same images."""
    probabilities = torch.stack([logits.float().softmax(1) for logits in logits_per_column])
    confidence, _ = probabilities.max(2)
    # arg max of the logits, exactly as the per-column accuracy counts it
    prediction = torch.stack([logits.float().argmax(1) for logits in logits_per_column])
    return ColumnOutputs(confidence.cpu(), prediction.cpu(), labels.cpu())


def halting_columns(confidence: Tensor, threshold: float) -> Tensor:
    """1-based column where each image halts: the first with confidence >= threshold, else C."""
    reached = confidence >= threshold
    reached[-1] = True
    return reached.int().argmax(0) + 1  # argmax returns the first maximum


@torch.no_grad()
def column_flops(model: nn.Module, input_shape: tuple[int, ...]) -> list[float]:
    """FLOPs for one image of each column alone (1..C), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    flops = []
    for column in range(1, model.columns + 1):
        with FlopCounterMode(display=False) as counter:
            model(x, column=column)
        flops.append(float(counter.get_total_flops()))
    model.train(was_training)
    return flops


def halting_point(outputs: ColumnOutputs, flops: list[float], threshold: float) -> HaltingPoint:
    columns = outputs.columns
    halt = halting_columns(outputs.confidence, threshold)
    answer = outputs.prediction.gather(0, (halt - 1).long().unsqueeze(0))[0]
    paid = torch.tensor(flops, dtype=torch.float64).cumsum(0) / flops[-1]  # columns 1..k
    halted = torch.bincount(halt - 1, minlength=columns).double() / len(halt)
    return HaltingPoint(
        threshold=float(threshold),
        accuracy=share_correct(answer, outputs.labels),
        compute_fraction=paid[(halt - 1).long()].mean().item(),
        halted=tuple(halted.tolist()),
    )


def anytime_curve(outputs: ColumnOutputs, flops: list[float],
                  threshold: float | None = None) -> list[HaltingPoint]:
    thresholds = sorted({*CURVE_THRESHOLDS, *([threshold] if threshold is not None else [])})
    return [halting_point(outputs, flops, t) for t in thresholds]


def curve_csv(points: list[HaltingPoint]) -> str:
    """threshold,accuracy,compute_fraction,halted_column_1..C: one row per threshold."""
    columns = len(points[0].halted)
    out = io.StringIO()
    out.write(",".join([*CSV_COLUMNS, *(f"halted_column_{k}" for k in range(1, columns + 1))]))
    out.write("\n")
    for p in points:
        cells = [f"{p.threshold:g}", f"{p.accuracy:.6f}", f"{p.compute_fraction:.6f}",
                 *(f"{share:.6f}" for share in p.halted)]
        out.write(",".join(cells) + "\n")
    return out.getvalue()


@torch.no_grad()
def halting_predict(model: nn.Module, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Class predictions and the 1-based column where each image halted, running column k
    only on the images that no shallower column was confident about."""
    prediction = torch.empty(len(x), dtype=torch.long, device=x.device)
    halted_at = torch.full((len(x),), model.columns, dtype=torch.long, device=x.device)
    pending = torch.arange(len(x), device=x.device)
    for column in range(1, model.columns + 1):
        logits = model(x[pending], column=column).float()
        confidence, _ = logits.softmax(1).max(1)
        done = confidence >= threshold if column < model.columns else torch.ones_like(confidence,
                                                                                      dtype=torch.bool)
        prediction[pending[done]] = logits.argmax(1)[done]
        halted_at[pending[done]] = column
        pending = pending[~done]
        if len(pending) == 0:
            break
    return prediction, halted_at
