"""Server memory under a burst of large uploads: the peak, and what the process still holds afterwards.

    python bench/serve_memory.py [--uploads 8] [--side 6000] [--pictures]

Builds an untrained `fast` model (memory does not depend on the weights), sends `--uploads` solid-colour
side x side PNGs at the same time through the FastAPI app (`--max-concurrent 1`, the default), and prints the
status codes, the process's RSS before, its peak and its RSS once the burst is over.
"""

from __future__ import annotations

import argparse
import io
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from scale import rss_mb

from anoseg import AnoSegModel, profile_config
from anoseg.serve import ServeSettings, create_app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=8)
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--pictures", action="store_true")
    args = ap.parse_args()
    buf = io.BytesIO()
    Image.fromarray(np.full((args.side, args.side, 3), 120, np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    client = TestClient(create_app(AnoSegModel(profile_config("fast"), map_threshold=0.5, device="cpu"),
                                   ServeSettings()))
    base = rss_mb()
    start = time.perf_counter()

    def send(_):
        r = client.post(f"/predict?pictures={str(args.pictures).lower()}", files={"file": ("big.png", data)})
        return r.status_code

    with ThreadPoolExecutor(args.uploads) as pool:
        codes = list(pool.map(send, range(args.uploads)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.uploads} uploads of {len(data) / 1024:.0f} KB ({args.side} x {args.side}), pictures="
          f"{args.pictures}: status {sorted(set(codes))} counts {[codes.count(c) for c in sorted(set(codes))]}, "
          f"{time.perf_counter() - start:.1f} s, RSS before {base:.0f} MB, peak {peak:.0f} MB, "
          f"held after {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
