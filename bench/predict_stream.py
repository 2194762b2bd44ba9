"""Benchmark: streaming `anoseg predict` over many generated images; images/s and peak memory.

    python bench/predict_stream.py                  # 1,000 and 10,000 images, 256 px, fast profile
    python bench/predict_stream.py --counts 500 --workers 0 1

Images (256 x 256 RGB PNG, brushed-metal textures) are generated into --work first; the model is the
`fast` profile's architecture with untrained weights (speed and memory do not depend on the weights).
Peak memory is the largest total RSS of `anoseg predict` and its DataLoader workers, sampled every
0.1 s. Writes bench/stream_results.json and bench/stream_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from arguments import recorded_command
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def make_images(folder: Path, n: int, size: int = 256) -> None:
    from anoseg.demo import _texture

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png")))
    rng = np.random.default_rng(have)
    base = _texture(rng, size)
    for i in range(have, n):
        # a shifted, re-noised copy: cheap to make, still a distinct image to decode and score
        img = np.roll(base, (i * 7) % size, axis=1) + rng.normal(0, 0.01, base.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:06d}.png", compress_level=1)


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


def run(model: Path, images: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "anoseg", "predict", str(model), str(images), "--out", str(out), "--quiet",
           "--workers", str(workers), "--device", "cpu"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"predict failed: {stderr[-2000:]}")
    n = sum(1 for _ in open(out / "predictions.jsonl"))
    return {"images": n, "workers": workers, "seconds": round(seconds, 1), "images_per_second": round(n / seconds, 1),
            "peak_rss_mb": round(peak, 1), "cli_line": stdout.strip().splitlines()[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--profile", default="fast")
    p.add_argument("--work", default=str(HERE / "runs" / "stream"))
    args = p.parse_args()
    import shutil

    import anoseg
    from anoseg.inference import AnoSegModel

    work = Path(args.work)
    model_dir = work / f"model_{args.profile}"
    AnoSegModel(anoseg.profile_config(args.profile), map_threshold=0.5, device="cpu").save(model_dir)
    results = []
    for n in args.counts:
        images = work / f"images_{n}"
        t = time.perf_counter()
        make_images(images, n)
        print(f"{n} images ready in {images} ({time.perf_counter() - t:.0f} s)", flush=True)
        for w in args.workers:
            out = work / f"pred_{n}_w{w}"
            shutil.rmtree(out, ignore_errors=True)
            r = {"profile": args.profile, **run(model_dir, images, out, w)}
            print(json.dumps(r), flush=True)
            results.append(r)
            shutil.rmtree(out, ignore_errors=True)
    command = recorded_command("predict_stream.py", sys.argv[1:])
    meta = {"command": command, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"}
    (HERE / "stream_results.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    lines = ["# Streaming predict benchmark", "", f"Command: `{command}`  ", f"Machine: {meta['machine']}; "
             f"date {meta['date']}.", "",
             "| images | profile | workers | seconds | img/s | peak RSS MB (with workers) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['profile']} | {r['workers']} | {r['seconds']} | {r['images_per_second']} | "
              f"{r['peak_rss_mb']} |" for r in results]
    lines += ["", "Each image: 256 x 256 RGB PNG decoded, scored, and written back as an overlay PNG and a 16-bit map "
              "PNG, with a CSV and a JSONL line. Model: the profile's architecture, untrained weights.", ""]
    (HERE / "stream_results.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
