"""One large photo in predict: peak memory stays a small multiple of the image itself."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("resource")

CHILD = """
import resource, sys
from anoseg.cli import main
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def test_a_24_megapixel_jpeg_in_predict_stays_small(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    small.resize((6000, 4000)).save(tmp_path / "big.jpg", quality=85)  # 24 MP: 72 MB as RGB uint8
    proc = subprocess.run([sys.executable, "-c", CHILD, "predict", str(tiny_model_dir), str(tmp_path / "big.jpg"),
                           "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.split("PEAK_KB")[1]) / 1024
    # before the fix this image took about 2 GB (float64 colour map, float copies of the image)
    assert peak_mb < 800, f"peak {peak_mb:.0f} MB"
    assert Image.open(tmp_path / "out" / "big_overlay.png").size == (6000, 4000)
