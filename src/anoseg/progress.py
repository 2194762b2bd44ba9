"""Progress bars: live in a terminal, a few plain lines in a log file or CI."""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # outside a terminal, at most one progress line this often (and one at the end)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = _ANSI.sub("", text).replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm with the project's defaults; where stderr is not a terminal it prints plain, spaced-out lines."""
    stream = sys.stderr
    if stream is not None and hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    kwargs.pop("leave", None)  # a line in a log is kept anyway
    # miniters=1 keeps tqdm's monitor thread out: its forced redraws do not reset the clock of the next
    # one, so under slow steps it printed two lines per interval
    return tqdm(iterable, file=_Lines(stream or sys.__stderr__), mininterval=LOG_INTERVAL_S, miniters=1,
                ncols=100, ascii=True, **kwargs)
