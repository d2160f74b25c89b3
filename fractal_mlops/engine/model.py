"""FractalNet (Larsson, Maire, Shakhnarovich 2016, arXiv 1605.07648), built from one variant.

Expansion rule: f_1(z) = unit(z); f_{C+1}(z) = join(f_C(f_C(z)), unit(z)), join = element-wise
mean over the columns that meet there. Column 1 is the shallowest path (one unit), column C the
deepest (2^(C-1) units). B blocks, each followed by a 2x2 max-pool; widths double per block,
capped at 8x the first; a linear head on the globally pooled features.

Drop-path (training only): "local" drops each join input with probability p (at least one kept);
"local+global" also picks, for half of the mini-batches, one column that the whole network uses.
Any single column can run alone at evaluation time (the anytime property): `model(x, column=k)`.
With `static_drop_path` (a compiled step), training masks what it drops instead of skipping it
(static_drop_path.py).

Weight sharing (`weight_sharing="recursive"`): the rule applies f_C twice, f_C(f_C(z)); Larsson
builds two independent copies, so a block holds 2^C - 1 units. With sharing, the applications
of f_k in a block that play the same role share one set of conv weights. There are two roles:
the chain that reads the block's input (in -> out channels: f_C, its first half, that one's
first half, ...) and everything after it (out -> out). A block then holds one unit per level
and role: C + (C - 1) = 2C - 1 convs, linear in C. The input chain keeps its own weights even
where in == out (the width cap), so that the count, and whether anything is shared at all,
follows from the variant alone: with one or two columns nothing is shared. Norms stay per
application by default (each application keeps its own statistics and affine parameters;
measured in benchmarks/bench_sharing.py); `shared_norms=True` shares whole units.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from timm.layers import create_act_layer, create_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from fractal_mlops.config.experiment import parse_unit
from fractal_mlops.engine.static_drop_path import MaskPlan

TIMM_NORMS = {"batch": "batchnorm2d", "group": "groupnorm", "layer": "layernorm2d"}
WEIGHT_SHARING = ("none", "recursive")

UnitFactory = Callable[[int, int], nn.Module]
# (in channels, out channels, level k of the f_k that the unit belongs to, role) -> unit
Role = Literal["input", "inner"]
PathUnitFactory = Callable[[int, int, int, Role], nn.Module]


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":  # 32 groups as in Wu & He, fewer when the channels do not divide
        return create_norm_layer("groupnorm", channels, num_groups=math.gcd(32, channels))
    return create_norm_layer(TIMM_NORMS[kind], channels)


def make_unit(in_ch: int, out_ch: int, ops: tuple[str, ...], norm: str, activation: str,
              dropout: float) -> nn.Sequential:
    """A 3x3 conv plus norm / act / dropout in the template's order."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_ch
    for i, op in enumerate(ops):
        if op == "conv":
            norm_follows = "norm" in ops[i + 1:] and norm != "none"
            layers["conv"] = nn.Conv2d(channels, out_ch, 3, padding=1, bias=not norm_follows)
            channels = out_ch
        elif op == "norm" and norm != "none":
            layers["norm"] = make_norm(norm, channels)
        elif op == "act" and activation != "none":
            # never in place: a block's input feeds several columns
            layers["act"] = create_act_layer(activation, inplace=False)
        elif op == "drop" and dropout > 0:
            layers["drop"] = nn.Dropout(dropout)
    return nn.Sequential(layers)


# Drop-path decisions draw from a generator of their own (seeded by train.seed_everything), not
# from a tensor, whose value a GPU would have to send back: the step would wait for the device.
# Not Python's global random either, which libraries draw from (retry jitter).
drop_rng = random.Random(0)


def join(inputs: list[Tensor], drop_prob: float) -> Tensor:
    """Mean of the inputs; with drop_prob > 0 each is dropped, keeping at least one.

    The decisions come from `drop_rng`. The mean is a sum, not torch.stack(...).mean(0), which
    returns NCHW even for channels_last inputs."""
    if len(inputs) > 1 and drop_prob > 0:
        keep = [drop_rng.random() >= drop_prob for _ in inputs]
        if not any(keep):
            keep[drop_rng.randrange(len(inputs))] = True
        inputs = [x for x, kept in zip(inputs, keep, strict=True) if kept]
    total = inputs[0]
    for x in inputs[1:]:
        total = total + x
    return total if len(inputs) == 1 else total / len(inputs)


@contextlib.contextmanager
def frozen_norm_statistics(module: nn.Module):
    """Batch norms in `module` leave their running statistics alone (momentum 0) meanwhile.

    Gradient checkpointing runs a block's forward twice; without this, the recomputation
    would update the running statistics a second time and change the trained model.
    """
    norms = [m for m in module.modules()
             if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum, tracked in saved:
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(tracked)


def checkpointed(module: nn.Module, *args) -> list[Tensor]:
    """module(*args), keeping only its inputs and outputs: backward runs the forward again,
    with the same drop-path decisions (checkpoint replays torch's RNG, `replaying` drop_rng)
    and without counting the batch twice in the norms' running statistics."""
    def contexts():  # called as the forward starts
        return contextlib.nullcontext(), replaying(drop_rng.getstate(), module)

    return checkpoint(module, *args, use_reentrant=False, context_fn=contexts)


@contextlib.contextmanager
def replaying(state: tuple, module: nn.Module) -> Iterator[None]:
    outer = drop_rng.getstate()
    drop_rng.setstate(state)
    try:
        with frozen_norm_statistics(module):
            yield
    finally:
        drop_rng.setstate(outer)


class RecursiveUnits:
    """Unit factory of one block with recursive weight sharing: one conv per (level, role).

    With `shared_norms`, the whole unit (conv, norm, ...) is shared; otherwise each application
    gets its own unit around the shared conv.
    """

    def __init__(self, unit: UnitFactory, shared_norms: bool) -> None:
        self.unit = unit
        self.shared_norms = shared_norms
        self.built: dict[tuple[int, Role], nn.Module] = {}

    def __call__(self, in_ch: int, out_ch: int, level: int, role: Role) -> nn.Module:
        first = self.built.get((level, role))
        if first is None:
            first = self.built[(level, role)] = self.unit(in_ch, out_ch)
            return first
        if self.shared_norms:
            return first
        fresh = self.unit(in_ch, out_ch)
        fresh.conv = first.conv  # same position in the Sequential, shared parameters
        return fresh


class FractalPath(nn.Module):
    """f_C: returns the outputs of its columns (shallowest first), not yet joined."""

    def __init__(self, columns: int, in_ch: int, out_ch: int, unit: PathUnitFactory,
                 role: Role = "input") -> None:
        super().__init__()
        self.columns = columns
        self.shallow = unit(in_ch, out_ch, columns, role)
        if columns > 1:
            self.first = FractalPath(columns - 1, in_ch, out_ch, unit, role)
            self.second = FractalPath(columns - 1, out_ch, out_ch, unit, "inner")

    def forward(self, z: Tensor, column: int | None = None, drop_prob: float = 0.0,
                checkpointing: bool = False) -> list[Tensor]:
        """With `checkpointing`, the two halves f_{C-1} are checkpointed separately, so that
        backward holds the activations of half a block at a time, not of the whole block."""
        run = checkpointed if checkpointing else nn.Module.__call__
        if column == 1 or self.columns == 1:
            return [run(self.shallow, z)]
        if column is not None:  # one column alone: only the units on its path run
            middle = run(self.first, z, column - 1)[0]
            return run(self.second, middle, column - 1)
        middle = join(run(self.first, z, None, drop_prob), drop_prob)
        return [self.shallow(z), *run(self.second, middle, None, drop_prob)]

    def forward_masked(self, z: Tensor, plan: MaskPlan, column: Tensor) -> list[Tensor]:
        """Every column's output, whatever the draws; `column`: the global column relative to
        this path (see MaskPlan)."""
        if self.columns == 1:
            return [self.shallow(z)]
        inner = column - 1  # f_C's columns 2..C are its halves' columns 1..C-1
        firsts = self.first.forward_masked(z, plan, inner)
        middle = plan.join(firsts, inner)
        return [self.shallow(z), *self.second.forward_masked(middle, plan, inner)]


class FractalBlock(nn.Module):
    def __init__(self, columns: int, in_ch: int, out_ch: int, unit: UnitFactory,
                 weight_sharing: str = "none", shared_norms: bool = False) -> None:
        super().__init__()
        self.weight_sharing = weight_sharing
        self.shared_norms = shared_norms and weight_sharing != "none"
        if weight_sharing == "recursive":
            units: PathUnitFactory = RecursiveUnits(unit, shared_norms)
        else:
            def units(in_ch: int, out_ch: int, level: int, role: Role) -> nn.Module:
                return unit(in_ch, out_ch)
        self.path = FractalPath(columns, in_ch, out_ch, units)
        self.pool = nn.MaxPool2d(2)

    def extra_repr(self) -> str:
        if self.weight_sharing == "none":
            return ""
        return f"weight_sharing={self.weight_sharing}, shared_norms={self.shared_norms}"

    def forward(self, x: Tensor, column: int | None = None, drop_prob: float = 0.0,
                checkpointing: bool = False) -> Tensor:
        return self.pool(join(self.path(x, column, drop_prob, checkpointing), drop_prob))

    def forward_masked(self, x: Tensor, plan: MaskPlan) -> Tensor:
        outputs = self.path.forward_masked(x, plan, plan.column)
        return self.pool(plan.join(outputs, plan.column))


class FractalNet(nn.Module):
    def __init__(
        self,
        blocks: int = 5,
        columns: int = 3,
        width: int = 64,
        unit: str = "conv-norm-act-drop",
        norm: str = "batch",
        activation: str = "relu",
        dropout: float = 0.0,
        drop_path: str = "local+global",
        num_classes: int = 10,
        in_chans: int = 3,
        local_drop_prob: float = 0.15,
        grad_checkpointing: bool = False,
        weight_sharing: str = "none",
        shared_norms: bool = False,
        static_drop_path: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        ops = parse_unit(unit, "unit")
        if drop_path not in ("none", "local", "local+global"):
            raise ValueError(f"drop_path {drop_path!r} must be none, local or local+global")
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing {weight_sharing!r} must be none or recursive")
        if static_drop_path and grad_checkpointing:
            raise ValueError("static_drop_path does not go with grad_checkpointing")
        self.columns = columns
        self.drop_path = drop_path if columns > 1 else "none"
        self.local_drop_prob = local_drop_prob
        self.grad_checkpointing = grad_checkpointing
        self.static_drop_path = static_drop_path
        self.variant_name = name
        self.num_classes = num_classes

        def unit_factory(cin: int, cout: int) -> nn.Module:
            return make_unit(cin, cout, ops, norm, activation, dropout)

        widths = [min(width * 2**i, width * 8) for i in range(blocks)]
        self.blocks = nn.ModuleList(
            FractalBlock(columns, cin, cout, unit_factory, weight_sharing, shared_norms)
            for cin, cout in zip([in_chans, *widths[:-1]], widths, strict=True)
        )
        self.num_features = widths[-1]
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(self.num_features, num_classes))

    def extra_repr(self) -> str:
        return f"columns={self.columns}, drop_path={self.drop_path}, p_local={self.local_drop_prob}"

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # timm's name for the switch
        self.grad_checkpointing = enable

    def _drop_plan(self) -> tuple[int | None, float]:
        """(global column or None, local drop probability) for one training mini-batch."""
        if not self.training or self.drop_path == "none":
            return None, 0.0
        if self.drop_path == "local+global" and drop_rng.random() < 0.5:
            return drop_rng.randint(1, self.columns), 0.0
        return None, self.local_drop_prob

    def forward_features(self, x: Tensor, column: int | None = None) -> Tensor:
        if self.static_drop_path and self.training and self.drop_path != "none" and column is None:
            plan = MaskPlan(self.columns, self.drop_path, self.local_drop_prob, x.device)
            for block in self.blocks:
                x = block.forward_masked(x, plan)
            return x
        drop_column, drop_prob = self._drop_plan() if column is None else (column, 0.0)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = block(x, drop_column, drop_prob, checkpointing)
        return x

    def forward(self, x: Tensor, column: int | None = None) -> Tensor:
        """Class scores; `column=k` runs column k of every block alone (anytime prediction)."""
        if column is not None and not 1 <= column <= self.columns:
            raise ValueError(f"column must be in 1..{self.columns}, got {column}")
        return self.head(self.forward_features(x, column))


# timm's config for the model: the defaults create_model fills in (CIFAR-10's classes and
# image size); no weights to download
default_cfgs = generate_default_cfgs({"fractalnet": {"num_classes": 10, "input_size": (3, 32, 32)}})


@register_model
def fractalnet(pretrained: bool = False, **kwargs) -> FractalNet:
    """timm entry point: timm.create_model("fractalnet", blocks=5, columns=3, ...)."""
    if pretrained:  # timm would warn and go on with random weights
        raise ValueError("fractalnet has no pretrained weights")
    return build_model_with_cfg(FractalNet, "fractalnet", pretrained, **kwargs)


def build_model(variant: dict, num_classes: int, in_chans: int, **options) -> FractalNet:
    return FractalNet(**variant, num_classes=num_classes, in_chans=in_chans, **options)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
