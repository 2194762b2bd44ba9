from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout category, shared by the slower tests."""
    from anoseg.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), size=64, n_train=16, n_test_good=4, n_test_defect=3)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_root) -> Path:
    """A tiny model trained for a few steps (fast; quality is not the point), in fp32 on any CPU: tests compare
    maps to ONNX Runtime's and to each other at a tolerance bf16's rounding would exceed."""
    from anoseg import profile_config, train

    out = tmp_path_factory.mktemp("model")
    cfg = profile_config("tiny", steps=6, checkpoint_every=3, batch_size=4, precision="fp32")
    train(cfg, demo_root, out, progress=False)
    return out


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model that a test may change."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    return folder


@pytest.fixture(scope="session")
def detector_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model with a detector trained for a few steps."""
    import shutil

    from anoseg import train_detector

    folder = tmp_path_factory.mktemp("det") / "model"
    shutil.copytree(tiny_model_dir, folder)
    train_detector(folder, overrides={"detector_steps": 3}, progress=False)
    return folder
