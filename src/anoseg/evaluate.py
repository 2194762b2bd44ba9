"""Evaluate a trained model on a labelled test set: metrics JSON + Markdown, per-image scores, curve plots.

Memory does not grow with the test set: maps go into fixed-size histograms (pixel_histograms) one image at a time.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .data import Sample, load_sample_mask
from .fileio import load_image, make_output_dir, write_text_atomic
from .inference import AnoSegModel, Prediction
from .pixel_histograms import PixelHistograms
from .progress import bar as progress_bar
from .scoring import OUTLINE_RULE, Thresholds, verdict
from .visualize import plot_pro, plot_roc

PRO_FPR_LIMIT = 0.3

METRIC_NAMES = {
    "pixel_auroc": "pixel AUROC",
    "aupro": f"AUPRO (FPR <= {PRO_FPR_LIMIT})",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1_max": "image F1-max",
    "iou": "IoU of the outlines",
    "seg_f1": "F1 of the outlines",
    "seg_precision": "precision of the outlines",
    "seg_recall": "recall of the outlines",
    "aupimo": "AUPIMO (mean per-image overlap, FPR 1e-5 to 1e-4 on normal images)",
    "best_iou": "best IoU (upper bound)",
    "image_accuracy": "image accuracy at the image threshold",
    "image_auroc_map": "image AUROC, score = the map's image score (image_score_topk_weight)",
    "image_auroc_max": "image AUROC, score = max of the map",
    "image_auroc_topk": "image AUROC, score = mean of the top-k map pixels",
    "image_auroc_detector": "image AUROC, score = detector",
}


def score_samples(model: AnoSegModel, samples: list[Sample], pixels: PixelHistograms, thresholds: Thresholds,
                  progress: bool = True) -> list[Prediction]:
    """Predictions for every sample, in their order; each map and its outline (at `thresholds`) go into `pixels`
    and the map is then dropped.

    Normal images run first: AUPIMO reads each anomalous image at false positive rates of the normal ones."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].label)
    preds: list[Prediction] = [None] * len(samples)  # type: ignore[list-item]
    bs = model.config.batch_size_infer
    bar = progress_bar(total=len(samples), desc="evaluating", disable=not progress, leave=False)
    for start in range(0, len(order), bs):
        chunk = order[start:start + bs]
        images = [load_image(samples[i].path) for i in chunk]
        for i, im, pred in zip(chunk, images, model.maps_for_batch(images)):
            s = samples[i]
            pixels.add(None if s.label == 0 else s.defect_type, pred.anomaly_map, load_sample_mask(s, im.shape[:2]),
                       pred.outline(thresholds))
            pred.anomaly_map = None
            preds[i] = pred
        bar.update(len(chunk))
    bar.close()
    return preds


def image_metrics(labels: np.ndarray, preds: list[Prediction], image_threshold: float | None,
                  curves: dict[str, metrics.Curve] | None = None) -> dict[str, Any]:
    """Image-level metrics (exact: one number per image); `curves` receives the image ROC curve."""
    out: dict[str, Any] = {}
    scores = np.array([p.score for p in preds])
    if 0 < labels.sum() < len(labels):
        image = metrics.threshold_curve(labels, scores)
        out["image_auroc"] = image.auroc()
        out["image_ap"] = image.average_precision()
        out["image_f1_max"] = image.f1_max()[0]
        if curves is not None:
            curves["image"] = image
        out["image_auroc_map"] = metrics.auroc(labels, [p.map_score for p in preds])
        out["image_auroc_max"] = metrics.auroc(labels, [p.max_score for p in preds])
        out["image_auroc_topk"] = metrics.auroc(labels, [p.topk_score for p in preds])
        if preds and preds[0].detector_score is not None:
            out["image_auroc_detector"] = metrics.auroc(labels, [p.detector_score for p in preds])
    if image_threshold is not None:
        out["image_accuracy"] = float(np.mean((scores > image_threshold) == labels.astype(bool)))
    return out


TYPE_METRICS = ("pixel_auroc", "aupro", "pixel_ap", "image_auroc", "seg_f1", "pixel_f1_max", "aupimo")


def per_defect_type(samples: list[Sample], preds: list[Prediction], pixels: PixelHistograms) -> dict[str, Any]:
    """Metrics of each defect type, on its images plus all normal images."""
    types = sorted({s.defect_type for s in samples if s.label == 1})
    normal = [i for i, s in enumerate(samples) if s.label == 0]
    out: dict[str, dict[str, Any]] = {}
    for t in types:
        idx = normal + [i for i, s in enumerate(samples) if s.defect_type == t and s.label == 1]
        m = {**pixels.metrics([None, t], PRO_FPR_LIMIT),
             **image_metrics(np.array([samples[i].label for i in idx]), [preds[i] for i in idx], None)}
        out[t] = {"n_images": len(idx) - len(normal), "defect_pixels": int(pixels.groups[t].defect.sum()),
                  **{k: m.get(k) for k in TYPE_METRICS}}
    return out


def markdown_table(result: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = ["| metric | value |", "|---|---|"]
    for key, name in METRIC_NAMES.items():
        lines.append(f"| {name} | {f(result['metrics'].get(key))} |")
    info = (f"\n{result['n_images']} images ({result['n_defect']} defect); image score: {result['image_score']}, "
            f"image threshold {result['image_threshold']}; map threshold {result['map_threshold']}; outlines: "
            f"{OUTLINE_RULE}; {result['seconds']:.1f} s.\n")
    types = result.get("per_defect_type") or {}
    if types:
        names = " | ".join(METRIC_NAMES[k] for k in TYPE_METRICS)
        info += ("\n## Per defect type (its images and all normal images)\n\n"
                 f"| defect type | images | share of defect pixels | {names} |\n"
                 "|---|---|---|" + "---|" * len(TYPE_METRICS) + "\n")
        total = sum(v["defect_pixels"] for v in types.values()) or 1
        for t, v in types.items():
            info += (f"| {t} | {v['n_images']} | {v['defect_pixels'] / total:.1%} | "
                     + " | ".join(f(v[k]) for k in TYPE_METRICS) + " |\n")
    return "\n".join(lines) + "\n" + info


def evaluate(model: AnoSegModel, samples: list[Sample], out: str | Path | None = None,
             map_threshold: float | None = None, progress: bool = True,
             image_threshold: float | None = None) -> dict[str, Any]:
    """Run the model on labelled samples; write metrics.json, metrics.md, scores.csv, roc.png, pro.png to `out`."""
    start = time.perf_counter()
    thresholds = model.thresholds(map_threshold, image_threshold)
    t_map, t_img = thresholds
    pixels = PixelHistograms(outlines=t_map is not None)
    preds = score_samples(model, samples, pixels, thresholds, progress)
    labels = np.array([s.label for s in samples])
    curves: dict[str, metrics.Curve] = {}
    found = {**pixels.metrics(fpr_limit=PRO_FPR_LIMIT), **image_metrics(labels, preds, t_img, curves)}
    everything = pixels.merged()
    if found["pixel_auroc"] is not None:
        curves["pixel"] = pixels.curve(everything)
    result = {
        "metrics": {k: found.get(k) for k in METRIC_NAMES},
        "map_threshold": t_map,
        "image_threshold": t_img,
        "image_score": "detector" if model.detector is not None else model.scorer.describe(),
        "n_images": len(samples),
        "n_defect": int(labels.sum()),
        "per_defect_type": per_defect_type(samples, preds, pixels),
    }
    result["seconds"] = time.perf_counter() - start
    if out is not None:
        out = Path(out)
        make_output_dir(out)
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        write_text_atomic(out / "metrics.md", markdown_table(result))
        write_text_atomic(out / "scores.csv", _scores_csv(samples, preds, t_img))
        _plots(out, pixels, everything, curves, result["metrics"])
    return result


def _scores_csv(samples: list[Sample], preds: list[Prediction], threshold: float | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "defect_type", "label", "score", "verdict", "map_score", "max_score", "topk_score",
                "detector_score"])
    for s, p in zip(samples, preds):
        det = "" if p.detector_score is None else f"{p.detector_score:.6f}"
        w.writerow([s.path, s.defect_type, s.label, f"{p.score:.6f}", verdict(p.score, threshold) or "",
                    f"{p.map_score:.6f}", f"{p.max_score:.6f}", f"{p.topk_score:.6f}", det])
    return buf.getvalue()


def _plots(out: Path, pixels: PixelHistograms, everything, curves: dict[str, metrics.Curve],
           m: dict[str, Any]) -> None:
    if curves:
        plot_roc(out / "roc.png", {k: (c.fpr, c.tpr, m[f"{k}_auroc"]) for k, c in curves.items()})
    if m["aupro"] is not None:
        fpr, pro = pixels.pro_curve(everything)
        plot_pro(out / "pro.png", fpr, pro, PRO_FPR_LIMIT, m["aupro"])
