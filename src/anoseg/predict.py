"""Predict on new images: per image an overlay PNG, the raw map, and one line of results."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .fileio import (
    IMAGE_SUFFIXES,
    load_image,
    make_output_dir,
    safe_name,
    save_npy_atomic,
    save_png_atomic,
    write_text_atomic,
)
from .inference import AnoSegModel, Prediction, verdict
from .visualize import overlay, save_map_png16

RESULT_FIELDS = ["path", "score", "verdict", "threshold", "map_score", "topk_score", "detector_score",
                 "map_threshold", "width", "height", "overlay", "map"]


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Image files from a mix of files, folders and glob patterns, in order, without repeats."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            found += [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            raise DataError(f"{text}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return unique


def output_names(paths: list[Path]) -> list[str]:
    """Distinct, safe output stems: the path below the inputs' common folder."""
    parents = [str(p.parent) for p in paths]
    root = Path(os.path.commonpath(parents))
    names, seen = [], set()
    for p in paths:
        try:
            rel = p.relative_to(root)
        except ValueError:
            rel = Path(p.name)
        name = safe_name(str(rel.with_suffix("")))
        base, k = name, 1
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        seen.add(name)
        names.append(name)
    return names


def predict(model: AnoSegModel, inputs: list[str | Path], out: str | Path, threshold: float | None = None,
            map_format: str = "png", progress: bool = True,
            detector_threshold: float | None = None) -> list[dict[str, Any]]:
    """Score images and write overlays, raw maps and ``predictions.csv`` / ``predictions.jsonl`` into `out`.

    Files that cannot be read are skipped with a warning (listed in ``skipped.txt``).
    """
    if map_format not in ("png", "npy"):
        raise DataError(f"map format {map_format!r}: choose png or npy")
    t_map, t_img = model.thresholds(threshold, detector_threshold)
    out = Path(out)
    # never score our own earlier outputs when --out lies inside an input folder
    paths = [p for p in expand_inputs(inputs) if not p.is_relative_to(out.resolve())]
    if not paths:
        raise DataError(f"no images to score outside the output folder {out}")
    names = output_names(paths)
    make_output_dir(out)
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    bs = model.config.batch_size_infer
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
    for i in range(0, len(paths), bs):
        batch = []
        for p, name in zip(paths[i:i + bs], names[i:i + bs]):
            try:
                batch.append((p, name, load_image(p)))
            except DataError as e:
                warnings.warn(f"skipped {e}", stacklevel=2)
                skipped.append(str(e))
        preds = model.maps_for_batch([im for _, _, im in batch]) if batch else []
        for (p, name, image), pred in zip(batch, preds):
            records.append(_write_one(out, name, p, image, pred, t_map, t_img, map_format))
        bar.update(len(paths[i:i + bs]))
    bar.close()
    if skipped:
        write_text_atomic(out / "skipped.txt", "\n".join(skipped) + "\n")
    if not records:
        raise DataError(f"none of the {len(paths)} image(s) could be read (see {out / 'skipped.txt'}); "
                        f"first: {skipped[0]}")
    _write_tables(out, records)
    return records


def _write_one(out: Path, name: str, path: Path, image: np.ndarray, pred: Prediction, t_map: float | None,
               t_img: float | None, map_format: str) -> dict[str, Any]:
    overlay_file = f"{name}_overlay.png"
    save_png_atomic(out / overlay_file, Image.fromarray(overlay(image, pred.anomaly_map, t_map)))
    map_file = f"{name}_map.{map_format}"
    if map_format == "png":
        save_map_png16(out / map_file, pred.anomaly_map)
    else:
        save_npy_atomic(out / map_file, pred.anomaly_map)

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 6)

    return {"path": str(path), "score": r(pred.score), "verdict": verdict(pred.score, t_img), "threshold": t_img,
            "map_score": r(pred.map_score), "topk_score": r(pred.topk_score), "detector_score": r(pred.detector_score),
            "map_threshold": t_map, "width": image.shape[1], "height": image.shape[0],
            "overlay": overlay_file, "map": map_file}


def _write_tables(out: Path, records: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS)
    w.writeheader()
    w.writerows(records)
    write_text_atomic(out / "predictions.csv", buf.getvalue())
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
