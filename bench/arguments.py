"""Argument types shared by the bench scripts: a bad value ends with one line naming it, before any run starts."""

from __future__ import annotations

import argparse
import os


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; seeds are whole numbers >= 0."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be 0 or more")
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def positive_int(text: str) -> int:
    """A whole number of at least 1 (runs at a time, threads, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def name_list(text: str, known: list[str], what: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of `known`; else an error listing them."""
    names = [x for x in text.split(",") if x]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"choose from {', '.join(known)}")
    return names


def recorded_command(script: str, argv: list[str]) -> str:
    """The command line as a results file records it: folders of this machine become placeholders (DATA for the
    data root, RUNS/NAME for any other absolute path), so that the line runs anywhere."""
    def placeholder(arg: str) -> str:
        if not os.path.isabs(arg):
            return arg
        return "DATA" if arg.rstrip("/").endswith("shared/data") else f"RUNS/{os.path.basename(arg.rstrip('/'))}"

    return " ".join(["python", f"bench/{script}", *map(placeholder, argv)])
