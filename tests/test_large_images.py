"""One large photo in predict: peak memory stays a small multiple of the image itself."""

import os
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
    # before the fix this image took about 2 GB (float64 colour map, float copies of the image); after it,
    # 0.7-0.9 GB depending on the installed versions, most of it the interpreter with torch loaded
    assert peak_mb < 1200, f"peak {peak_mb:.0f} MB"
    assert Image.open(tmp_path / "out" / "big_overlay.png").size == (6000, 4000)


def test_overlay_in_bands_equals_the_whole_image_computation(monkeypatch):
    import anoseg.visualize as vis

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (301, 257, 3), dtype=np.uint8)
    blobs = np.kron(rng.random((11, 9)), np.ones((28, 29)))[:301, :257]  # regions larger than the bands
    amap = np.clip(blobs + 0.05 * rng.random((301, 257)), 0, 1).astype(np.float32)
    width = max(1, round(301 / 256))
    whole = (image.astype(np.float32) * 0.55 + vis._jet_lut().astype(np.float32)[vis._lut_index(amap)] * 0.45)
    expected = whole.astype(np.uint8)
    expected[vis.outline(amap > 0.5, width)] = vis.OUTLINE_RGB
    monkeypatch.setattr(vis, "ROWS_PER_CHUNK", 7)  # many band edges
    assert np.array_equal(vis.overlay(image, amap, 0.5), expected)
    assert np.array_equal(np.asarray(vis.overlay_image(image, amap, 0.5)), expected)
    for w in (1, 3, 9):  # outlines of any width, cut into bands, are the whole-map ones
        full = vis.outline(amap > 0.5, w)
        bands = np.concatenate([vis._outline_rows(amap, 0.5, w, r, min(7, 301 - r)) for r in range(0, 301, 7)])
        assert np.array_equal(full, bands), w


CHILD_WITH_BASE = """
import os, resource, sys
from anoseg.cli import main
print("BASE_KB", int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024)
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for the resident size")
def test_a_large_png_in_predict_costs_under_four_image_copies(tiny_model_dir, tmp_path):
    # an 81 MP PNG took 1.32 GB: Pillow's whole-image byte string (made twice) when decoding, a whole overlay and
    # 16-bit map picture when encoding. Now pixels leave Pillow, and the PNGs are written, in bands of rows
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    small.resize((6000, 6000)).save(tmp_path / "big.png", compress_level=1)
    proc = subprocess.run([sys.executable, "-c", CHILD_WITH_BASE, "predict", str(tiny_model_dir),
                           str(tmp_path / "big.png"), "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    base = int(proc.stdout.split("BASE_KB")[1].split()[0]) * 1024
    peak = int(proc.stdout.split("PEAK_KB")[1]) * 1024
    image_bytes = 6000 * 6000 * 3
    # the image, its full-size float32 map (4/3 of it), Pillow's decoded copy (4/3) and the model's work must
    # fit: 3.2 image sizes over the start here, 5.1 before (bands of a few MB are all that is added)
    assert (peak - base) / image_bytes < 4.0, f"{(peak - base) / 2**20:.0f} MB over the start"
    out = np.asarray(Image.open(tmp_path / "out" / "big_overlay.png"))
    assert out.shape == (6000, 6000, 3)
