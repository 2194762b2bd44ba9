"""Map trained models at other sets of scales (short sides), evaluation only: which scales should a model map at?

    python bench/map_scales.py --work RUNS [--seeds 0,1] [--sides 128,256,384] [--only tire,bottle]
                               [--fusion mean,geometric,max,noise_weighted]

For each benchmark model found in RUNS, each image (held-out normal training images and the test set) is mapped
once at every short side in --sides, and the raw maps are kept. Every combination of those sides is then
finished as the model finishes its own scales (`MapPostprocessor`: each scale smoothed in its own pixels, the
scales averaged at the first scale's shape, broad share, peak boost), calibrated on the held-out images as
`calibrate` does (map threshold: the 0.999 quantile of their pixels) and scored: pixel AUROC, AUPRO, image AUROC,
best pixel F1 and the outline's F1 (`seg_f1`). A side the model never trained at is mapped all the same.
--fusion also tries other ways of combining the smoothed scales before the broad share and the peak boost:
`geometric` (their geometric mean: a defect must show at every scale), `max`, and `noise_weighted` (a mean
weighted by 1 / the 0.999 quantile of each scale's held-out map: a scale noisy on normal images counts less).
Writes bench/map_scales.json and .md, or --out (mean over the seeds found).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from arguments import name_list, recorded_command, seed_list
from run_bench import CATEGORIES, DATA, HERE, model_folder

FIGURES = ("pixel_auroc", "aupro", "image_auroc", "pixel_f1_max", "seg_f1", "aupimo")
FUSIONS = ("mean", "geometric", "max", "noise_weighted")  # "mean" is the model's own


def fusion_list(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(FUSIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown fusion {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(FUSIONS)}")
    return list(dict.fromkeys(names))


def side_list(text: str) -> list[int]:
    try:
        sides = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of short sides") from None
    if not sides or sides[0] < 16 or any(s % 16 for s in sides):
        raise argparse.ArgumentTypeError(f"{text!r}: each short side must be a multiple of 16")
    return sides


def raw_maps(model, image: np.ndarray, sides: list[int]) -> list[np.ndarray]:
    """The unsmoothed map of one image at each short side (float16, the side's working shape)."""
    import torch

    from anoseg.inference import model_input

    out = []
    for side in sides:
        x = torch.from_numpy(model_input([image], model.geometry.working_shape(*image.shape[:2], side)))
        with torch.no_grad():
            out.append(model.raw_maps(x.to(model.device))[0, 0].cpu().numpy().astype(np.float16))
    return out


def smoothed(model, raws: list[np.ndarray], shape: tuple[int, int]) -> list:
    """Each scale's raw map smoothed in its own pixels by the model's post-processor, then resized to `shape`."""
    import torch

    from anoseg.postprocess import at_shape, gaussian_blur

    sigma = model.postprocess.smoothing_sigma
    return at_shape([gaussian_blur(torch.from_numpy(r.astype(np.float32))[None, None], sigma) for r in raws], shape)


def fused(model, raws: list[np.ndarray], shape: tuple[int, int], fusion: str, weights: list[float] | None):
    """The finished B x 1 x H x W map: scales combined by `fusion`, then the model's broad share and peak boost;
    "mean" is the model's own post-processor."""
    import torch

    if fusion == "mean":
        return model.postprocess([torch.from_numpy(r.astype(np.float32))[None, None] for r in raws], shape)
    parts = smoothed(model, raws, shape)
    if fusion == "geometric":
        m = torch.exp(sum(torch.log(p.clamp_min(1e-6)) for p in parts) / len(parts))
    elif fusion == "max":
        m = torch.stack(parts).amax(0)
    else:
        m = sum(w * p for w, p in zip(weights, parts))
    return model.postprocess.boost_peaks(model.postprocess.add_broad(m))


def noise_weights(model, hold: list[dict], which: list[int]) -> list[float]:
    """Weights summing to 1, each scale's inversely to the 0.999 quantile of its smoothed held-out maps."""
    per_scale = [[] for _ in which]
    for h in hold:
        shape = model.geometry.working_shape(*h["size"])
        for j, m in enumerate(smoothed(model, [h["raw"][i] for i in which], shape)):
            per_scale[j].append(m.numpy().ravel())
    inverse = [1 / max(float(np.quantile(np.concatenate(p), 0.999)), 1e-6) for p in per_scale]
    return [w / sum(inverse) for w in inverse]


def finished(model, raws: list[np.ndarray], size: tuple[int, int], fusion: str = "mean",
             weights: list[float] | None = None) -> tuple[np.ndarray, float]:
    """The finished map at the image's size and its image score, from raw maps of the scales to combine, fused
    at the shape of the model's first scale, as the model's own are."""
    import torch.nn.functional as F

    m = fused(model, raws, model.geometry.working_shape(*size), fusion, weights)
    score = float(model.scorer(m)[0][0])
    full = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    return full.numpy(), score


def scored(model, hold: list[dict], test: list[dict], which: list[int], fusion: str = "mean"
           ) -> dict[str, float | None]:
    """The figures of one combination of scales (indices into each image's raw maps) fused by `fusion`, at
    thresholds chosen on the held-out images as `calibrate` chooses them."""
    from anoseg.metrics import auroc
    from anoseg.pixel_histograms import PixelHistograms
    from anoseg.scoring import outline_levels, outline_region, quantile_thresholds

    weights = noise_weights(model, hold, which) if fusion == "noise_weighted" else None

    def finish(item: dict, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        return finished(model, [item["raw"][i] for i in which], size, fusion, weights)

    normal = [finish(h, h["size"]) for h in hold]
    pixels = np.concatenate([m.ravel() for m, _ in normal])
    thresholds = quantile_thresholds(model.config, [s for _, s in normal], pixels)
    hist, scores = PixelHistograms(outlines=True), []
    for t in test:
        amap, score = finish(t, t["mask"].shape)
        outline = outline_region(amap, outline_levels(thresholds, float(amap.max()), score))
        hist.add(None if t["label"] == 0 else t["type"], amap, t["mask"], outline)
        scores.append(score)
    found = hist.metrics()
    labels = np.array([t["label"] for t in test])
    return {**{k: found.get(k) for k in FIGURES if k != "image_auroc"}, "image_auroc": auroc(labels, np.array(scores))}


def one(folder: Path, root: Path, sides: list[int], fusions: tuple[str, ...] = ("mean",)) -> dict[str, dict]:
    import anoseg
    from anoseg.data import load_sample_mask, mvtec_test_samples
    from anoseg.fileio import load_image

    model = anoseg.load(folder, device="cpu")
    hold = []
    for f in model.meta["holdout_files"]:
        image = load_image(f)
        hold.append({"raw": raw_maps(model, image, sides), "size": image.shape[:2]})
    test = []
    for s in sorted(mvtec_test_samples(root), key=lambda s: s.label):  # normal images first (AUPIMO)
        image = load_image(s.path)
        test.append({"label": s.label, "type": s.defect_type, "raw": raw_maps(model, image, sides),
                     "mask": load_sample_mask(s, image.shape[:2]) > 0})
    out = {}
    for n in range(1, len(sides) + 1):
        for which in itertools.combinations(range(len(sides)), n):
            for fusion in fusions if n > 1 else ("mean",):
                name = "+".join(str(sides[i]) for i in which) + ("" if fusion == "mean" else f" {fusion}")
                out[name] = scored(model, hold, test, list(which), fusion)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE / "runs"), help="the benchmark's model folders (run_bench.py --work)")
    p.add_argument("--seeds", default="0", type=seed_list)
    p.add_argument("--sides", default="128,256,384", type=side_list, help="short sides to map at")
    p.add_argument("--only", default=",".join(c for _, c in CATEGORIES),
                   type=lambda t: name_list(t, [c for _, c in CATEGORIES], "category"))
    p.add_argument("--fusion", default="mean", type=fusion_list,
                   help=f"ways to combine the scales, comma-separated: {', '.join(FUSIONS)}")
    p.add_argument("--profile", default="fast")
    p.add_argument("--out", default=str(HERE / "map_scales"), help="results file stem (.json and .md)")
    args = p.parse_args()
    results: dict[str, dict] = {}
    for dataset, category in CATEGORIES:
        for seed in args.seeds if category in args.only else []:
            folder = model_folder(Path(args.work), dataset, category, args.profile, seed)
            if not (folder / "model.json").exists():
                print(f"skipping {category} seed {seed}: no model in {folder}")
                continue
            start = time.perf_counter()
            found = one(folder, DATA / dataset / category, args.sides, args.fusion)
            results.setdefault(category, {})[str(seed)] = found
            for combo, figures in found.items():
                print(f"{category} seed {seed} {combo}: " + " ".join(f"{k} {_f(v)}" for k, v in figures.items()))
            print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    if not results:
        print("no benchmark models found", file=sys.stderr)
        return 1
    write(results, recorded_command("map_scales.py", sys.argv[1:]), Path(args.out))
    return 0


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write(results: dict, command: str, out: Path) -> None:
    record = {"command": command, "date": time.strftime("%Y-%m-%d"), "results": results}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Maps at other sets of scales (evaluation only)", "",
             f"`{command}`, {record['date']}. Each cell: pixel AUROC / AUPRO / image AUROC / seg_f1 (pixel F1-max), "
             "mean over the seeds found; a combination fuses the maps of those short sides as the model fuses "
             "its own.", ""]
    combos = list(next(iter(next(iter(results.values())).values())))
    cats = list(results)
    lines += ["| short sides | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for combo in combos:
        cells = []
        for c in cats:
            runs = results[c].values()
            mean = {k: np.mean([r[combo][k] for r in runs if r[combo][k] is not None] or [np.nan]) for k in FIGURES}
            cells.append(" / ".join(f"{mean[k]:.3f}" for k in ("pixel_auroc", "aupro", "image_auroc", "seg_f1"))
                         + f" ({mean['pixel_f1_max']:.3f})")
        lines.append(f"| {combo} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
