"""Label-free outline rules, compared by the outline F1 they give on the test set (issue 59).

    python bench/threshold_rules.py --work RUNS [--seeds 0,1] [--out bench/threshold_rules]

For each benchmark model found in RUNS: its held-out normal training images (model.json `holdout_files`, the images
`calibrate` uses) give each rule's threshold, without any test label. A rule outlines the pixels above a threshold
(global rules), or above the 0.999 quantile and a fraction of the image's own map maximum (or of the way to it from
the median normal pixel), some only in the regions that reach a larger fraction of it, some with another floor or
none in images judged defect, some in images judged defect only (the default: anoseg.scoring.outline_levels). The
test set is scored once and each rule's outline counted image by image. Writes --out's .json and .md (by default
bench/threshold_rules): each category's F1 per rule, the best F1 of one threshold over all test pixels (labels used:
the upper bound of a global threshold) and the mean over categories.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from arguments import recorded_command, seed_list
from run_bench import CATEGORIES, DATA, HERE, model_folder

SYNTHETIC_COPIES = 4  # synthetic anomalies made from each held-out image (synthetic_f1 rule)


def held_out_maps(model, files: list[Path]) -> tuple[list[np.ndarray], list[float]]:
    maps, maxima = [], []
    for p in model.iter_predict_files(files):
        maps.append(p.anomaly_map.astype(np.float32))
        maxima.append(float(p.anomaly_map.max()))
    return maps, maxima


def synthetic_f1_threshold(model, files: list[Path]) -> float:
    """The threshold of the best pixel F1 on synthetic anomalies (the training augmentation) pasted into the
    held-out normal images, each at its first working shape."""
    import torch

    from anoseg.augment import Augmenter
    from anoseg.data import resize_rgb
    from anoseg.fileio import load_image
    from anoseg.pixel_histograms import PixelHistograms

    rng = np.random.default_rng([model.config.seed, 11])
    augment = Augmenter.from_config(model.config, anomaly_ratio=1.0)
    hist = PixelHistograms()
    images = [resize_rgb(load_image(f), model.geometry.working_shape(*load_image(f).shape[:2])) for f in files]
    s = model.config.image_size
    for _ in range(SYNTHETIC_COPIES):
        for im in images:  # the augmentation works on square crops, as in training: made in one, put back
            whole = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).float() / 255.0
            donor = images[int(rng.integers(len(images)))]
            top, left = int(rng.integers(im.shape[0] - s + 1)), int(rng.integers(im.shape[1] - s + 1))
            dt, dl = int(rng.integers(donor.shape[0] - s + 1)), int(rng.integers(donor.shape[1] - s + 1))
            source = torch.from_numpy(np.ascontiguousarray(donor[dt:dt + s, dl:dl + s].transpose(2, 0, 1))) / 255.0
            crop, crop_mask = augment.synthesize(whole[:, top:top + s, left:left + s], source.float(), rng)
            whole[:, top:top + s, left:left + s] = crop
            mask = np.zeros(im.shape[:2], bool)
            mask[top:top + s, left:left + s] = crop_mask[0].numpy() > 0.5
            picture = (whole.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            hist.add("synthetic", model.maps_for_batch([picture])[0].anomaly_map, mask)
    curve = hist.curve(hist.merged())
    return curve.f1_max()[1] if curve.n_pos and curve.n_neg else float("nan")


@dataclass(frozen=True)
class Rule:
    """An outline rule: pixels above `floor` and `fraction` of the way from `base` to the image's map maximum, in
    the regions whose maximum reaches `reach` x it; with `gated`, only in images judged defect (the model's image
    threshold); with `defect_floor`, that floor instead of `floor` in images judged defect; with `image_base`, `base`
    is the image's own median map value."""

    floor: float
    fraction: float = 0.0
    reach: float = 0.0
    gated: bool = False
    defect_floor: float | None = None
    base: float = 0.0
    image_base: bool = False

    def region(self, pred, image_threshold: float) -> np.ndarray | None:
        from anoseg.scoring import OutlineLevels, outline_region, verdict

        judged_defect = verdict(pred.score, image_threshold) == "defect"
        if self.gated and not judged_defect:
            return None
        floor = self.defect_floor if self.defect_floor is not None and judged_defect else self.floor
        base = float(np.median(pred.anomaly_map)) if self.image_base else self.base
        edge = max(floor, base + self.fraction * (pred.max_score - base))
        return outline_region(pred.anomaly_map, OutlineLevels(edge, max(edge, self.reach * pred.max_score)))


def rules(model, files: list[Path]) -> dict[str, Rule]:
    from anoseg.scoring import OUTLINE_EDGE, OUTLINE_REACH

    maps, maxima = held_out_maps(model, files)
    pixels = np.concatenate([m.ravel() for m in maps])
    median, q99, q999 = np.quantile(pixels, [0.5, 0.99, 0.999])
    global_rules = {
        "pixel_quantile_0.999": float(q999),
        "pixel_quantile_0.9999": float(np.quantile(pixels, 0.9999)),
        "max_of_maxima": float(max(maxima)),
        "median_of_maxima": float(np.median(maxima)),
        "margin: q0.999 + 2 x (q0.999 - median)": float(q999 + 2 * (q999 - median)),
        "mean + 6 std": float(pixels.mean() + 6 * pixels.std()),
        "synthetic_f1": synthetic_f1_threshold(model, files),
    }
    out = {k: Rule(t) for k, t in global_rules.items()}
    for fraction in (0.3, 0.4, 0.5):
        out[f"q0.999 and {fraction:g} x peak"] = Rule(float(q999), fraction)
    out["q0.99 and 0.4 x peak"] = Rule(float(q99), 0.4)
    out["q0.999, images judged defect"] = Rule(float(q999), 0.0, gated=True)
    out["q0.999 and 0.4 x peak, images judged defect"] = Rule(float(q999), 0.4, gated=True)
    out["q0.999 and 0.4 x peak, no floor in images judged defect"] = Rule(float(q999), 0.4, defect_floor=0.0)
    for fraction, reach in ((0.3, 0.9), (0.35, 0.8), (0.35, 0.9), (0.35, 0.95), (0.4, 0.9)):
        name = f"q0.999 and {fraction:g} x peak, regions reaching {reach:g} x peak"
        out[name] = Rule(float(q999), fraction, reach)
    for fraction, reach in ((0.35, 0.9), (0.4, 0.9)):
        name = f"{fraction:g} x peak, regions reaching {reach:g} x peak, q0.999 in images judged normal"
        out[name] = Rule(float(q999), fraction, reach, defect_floor=0.0)
    for fraction in (0.3, 0.35, 0.4):  # the edge measured from the map background, the median normal pixel
        name = (f"{fraction:g} of the way from the median normal pixel to the peak, regions reaching 0.9 x peak, "
                "q0.999 in images judged normal")
        default = (fraction, 0.9) == (OUTLINE_EDGE, OUTLINE_REACH)
        out[name + (" (default)" if default else "")] = Rule(float(q999), fraction, 0.9, defect_floor=0.0,
                                                             base=float(median))
    out["0.35 of the way from the image's median to the peak, regions reaching 0.9 x peak, q0.999 in images "
        "judged normal"] = Rule(float(q999), 0.35, 0.9, defect_floor=0.0, image_base=True)
    out["q0.999 and 0.35 x peak, regions reaching 0.9 x peak, q0.99 in images judged defect"] = \
        Rule(float(q999), 0.35, 0.9, defect_floor=float(q99))
    return out


def one(folder: Path, root: Path) -> dict:
    import anoseg
    from anoseg.data import load_sample_mask, mvtec_test_samples
    from anoseg.fileio import load_image
    from anoseg.metrics import outline_counts, outline_scores
    from anoseg.pixel_histograms import PixelHistograms

    model = anoseg.load(folder, device="cpu")
    found = rules(model, [Path(f) for f in model.meta["holdout_files"]])
    counts = {k: np.zeros(3, np.int64) for k in found}
    hist = PixelHistograms()
    samples = sorted(mvtec_test_samples(root), key=lambda s: s.label)
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        images = [load_image(s.path) for s in chunk]
        for s, im, p in zip(chunk, images, model.maps_for_batch(images)):
            mask = load_sample_mask(s, im.shape[:2])
            hist.add(None if s.label == 0 else s.defect_type, p.anomaly_map, mask)
            for k, rule in found.items():
                counts[k] += outline_counts(mask, rule.region(p, model.image_threshold))
    curve = hist.curve(hist.merged())
    return {"rules": {k: vars(r) for k, r in found.items()},
            "seg_f1": {k: outline_scores(*(int(v) for v in c))["seg_f1"] for k, c in counts.items()},
            "pixel_f1_max": curve.f1_max()[0], "best_threshold": curve.f1_max()[1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE / "runs"))
    p.add_argument("--seeds", default="0", type=seed_list)
    p.add_argument("--profile", default="fast")
    p.add_argument("--out", default=str(HERE / "threshold_rules"), help="results file stem (.json and .md)")
    args = p.parse_args()
    results: dict[str, dict] = {}
    for dataset, category in CATEGORIES:
        for seed in args.seeds:
            folder = model_folder(Path(args.work), dataset, category, args.profile, seed)
            if not (folder / "model.json").exists():
                print(f"skipping {category} seed {seed}: no model in {folder}")
                continue
            start = time.perf_counter()
            results.setdefault(category, {})[str(seed)] = one(folder, DATA / dataset / category)
            print(f"{category} seed {seed}: {json.dumps(results[category][str(seed)]['seg_f1'])} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if not results:
        print("no benchmark models found", file=sys.stderr)
        return 1
    write(results, recorded_command("threshold_rules.py", sys.argv[1:]), Path(args.out))
    return 0


def write(results: dict, command: str, stem: Path) -> None:
    names = list(next(iter(next(iter(results.values())).values()))["seg_f1"])
    per_cat = {c: {k: float(np.mean([r["seg_f1"][k] for r in runs.values()])) for k in names}
               for c, runs in results.items()}
    best = {c: float(np.mean([r["pixel_f1_max"] for r in runs.values()])) for c, runs in results.items()}
    mean = {k: float(np.mean([per_cat[c][k] for c in per_cat])) for k in names}
    record = {"command": command, "date": time.strftime("%Y-%m-%d"), "results": results, "mean_seg_f1": mean}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    cats = list(per_cat)
    lines = ["# Map threshold rules, chosen without test labels: outline F1 on the test set", "",
             f"`{command}`, {record['date']}. Each cell: pixel F1 of the rule's outlines over the category's test "
             "set (mean over the seeds found); the last row is the best F1 of one threshold for all test pixels "
             "(chosen with the labels: the upper bound of a global threshold; per-image rules may pass it).", "",
             "| rule | " + " | ".join(cats) + " | mean |", "|---" * (len(cats) + 2) + "|"]
    for k in sorted(names, key=lambda k: -mean[k]):
        lines.append(f"| {k} | " + " | ".join(f"{per_cat[c][k]:.3f}" for c in cats) + f" | {mean[k]:.3f} |")
    lines.append("| best over thresholds (labels) | " + " | ".join(f"{best[c]:.3f}" for c in cats)
                 + f" | {np.mean(list(best.values())):.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
