"""Predict on new images: per image an overlay PNG, the raw map, and one line of results."""

from __future__ import annotations

import csv
import ctypes
import functools
import glob
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import DataError, OutputError
from .fileio import (
    TEXT,
    _write_atomic,
    load_image,
    make_output_dir,
    printable,
    safe_name,
    save_npy_atomic,
    temp_files,
    write_text_atomic,
)
from .inference import AnoSegModel, Prediction
from .inputs import check_inputs, iter_inputs
from .progress import bar as progress_bar
from .scoring import Thresholds
from .visualize import save_map_png16, save_overlay

RESULT_FIELDS = ["path", "score", "verdict", "image_threshold", "map_score", "max_score", "topk_score",
                 "detector_score", "map_threshold", "outline_threshold", "outline_reach", "width", "height", "overlay",
                 "map"]


def output_name(path: Path, base: Path, used: set[str]) -> str:
    """A distinct, safe output stem: the path below `base`, with '__' for folder separators."""
    try:
        rel = path.resolve().relative_to(base)
    except ValueError:
        rel = Path(path.name)
    name = base_name = safe_name(str(rel.with_suffix("")))
    k = 1
    while name in used:
        k += 1
        name = f"{base_name}_{k}"
    used.add(name)
    return name


class _Images(IterableDataset):
    """Decodes images in DataLoader workers; each worker takes every n-th file, so order is kept."""

    def __init__(self, inputs: list[str | Path], out: Path, done: set[str]) -> None:
        self.inputs, self.out, self.done = inputs, out, done

    def __iter__(self):
        info = get_worker_info()
        n, k = (info.num_workers, info.id) if info else (1, 0)
        for i, (path, name) in enumerate(_named(self.inputs, self.out, self.done)):
            if i % n != k:
                continue
            try:
                yield path, name, load_image(path), None
            except DataError as e:
                yield path, name, None, printable(str(e))


def _die_with_parent(parent: int, worker_id: int) -> None:  # noqa: ARG001
    """A decoding worker ends when the predict process dies, even by SIGKILL (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl: torch's own watchdog still ends idle workers
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)


def _named(inputs: list[str | Path], out: Path, done: set[str]) -> Iterator[tuple[Path, str]]:
    used: set[str] = set()
    done = {os.path.abspath(p) for p in done}  # however the inputs were spelled then and now
    for path, base in iter_inputs(inputs, skip=out):
        name = output_name(path, base, used)
        if os.path.abspath(path) not in done:
            yield path, name


INPUTS_FILE = "predict_inputs.json"


def _input_keys(inputs: list[str | Path]) -> list[str]:
    """Inputs as absolute paths (folders and files resolved, globs made absolute), to compare runs."""
    return [os.path.abspath(str(i)) if glob.has_magic(str(i)) else str(Path(i).resolve()) for i in inputs]


def _record_inputs(out: Path, inputs: list[str | Path]) -> None:
    if not (out / INPUTS_FILE).exists():
        write_text_atomic(out / INPUTS_FILE, json.dumps({"inputs": _input_keys(inputs)}, indent=1) + "\n")


def _check_same_inputs(out: Path, inputs: list[str | Path]) -> None:
    """A resume must score the same inputs as the run it continues (spelled any way)."""
    try:
        first = json.loads((out / INPUTS_FILE).read_text())["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        if (out / "predictions.jsonl").exists():  # results, but no record of what they were made from
            raise DataError(f"--resume: {out} holds results but not their record of inputs ({INPUTS_FILE}); "
                            "it cannot be resumed safely: give a new --out") from None
        return  # nothing scored yet: nothing to compare with
    if first != _input_keys(inputs):
        raise DataError(f"--resume: the inputs differ from those of the run in {out} ({', '.join(first)}); "
                        "give the same inputs, or a new --out")


@dataclass
class PredictSummary:
    """What a predict run did; `records` holds the result rows unless they were not kept."""

    scored: int = 0
    defects: int = 0
    skipped: int = 0
    already_done: int = 0
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0  # images this run found, read or not
    first_skipped: str = ""  # why the first unreadable one was skipped


def predict(model: AnoSegModel, inputs: list[str | Path], out: str | Path, map_threshold: float | None = None,
            map_format: str = "png", progress: bool = True, image_threshold: float | None = None,
            resume: bool = False, workers: int = 0) -> list[dict[str, Any]]:
    """Like :func:`predict_stream`, returning the result rows (for a manageable number of images)."""
    return predict_stream(model, inputs, out, map_threshold, map_format, progress, image_threshold, resume, workers,
                          keep_records=True).records


def predict_stream(model: AnoSegModel, inputs: list[str | Path], out: str | Path,
                   map_threshold: float | None = None, map_format: str = "png", progress: bool = True,
                   image_threshold: float | None = None,
                   resume: bool = False, workers: int = 0, keep_records: bool = False) -> PredictSummary:
    """Score images and write overlays, raw maps and ``predictions.csv`` / ``predictions.jsonl`` into `out`.

    Streams: files are found lazily, decoded by `workers` DataLoader processes, and each batch's results
    are appended to the tables as soon as they exist, so memory does not grow with the number of images
    (apart from about 100 bytes of bookkeeping per image for distinct output names). With `resume`,
    images already in ``predictions.jsonl`` are skipped. Unreadable files are skipped with a warning and
    listed in ``skipped.txt``.
    """
    start = time.perf_counter()
    _check_options(map_format, workers)
    thresholds = model.thresholds(map_threshold, image_threshold)
    out = _check_output_folder(Path(out), resume)
    check_inputs(inputs)
    done = _resume_tables(out) if resume else set()
    if resume:
        _check_same_inputs(out, inputs)
    else:  # a fresh run: an earlier run's list of skipped files no longer applies
        (out / "skipped.txt").unlink(missing_ok=True)
        (out / INPUTS_FILE).unlink(missing_ok=True)
    for leftover in temp_files(out, "") if out.is_dir() else []:  # of writes a kill cut short
        leftover.unlink(missing_ok=True)
    tables = _Tables(out, append=resume and bool(done))
    # items one by one (workers take turns, so the order is the inputs' order), batched here for the model
    loader = DataLoader(_Images(inputs, out, done), batch_size=None, num_workers=workers, collate_fn=_as_is,
                        prefetch_factor=None if workers == 0 else 2 * model.config.batch_size_infer,
                        worker_init_fn=functools.partial(_die_with_parent, os.getpid()))
    summary = PredictSummary(already_done=len(done))
    bar = progress_bar(desc="predicting", unit="img", disable=not progress)
    try:
        for batch in _batches(loader, model.config.batch_size_infer):
            _score_batch(model, batch, out, inputs, tables, summary, (thresholds, map_format), keep_records)
            bar.update(len(batch))
    finally:
        bar.close()
        tables.close()
    _check_something_scored(summary, inputs, out, done)
    summary.seconds = time.perf_counter() - start
    return summary


def _check_output_folder(out: Path, resume: bool) -> Path:
    """`out` can be a results folder, and holds no earlier run's results unless the run resumes it."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing == out and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; give --out a folder")
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{out}: {existing} is a file, not a folder; give --out a folder")
    if not resume and (out / "predictions.jsonl").exists():
        raise OutputError(f"{out}: holds the results of an earlier run; continue it with --resume, or give "
                          "another --out")
    return out


def _check_options(map_format: str, workers: int) -> None:
    if map_format not in ("png", "npy"):
        raise DataError(f"map format {map_format!r}: choose png or npy")
    if workers < 0:
        raise DataError(f"--workers {workers}: must be 0 or more")


def _score_batch(model: AnoSegModel, batch: list, out: Path, inputs: list, tables: _Tables, summary: PredictSummary,
                 how: tuple[Thresholds, str], keep_records: bool) -> None:
    """Score one batch of decoded items (path, name, image, error), write its files and table rows."""
    summary.seen += len(batch)
    good = [(p, n, im) for p, n, im, err in batch if err is None]
    for _, _, _, err in (b for b in batch if b[3] is not None):
        warnings.warn(f"skipped {err}", stacklevel=3)
        summary.first_skipped = summary.first_skipped or err
        summary.skipped += 1
        tables.skipped(err)
    if not good:
        return
    make_output_dir(out)
    _record_inputs(out, inputs)
    preds = model.maps_for_batch([im for _, _, im in good])
    rows = [_write_one(out, n, p, im, pred, *how) for (p, n, im), pred in zip(good, preds)]
    tables.append(rows)
    summary.scored += len(rows)
    summary.defects += sum(r["verdict"] == "defect" for r in rows)
    if keep_records:
        summary.records += rows


def _check_something_scored(summary: PredictSummary, inputs: list, out: Path, done: set) -> None:
    if done:
        return
    if summary.seen == 0:
        inside = [str(i) for i in inputs if Path(str(i)).exists() and Path(str(i)).resolve().is_relative_to(
            out.resolve())]
        if inside:
            raise DataError(f"{', '.join(inside)}: inside the output folder {out}, which predict never reads "
                            "(its earlier outputs are not scored again); give another --out")
        raise DataError(f"no images found in {', '.join(map(str, inputs))}" +
                        (f" outside the output folder {out}" if any(Path(str(i)).is_dir() for i in inputs) else ""))
    if summary.scored == 0:
        raise DataError(f"none of the {summary.seen} image(s) could be read (see {out / 'skipped.txt'}); "
                        f"first: {summary.first_skipped}")


def _write_one(out: Path, name: str, path: Path, image: np.ndarray, pred: Prediction, thresholds: Thresholds,
               map_format: str) -> dict[str, Any]:
    overlay_file = f"{name}_overlay.png"
    save_overlay(out / overlay_file, image, pred.anomaly_map, pred.outline(thresholds))
    map_file = f"{name}_map.{map_format}"
    if map_format == "png":
        save_map_png16(out / map_file, pred.anomaly_map)
    else:
        save_npy_atomic(out / map_file, pred.anomaly_map)

    return {"path": str(path), **pred.to_record(thresholds), "overlay": overlay_file, "map": map_file}


def _as_is(item: Any) -> Any:
    return item  # keep NumPy images as they are (the default would turn them into tensors)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Tables:
    """predictions.csv / .jsonl (and skipped.txt), appended batch by batch and flushed, so an interrupted
    run keeps every finished image; created only once there is something to write."""

    def __init__(self, out: Path, append: bool) -> None:
        self.out, self.mode = out, "a" if append else "w"
        self.csv = self.jsonl = self.skip = None
        self.writer: csv.DictWriter | None = None

    def append(self, rows: list[dict[str, Any]]) -> None:
        try:
            if self.csv is None:
                new = self.mode == "w" or not (self.out / "predictions.csv").exists()
                self.csv = open(self.out / "predictions.csv", self.mode, newline="", **TEXT)
                self.jsonl = open(self.out / "predictions.jsonl", self.mode, **TEXT)
                self.writer = csv.DictWriter(self.csv, fieldnames=RESULT_FIELDS)
                if new:
                    self.writer.writeheader()
            self.writer.writerows(rows)
            self.jsonl.write("".join(json.dumps(r) + "\n" for r in rows))
            self.csv.flush()
            self.jsonl.flush()
        except OSError as e:
            raise OutputError(f"{self.out}: cannot write the results ({e.strerror or e}); "
                              "results up to the last batch are kept, continue with --resume") from None

    def skipped(self, line: str) -> None:
        if self.skip is None:
            make_output_dir(self.out)
            path = self.out / "skipped.txt"
            # a resumed run meets the same unreadable files again: list each one once
            earlier = path.read_text(**TEXT).splitlines() if self.mode == "a" and path.is_file() else []
            self.skipped_before = set(earlier)
            self.skip = open(path, self.mode, **TEXT)
        if line in self.skipped_before:
            return
        self.skipped_before.add(line)
        self.skip.write(line + "\n")
        self.skip.flush()

    def close(self) -> None:
        for f in (self.csv, self.jsonl, self.skip):
            if f is not None:
                f.close()


def _path_of(line: bytes) -> str | None:
    """The image path a predictions.jsonl line records; None for a damaged line."""
    try:
        path = json.loads(line)["path"]
    except (ValueError, KeyError, TypeError):
        return None
    return path if isinstance(path, str) else None


def _resume_tables(out: Path) -> set[str]:
    """Paths already scored in `out`. Keeps the valid lines of predictions.jsonl: a half-written last line (a kill)
    goes quietly, a damaged line before it with a warning (its image is scored again); the CSV is made to match."""
    jsonl = out / "predictions.jsonl"
    if not jsonl.is_file():
        return set()
    done, damaged, rewrite = _scan(jsonl)
    if damaged:
        warnings.warn(f"{jsonl}: {damaged} damaged line(s) dropped; their images are scored again", stacklevel=3)
    if rewrite:
        _write_atomic(jsonl, functools.partial(_copy_valid_lines, jsonl))
    _write_atomic(out / "predictions.csv", functools.partial(_csv_from_jsonl, jsonl))
    return done


def _scan(jsonl: Path) -> tuple[set[str], int, bool]:
    """(paths recorded, damaged lines, whether the file needs rewriting), read line by line: a run of millions
    of rows is never held whole."""
    done, damaged, rewrite = set(), 0, False
    with open(jsonl, "rb") as f:
        for line in f:
            path = _path_of(line)
            if path is None:
                damaged += line.endswith(b"\n")  # an unfinished last line (a kill) goes quietly
                rewrite = True
            else:
                done.add(path)
                rewrite |= not line.endswith(b"\n")
    return done, damaged, rewrite


def _copy_valid_lines(jsonl: Path, dest: Path) -> None:
    with open(jsonl, "rb") as src, open(dest, "wb") as dst:
        for line in src:
            if _path_of(line) is not None:
                dst.write(line if line.endswith(b"\n") else line + b"\n")


def _csv_from_jsonl(jsonl: Path, dest: Path) -> None:
    with open(jsonl, **TEXT) as src, open(dest, "w", newline="", **TEXT) as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        w.writeheader()
        w.writerows(json.loads(line) for line in src)
