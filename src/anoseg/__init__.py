"""anoseg: AnoSeg anomaly segmentation (Song et al., arXiv 2110.03396) for industrial inspection.

Maps and masks use 1 = defect. See :mod:`anoseg.api` for the Python API.
"""

from .api import demo, evaluate, load, predict, save_synthetic_examples, train, train_detector
from .config import Config, profile_config
from .errors import AnosegError, ConfigError, DataError, ModelFileError, OutputError
from .inference import AnoSegModel

__all__ = [
    "AnoSegModel", "AnosegError", "Config", "ConfigError", "DataError", "ModelFileError", "OutputError",
    "demo", "evaluate", "load", "predict", "profile_config", "save_synthetic_examples", "train",
    "train_detector",
]
__version__ = "0.1.0"
