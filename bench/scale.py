"""Time and peak memory as the work grows: evaluate, train and a burst on the server, each point in its own process.

    python bench/scale.py                       # every point; writes bench/scale.json, scale.md, scale.png
    python bench/scale.py --only evaluate       # one kind of point (evaluate, train, serve); other rows are kept
    python bench/scale.py --work RUNS/scale     # where the synthetic data and models go (default bench/runs/scale)

evaluate: a `tiny` model (untrained weights: time and memory do not depend on them) on N synthetic test images of
SIDE x SIDE (BMP), half with a defect mask; 40 distinct images on disk, listed again to make N (each is decoded anew).
train: the `fast` profile for a few steps on N normal 512 x 512 images (100 distinct files, hard-linked to N names,
each decoded anew). serve: a burst of N concurrent 4000 x 4000 PNG uploads with pictures, `--max-concurrent 1`;
the RSS before (model loaded, idle), the peak and what is held once the burst is over.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from arguments import recorded_command
from resultsfile import locked, read_rows

HERE = Path(__file__).resolve().parent
EVALUATE = [(n, side) for side in (512, 1024) for n in (100, 1000, 5000)]
TRAIN = [100, 1000, 10000]
SERVE = [1, 8, 32]
SERVE_SIDE = 4000
TRAIN_STEPS = 20
DISTINCT = 40


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system): unlike wall time, it does not grow when others share the
    cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def synthetic(rng: np.random.Generator, side: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A smooth textured image and its mask (one bright blob where `defect`)."""
    y, x = np.mgrid[0:side, 0:side] / side
    base = 120 + 40 * np.sin(2 * np.pi * (x * rng.uniform(2, 6) + y * rng.uniform(2, 6)))
    image = np.clip(base[..., None] + rng.normal(0, 6, (side, side, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((side, side), np.uint8)
    if defect:
        cy, cx, r = *rng.integers(side // 8, side - side // 8, 2), rng.integers(side // 40, side // 10)
        mask[(y * side - cy) ** 2 + (x * side - cx) ** 2 < r * r] = 255
        image[mask > 0] = 230
    return image, mask


def make_test_set(folder: Path, side: int):
    """DISTINCT images in MVTec layout (half good, half 'blob' with masks); returns their samples."""
    from PIL import Image

    from anoseg.data import mvtec_test_samples

    if not (folder / "done").exists():
        rng = np.random.default_rng(side)
        for i in range(DISTINCT):
            kind = "good" if i % 2 == 0 else "blob"
            image, mask = synthetic(rng, side, kind == "blob")
            (folder / "test" / kind).mkdir(parents=True, exist_ok=True)
            # BMP: decoding is a copy, so the figures are evaluate's own work, not PNG decompression
            Image.fromarray(image).save(folder / "test" / kind / f"{i:03d}.bmp")
            if kind == "blob":
                (folder / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(folder / "ground_truth" / kind / f"{i:03d}_mask.png")
        (folder / "done").touch()
    return mvtec_test_samples(folder)


def point_evaluate(work: Path, n: int, side: int) -> dict:
    from anoseg import AnoSegModel, profile_config
    from anoseg.evaluate import evaluate

    samples = make_test_set(work / f"test_{side}", side)
    samples = [samples[i % len(samples)] for i in range(n)]
    model = AnoSegModel(profile_config("tiny"), map_threshold=0.5, map_score_threshold=0.5, device="cpu")
    before, cpu = rss_mb(), cpu_seconds()
    start = time.perf_counter()
    result = evaluate(model, samples, work / f"eval_{side}_{n}", progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    megapixels = n * side * side / 1e6
    return {"kind": "evaluate", "images": n, "side": side, "megapixels": round(megapixels, 1),
            "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "cpu_seconds_per_megapixel": round(cpu / megapixels, 4),
            "rss_before_mb": round(before), "peak_rss_mb": round(peak_mb()),
            "pixel_auroc": round(result["metrics"]["pixel_auroc"], 4)}


def make_train_set(folder: Path, n: int) -> Path:
    """N normal 512 x 512 images: 100 distinct files, hard-linked to the other names."""
    from PIL import Image

    distinct = folder.parent / "train_distinct"
    if not (distinct / "done").exists():
        distinct.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        for i in range(100):
            Image.fromarray(synthetic(rng, 512, False)[0]).save(distinct / f"{i:03d}.png")
        (distinct / "done").touch()
    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            target = folder / f"{i:05d}.png"
            if not target.exists():
                os.link(distinct / f"{i % 100:03d}.png", target)
        (folder / "done").touch()
    return folder


def point_train(work: Path, n: int) -> dict:
    import anoseg

    data = make_train_set(work / f"train_{n}", n)
    cfg = anoseg.profile_config("fast", steps=TRAIN_STEPS, checkpoint_every=TRAIN_STEPS)
    start, cpu = time.perf_counter(), cpu_seconds()
    model = anoseg.train(cfg, data, work / f"model_{n}", overwrite=True, progress=False)
    return {"kind": "train", "images": n, "side": 512, "steps": TRAIN_STEPS,
            "seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(cpu_seconds() - cpu, 1),
            "peak_rss_mb": round(peak_mb()),
            "train_images": model.meta["train_images"]}


def point_serve(uploads: int) -> dict:
    import io
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient
    from PIL import Image

    from anoseg import AnoSegModel, profile_config
    from anoseg.serve import ServeSettings, create_app

    buf = io.BytesIO()
    Image.fromarray(np.full((SERVE_SIDE, SERVE_SIDE, 3), 120, np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    client = TestClient(create_app(AnoSegModel(profile_config("fast"), map_threshold=0.5, device="cpu"),
                                   ServeSettings(busy_timeout_s=3600)))
    assert client.get("/health").status_code == 200
    idle, cpu = rss_mb(), cpu_seconds()
    start = time.perf_counter()
    with ThreadPoolExecutor(uploads) as pool:
        codes = list(pool.map(lambda _: client.post("/predict?pictures=true", files={"file": ("big.png", data)})
                              .status_code, range(uploads)))
    seconds = time.perf_counter() - start
    return {"kind": "serve", "uploads": uploads, "side": SERVE_SIDE, "upload_kb": round(len(data) / 1024),
            "status": sorted(set(codes)), "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds() - cpu, 1),
            "idle_rss_mb": round(idle),
            "peak_rss_mb": round(peak_mb()), "held_after_mb": round(rss_mb()),
            "held_over_idle_mb": round(rss_mb() - idle)}


def child(args: argparse.Namespace) -> dict:
    kind, *sizes = args.child
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if kind == "evaluate":
        return point_evaluate(work, int(sizes[0]), int(sizes[1]))
    if kind == "train":
        return point_train(work, int(sizes[0]))
    return point_serve(int(sizes[0]))


def points(only: list[str]) -> list[list[str]]:
    todo = [["evaluate", str(n), str(s)] for n, s in EVALUATE] + [["train", str(n)] for n in TRAIN]
    todo += [["serve", str(n)] for n in SERVE]
    return [p for p in todo if not only or p[0] in only]


def key(row: dict) -> tuple:
    return row["kind"], row.get("images", row.get("uploads")), row.get("side")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], choices=["evaluate", "train", "serve"])
    p.add_argument("--work", default=str(HERE / "runs" / "scale"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    results_file = HERE / "scale.json"
    failed = 0
    for point in points(args.only):
        cmd = [sys.executable, __file__, "--work", args.work, "--child", *point]
        print("==", " ".join(point), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"failed ({proc.returncode}):\n{proc.stdout[-2000:]}", flush=True)
            failed += 1
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        row["command"] = recorded_command("scale.py", ["--work", args.work, "--child", *point])
        print(json.dumps(row), flush=True)
        with locked(results_file):
            rows = [r for r in read_rows(results_file) if key(r) != key(row)] + [row]
            write(results_file, sorted(rows, key=lambda r: (r["kind"], r.get("side") or 0, key(r)[1])))
    return 1 if failed else 0


def write(results_file: Path, rows: list[dict]) -> None:
    import platform

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d")}
    results_file.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    lines = ["# Scale: time and peak memory as the work grows", "",
             f"Machine: {meta['machine']}; written {meta['date']} by `python bench/scale.py`. Each row ran in its "
             "own process; its command (in scale.json) reproduces it alone. Plot: scale.png. Wall seconds depend on "
             "what else runs on the machine; CPU seconds (user + system) do not.", "",
             "## evaluate (tiny model, synthetic images, half with a defect)", "",
             "| images | side | megapixels | seconds | CPU seconds | CPU s per megapixel | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['side']} | {r['megapixels']} | {r['seconds']} | {r['cpu_seconds']} "
              f"| {r['cpu_seconds_per_megapixel']} | {r['peak_rss_mb']} |" for r in rows if r["kind"] == "evaluate"]
    lines += ["", f"## train (fast profile, {TRAIN_STEPS} steps, 512 x 512 images)", "",
              "| images | seconds | CPU seconds | peak RSS MB | store |", "|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_mb']} | {r['train_images']} |"
              for r in rows if r["kind"] == "train"]
    lines += ["", f"## serve (burst of concurrent {SERVE_SIDE} x {SERVE_SIDE} uploads, pictures, --max-concurrent 1)",
              "",
              "| uploads | seconds | status | idle RSS MB | peak RSS MB | held after MB | held over idle MB |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['uploads']} | {r['seconds']} | {r['status']} | {r['idle_rss_mb']} | {r['peak_rss_mb']} "
              f"| {r['held_after_mb']} | {r['held_over_idle_mb']} |" for r in rows if r["kind"] == "serve"]
    (HERE / "scale.md").write_text("\n".join(lines) + "\n")
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ev = [r for r in rows if r["kind"] == "evaluate"]
    for side, marker in ((512, "o"), (1024, "s")):
        pts = sorted((r["megapixels"], r["peak_rss_mb"], r["cpu_seconds"]) for r in ev if r["side"] == side)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{side} x {side}")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, label=f"{side} x {side}")
    axes[0].axhline(2048, color="grey", ls=":", label="2 GB target")
    axes[0].set(xlabel="test megapixels", ylabel="peak RSS (MB)", title="evaluate: memory")
    axes[1].set(xlabel="test megapixels", ylabel="CPU seconds", title="evaluate: time (linear = slope 1)")
    tr = sorted((r["images"], r["peak_rss_mb"]) for r in rows if r["kind"] == "train")
    axes[2].plot([p[0] for p in tr], [p[1] for p in tr], marker="o", label="peak RSS")
    axes[2].axhline(4096, color="grey", ls=":", label="4 GB target")
    axes[2].set(xlabel="training images (512 x 512)", ylabel="peak RSS (MB)", title=f"train ({TRAIN_STEPS} steps)")
    sv = sorted((r["uploads"], r["idle_rss_mb"], r["peak_rss_mb"], r["held_after_mb"]) for r in rows
                if r["kind"] == "serve")
    for j, label in ((1, "idle (model loaded)"), (2, "peak"), (3, "held after the burst")):
        axes[3].plot([p[0] for p in sv], [p[j] for p in sv], marker="o", label=label)
    axes[3].set(xlabel=f"concurrent {SERVE_SIDE} x {SERVE_SIDE} uploads", ylabel="RSS (MB)", title="serve burst")
    for ax, has_points in zip(axes, (ev, ev, tr, sv)):
        if has_points:  # a log axis without points cannot be drawn
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    if ev:
        axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(HERE / "scale.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
