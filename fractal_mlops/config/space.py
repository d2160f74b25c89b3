"""The template grid: enumerate the configured dimensions into distinct, canonically named variants.

A dimension that a variant's unit does not use must not multiply the grid: with a unit that has
no `norm`, every norm value builds the same network, so the variant keeps norm="none". The same
holds for `act` / activation, `drop` / dropout, and drop-path with a single column. An op whose
value makes it a no-op (norm "none", activation "none", dropout 0) is dropped from the unit.
Recursive weight sharing needs three columns: with one or two, no two applications of an f_k
in a block share a role (see engine/model.py), so `recursive` builds the `none` network.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from fractal_mlops.config.experiment import DIMENSIONS, SPACE_DEFAULTS, ExperimentConfig

DROP_PATH_SHORT = {"none": "dp0", "local": "dpL", "local+global": "dpLG"}
MIN_SHARING_COLUMNS = 3


@dataclass(frozen=True)
class Variant:
    """One grid point. Its fields (plus `name`) are keyword arguments of timm's `fractalnet`."""

    blocks: int
    columns: int
    width: int
    unit: str
    norm: str
    activation: str
    dropout: float
    drop_path: str
    weight_sharing: str = "none"

    @property
    def name(self) -> str:
        """Stable, readable name, e.g. b3-c3-w64-conv.batch.relu.drop0.1-dpLG; a `-rec`
        suffix for recursive weight sharing (names without sharing predate it, unchanged)."""
        values = {"conv": "conv", "norm": self.norm, "act": self.activation,
                  "drop": f"drop{self.dropout:g}"}
        ops = ".".join(values[op] for op in self.unit.split("-"))
        sharing = "-rec" if self.weight_sharing == "recursive" else ""
        return (f"b{self.blocks}-c{self.columns}-w{self.width}-{ops}-"
                f"{DROP_PATH_SHORT[self.drop_path]}{sharing}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Variant:
        # a run recorded before a dimension existed has that dimension's default
        return canonical(**{dim: values.get(dim, SPACE_DEFAULTS[dim][0]) for dim in DIMENSIONS})


def canonical(blocks: int, columns: int, width: int, unit: str, norm: str, activation: str,
              dropout: float, drop_path: str, weight_sharing: str = "none") -> Variant:
    """The variant with no-op ops removed and unused dimensions set to their neutral value."""
    ops = [op for op in unit.split("-")
           if not ((op == "norm" and norm == "none")
                   or (op == "act" and activation == "none")
                   or (op == "drop" and float(dropout) == 0.0))]
    return Variant(
        blocks=int(blocks),
        columns=int(columns),
        width=int(width),
        unit="-".join(ops),
        norm=norm if "norm" in ops else "none",
        activation=activation if "act" in ops else "none",
        dropout=float(dropout) if "drop" in ops else 0.0,
        drop_path=drop_path if columns > 1 else "none",
        weight_sharing=weight_sharing if columns >= MIN_SHARING_COLUMNS else "none",
    )


def enumerate_variants(space: dict[str, list[Any]]) -> list[Variant]:
    """All distinct variants of the grid, in a stable order (the order of the config's values)."""
    seen: dict[Variant, None] = {}
    for values in itertools.product(*(space[dim] for dim in DIMENSIONS)):
        seen.setdefault(canonical(**dict(zip(DIMENSIONS, values, strict=True))), None)
    return list(seen)


def grid(config: ExperimentConfig) -> list[Variant]:
    return enumerate_variants(config.space)


def dimension_values(variants: list[Variant]) -> dict[str, list[Any]]:
    """Each dimension's values over the grid's variants, in their order of first appearance
    (a value that no variant keeps, like a norm with no norm in any unit, is left out)."""
    values: dict[str, dict[Any, None]] = {dim: {} for dim in DIMENSIONS}
    for variant in variants:
        for dim in DIMENSIONS:
            values[dim].setdefault(getattr(variant, dim), None)
    return {dim: list(seen) for dim, seen in values.items()}
