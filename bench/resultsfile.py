"""The bench scripts' results files, read again and rewritten under a lock: scripts run side by side (two sweeps,
two benchmark passes) keep each other's rows instead of writing back only what each read at its start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold PATH.lock (beside the file) exclusively for the block; without POSIX locks, no lock."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_rows(path: Path) -> list[dict]:
    """The `results` rows of a results file as it stands (none when it is not there yet)."""
    return json.loads(path.read_text())["results"] if path.exists() else []
