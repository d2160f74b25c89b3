"""Several GPUs on one host: the GPU each of `--workers N` trains on, and how much of a shared
GPU's memory each may take.

The launcher places worker i (counting from 0) on GPU i mod G of the G GPUs it sees, by giving
the worker process `CUDA_VISIBLE_DEVICES=<that GPU>`: each worker sees one device, `cuda:0`.
More workers than GPUs share them, as several workers share one GPU today. Each trial records
its placement as params `gpu` (the GPU as the host's CUDA_VISIBLE_DEVICES, or its index, names
it) and `gpu_workers` (how many workers of the launcher train on it).

Environment (read here, without importing torch at module level):
- FRACTAL_GPU_COUNT: place the workers on this many GPUs instead of the number CUDA reports:
  fewer than the host has, or, in tests on a CPU, GPUs that are not there (the placement is
  then made and recorded, and the trials train on the device --device gives).
- FRACTAL_GPU_MEMORY_SHARE: unset (the default): no cap, a worker's CUDA allocator may take
  what the GPU has free; `even`: each of the k workers on a GPU may take 1/k of its memory;
  a number in (0, 1]: each worker may take that fraction. A capped worker that needs more is
  out of memory (FAIL "CUDA out of memory", tried again later) even when the GPU has memory
  free; without a cap a large variant can use what a small one next to it leaves.
"""

from __future__ import annotations

import os

from fractal_mlops.errors import ConfigError

GPU_COUNT_ENV = "FRACTAL_GPU_COUNT"
MEMORY_SHARE_ENV = "FRACTAL_GPU_MEMORY_SHARE"
# Set by the launcher for each worker it places: "<gpu>/<workers on that gpu>"
WORKER_GPU_ENV = "FRACTAL_WORKER_GPU"


def injected_gpu_count() -> int | None:
    """FRACTAL_GPU_COUNT, checked (bad input: ConfigError); None when unset."""
    value = os.environ.get(GPU_COUNT_ENV)
    if value is None or value.strip() == "":
        return None
    if not value.strip().isdigit():
        raise ConfigError(f"{GPU_COUNT_ENV} must be a whole number of GPUs, got {value!r}")
    return int(value)


def memory_share() -> str | float | None:
    """FRACTAL_GPU_MEMORY_SHARE, checked: None (no cap), "even", or a fraction in (0, 1]."""
    value = os.environ.get(MEMORY_SHARE_ENV, "").strip()
    if value in ("", "none"):
        return None
    if value == "even":
        return value
    try:
        fraction = float(value)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction <= 1:
        raise ConfigError(f"{MEMORY_SHARE_ENV} must be 'even' or a fraction in (0, 1], "
                          f"got {value!r}")
    return fraction


def visible_gpus(device_type: str) -> list[str]:
    """The GPUs the launcher places its workers on, as a worker's CUDA_VISIBLE_DEVICES names
    them: the first of this process's CUDA_VISIBLE_DEVICES entries (indices, UUIDs or MIG
    names), else indices from 0; as many as FRACTAL_GPU_COUNT says, else as CUDA reports."""
    count = injected_gpu_count()
    if count is None:
        if device_type != "cuda":
            return []
        import torch

        count = torch.cuda.device_count()
    listed = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
              if name.strip()]
    if listed:  # the host's own list bounds what its workers may see
        return listed[:count]
    return [str(index) for index in range(count)]


def placements(workers: int, gpus: list[str]) -> list[dict[str, str]]:
    """Each worker's environment for its GPU: worker i on gpus[i mod G] ({} without GPUs)."""
    if not gpus:
        return [{} for _ in range(workers)]
    sharing = {gpu: sum(gpus[i % len(gpus)] == gpu for i in range(workers)) for gpu in gpus}
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)],
             WORKER_GPU_ENV: f"{gpus[i % len(gpus)]}/{sharing[gpus[i % len(gpus)]]}"}
            for i in range(workers)]


def placement() -> tuple[str, int] | None:
    """(gpu, workers on it) that the launcher gave this worker, or None."""
    value = os.environ.get(WORKER_GPU_ENV)
    if not value or "/" not in value:
        return None
    gpu, _, sharers = value.rpartition("/")
    return gpu, int(sharers) if sharers.isdigit() else 1


def memory_fraction() -> float | None:
    """The share of its GPU this worker may take (FRACTAL_GPU_MEMORY_SHARE), or None: no cap."""
    share = memory_share()
    if share == "even":
        placed = placement()
        return 1.0 / placed[1] if placed else None
    return share


def placement_params(device_type: str) -> dict[str, str | int | float]:
    """What a trial run records of its worker's placement (nothing when it was not placed)."""
    placed = placement()
    params: dict[str, str | int | float] = {}
    if placed is not None:
        params.update(gpu=placed[0], gpu_workers=placed[1])
    fraction = memory_fraction()
    if fraction is not None and device_type == "cuda":
        params["gpu_memory_fraction"] = round(fraction, 4)
    return params


def cap_memory(device) -> float | None:
    """Apply memory_fraction() to a CUDA device (torch's caching allocator); the fraction."""
    fraction = memory_fraction()
    if fraction is None or device.type != "cuda":
        return None
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
