"""Decoding workers of `predict --workers N` end with their parent, even when it is killed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import write_png

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_exit_when_predict_is_killed(tiny_model_dir, tmp_path):
    for i in range(120):  # big, cheap-to-store images: the run lasts long enough to be killed midway
        write_png(tmp_path / "in" / f"{i:03d}.png", np.full((1500, 1500, 3), i, np.uint8))
    proc = subprocess.Popen([sys.executable, "-m", "anoseg", "predict", str(tiny_model_dir), str(tmp_path / "in"),
                             "--out", str(tmp_path / "out"), "--workers", "2", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            workers = children(proc.pid)
            time.sleep(0.1)
        assert len(workers) >= 2, "the workers never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "a worker outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
