"""anoseg: AnoSeg anomaly segmentation (Song et al., arXiv 2110.03396) for industrial inspection.

Maps and masks use 1 = defect. See :mod:`anoseg.api` for the Python API.

The API is loaded on first use: ``import anoseg.config`` (settings only) does not load PyTorch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .config import Config, profile_config
from .errors import AnosegError, ConfigError, DataError, ModelFileError, OutputError

# name -> module that defines it; loaded when first asked for
_LAZY = {name: "api" for name in ("calibrate", "demo", "evaluate", "load", "predict", "save_synthetic_examples",
                                  "train", "train_detector")}
_LAZY["AnoSegModel"] = "inference"

__all__ = [
    "AnoSegModel", "AnosegError", "Config", "ConfigError", "DataError", "ModelFileError", "OutputError",
    "calibrate", "demo", "evaluate", "load", "predict", "profile_config", "save_synthetic_examples", "train",
    "train_detector",
]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """The package, with the API functions resolved lazily.

    Some functions share their name with a module (``train``, ``evaluate``, ``predict``, ``demo``). When
    such a module is imported, Python sets it as an attribute of the package; that is refused here, so
    ``anoseg.train`` is always the function (the module stays reachable as ``sys.modules["anoseg.train"]``).
    """

    def __getattr__(self, name: str) -> Any:
        if name not in _LAZY:
            raise AttributeError(f"module 'anoseg' has no attribute {name!r}")
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_LAZY))


sys.modules[__name__].__class__ = _Package
