"""One large photo in predict: peak memory stays a small multiple of the image itself."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("resource")

# The peak is VmHWM where Linux has it: ru_maxrss keeps the high-water mark of the parent that spawned the child
# (vfork + exec), so after the test process has trained a model it reports the test process's size.
CHILD = """
import os, resource, sys
from anoseg.cli import main
code = main(sys.argv[1:])
if os.path.exists("/proc/self/status"):
    print("PEAK_KB", [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
else:
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


def test_overlay_in_bands_equals_the_whole_image_computation(monkeypatch, tmp_path):
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
    assert np.array_equal(vis.overlay(image, amap, amap > 0.5), expected)
    vis.save_overlay(tmp_path / "overlay.png", image, amap, amap > 0.5)  # what predict writes, band by band
    assert np.array_equal(np.asarray(Image.open(tmp_path / "overlay.png")), expected)
    for w in (1, 3, 9):  # outlines of any width, cut into bands, are the whole-map ones
        full = vis.outline(amap > 0.5, w)
        bands = np.concatenate([vis._outline_rows(amap > 0.5, w, r, min(7, 301 - r)) for r in range(0, 301, 7)])
        assert np.array_equal(full, bands), w


PICTURES_CHILD = """
import os, sys
import numpy as np
from pathlib import Path
from anoseg.fileio import load_image
from anoseg.visualize import save_map_png16, save_overlay
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
image = load_image(sys.argv[1])
amap = np.zeros(image.shape[:2], np.float32)
amap[1000:3000, 2000:5000] = 0.9  # one defect region, outlined
save_overlay(Path(sys.argv[2]) / "overlay.png", image, amap, amap > 0.5)
save_map_png16(Path(sys.argv[2]) / "map.png", amap)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print("RATIO", (int(hwm.split()[1]) * 1024 - base) / image.nbytes)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for the resident size")
def test_a_large_png_is_read_and_its_pictures_written_in_bands(tmp_path):
    # decoding took Pillow's image plus its whole-image byte string, built twice; writing the overlay and the
    # 16-bit map took whole Pillow pictures. Now both go in bands: the image, the map and Pillow's decoded
    # copy are about all (measured: 2.4 image sizes over the start, 3.8 before)
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    small.resize((6000, 6000)).save(tmp_path / "big.png", compress_level=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", PICTURES_CHILD, str(tmp_path / "big.png"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    ratio = float(proc.stdout.split("RATIO")[1])
    print("RATIO", ratio)
    assert ratio < 3.1, f"{ratio:.2f} image sizes over the start"
    assert np.asarray(Image.open(tmp_path / "overlay.png")).shape == (6000, 6000, 3)
    assert np.asarray(Image.open(tmp_path / "map.png")).max() == round(0.9 * 65535)
