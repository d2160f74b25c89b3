"""What a trained network costs at inference: FLOPs, latency and throughput.

    cost = inference_cost(model, (1, 8, 8), device)   # {"flops", "latency_ms", "throughput_img_s"}

- `flops`: one forward pass of the whole network (every column, eval mode) for one image, as
  torch's FlopCounterMode counts it (convolutions and the linear head; norms, activations,
  joins and pooling are not counted). Exact and the same on every machine.
- `latency_ms`: wall time of one forward pass at batch 1 on `device`, the median of
  LATENCY_CALLS timed calls after WARMUP_CALLS untimed ones (CUDA: synchronized around each).
  It measures the machine as much as the network: another process on the same cores moves it.
- `throughput_img_s`: images per second at batch THROUGHPUT_BATCH (the best of
  THROUGHPUT_CALLS timed calls after one warm-up).

Both timings run under `autocast` (the trial's precision) and in the trial's memory format, so
they describe the network as it was trained; FLOPs do not depend on either.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

WARMUP_CALLS = 3
LATENCY_CALLS = 21
THROUGHPUT_BATCH = 128
THROUGHPUT_CALLS = 3
COST_METRICS = ("flops", "latency_ms", "throughput_img_s")


@torch.no_grad()
def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of the whole network's forward pass for one image (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def _timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes (CUDA: the kernels it queued included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def inference_cost(model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   channels_last: bool = False) -> dict[str, float]:
    """flops, latency_ms and throughput_img_s of `model` (see the module's docstring)."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def images(batch: int) -> torch.Tensor:
        x = torch.randn(batch, *input_shape, device=device, dtype=dtype)
        return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x

    def run(x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with autocast():
                return model(x)
        return call

    try:
        one, many = images(1), images(THROUGHPUT_BATCH)
        for _ in range(WARMUP_CALLS):
            run(one)()
        latency = statistics.median(_timed(run(one), device) for _ in range(LATENCY_CALLS))
        run(many)()
        best = min(_timed(run(many), device) for _ in range(THROUGHPUT_CALLS))
    finally:
        model.train(was_training)
    return {"flops": forward_flops(model, input_shape), "latency_ms": latency * 1000.0,
            "throughput_img_s": THROUGHPUT_BATCH / best}
