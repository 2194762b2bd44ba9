"""Peak server memory under many large uploads at once (issue 12, item 2).

    python bench/serve_memory.py [--uploads 16] [--side 6000] [--pictures]

Builds an untrained `fast` model (memory does not depend on the weights), sends `--uploads` solid-colour
side x side PNGs at the same time through the FastAPI app, and prints the status codes and the
process's peak RSS.
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

from anoseg import AnoSegModel, profile_config
from anoseg.serve import ServeSettings, create_app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=16)
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--pictures", action="store_true")
    args = ap.parse_args()
    buf = io.BytesIO()
    Image.fromarray(np.full((args.side, args.side, 3), 120, np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    client = TestClient(create_app(AnoSegModel(profile_config("fast"), map_threshold=0.5, device="cpu"),
                                   ServeSettings()))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()

    def send(_):
        r = client.post(f"/predict?pictures={str(args.pictures).lower()}", files={"file": ("big.png", data)})
        return r.status_code

    with ThreadPoolExecutor(args.uploads) as pool:
        codes = list(pool.map(send, range(args.uploads)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.uploads} uploads of {len(data) / 1024:.0f} KB ({args.side} x {args.side}), pictures="
          f"{args.pictures}: status {sorted(set(codes))} counts {[codes.count(c) for c in sorted(set(codes))]}, "
          f"{time.perf_counter() - start:.1f} s, peak RSS {peak:.0f} MB (before the uploads {base:.0f} MB)")


if __name__ == "__main__":
    main()
