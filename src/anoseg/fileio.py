"""Reading images and masks of any common kind, and writing files atomically."""

from __future__ import annotations

import io
import os
import re
import secrets
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, ImageError, OutputError

# What Pillow opens, but for formats whose files hold no picture it decodes by itself (stubs that need a handler,
# vector and scientific formats): one list for folders, names and uploads. Animations give their first frame.
Image.init()
_NOT_PICTURES = {"BUFR", "EPS", "GRIB", "HDF5", "IPTC", "MPEG", "WMF"}
READABLE_FORMATS = tuple(sorted(set(Image.OPEN) - _NOT_PICTURES))
IMAGE_SUFFIXES = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in READABLE_FORMATS))

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


def image_shape(path: str | Path) -> tuple[int, int] | None:
    """(height, width) as :func:`load_image` will return it, from the file's header (no pixels decoded);
    None where the header cannot be read (loading the image then says why)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = _orientation(im) in (5, 6, 7, 8)  # the EXIF turns that swap width and height
    except Exception:  # any failure here is reported, in one line, by load_image
        return None
    return (w, h) if turned else (h, w)


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos), so pixels, maps and masks are the way every viewer shows them."""
    if _orientation(im) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1: as stored); 1 where the EXIF cannot be read (Pillow raises many kinds)."""
    try:
        return im.getexif().get(0x0112, 1)
    except Exception:
        return 1


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


DECODE_ROWS = 1024  # 8-bit images are copied out of Pillow in bands of rows (no whole-image byte string)


def _rgb8_in_bands(im: Image.Image) -> np.ndarray:
    """An 8-bit RGB, RGBA or L Pillow image as RGB uint8, copied band by band (alpha dropped, grey repeated).

    ``np.asarray(im)`` would first make the whole image a byte string, and Pillow joins that from pieces:
    for an 81 MP photo two extra copies of 243 MB beside Pillow's own.
    """
    w, h = im.size
    out = np.empty((h, w, 3), dtype=np.uint8)
    for r in range(0, h, DECODE_ROWS):
        band = im.crop((0, r, w, min(h, r + DECODE_ROWS)))
        out[r:r + band.height] = np.asarray(band if band.mode == "RGB" else band.convert("RGB"))
    return out


def _as_rgb8(im: Image.Image, label: str) -> np.ndarray:
    if im.mode in ("RGB", "L", "RGBA", "P"):  # 8-bit: no float copies (a 48 MP photo stays ~150 MB)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        return _rgb8_in_bands(im)
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


def temp_files(folder: Path, prefix: str) -> list[Path]:
    """The temporary files (:func:`_new_temp_file`) that atomic writes of names starting with `prefix` left in
    `folder`: a kill cut those writes short, so nothing renames or removes them."""
    return [p for p in Path(folder).glob(f".{prefix}*.tmp") if re.fullmatch(r"\..+\.[0-9a-f]{12}\.tmp", p.name)]


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


PNG_ROWS = 64  # rows filtered at once by the streaming writer: its extra memory is a few such strips


def _filtered(raw: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """PNG scanlines (filter byte + bytes) of raw rows (n x L uint8), each with the best of None/Sub/Up/Paeth.

    `prev` is the row above the first. Rows are scored by the sum of absolute signed bytes, as libpng does.
    """
    r = raw.astype(np.int16)
    b = np.vstack([prev[None], raw[:-1]]).astype(np.int16)  # up
    a = np.zeros_like(r)
    a[:, bpp:] = r[:, :-bpp]  # left
    c = np.zeros_like(r)
    c[:, bpp:] = b[:, :-bpp]  # up-left
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    candidates = np.stack([r, r - a, r - b, r - paeth]).astype(np.uint8)  # filter types 0, 1, 2, 4
    signed = candidates.view(np.int8).astype(np.int16)
    best = np.abs(signed).sum(axis=2).argmin(axis=0)
    out = np.empty((raw.shape[0], raw.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = np.array([0, 1, 2, 4], dtype=np.uint8)[best]
    out[:, 1:] = candidates[best, np.arange(raw.shape[0])]
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def save_png_bands(path: Path, height: int, width: int, bands: Iterable[np.ndarray], compress_level: int = 1) -> None:
    """A PNG written band by band (large images: never the whole picture in memory), atomically.

    `bands` are, top to bottom, H_i x W x 3 uint8 (RGB) or H_i x W uint16 (16-bit grey) arrays whose heights
    sum to `height`. The pixels are the same as Pillow writes for the whole array.
    """
    def write(p: Path) -> None:
        rows_done, prev, depth = 0, None, None
        z = zlib.compressobj(compress_level)
        with open(p, "wb") as f:
            for band in bands:
                if depth is None:
                    depth, colour = (8, 2) if band.dtype == np.uint8 else (16, 0)
                    f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth,
                                                                                colour, 0, 0, 0)))
                raw = (band if depth == 8 else band.astype(">u2").view(np.uint8)).reshape(len(band), -1)
                prev = np.zeros(raw.shape[1], np.uint8) if prev is None else prev
                for i in range(0, len(raw), PNG_ROWS):
                    data = z.compress(_filtered(raw[i:i + PNG_ROWS], prev, 3 if depth == 8 else 2).tobytes())
                    if data:
                        f.write(_chunk(b"IDAT", data))
                    prev = raw[min(i + PNG_ROWS, len(raw)) - 1]
                rows_done += len(band)
            if rows_done != height:
                raise ValueError(f"PNG bands hold {rows_done} rows, not {height}")
            f.write(_chunk(b"IDAT", z.flush()) + _chunk(b"IEND", b""))

    _write_atomic(path, write)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array)

    _write_atomic(path, write)


_UNSAFE = re.compile(r"[^\w.-]+")  # letters of any script and digits stay; the rest becomes "_"


def printable(text: str) -> str:
    """`text` on one line, the same wherever it is shown (skipped.txt, warnings): control characters as \\n,
    \\r, \\t or \\xNN, and the bytes of a name that is not UTF-8 (surrogate escapes) as \\xNN."""
    def escape(m: re.Match) -> str:
        c = m.group()
        if "\udc80" <= c <= "\udcff":
            return f"\\x{ord(c) - 0xDC00:02x}"
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}")

    return re.sub(r"[\x00-\x1f\x7f\udc80-\udcff]", escape, text)


def safe_name(name: str) -> str:
    """A file name that cannot leave its folder: separators and odd characters become '_'. Letters of any script
    stay; a long name is shortened to 200 bytes of UTF-8, keeping its extension."""
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".", "..")]
    cleaned = _UNSAFE.sub("_", "__".join(parts)).strip("._") or "image"
    stem, dot, ext = cleaned.rpartition(".")
    suffix = f".{ext}" if dot and stem and len(ext) <= 10 else ""
    base = cleaned[: len(cleaned) - len(suffix)]
    base = base.encode()[: 200 - len(suffix.encode())].decode("utf-8", "ignore").rstrip("._") or "image"
    return base + suffix
