"""Reading images and masks of any common kind, and writing files atomically."""

from __future__ import annotations

import io
import os
import re
import secrets
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, ImageError, OutputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Refuse images whose declared size is absurd before decoding them (decompression bombs).
MAX_PIXELS = 100_000_000


def _open(path: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a one-line DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image")
    return _decode(path, str(path), max_pixels)


def _decode(source: Path | io.BytesIO, label: str, max_pixels: int,
            formats: tuple[str, ...] | None = None) -> Image.Image:
    """Decode from a file or an in-memory buffer; the declared size is checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("error", message="Truncated File Read")  # TIFF: else a half-read image
            im = Image.open(source, formats=formats)
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{label}: image is {w}x{h}, more than {max_pixels} pixels", "too_large")
            if w == 0 or h == 0:
                raise ImageError(f"{label}: image has no pixels ({w}x{h})", "no_pixels")
            im.load()
    except DataError:
        raise
    except UnidentifiedImageError:
        kinds = ", ".join(formats) if formats else "a format Pillow cannot read"
        raise ImageError(f"{label}: not an image file (or {kinds})" if formats is None else
                         f"{label}: not an image of a supported type ({kinds})", "not_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: image declares a huge size (decompression bomb?)", "too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError, UserWarning) as e:
        raise ImageError(f"{label}: damaged or truncated image ({e})", "damaged") from None
    return _upright(im)


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos), so pixels, maps and masks are the way every viewer shows them."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF: Pillow raises many kinds; the pixels stay as stored
        return im
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def _to_float_gray_or_rgb(im: Image.Image) -> np.ndarray:
    """Pixel values as float32 in [0, 1], HxW or HxWxC, whatever the bit depth."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        im = im.convert("RGB" if im.mode != "1" else "L")
    arr = np.asarray(im)
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.bool_:
        out = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        # 16-bit files arrive as I;16 or as 32-bit I; both hold 0..65535
        out = np.clip(arr.astype(np.float32), 0, 65535) / 65535.0
    else:
        out = arr.astype(np.float32)
        hi = float(np.nanmax(out)) if out.size else 0.0
        out = np.nan_to_num(out / (255.0 if hi > 1.0 else 1.0), nan=0.0)
        out = np.clip(out, 0.0, 1.0)
    if out.ndim == 3 and out.shape[2] in (2, 4):  # drop alpha (LA, RGBA)
        out = out[..., :-1]
    if out.ndim == 3 and out.shape[2] == 1:
        out = out[..., 0]
    return out


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Load any supported image as RGB uint8, HxWx3 (grey is repeated to 3 channels)."""
    return _as_rgb8(_open(Path(path), max_pixels), str(path))


def load_image_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS,
                     formats: tuple[str, ...] | None = None) -> np.ndarray:
    """Like :func:`load_image`, for an image held in memory (an upload).

    The type comes from the bytes, never from the name; `formats` (Pillow names, e.g. ("PNG", "JPEG"))
    restricts the accepted types.
    """
    if not data:
        raise ImageError(f"{name}: empty file", "empty")
    return _as_rgb8(_decode(io.BytesIO(data), name, max_pixels, formats), name)


def _as_rgb8(im: Image.Image, label: str) -> np.ndarray:
    if im.mode in ("RGB", "L", "RGBA", "P"):  # 8-bit: no float copies (a 48 MP photo stays ~150 MB)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        return np.ascontiguousarray(np.asarray(im.convert("RGB") if im.mode == "L" else im)[..., :3])
    try:
        arr = _to_float_gray_or_rgb(im)
    except (OSError, ValueError, TypeError) as e:  # a mode Pillow decodes but cannot convert
        raise DataError(f"{label}: unsupported image kind ({im.mode}: {e})") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{label}: unsupported channel layout {arr.shape}")
    return np.round(arr * 255.0).astype(np.uint8)


def load_mask(path: str | Path) -> np.ndarray:
    """Load a ground-truth mask as bool HxW, True = defect.

    Masks stored as 0/255 (MVTec), 0/65535 or 0/1 all work; colour masks count any channel.
    """
    im = _open(Path(path))
    raw = np.asarray(im.convert("L") if im.mode in ("P", "RGB", "RGBA", "LA", "CMYK", "1") else im)
    if raw.ndim == 3:
        raw = raw.max(axis=2)
    raw = raw.astype(np.float64)
    top = raw.max() if raw.size else 0.0
    if top <= 1.0:
        return raw > 0
    full = 255.0 if top <= 255 else 65535.0
    return raw > full / 2


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# ----------------------------------------------------------------------------------------
def make_output_dir(folder: str | Path) -> Path:
    """Create an output folder (and its parents), with a clear error when that is impossible."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None
    return folder


def _new_temp_file(path: Path) -> str:
    """An empty, new file beside `path`, with the permissions any new file gets (0666 less the umask).

    The kernel applies the umask itself, so it is never read or changed (mkstemp would make 0600 files).
    """
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file.

    On failure (disk full, no permission, ...) the earlier file at `path`, if any, is left as it was
    and an :class:`OutputError` names the file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_file(path)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write ({e.strerror or e}); earlier files are unchanged") from None
        raise


# Text files are UTF-8; file names that are not (os.fsdecode's surrogates) are written as their own bytes,
# so os.fsencode of what is read back with the same options gives the original name.
TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda p: p.write_text(text, **TEXT))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _write_atomic(path, lambda p: p.write_bytes(data))


def save_png_atomic(path: Path, image: Image.Image, compress_level: int = 1) -> None:
    # level 1: about 4x faster to write than the default 6, for files about a fifth larger
    _write_atomic(path, lambda p: image.save(p, format="PNG", compress_level=compress_level))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array)

    _write_atomic(path, write)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file name that cannot leave its folder: separators and odd characters become '_'."""
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".", "..")]
    cleaned = _UNSAFE.sub("_", "__".join(parts)).strip("._") or "image"
    return cleaned[:200]
