"""What the hardware computes natively: the dtype that ``--dtype auto`` picks."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16).

    Without either, PyTorch emulates bf16 matmuls on the CPU and they run several times slower than fp32.
    """
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:  # pragma: no cover - probes that can't run count as absent
            continue
    return False


def native_bf16(device: torch.device) -> bool:
    """bf16 is native on CUDA devices that support it and on CPUs with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def auto_dtype(device: torch.device) -> torch.dtype:
    """``--dtype auto``: bf16 where the hardware has it, fp32 elsewhere."""
    return torch.bfloat16 if native_bf16(device) else torch.float32
