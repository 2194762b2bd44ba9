"""Where and how the networks run: the device, the precision (bfloat16 where native) and torch.compile."""

from __future__ import annotations

import contextlib
import functools
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .config import Config
from .errors import AnosegError
from .models import Generator


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise AnosegError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AnosegError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bfloat16 in hardware: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated, slower than fp32.
    """
    if device.type == "cuda":  # emulated bf16 (GPUs before Ampere) counts as not native
        return torch.cuda.is_available() and torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


BF16_MIN_GAIN = 0.9  # bf16 is taken on a CPU only if its step takes under this share of fp32's


def cpu_step_seconds(repeats: int = 5) -> dict[str, float]:
    """CPU seconds of the cheapest of `repeats` training steps of the default generator on one thread and a small
    batch (8 x 64 px), in bf16 autocast and in fp32. CPU time, not wall time, so that other work on the machine
    does not decide; the process's random state and thread count are left as they were.

    The hardware flags do not say which is faster: with AVX512-BF16 and no AMX, one CPU ran the generator's
    step in 0.62 x fp32's time and another in 1.2-1.3 x (docs/design.md).
    """
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {"bf16": [], "fp32": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # idle threads spin: with more, their waiting would count as CPU time
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(0)
            net = Generator(Config())
            x = torch.rand(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
            for rep in range(repeats + 1):
                for precision in times:
                    start = time.process_time()
                    with _autocast_as(precision, cpu):
                        _, amap = net(x, reconstruct=False)
                    amap.float().mean().backward()
                    if rep:  # the first of each is a warm-up
                        times[precision].append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    return {p: min(t) for p, t in times.items()}


@functools.cache
def _bf16_faster_on_this_cpu() -> bool:
    t = cpu_step_seconds()
    return t["bf16"] < BF16_MIN_GAIN * t["fp32"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision the networks run in: `precision` itself, or for "auto" bf16 where the hardware has it and
    (on a CPU) a timed step says it is faster, else fp32."""
    if precision != "auto":
        return precision
    if not native_bf16(device):
        return "fp32"
    return "bf16" if device.type == "cuda" or _bf16_faster_on_this_cpu() else "fp32"


def autocast(precision: str, device: torch.device):
    """bfloat16 autocast for the networks when `precision` is (or resolves to) bf16.

    In fp32 no autocast region is entered at all, so traced graphs (ONNX export) stay as they were.
    """
    return _autocast_as(resolve_precision(precision, device), device)


def _autocast_as(precision: str, device: torch.device):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class _CompiledOrEager:
    """A torch.compile'd callable that falls back to the plain one, with a warning, if compiling fails.

    torch.compile is lazy: it fails at the first call, not when asked for, so the fallback lives here.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn, self.compiled = fn, torch.compile(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly instead
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running without it",
                              stacklevel=2)
                self.compiled = None
        return self.fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # parameters(), train(), ... of the wrapped module
        return getattr(self.fn, name)


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    return _CompiledOrEager(fn) if enabled else fn
