"""Scaled-down copies of the real categories, for a GPU machine (../shared does not travel there).

    python bench/make_small_data.py                # short side 128 px -> bench/data_small (git-ignored)
    python bench/make_small_data.py --short 256 --only bottle
    python bench/make_small_data.py --short 256 --jpeg 92   # 256 px copies that fit a 64 MiB `carry` (48 MiB)

Images keep their aspect ratio and are only ever made smaller (Lanczos); masks use nearest neighbour,
so they stay binary. Grey images stay grey. The layout is the same MVTec layout as the source.
--jpeg stores the images (never the masks) as JPEG of that quality: lossy, so compare variants only
against a baseline run on the same copy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CATEGORIES = {"bottle": "mvtec_ad", "commutator": "kolektorsdd", "magnetic_tile": "magnetic_tile"}


def scaled(path: Path, short: int, mask: bool) -> Image.Image:
    im = Image.open(path)
    im.load()
    factor = short / min(im.size)
    if factor >= 1.0:
        return im
    size = (max(1, round(im.width * factor)), max(1, round(im.height * factor)))
    return im.resize(size, Image.NEAREST if mask else Image.LANCZOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=128, help="short side in pixels (larger images are scaled down)")
    ap.add_argument("--only", default=",".join(CATEGORIES), help="comma-separated categories")
    ap.add_argument("--jpeg", type=int, default=0, help="store images as JPEG of this quality (1-100; 0 = PNG)")
    ap.add_argument("--out", default=str(HERE / "data_small"), help="output folder")
    args = ap.parse_args()
    if not 0 <= args.jpeg <= 100:
        ap.error(f"--jpeg {args.jpeg}: must be a JPEG quality from 1 to 100, or 0 for PNG")
    for category in args.only.split(","):
        src = DATA / CATEGORIES[category] / category
        if not src.is_dir():
            raise SystemExit(f"{src}: not found")
        dst = Path(args.out) / CATEGORIES[category] / category
        n = 0
        for path in sorted(src.rglob("*.png")):
            mask = "ground_truth" in path.parts
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            im = scaled(path, args.short, mask)
            if args.jpeg and not mask:
                im.save(out.with_suffix(".jpg"), quality=args.jpeg, subsampling=0)
            else:
                im.save(out, optimize=True)
            n += 1
        print(f"{category}: {n} images -> {dst}")


if __name__ == "__main__":
    main()
