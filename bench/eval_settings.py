"""Evaluate trained models again with other map settings (evaluation only, no training).

    python bench/eval_settings.py --set tta_flips=none,h,hv MODEL=DATA [MODEL=DATA ...]

MODEL is a trained model folder, DATA its MVTec-layout category folder. For each value of the one
setting (`tta_flips`, `smoothing_sigma` or `topk_fraction`: the ones that change maps or scores, not
weights) the model is evaluated on DATA's test split; one line per value is printed and appended to
bench/eval_settings.json. Image AUROC: the map maximum and the top-k mean (the detector, if any, is not used).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anoseg
from anoseg.config import parse_setting

HERE = Path(__file__).resolve().parent
EVAL_ONLY = ("tta_flips", "smoothing_sigma", "topk_fraction")
KEYS = ("pixel_auroc", "aupro", "pixel_ap", "image_auroc_max", "image_auroc_topk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="MODEL=DATA")
    ap.add_argument("--set", required=True, metavar="KEY=V1,V2,...", help=f"one of {', '.join(EVAL_ONLY)}")
    ap.add_argument("--out", default=str(HERE / "eval_settings.json"))
    args = ap.parse_args()
    key, _, values = args.set.partition("=")
    if key not in EVAL_ONLY:
        raise SystemExit(f"--set {key}: only {', '.join(EVAL_ONLY)} can change without training")
    out = Path(args.out)
    records = json.loads(out.read_text())["results"] if out.exists() else []
    for pair in args.pairs:
        folder, sep, data = pair.partition("=")
        if not sep:
            raise SystemExit(f"{pair}: expected MODEL=DATA")
        model = anoseg.load(folder, device="cpu")
        model.detector = None  # the map's own image score
        original = model.config
        for text in values.split(","):
            model.config = original.replace(**{key: parse_setting(key, text)})
            start = time.perf_counter()
            m = anoseg.evaluate(model, data, None, progress=False)["metrics"]
            r = {"model": folder, "data": data, key: model.config.to_dict()[key], **{k: m[k] for k in KEYS},
                 "seconds": round(time.perf_counter() - start, 1)}
            records.append(r)
            out.write_text(json.dumps({"results": records}, indent=1) + "\n")
            print(f"{folder} {key}={text}: " + " ".join(f"{k} {m[k]:.3f}" for k in KEYS), flush=True)


if __name__ == "__main__":
    main()
