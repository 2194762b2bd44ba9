"""The images a user names for predict: files, folders (searched recursively) and globs, found lazily."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError


def check_inputs(inputs: list[str | Path]) -> list[str]:
    """The inputs as text; each names something that exists or is a glob pattern."""
    texts = [str(i) for i in inputs]
    for text in texts:
        if not Path(text).exists() and not glob.has_magic(text):
            raise DataError(f"{text}: no such file or folder")
    if not texts:
        raise DataError("no inputs given")
    return texts


def _walk(folder: Path, skip: Path) -> Iterator[Path]:
    """Files under `folder`, in sorted order, without listing the whole tree at once; links to folders are not
    followed."""
    for here, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if (Path(here) / d).resolve() != skip)
        yield from (Path(here) / f for f in sorted(files))


def _unique(paths: Iterator[Path]) -> Iterator[Path]:
    """Each real file once: a '**' glob through a symlink loop reaches the same file under many names."""
    seen: set[str] = set()
    for p in paths:
        r = str(p.resolve())
        if r not in seen:
            seen.add(r)
            yield p


def _glob(pattern: str, skip: Path) -> Iterator[Path]:
    """Files matching a glob pattern. '**' walks the folders below without following links to folders (as a
    folder input does): glob's own '**' follows them, and two links that loop keep it busy for ever."""
    if "**" not in pattern:
        yield from (Path(p) for p in glob.iglob(pattern))
        return
    parts = Path(os.path.abspath(pattern)).parts
    split = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root, rest = Path(*parts[:split]), parts[split:]
    pieces = "".join("(?:[^/]+/)*" if part == "**" else _part_regex(part) + "/" for part in rest)
    regex = re.compile((pieces[:-1] if pieces.endswith("/") else pieces + "[^/]+") + r"\Z")
    for path in _walk(root, skip):
        if regex.match(path.relative_to(root).as_posix()):
            yield path


def _part_regex(part: str) -> str:
    """One path component of a glob as a regular expression ('**' matches any number of folders)."""
    return fnmatch.translate(part).removeprefix("(?s:").removesuffix(r")\Z").replace(".*", "[^/]*")


def iter_inputs(inputs: list[str | Path], skip: Path | None = None) -> Iterator[tuple[Path, Path]]:
    """(image file, folder it is named relative to) for files, folders and globs, lazily and in order.

    A file already reached through an earlier input is not repeated; `skip` (the output folder) is never
    entered, so earlier outputs are not scored again.
    """
    texts = check_inputs(inputs)
    skip = (skip or Path("/nonexistent")).resolve()
    base = _common_base(texts)
    earlier: list[str] = []

    def seen_before(p: Path) -> bool:  # bounded memory: compare with the earlier inputs, not with every file
        r = str(p.resolve())
        return any(r == e or r.startswith(e.rstrip(os.sep) + os.sep) or (glob.has_magic(e) and fnmatch.fnmatch(r, e))
                   for e in earlier)

    for text in texts:
        path = Path(text)
        if path.is_dir():
            found: Iterator[Path] = _walk(path, skip)
        elif path.is_file():
            found = iter([path])
        else:
            found = _unique(_glob(text, skip))
        for p in found:
            if not p.is_file():  # every file named is scored, or skipped with its reason: none is dropped unsaid
                continue
            if p.resolve().is_relative_to(skip) or (earlier and seen_before(p)):
                continue
            yield p, base
        earlier.append(str(path.resolve()) if not glob.has_magic(text) else os.path.abspath(text))


def _common_base(texts: list[str]) -> Path:
    """The folder output names are relative to: the inputs' common folder."""
    roots = []
    for text in texts:
        p = Path(text)
        if glob.has_magic(text):
            parts = []
            for part in Path(os.path.abspath(text)).parts:
                if glob.has_magic(part):
                    break
                parts.append(part)
            roots.append(str(Path(*parts)))
        else:
            roots.append(str(p.resolve() if p.is_dir() else p.resolve().parent))
    return Path(os.path.commonpath(roots))
