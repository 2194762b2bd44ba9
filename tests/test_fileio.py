"""Loading every common image kind, and clear errors for broken files."""

import io

import numpy as np
import pytest
from PIL import Image

from anoseg.errors import DataError
from anoseg.fileio import load_image, load_mask, safe_name, write_text_atomic


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16", "I", "F", "1", "CMYK"])
def test_modes_load_as_rgb_uint8(tmp_path, mode):
    im = Image.new("RGB", (7, 5), (200, 100, 50)).convert(mode)
    suffix = "tiff" if mode in ("F", "CMYK", "I") else "png"
    arr = load_image(_save(tmp_path, f"x.{suffix}", im))
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8


def test_16bit_scaled_to_8bit(tmp_path):
    arr16 = np.array([[0, 65535, 32896]], dtype=np.uint16)
    p = _save(tmp_path, "x.png", Image.fromarray(arr16))
    assert load_image(p)[0, :, 0].tolist() == [0, 255, 128]


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_formats(tmp_path, fmt):
    p = _save(tmp_path, f"x.{fmt.lower()}", Image.new("RGB", (9, 4), (10, 20, 30)), format=fmt)
    assert load_image(p).shape == (4, 9, 3)


def test_rgba_drops_alpha(tmp_path):
    p = _save(tmp_path, "x.png", Image.new("RGBA", (3, 3), (10, 20, 30, 0)))
    assert load_image(p)[0, 0].tolist() == [10, 20, 30]


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello")
    with pytest.raises(DataError, match="notes.png: not an image"):
        load_image(p)


def test_truncated_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match="cut.png: damaged or truncated"):
        load_image(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("high", [1, 255])
def test_mask_conventions(tmp_path, high):
    arr = np.array([[0, high], [high, 0]], dtype=np.uint8)
    m = load_mask(_save(tmp_path, "m.png", Image.fromarray(arr)))
    assert m.tolist() == [[False, True], [True, False]]


def test_mask_16bit(tmp_path):
    arr = np.array([[0, 65535]], dtype=np.uint16)
    assert load_mask(_save(tmp_path, "m.png", Image.fromarray(arr))).tolist() == [[False, True]]


@pytest.mark.parametrize("name,expected", [("../../etc/passwd", "etc__passwd"), ("a/b c.png", "a__b_c.png"),
                                           ("..", "image"), ("/abs/x", "abs__x")])
def test_safe_name_stays_inside(name, expected):
    assert safe_name(name) == expected


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    write_text_atomic(p, "one")
    write_text_atomic(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    from anoseg.fileio import load_image_bytes

    stored = np.zeros((100, 200, 3), np.uint8)  # stored 200 wide, 100 high
    stored[:, :20] = 255  # a white band at the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": viewers show it 100 wide, 200 high
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "phone.jpg")
    assert shown.shape == (200, 100, 3)
    assert shown[:20].mean() > 200 and shown[-20:].mean() < 50  # the band is now at the top
    assert load_image_bytes((tmp_path / "phone.jpg").read_bytes()).shape == (200, 100, 3)
    Image.fromarray(stored[..., 0]).save(tmp_path / "mask.png", exif=exif)
    mask = load_mask(tmp_path / "mask.png")
    assert mask.shape == (200, 100) and mask[:20].all() and not mask[-20:].any()


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o640  # 0666 less the umask, as any new file


@pytest.mark.parametrize("kind", ["rgb8", "grey16"])
def test_png_written_in_bands_has_the_same_pixels_as_pillow(tmp_path, kind):
    from anoseg.fileio import save_png_bands

    rng = np.random.default_rng(0)
    shape, dtype, top = ((301, 257, 3), np.uint8, 256) if kind == "rgb8" else ((301, 257), np.uint16, 65536)
    noise = rng.integers(0, top, shape).astype(dtype)
    smooth = np.linspace(0, top - 1, shape[0] * shape[1]).astype(dtype).reshape(shape[:2])
    smooth = smooth if kind == "grey16" else np.repeat(smooth[..., None], 3, axis=2)
    picture = np.concatenate([noise[:150], smooth[150:]])  # rows that pick different PNG filters
    bands = [picture[r:r + 70] for r in range(0, shape[0], 70)]  # band edges inside the 64-row filter strips
    save_png_bands(tmp_path / "a.png", shape[0], shape[1], bands)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), picture)
    with pytest.raises(ValueError, match="rows"):  # fewer rows than declared: no file left behind
        save_png_bands(tmp_path / "b.png", shape[0] + 1, shape[1], iter(bands))
    assert not (tmp_path / "b.png").exists() and not list(tmp_path.glob(".b.png*"))
