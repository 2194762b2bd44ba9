"""Benchmark: train a profile on each real category in ../shared/data, evaluate, time inference.

    python bench/run_bench.py                      # every category found, fast profile
    python bench/run_bench.py --only bottle        # one category; other records in results.json are kept
    python bench/run_bench.py --speed              # inference speed only: PyTorch and ONNX Runtime side by side

Each category runs in its own process so that its peak memory is its own. Writes bench/results.json
and bench/results.md (records are updated in place, keyed by dataset/category/profile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from arguments import name_list, positive_int, recorded_command, seed_list
from resultsfile import locked, read_rows

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CATEGORIES = [("mvtec_ad", "bottle"), ("kolektorsdd", "commutator"), ("magnetic_tile", "magnetic_tile"),
              ("mvtec3d_tire", "tire"), ("bsdata", "ball_screw_drive")]
KEYS = ["pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max", "image_auroc", "image_f1_max", "iou", "best_iou", "seg_f1",
        "seg_precision", "seg_recall", "aupimo"]
SEG_RATIO_TARGET = 0.8  # issue 59: the outline at the model's own threshold scores >= 0.8 x the best pixel F1


def images_per_second(model, images: list, single: bool) -> float:
    model.predict_images(images[:8])  # warm-up
    t = time.perf_counter()
    if single:
        for im in images[:16]:
            model.predict_images([im])
        return 16 / (time.perf_counter() - t)
    model.predict_images(images)
    return len(images) / (time.perf_counter() - t)


def speed_one(dataset: str, category: str, profile: str, work: Path, sets: list[str]) -> dict:
    """PyTorch and ONNX Runtime images/s for one category's model, measured in the same process.

    Uses the trained model in `work` when there is one, else the same architecture and settings with
    untrained weights (speed does not depend on the weights); the record says which.
    """
    import tempfile

    import numpy as np
    import torch

    import anoseg
    from anoseg.cli import parse_sets
    from anoseg.export import export_onnx, onnx_images_per_second

    torch.set_num_threads(os.cpu_count() or 1)
    out = work / f"{dataset}_{category}_{profile}"
    trained = (out / "model.safetensors").exists()
    if trained:
        model = anoseg.load(out, device="cpu")
        model.detector = None
    else:
        model = anoseg.AnoSegModel(anoseg.profile_config(profile, **parse_sets(sets)), map_threshold=0.5,
                                     device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(128)]
    bs = model.config.batch_size_infer
    # PyTorch first, then ONNX Runtime (whose idle threads would otherwise compete); best of 3 each
    torch_batch = max(images_per_second(model, images, False) for _ in range(3))
    torch_single = max(images_per_second(model, images, True) for _ in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, tmp)
        onnx_batch = max(onnx_images_per_second(tmp, n=128, batch=bs) for _ in range(3))
        onnx_single = max(onnx_images_per_second(tmp, n=16, batch=1) for _ in range(3))
    # one full-size test image of the category, end to end as predict does it (map back to its own size)
    from anoseg.data import mvtec_test_samples
    from anoseg.fileio import load_image

    full = load_image(mvtec_test_samples(DATA / dataset / category)[0].path)
    full_ips = max(images_per_second(model, [full] * 16, True) for _ in range(3))
    return {"images_per_second_full_size": round(full_ips, 1), "full_size": list(full.shape[1::-1]),
            "images_per_second": round(torch_batch, 1), "images_per_second_single": round(torch_single, 1),
            "onnx_images_per_second": round(onnx_batch, 1), "onnx_images_per_second_single": round(onnx_single, 1),
            "speed_weights": "trained" if trained else "untrained (same architecture)"}


def model_folder(work: Path, dataset: str, category: str, profile: str, seed: int) -> Path:
    return work / f"{dataset}_{category}_{profile}" if seed == 0 else work / f"{dataset}_{category}_{profile}_s{seed}"


def check_reused(saved, wanted, folder: Path) -> None:
    """Refuse a reused model trained with other settings than the profile and --set name: its figures would
    be reported under the wrong recipe. Settings applied after training (maps, thresholds, detector) may differ."""
    from anoseg.config import RESUMABLE

    free = {*RESUMABLE, "profile", "version"} - {"steps"}
    old, new = saved.to_dict(), wanted.to_dict()
    differ = [f"{k}={old.get(k)!r} (asked: {v!r})" for k, v in new.items() if k not in free and old.get(k) != v]
    if differ:
        raise SystemExit(f"{folder}: --reuse found a model trained with other settings: {'; '.join(differ)}. "
                         "Train it again (leave out --reuse), or name its settings with --set")


def rescored(model, cfg, folder: Path):
    """A reused `model` with `cfg`'s map and score settings (the profile's as it stands, or --set), its thresholds
    chosen again for them as `anoseg calibrate` does; unchanged where they already match and the model has its map
    background (also bench/ablation.py)."""
    import anoseg
    from anoseg.config import MAP_SETTINGS

    changed = {k: getattr(cfg, k) for k in MAP_SETTINGS if getattr(model.config, k) != getattr(cfg, k)}
    return anoseg.calibrate(folder, overrides=changed) if changed or model.map_background is None else model


def run_one(dataset: str, category: str, profile: str, work: Path, sets: list[str], reuse: bool,
            detector: bool, seed: int = 0, threads: int = 0) -> dict:
    """Train + evaluate + time one category with one seed (runs inside the child process)."""
    import numpy as np
    import torch

    import anoseg
    from anoseg.cli import parse_sets

    torch.set_num_threads(threads or os.cpu_count() or 1)
    root = DATA / dataset / category
    out = model_folder(work, dataset, category, profile, seed)
    train_peak = None  # peak RSS of training, where this process trained
    cfg = anoseg.profile_config(profile, **{**parse_sets(sets), "seed": seed})
    if reuse and (out / "model.safetensors").exists():
        model = anoseg.load(out)
        check_reused(model.config, cfg, out)
        model = rescored(model, cfg, out)
    else:
        model = anoseg.train(cfg, root, out, overwrite=True, progress=sys.stderr.isatty())
        train_peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    train_seconds = model.meta["train_seconds"]
    if detector and model.detector is None:
        model = anoseg.train_detector(out, root, progress=sys.stderr.isatty())
    result = anoseg.evaluate(model, root, out / "eval", progress=False)
    headline = result
    if model.detector is not None:  # the headline is the model as `train` makes it: the map's own image score
        det, model.detector = model.detector, None
        headline = anoseg.evaluate(model, root, None, progress=False)
        model.detector = det

    # inference speed on 256 px images, end to end (resize, network, smoothing, upsampling back to 256 px)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(64)]
    det, model.detector = model.detector, None  # the map alone first
    batch_ips, single_ips = images_per_second(model, images, False), images_per_second(model, images, True)
    model.detector = det
    extra = {}
    if det is not None:
        extra = {"detector_train_seconds": det.meta["train_seconds"],
                 "images_per_second_with_detector": round(images_per_second(model, images, False), 1)}

    return {
        "dataset": dataset, "category": category, "profile": profile, "seed": seed,
        **{k: headline["metrics"][k] for k in KEYS},
        "per_defect_type": headline["per_defect_type"],
        "map_threshold": model.map_threshold,
        "train_seconds": round(train_seconds, 1),
        "steps": model.meta["steps_done"],
        "eval_seconds": round(result["seconds"], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "train_peak_rss_mb": train_peak,
        "images_per_second": round(batch_ips, 1),
        "images_per_second_single": round(single_ips, 1),
        "batch_size_infer": model.config.batch_size_infer,
        "ema_decay": model.config.ema_decay,
        "settings": sets,
        **{k: result["metrics"][k] for k in ("image_auroc_map", "image_auroc_max", "image_auroc_topk",
                                             "image_auroc_detector")},
        **extra,
    }


# quality targets of the fast profile (issue 59), mean over seeds
TARGETS = {"bottle": {"pixel_auroc": 0.98, "aupro": 0.90},
           "commutator": {"pixel_auroc": 0.97, "aupro": 0.85},
           "magnetic_tile": {"pixel_auroc": 0.90, "aupro": 0.86},
           "tire": {"pixel_auroc": 0.94, "aupro": 0.75},
           "ball_screw_drive": {"pixel_auroc": 0.975, "aupro": 0.82}}


def target_lines(records: list[dict]) -> list[str]:
    """A table of each target, the measured mean and by how much it is met or missed."""
    lines = ["", "## Targets (fast profile, mean over seeds)", "",
             "| category | figure | target | measured | met? |", "|---|---|---|---|---|"]
    verdicts = []
    for r in records:
        for key, goal in TARGETS.get(r["category"], {}).items() if r["profile"] == "fast" else ():
            value = r.get(key)
            verdicts.append("n/a" if value is None else ("yes" if value >= goal else f"missed by {goal - value:.3f}"))
            lines.append(f"| {r['category']} | {key} | {goal} | {'n/a' if value is None else f'{value:.3f}'} "
                         f"| {verdicts[-1]} |")
        if r["profile"] == "fast" and r["category"] in TARGETS:
            ratio = _ratio(r)
            verdicts.append("n/a" if ratio is None else "yes" if ratio >= SEG_RATIO_TARGET
                            else f"missed by {SEG_RATIO_TARGET - ratio:.3f}")
            lines.append(f"| {r['category']} | seg F1 / pixel F1-max | {SEG_RATIO_TARGET} | {_f(ratio)} "
                         f"| {verdicts[-1]} |")
    where = "docs/design.md (\"Benchmark\") and bench/ablation.md."
    if verdicts and all(v == "yes" for v in verdicts):
        return lines + ["", f"Every target listed is met. What each part of the recipe buys: {where}"]
    return lines + ["", f"What was tried for the missed ones, and what each part buys: {where}"]


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _num(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pm(r: dict, k: str) -> str:
    std = r.get(f"{k}_std")
    return _f(r[k]) + ("" if std is None else f" ± {std:.3f}")


def _ratio(r: dict) -> float | None:
    seg, best = r.get("seg_f1"), r.get("pixel_f1_max")
    return None if seg is None or not best else seg / best


QUALITY = ("pixel_auroc", "aupro", "pixel_ap", "image_auroc", "pixel_f1_max", "seg_f1", "aupimo")


def headline_lines(records: list[dict]) -> list[str]:
    lines = ["| dataset | category | profile | seeds | pixel AUROC | AUPRO@0.3 | pixel AP | image AUROC | pixel F1-max "
             "| seg F1 | seg F1 / F1-max | AUPIMO |", "|---" * 12 + "|"]
    for r in records:
        lines.append(
            f"| {r['dataset']} | {r['category']} | {r['profile']} | {','.join(map(str, r.get('seeds', [0])))} | "
            f"{_pm(r, 'pixel_auroc')} | {_pm(r, 'aupro')} | {_f(r['pixel_ap'])} | {_pm(r, 'image_auroc')} | "
            f"{_f(r['pixel_f1_max'])} | {_f(r.get('seg_f1'))} | {_f(_ratio(r))} | {_f(r.get('aupimo'))} |")
    for profile in sorted({r["profile"] for r in records}):
        rows = [r for r in records if r["profile"] == profile]
        if len(rows) > 1:
            means = [_mean([r.get(k) for r in rows]) for k in QUALITY]
            ratio = _mean([_ratio(r) for r in rows])
            cells = " | ".join(_f(v) for v in means[:6]) + f" | {_f(ratio)} | {_f(means[6])}"
            lines.append(f"| **mean** | {len(rows)} categories | {profile} | | {cells} |")
    lines += ["", "## Outline, time and memory", "",
              "| category | seg precision | seg recall | IoU | best IoU | image F1-max | train s | train peak MB "
              "| peak RSS MB | img/s batch | img/s single | ONNX img/s batch | ONNX img/s single |", "|---" * 13 + "|"]
    for r in records:
        lines.append(
            f"| {r['category']} | {_f(r.get('seg_precision'))} | {_f(r.get('seg_recall'))} | {_f(r['iou'])} | "
            f"{_f(r['best_iou'])} | {_f(r['image_f1_max'])} | {_num(r['train_seconds'], 0)} | "
            f"{_num(r.get('train_peak_rss_mb'), 0)} | {_num(r.get('peak_rss_mb'), 0)} | "
            f"{_num(r.get('images_per_second'), 1)} | {_num(r.get('images_per_second_single'), 1)} | "
            f"{r.get('onnx_images_per_second', 'n/a')} | {r.get('onnx_images_per_second_single', 'n/a')} |")
    changed = [f"{r['category']} (`{' '.join('--set ' + x for x in r['settings'])}`)" for r in records
               if r.get("settings")]
    if changed:  # a row whose recipe is not the profile's as it stands
        lines += ["", "Trained with settings other than the profile's: " + ", ".join(changed) + "."]
    return lines


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def image_score_lines(records: list[dict]) -> list[str]:
    lines = ["", "## Image-level scores (image AUROC)", "",
             "| dataset | category | map score | max of map | top-k mean | detector | detector train s "
             "| img/s with detector |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['dataset']} | {r['category']} | {_f(r.get('image_auroc_map'))} | "
                     f"{_f(r.get('image_auroc_max'))} | "
                     f"{_f(r.get('image_auroc_topk'))} | {_f(r.get('image_auroc_detector'))} | "
                     f"{r.get('detector_train_seconds', 'n/a')} | {r.get('images_per_second_with_detector', 'n/a')} |")
    pending = [r["category"] for r in records if r.get("image_auroc_detector") is None]
    if pending:  # say so, rather than leave a bare n/a: the detector is trained by a separate pass
        lines += ["", f"No detector trained on these models yet: {', '.join(pending)} (`python bench/run_bench.py "
                  "--reuse --detector` trains and scores it on the models in --work)."]
    return lines


def detail_lines(records: list[dict]) -> list[str]:
    lines = ["", "## Per defect type (each type's images and all normal images; mean over seeds)", "",
             "| category | defect type | images | pixel AUROC | AUPRO@0.3 | pixel AP | image AUROC | pixel F1-max "
             "| seg F1 | AUPIMO |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for t, d in (r.get("per_defect_type") or {}).items():
            lines.append(f"| {r['category']} | {t} | {d['n_images']} | {_f(d['pixel_auroc'])} | {_f(d['aupro'])} | "
                         f"{_f(d['pixel_ap'])} | {_f(d['image_auroc'])} | {_f(d.get('pixel_f1_max'))} | "
                         f"{_f(d.get('seg_f1'))} | {_f(d.get('aupimo'))} |")
    lines += ["", "## Inference on a full-size test image (PyTorch, one image at a time)", ""]
    timed = [r for r in records if r.get("images_per_second_full_size")]
    if not timed:
        return [*lines, "Not measured in these records (`python bench/run_bench.py --speed` measures it)."]
    lines += ["| category | image size | img/s |", "|---|---|---|"]
    for r in timed:
        size = "x".join(map(str, r["full_size"]))
        lines.append(f"| {r['category']} | {size} | {r['images_per_second_full_size']} |")
    return lines


NOTES = ("Image score in the first table: the map's image score, (1 - w) x the maximum of the finished anomaly map "
         "+ w x the mean of its top 1% pixels (w = `image_score_topk_weight`), the model as `train` makes it, "
         "without a detector; the image-level table gives the image AUROC of each score. seg F1 (with its precision "
         "and recall) and IoU are those of the outlines a user sees, chosen without test labels (docs/design.md, "
         "\"The outline\": in each image the regions above an edge 0.35 of the way from the map background, the "
         "median held-out normal map pixel, to the image's map maximum, and in images judged normal above the map "
         "threshold, the 0.999 quantile of those pixels, that reach 0.9 x the maximum); seg F1 / F1-max compares "
         "seg F1 with "
         "the best single threshold chosen with the labels. AUPIMO: the mean over anomalous images of the share of "
         "their defect pixels found, read at false positive rates 1e-5 to 1e-4 of the normal test images (Bertoldo "
         "et al. 2024). Pixel metrics come from histograms of 2^16 bins (bench/metrics_agreement.md: agreement with "
         "the exact computation); best IoU picks the threshold with the labels (upper bound). train s: the mean "
         "over seeds of each model's training time as its model.json records it (each run's in results.json "
         "`runs`); a run that shared the cores with others took longer than one alone. Inference: 256 px RGB "
         "images, end to end (resize, network, smoothing, map back to 256 px). PyTorch and ONNX Runtime speeds "
         "come from one process each (`--speed` pass, see `speed_command` and `speed_weights` in results.json: "
         "where no trained model was at hand, the same architecture with untrained weights, which runs at the "
         "same speed).")


def write_tables(records: list[dict], command: str) -> None:
    meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{platform.python_implementation()} {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d")}
    (HERE / "results.json").write_text(json.dumps({**meta, "results": records}, indent=2) + "\n")
    lines = [
        "# Benchmark results", "",
        "Commands: `python bench/run_bench.py [--only CATEGORY]` (train, evaluate, time), then "
        "`python bench/run_bench.py --reuse --detector` (detector pass) and `python bench/run_bench.py --speed` "
        "(PyTorch and ONNX Runtime speed side by side); each record in results.json names its own `command` and "
        "`speed_command`.  ", f"Machine: {meta['machine']}; last written {meta['date']} by `{command}`.", "",
        "Headline rows are the mean over the seeds listed (± the standard deviation over seeds).", "",
        *headline_lines(records), *image_score_lines(records), *detail_lines(records), *target_lines(records),
        "", NOTES, ""]
    (HERE / "results.md").write_text("\n".join(lines))


def parse_args() -> argparse.Namespace:
    from anoseg.config import PROFILES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="fast", choices=list(PROFILES))
    p.add_argument("--only", action="extend", default=[], help="category name(s) to run (comma-separated or repeated)",
                   type=lambda t: name_list(t, [c for _, c in CATEGORIES], "category"))
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    p.add_argument("--work", default=str(HERE / "runs"), help="folder for models and evaluation outputs")
    p.add_argument("--reuse", action="store_true", help="reuse trained models found in --work")
    p.add_argument("--detector", action="store_true", help="also train and score the anomaly detector")
    p.add_argument("--speed", action="store_true",
                   help="only re-measure inference speed (PyTorch and ONNX Runtime) for the existing records")
    p.add_argument("--seeds", default="0,1", type=seed_list,
                   help="comma-separated seeds; headline rows are their mean (default 0,1)")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at a time; CPU threads are split between them")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args()


def list_jobs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(dataset, category, seed) of each run asked for whose data is at hand; --speed times seed 0's model."""
    jobs = []
    for dataset, category in CATEGORIES:
        if args.only and category not in args.only:
            continue
        if not (DATA / dataset / category / "train").is_dir():
            print(f"skipping {dataset}/{category}: not found under {DATA}")
            continue
        jobs += [(dataset, category, seed) for seed in ([0] if args.speed else args.seeds)]
    return jobs


def main() -> int:
    args = parse_args()
    work = Path(args.work)
    if args.child and args.speed:
        print("RESULT " + json.dumps(speed_one(*args.child, args.profile, work, args.set)))
        return 0
    if args.child:
        record = run_one(*args.child, args.profile, work, args.set, args.reuse, args.detector,
                         seed=args.seeds[0], threads=args.threads)
        print("RESULT " + json.dumps(record))
        return 0

    results_file = HERE / "results.json"
    records = read_rows(results_file)  # as the run starts: what --speed adds to, and with which settings
    command = recorded_command("run_bench.py", sys.argv[1:])
    jobs = list_jobs(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    results: dict[tuple[str, str], list[dict]] = {}
    failed: list[tuple[str, str, int]] = []

    def child(job: tuple[str, str, int]) -> bool:
        """Run one job in its own process; True when it gave a record."""
        dataset, category, seed = job
        print(f"== {dataset}/{category} ({args.profile}, seed {seed})", flush=True)
        cmd = [sys.executable, __file__, "--child", dataset, category, "--profile", args.profile, "--work", str(work),
               "--seeds", str(seed), "--threads", str(threads)]
        cmd += [x for s in args.set for x in ("--set", s)] + (["--reuse"] if args.reuse else [])
        cmd += ["--detector"] if args.detector else []
        cmd += ["--speed"] if args.speed else []
        old = [r for r in records if (r["dataset"], r["category"], r["profile"]) == (dataset, category, args.profile)]
        if args.speed and not old:
            print(f"skipping {dataset}/{category}: no benchmark record to add speeds to")
            return False
        if args.speed:  # the architecture must be the one the record was measured with
            cmd += [x for s in old[0].get("settings", []) for x in ("--set", s)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"failed: {dataset}/{category} seed {seed} (exit {proc.returncode})\n{proc.stdout[-2000:]}")
            failed.append(job)
            return False
        results.setdefault((dataset, category), []).append(json.loads(lines[-1][len("RESULT "):]))
        return True

    lock = threading.Lock()

    def child_then_write(job: tuple[str, str, int]) -> None:
        if not child(job):  # nothing new: the files keep what they hold, and who wrote it
            return
        # every finished run is written at once (an interrupted benchmark keeps what it has), merged into the
        # file as it stands: another run_bench beside this one keeps its rows
        with lock, locked(results_file):
            merged = merge_results(read_rows(results_file), {k: v for k, v in results.items() if k == job[:2]},
                                   args, command)
            write_tables(merged, command)

    jobs.sort(key=lambda j: (j[2], [c for _, c in CATEGORIES].index(j[1])))  # every category's first seed first
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(child_then_write, jobs))
    if failed:
        print(f"{len(failed)} of {len(jobs)} run(s) failed: " + ", ".join(f"{c} seed {s}" for _, c, s in failed))
    return 1 if failed else 0


def merge_results(records: list[dict], results: dict, args, command: str) -> list[dict]:
    """Records with the finished runs of `results` ((dataset, category) -> runs) merged in."""
    for (dataset, category), runs in results.items():
        key = (dataset, category, args.profile)
        old = [r for r in records if (r["dataset"], r["category"], r["profile"]) == key]
        if args.speed:
            record = {**old[0], **runs[0], "speed_command": command}
        else:
            record = {**merge_seeds(sorted(runs, key=lambda r: r["seed"])), "command": command}
            if args.reuse and old:  # the models were trained by an earlier run: its training peak still counts
                record["train_peak_rss_mb"] = old[0].get("train_peak_rss_mb")
                record["peak_rss_mb"] = max(record["peak_rss_mb"], record["train_peak_rss_mb"] or 0)
        print(json.dumps({k: v for k, v in record.items() if k not in ("runs", "per_defect_type")}), flush=True)
        records = [r for r in records if (r["dataset"], r["category"], r["profile"]) != key] + [record]
    order = {c: i for i, c in enumerate(CATEGORIES)}  # the tables list the categories in one order, however run
    return sorted(records, key=lambda r: (r["profile"], order.get((r["dataset"], r["category"]), len(order))))


def merge_seeds(runs: list[dict]) -> dict:
    """One headline record: the mean over seeds of every metric, their spread, and each run kept in `runs`."""
    import numpy as np

    out = {k: v for k, v in runs[0].items() if k != "seed"}
    out["seeds"] = [r["seed"] for r in runs]
    for k in [*KEYS, "image_auroc_map", "image_auroc_max", "image_auroc_topk", "image_auroc_detector", "train_seconds",
              "images_per_second", "images_per_second_single"]:
        values = [r.get(k) for r in runs]
        out[k] = None if any(v is None for v in values) else round(float(np.mean(values)), 4)
    for k in ("detector_train_seconds", "images_per_second_with_detector"):  # only a --detector pass has them
        values = [r[k] for r in runs if r.get(k) is not None]
        if values:
            out[k] = round(float(np.mean(values)), 1)
    for k in ("pixel_auroc", "aupro", "image_auroc"):  # a spread needs two seeds at least
        values = [r[k] for r in runs if r.get(k) is not None]
        out[f"{k}_std"] = round(float(np.std(values)), 4) if len(values) > 1 else None
    for k in ("peak_rss_mb", "train_peak_rss_mb"):
        peaks = [r[k] for r in runs if r.get(k) is not None]
        out[k] = max(peaks) if peaks else None
    types = runs[0].get("per_defect_type", {})
    out["per_defect_type"] = {t: {k: round(float(np.mean([r["per_defect_type"][t][k] for r in runs])), 4)
                                  if v is not None and not isinstance(v, int) else v for k, v in d.items()}
                              for t, d in types.items()}
    out["runs"] = [{k: v for k, v in r.items() if k != "per_defect_type"} for r in runs]
    return out


if __name__ == "__main__":
    sys.exit(main())
