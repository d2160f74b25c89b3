"""The device a trial trains on: which one, which autocast dtype, what it records about it,
and its memory (per-epoch peaks, the CUDA cache released between trials)."""

from __future__ import annotations

import contextlib
import gc
import platform
import resource
from pathlib import Path

import torch

from fractal_mlops.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but CUDA is not available on this machine")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is unknown (expected auto, cpu or cuda)")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 / AMX: without them, bf16 autocast on the CPU is many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the hardware has it (CUDA, CPUs with native bf16), fp16 (with a
    GradScaler) on CUDA without bf16, else off (fp32)."""
    if mode == "off":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("training.amp fp16 needs CUDA; use bf16 or auto on the CPU")
    if mode == "auto":
        if device.type == "cuda":
            # emulated bf16 (V100, T4) is slow: those GPUs get fp16 with a GradScaler
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def runtime_params(device: torch.device) -> dict[str, str]:
    """What a run depends on besides its config and its precision (engine/precision.py): the
    device's model, torch's version and, on CUDA, the CUDA and cuDNN versions (reproduce
    compares them)."""
    params = {"torch_version": torch.__version__}
    if device.type == "cuda":
        params.update(device_name=torch.cuda.get_device_name(device),
                      cuda_version=str(torch.version.cuda), cudnn_version=str(
                          torch.backends.cudnn.version()))
    else:
        params["device_name"] = cpu_model()
    return params


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine() or "cpu"


def release_memory(device: torch.device) -> None:
    """Between trials: what the last one left in the CUDA cache goes back to the GPU (other
    workers on it may need it; an out-of-memory trial is retried)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class PeakMemory:
    """Per-epoch peak memory: the process's resident set (always) and CUDA allocations."""

    _clear_refs = Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM)
            self._clear_refs.write_text("5")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def host_mb(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak, KiB

    def gpu_mb(self) -> tuple[float, float] | tuple[None, None]:
        """(peak allocated, peak reserved) since the last reset, in MiB; (None, None) off CUDA.
        Resets the peaks, so the next call measures the next phase."""
        if self.device.type != "cuda":
            return None, None
        peaks = (torch.cuda.max_memory_allocated(self.device) / 2**20,
                 torch.cuda.max_memory_reserved(self.device) / 2**20)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peaks
