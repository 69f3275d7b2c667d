"""Whether training steps run under bf16 autocast: the config's `amp` resolved on the worker's own device.

`amp`: none | gpu (CUDA only) | auto (CUDA, and CPUs with native bf16 matrix instructions, AVX512-BF16 or AMX; fp32
on other CPUs, where emulated bf16 is slower than fp32) | all (every device). Not on / off: YAML reads those as
booleans. The former boolean still reads: true = gpu, false = none. Imports torch only when asked about the CPU, so
the config (pydantic) and the GPU scripts (raw YAML) share it.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

AmpMode = Literal["none", "gpu", "auto", "all"]
AMP_MODES: tuple[str, ...] = get_args(AmpMode)


def amp_mode(value: Any) -> Any:
    """The former boolean `amp` as its mode (true: gpu, false: none); anything else unchanged (validated later)."""
    return ("gpu" if value else "none") if isinstance(value, bool) else value


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast is faster."""
    import torch

    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


def use_bf16(amp: Any, device_type: str) -> bool:
    """Whether the steps on `device_type` ("cpu", "cuda", ...) run under bf16 autocast for the config's `amp`."""
    amp = amp_mode(amp)
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp {amp!r} ({' | '.join(AMP_MODES)})")
    if amp in ("none", "all"):
        return amp == "all"
    return device_type == "cuda" or (amp == "auto" and device_type == "cpu" and cpu_has_bf16())
