"""Working-size training images in one compact uint8 store: an array in memory, or a cache file beside the run.

The store's size is known before any image is decoded (from the files' headers). A set larger than a share of the
memory available goes to the cache file ``train_images.cache`` (with ``train_images.json``, its index), read image
by image: the images then sit in the operating system's file cache, which gives memory back under pressure, not in
the process. The cache is used again (``--resume``) while the input files and the working shapes are unchanged,
and built again when they change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import OutputError
from .fileio import write_text_atomic

CACHE_FILE = "train_images.cache"
INDEX_FILE = "train_images.json"
MEMORY_SHARE = 0.5  # a store larger than this share of the memory available goes to the cache file
STORE_VERSION = 1


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux: MemAvailable; elsewhere free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: keep the images in memory


def fingerprint(files: list[Path], shapes: list[tuple[int, ...]]) -> str:
    """Changes when an input file (path, size, modification time) or a working shape changes."""
    h = hashlib.sha256(str(STORE_VERSION).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.fspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([list(s) for s in shapes]).encode())
    return h.hexdigest()


class ImageStore:
    """Images of known shapes (uint8 C x H x W), back to back in one buffer or one file."""

    def __init__(self, shapes: list[tuple[int, int, int]], path: Path | None = None):
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        self.offsets = np.r_[0, np.cumsum(self.sizes(self.shapes))].astype(np.int64)
        self.path = path
        self._buffer = np.empty(int(self.offsets[-1]), dtype=np.uint8) if path is None else None
        self._fd: int | None = None

    @staticmethod
    def sizes(shapes: list[tuple[int, ...]]) -> np.ndarray:
        """Bytes of each image of these shapes (uint8)."""
        return np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    @property
    def in_memory(self) -> bool:
        return self.path is None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if self._buffer is not None:
            return self._buffer[start:end].reshape(self.shapes[i])
        data = os.pread(self._file(), end - start, start)
        if len(data) != end - start:
            raise OSError(f"{self.path}: cache file is shorter than its index says; delete it to build it again")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shapes[i])

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def put(self, i: int, image: np.ndarray) -> None:
        """Write image i (while building; its shape may be the planned one turned, with the same size)."""
        if image.size != self.offsets[i + 1] - self.offsets[i]:
            raise ValueError(f"image {i} has {image.size} values, {self.offsets[i + 1] - self.offsets[i]} planned")
        self.shapes[i] = tuple(image.shape)
        if self._buffer is not None:
            self._buffer[self.offsets[i]:self.offsets[i + 1]] = image.ravel()
        else:
            try:
                os.pwrite(self._file(), np.ascontiguousarray(image).tobytes(), int(self.offsets[i]))
            except OSError as e:
                raise OutputError(f"{self.path}: cannot write the training image cache ({e.strerror}); it needs "
                                  f"{self.nbytes / 1e6:.0f} MB beside the run") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    # the cache file

    @classmethod
    def create_cache(cls, folder: Path, shapes: list[tuple[int, int, int]]) -> ImageStore:
        """An empty cache file of the store's size, to fill with `put` and then `seal`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INDEX_FILE).unlink(missing_ok=True)  # no index: a half-built cache is never read
        # each process builds its own file and renames it into place (torchrun ranks build side by side)
        store = cls(shapes, folder / f"{CACHE_FILE}.{os.getpid()}.tmp")
        try:
            store._fd = os.open(store.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(store._fd, store.nbytes)
        except OSError as e:
            raise OutputError(f"{store.path}: cannot create the training image cache ({e.strerror})") from None
        return store

    def seal(self, key: str) -> None:
        """Write the index that makes a filled cache file usable (by a later run with the same `key`)."""
        os.fsync(self._file())
        final = self.path.with_name(CACHE_FILE)
        os.replace(self.path, final)  # the open descriptor still reads this file
        self.path = final
        write_text_atomic(self.path.with_name(INDEX_FILE),
                          json.dumps({"version": STORE_VERSION, "key": key, "bytes": self.nbytes,
                                      "shapes": self.shapes}) + "\n")

    @classmethod
    def open_cache(cls, folder: Path, key: str) -> ImageStore | None:
        """The cache built for `key` in `folder`, or None when there is none, or it is for other inputs."""
        index, data = folder / INDEX_FILE, folder / CACHE_FILE
        try:
            meta = json.loads(index.read_text())
            if meta.get("version") != STORE_VERSION or meta.get("key") != key:
                return None
            store = cls([tuple(s) for s in meta["shapes"]], data)
            return store if data.stat().st_size == store.nbytes == meta["bytes"] else None
        except (OSError, ValueError, KeyError, TypeError):
            return None


def remove_cache(folder: Path) -> None:
    """Delete a run's image cache (when training has finished, it is no longer needed)."""
    for name in (INDEX_FILE, CACHE_FILE):
        (folder / name).unlink(missing_ok=True)
    for tmp in folder.glob(f"{CACHE_FILE}.*.tmp"):  # left by a run killed while building
        tmp.unlink(missing_ok=True)
