"""Streaming pixel metrics against the exact all-pixels computation, on the benchmark's trained models.

    python bench/metrics_agreement.py --work RUNS       # every category's seed-0 model found in RUNS

Each model's test set is scored once; the same maps go into the histograms evaluate uses and into the exact
reference (metrics.exact_pixel_metrics), for the whole category and for each defect type. Writes
bench/metrics_agreement.json and .md with every figure from both and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from arguments import recorded_command
from run_bench import CATEGORIES, DATA, HERE, model_folder


def agreement(folder: Path, root: Path) -> dict:
    import numpy as np

    import anoseg
    from anoseg import metrics
    from anoseg.data import load_sample_mask, mvtec_test_samples
    from anoseg.fileio import load_image
    from anoseg.pixel_histograms import PixelHistograms

    model = anoseg.load(folder, device="cpu")
    samples = sorted(mvtec_test_samples(root), key=lambda s: s.label)
    maps, masks = [], []
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        images = [load_image(s.path) for s in chunk]
        maps += [p.anomaly_map for p in model.maps_for_batch(images)]
        masks += [load_sample_mask(s, im.shape[:2]) for s, im in zip(chunk, images)]
    groups = [None if s.label == 0 else s.defect_type for s in samples]
    hist = PixelHistograms(model.map_threshold)
    for g, a, m in zip(groups, maps, masks):
        hist.add(g, a, m)
    rows = {}
    for name in [None, *sorted({g for g in groups if g is not None})]:
        idx = [i for i, g in enumerate(groups) if name is None or g in (None, name)]
        sub_masks = [masks[i] for i in idx]
        if not any(m.any() for m in sub_masks):
            continue
        exact = metrics.exact_pixel_metrics(sub_masks, [maps[i] for i in idx], [groups[i] is None for i in idx],
                                            model.map_threshold)
        streamed = hist.metrics(None if name is None else [None, name])
        diff = {k: abs(streamed[k] - v) for k, v in exact.items() if v is not None and streamed[k] is not None}
        rows[name or "all"] = {"exact": exact, "streamed": {k: streamed[k] for k in exact},
                               "max_difference": max(diff.values()), "worst": max(diff, key=diff.get)}
    return {"images": len(samples), "pixels": int(sum(np.asarray(m).size for m in masks)), "groups": rows}


def main() -> int:
    from anoseg.pixel_histograms import BINS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE / "runs"), help="the benchmark's model folder (run_bench --work)")
    p.add_argument("--profile", default="fast")
    args = p.parse_args()
    results = {}
    for dataset, category in CATEGORIES:
        folder = model_folder(Path(args.work), dataset, category, args.profile, 0)
        if not (folder / "model.safetensors").exists():
            print(f"skipping {category}: no model in {folder}")
            continue
        start = time.perf_counter()
        results[category] = agreement(folder, DATA / dataset / category)
        worst = max(g["max_difference"] for g in results[category]["groups"].values())
        print(f"{category}: largest difference {worst:.2e} ({time.perf_counter() - start:.0f} s)", flush=True)
    if not results:
        print("no benchmark models found: run bench/run_bench.py first", file=sys.stderr)
        return 1
    record = {"command": recorded_command("metrics_agreement.py", sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "bins": BINS, "results": results}
    (HERE / "metrics_agreement.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Streaming pixel metrics against the exact computation", "",
             f"`{record['command']}`, {record['date']}; {BINS} histogram bins over [0, 1]. Each row: one category "
             "(all) or one defect type with all normal images; the largest absolute difference over pixel AUROC, "
             "AUPRO, pixel AP, pixel F1-max, best IoU, IoU / F1 / precision / recall at the map threshold and AUPIMO.",
             "", "| category | group | images | pixels | largest difference | on | exact value | streamed value |",
             "|---|---|---|---|---|---|---|---|"]
    for category, r in results.items():
        for name, g in r["groups"].items():
            k = g["worst"]
            lines.append(f"| {category} | {name} | {r['images']} | {r['pixels']} | {g['max_difference']:.1e} | {k} "
                         f"| {g['exact'][k]:.6f} | {g['streamed'][k]:.6f} |")
    (HERE / "metrics_agreement.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
