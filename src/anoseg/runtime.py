"""Where and how the networks run: the device, the precision (bfloat16 where native) and torch.compile."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import AnosegError


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
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated, slower than fp32.
    """
    if device.type == "cuda":  # emulated bf16 (GPUs before Ampere) counts as not native
        return torch.cuda.is_available() and torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision the networks run in: `precision` itself, or for "auto" bf16 where native, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bfloat16 autocast for the networks when `precision` is (or resolves to) bf16.

    In fp32 no autocast region is entered at all, so traced graphs (ONNX export) stay as they were.
    """
    if resolve_precision(precision, device) != "bf16":
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
