"""Which precision (autocast dtype) and memory format a network trains in, and the candidates
`training.amp: auto` / `training.memory_format: auto` choose from (autotune.py times them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fractal_mlops.config.sections import TrainConfig
from fractal_mlops.engine.device import cpu_has_native_bf16, resolve_amp

DTYPE_NAMES = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Precision:
    """How a network trains: the autocast dtype (None: fp32) and the memory format."""

    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        """e.g. `bfloat16/channels_last`."""
        return f"{DTYPE_NAMES[self.amp_dtype]}/{self.memory_format}"

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def params(self) -> dict[str, str]:
        """The run params that record it (reproduce and a resumed trial replay them)."""
        return {"amp_dtype": DTYPE_NAMES[self.amp_dtype], "memory_format": self.memory_format}

    @classmethod
    def from_params(cls, params: dict[str, str], settings: TrainConfig,
                    device: torch.device) -> Precision:
        """The precision a run recorded; a run from before memory_format was recorded trained
        in the format its config names (auto did not exist then)."""
        dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
        fallback = fixed(settings, device)
        amp = dtypes.get(params.get("amp_dtype", ""), fallback.amp_dtype)
        memory_format = params.get("memory_format", fallback.memory_format)
        return cls(amp, memory_format == "channels_last")


def candidates(settings: TrainConfig, device: torch.device) -> list[Precision]:
    """What `choose` times: one candidate when the config fixes both."""
    if settings.amp == "auto" and device.type == "cpu":
        # bf16 only where the CPU has it natively: emulated, it is 10-60x slower than fp32
        dtypes: list[torch.dtype | None] = [None, torch.bfloat16] if cpu_has_native_bf16() else [None]
    else:
        dtypes = [resolve_amp(settings.amp, device)]  # CUDA auto: bf16, else fp16 (as before)
    mode = settings.memory_format_mode
    formats = [False, True] if mode == "auto" else [mode == "channels_last"]
    return [Precision(dtype, channels_last) for dtype in dtypes for channels_last in formats]


def fixed(settings: TrainConfig, device: torch.device) -> Precision:
    """Without measuring: the rule-based amp dtype, and channels_last only when asked for."""
    return Precision(resolve_amp(settings.amp, device),
                     settings.memory_format_mode == "channels_last")
