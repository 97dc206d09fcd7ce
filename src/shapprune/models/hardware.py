"""Which dtype ``--dtype auto`` picks: the one the hardware multiplies faster, measured where it is not known.

Rules:

- CUDA: bf16 where the device supports it, else fp32.
- A CPU without AMX or AVX512-BF16 emulates bf16 matmuls (several times slower than fp32): fp32.
- A CPU with either may still run bf16 matmuls slower than fp32 (AVX512-BF16 without AMX can), so there bf16
  is picked only when a short probe measures bf16 matmuls faster than fp32 at the model's shapes (a
  ``[tokens, hidden] × [hidden, intermediate]`` product, best of a few repetitions of each, well under a
  second). The answer is cached per CPU, torch version, thread count and shape in the user cache
  (``bf16-probe.json``), so the probe runs once per machine.
- ``$SHAPPRUNE_CPU_BF16`` = ``yes`` / ``no`` decides without probing (``auto``, the default, probes);
  ``--dtype`` always overrides all of this.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_BF16_ENV = "SHAPPRUNE_CPU_BF16"
#: the shape probed when the model's is unknown: ``(tokens, hidden, intermediate)``
DEFAULT_SHAPE = (256, 1024, 4096)
#: bf16 must be at least this much faster than fp32 to be picked (a tie keeps fp32's exactness)
MIN_SPEEDUP = 1.10


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16).

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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _time_matmul(dtype: torch.dtype, shape: tuple[int, int, int], reps: int) -> float:
    t, h, f = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g).to(dtype)
    w = torch.randn(f, h, generator=g).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(x, w)  # warm-up: kernel selection, first-touch of the buffers
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t0)
    return best


def measure_bf16_speedup(shape: tuple[int, int, int] = DEFAULT_SHAPE, reps: int = 5) -> float:
    """fp32 time over bf16 time of one ``[tokens, hidden] × [hidden, intermediate]`` product (> 1: bf16 is
    faster); the best of ``reps`` repetitions of each."""
    return _time_matmul(torch.float32, shape, reps) / _time_matmul(torch.bfloat16, shape, reps)


def _probe_file() -> Path:
    from shapprune.models.sources import user_cache_dir

    return user_cache_dir() / "bf16-probe.json"


def _probe_key(shape: tuple[int, int, int]) -> str:
    return f"{cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{'x'.join(map(str, shape))}"


def cpu_bf16_speedup(shape: tuple[int, int, int] = DEFAULT_SHAPE) -> float:
    """:func:`measure_bf16_speedup`, cached in the user cache per CPU, torch version, threads and shape."""
    path, key = _probe_file(), _probe_key(shape)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), int | float):
        return float(cached[key])
    speedup = measure_bf16_speedup(shape)
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = round(speedup, 4)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # an unwritable cache only costs a probe next time
        log.debug("could not cache the bf16 probe in %s (%s)", path, exc)
    return speedup


def choose_dtype(device: torch.device, shape: tuple[int, int, int] | None = None) -> DtypeChoice:
    """``--dtype auto`` for ``device`` and a model of ``shape`` ``(tokens, hidden, intermediate)``."""
    if device.type == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return DtypeChoice(torch.bfloat16 if ok else torch.float32,
                           "CUDA device supports bf16" if ok else "CUDA device without bf16")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"{device.type}: fp32")
    setting = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if setting in ("yes", "1", "true", "on"):
        return DtypeChoice(torch.bfloat16, f"${CPU_BF16_ENV}={setting}")
    if setting in ("no", "0", "false", "off"):
        return DtypeChoice(torch.float32, f"${CPU_BF16_ENV}={setting}")
    if not cpu_has_native_bf16():
        return DtypeChoice(torch.float32, "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated)")
    shape = tuple(shape or DEFAULT_SHAPE)
    speedup = cpu_bf16_speedup(shape)
    dims = "x".join(map(str, shape))
    if speedup >= MIN_SPEEDUP:
        return DtypeChoice(torch.bfloat16, f"bf16 matmuls measured {speedup:.2f}x as fast as fp32 at {dims} here")
    return DtypeChoice(torch.float32, f"bf16 matmuls measured {speedup:.2f}x the speed of fp32 at {dims} here "
                                      f"(bf16 is picked from {MIN_SPEEDUP:.2f}x)")


def native_bf16(device: torch.device) -> bool:
    """Whether ``--dtype auto`` picks bf16 on ``device`` (for a model of the default shape)."""
    return choose_dtype(device).dtype == torch.bfloat16


def auto_dtype(device: torch.device, shape: tuple[int, int, int] | None = None) -> torch.dtype:
    """``--dtype auto``: :func:`choose_dtype`'s dtype."""
    return choose_dtype(device, shape).dtype
