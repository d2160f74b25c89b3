"""A reproduction against its original, as `reproduce` prints it: one row per epoch (original |
reproduced, metric by metric) while it trains, then the final metrics; equal within atol.
"""

from __future__ import annotations

import math

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")  # deterministic ones


def close(a: float | None, b: float | None, atol: float) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= atol


class EpochTable:
    """original | reproduced, metric by metric, one row per epoch (printed as it trains)."""

    def __init__(self, original: dict[int, dict[str, float]], atol: float) -> None:
        self.original = original
        self.atol = atol
        self.printed: set[int] = set()
        self.differing: set[int] = set()

    def print_header(self) -> None:
        cells = "".join(f"{m:<25}" for m in EPOCH_METRICS)
        sub = "".join(f"{'original':>11} {'reproduced':>11}  " for _ in EPOCH_METRICS)
        print(f"{'':>5}  {cells}".rstrip() + f"\n{'epoch':>5}  {sub}".rstrip(), flush=True)

    def print_row(self, epoch: int, values: dict[str, float]) -> None:
        before = self.original.get(epoch, {})
        cells, worst = [], 0.0
        same = bool(before)
        for key in EPOCH_METRICS:
            a, b = before.get(key), values.get(key)
            cells.append(f"{_num(a):>11} {_num(b):>11}  ")
            if not close(a, b, self.atol):
                same = False
                if a is not None and b is not None:
                    worst = max(worst, abs(a - b))
        status = "same" if same else ("DIFFERS, original has no such epoch" if not before else
                                      f"DIFFERS (max |diff| {worst:.3g})")
        if not same:
            self.differing.add(epoch)
        self.printed.add(epoch)
        print(f"{epoch:>5}  {''.join(cells)}{status}", flush=True)

    def finish(self, new: dict[int, dict[str, float]]) -> bool:
        """Compare what the new run recorded (read back from MLflow) with the original."""
        for epoch in sorted(set(self.original) - set(new)):
            print(f"{epoch:>5}  original only: "
                  + ", ".join(f"{k} {_num(v)}" for k, v in self.original[epoch].items())
                  + "  DIFFERS, missing in the reproduction")
            self.differing.add(epoch)
        for epoch, values in new.items():
            before = self.original.get(epoch, {})
            if not before or any(not close(before.get(k), values.get(k), self.atol)
                                 for k in EPOCH_METRICS):
                self.differing.add(epoch)
        return not self.differing


def compare_finals(original: dict[str, float], new: dict[str, float], atol: float) -> bool:
    """The final metrics the original recorded (timings aside), against the new ones."""
    if not original:
        return True
    same = True
    print(f"{'final metric':<20} {'original':>11} {'reproduced':>11}")
    for key in sorted(original, key=lambda k: (not k.startswith(("final", "best")), k)):
        a, b = original[key], new.get(key)
        ok = close(a, b, atol)
        same &= ok
        print(f"{key:<20} {_num(a):>11} {_num(b):>11}  {'same' if ok else 'DIFFERS'}")
    return same


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) >= 100:
        return f"{int(value):,}"
    return f"{value:.6f}" if abs(value) < 1e4 else f"{value:.4g}"
