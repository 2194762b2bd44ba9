"""Hostile and corrupt images on the loading path of train, predict and the server.

Every input is either loaded as an RGB uint8 array or refused with the project's DataError, within a
time bound (hypothesis' deadline), never a crash or a hang.
"""

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anoseg import profile_config
from anoseg.data import TrainingImages
from anoseg.errors import DataError
from anoseg.fileio import load_image, load_image_bytes, load_mask

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def png_bytes(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2, data: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares any size (checksums right), with the given (possibly short) pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(data if data is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def load_or_refuse(data: bytes, tmp_path: Path) -> np.ndarray | None:
    """Load the bytes through both entry points (file and memory); they must agree."""
    path = tmp_path / "x.img"
    path.write_bytes(data)
    results = []
    for load in (lambda: load_image(path), lambda: load_image_bytes(data, "x.img")):
        start = time.monotonic()
        try:
            arr = load()
        except DataError as e:
            assert "x.img" in str(e) and "\n" not in str(e)
            results.append(None)
        else:
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.size > 0
            results.append(arr)
        assert time.monotonic() - start < 2.0
    a, b = results
    assert (a is None) == (b is None)
    if a is not None:
        assert np.array_equal(a, b)
    return a


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(tmp_path, data):
    load_or_refuse(data, tmp_path)


@FUZZ
@given(st.binary(min_size=1, max_size=64))
def test_random_bytes_after_a_png_signature(tmp_path, tail):
    load_or_refuse(b"\x89PNG\r\n\x1a\n" + tail, tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_truncated_files(tmp_path, fmt, cut):
    rng = np.random.default_rng(0)
    good = encode(Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)), fmt)
    load_or_refuse(good[: int(len(good) * cut)], tmp_path)


@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_a_valid_png(tmp_path, data):
    good = bytearray(encode(Image.fromarray(np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)), "PNG"))
    for _ in range(data.draw(st.integers(1, 8))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    load_or_refuse(bytes(good), tmp_path)


@FUZZ
@given(w=st.integers(1, 64), h=st.integers(1, 64), mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "I;16", "1"]),
       fmt=st.sampled_from(["PNG", "TIFF", "BMP"]))
def test_valid_images_of_any_kind_load_at_their_size(tmp_path, w, h, mode, fmt):
    rng = np.random.default_rng(w * 100 + h)
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        image = base.convert(mode)
    try:
        data = encode(image, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot store this mode; nothing to test
        return
    arr = load_or_refuse(data, tmp_path)
    assert arr is not None and arr.shape == (h, w, 3)


@pytest.mark.parametrize("w,h", [(0, 0), (0, 10), (10, 0)])
def test_zero_pixel_images_are_refused(tmp_path, w, h):
    assert load_or_refuse(png_bytes(w, h), tmp_path) is None


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (1, 2**31 - 1)])
def test_huge_declared_sizes_are_refused_quickly(tmp_path, w, h):
    with pytest.raises(DataError, match="more than|huge|damaged"):
        load_image_bytes(png_bytes(w, h), "bomb.png")
    with pytest.raises(DataError, match=r"more than 1000000 pixels"):
        load_image_bytes(png_bytes(2000, 2000), "big.png", max_pixels=1_000_000)


def test_one_by_100000_loads_and_resizes(tmp_path):
    strip = np.tile(np.arange(256, dtype=np.uint8), 400)[:100_000].reshape(1, 100_000)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    assert load_image(path).shape == (1, 100_000, 3)
    images = TrainingImages.load([path], profile_config("tiny"), progress=False)
    assert images.image(0).shape == (3, 64, 256) and images.image(0, 1).shape == (3, 128, 512)  # capped at aspect 4


def test_palette_with_transparency_and_16bit_grey(tmp_path):
    pal = Image.fromarray(np.array([[0, 1], [2, 3]], dtype=np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    pal.info["transparency"] = 0
    arr = load_or_refuse(encode(pal, "PNG"), tmp_path)
    assert arr.tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [9, 9, 9]]]
    grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert load_or_refuse(encode(grey16, "PNG"), tmp_path).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_empty_upload():
    with pytest.raises(DataError, match="upload.png: empty file"):
        load_image_bytes(b"", "upload.png")


@FUZZ
@given(st.binary(max_size=2048))
def test_masks_from_random_bytes(tmp_path, data):
    path = tmp_path / "m_mask.png"
    path.write_bytes(data)
    try:
        mask = load_mask(path)
    except DataError as e:
        assert "m_mask.png" in str(e)
    else:
        assert mask.dtype == bool and mask.ndim == 2
