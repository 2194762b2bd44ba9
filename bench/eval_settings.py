"""Evaluate trained models again with other map settings (evaluation only, no training).

    python bench/eval_settings.py --set peak_boost=0,2,4 MODEL=DATA [MODEL=DATA ...]
    python bench/eval_settings.py --set broad_weight=0,0.25 --fix broad_sigma=12 MODEL=DATA

MODEL is a trained model folder, DATA its MVTec-layout category folder. For each value of the one
setting (one of anoseg.config.MAP_SETTINGS, listed by --help: the ones that change maps, scores and
thresholds, not weights) the model is evaluated on DATA's test split; one line per value is printed and appended
to bench/eval_settings.json (or --out; sweeps run side by side take turns through a FILE.lock beside it).
`--fix KEY=VALUE` (repeatable) sets another such setting, one value, for every evaluation of the sweep.
Image AUROC: the map's image score, the map maximum and the top-k mean (the detector, if any, is not used).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resultsfile import locked, read_rows

from anoseg.config import MAP_SETTINGS

HERE = Path(__file__).resolve().parent
EVAL_ONLY = MAP_SETTINGS
KEYS = ("pixel_auroc", "aupro", "pixel_ap", "image_auroc_map", "image_auroc_max", "image_auroc_topk")


def evaluations(model, data: str | Path, key: str, values: list[Any]) -> Iterator[tuple[Any, dict, float]]:
    """(value, metrics, seconds) of `model` on `data` with setting `key` at each value; the model's own
    settings are back in place afterwards."""
    import anoseg

    original = model.config
    try:
        for value in values:
            model.config = original.replace(**{key: value})
            start = time.perf_counter()
            metrics = anoseg.evaluate(model, data, None, progress=False)["metrics"]
            yield value, metrics, time.perf_counter() - start
    finally:
        model.config = original


def parse_values(key: str, texts: str) -> list[Any]:
    """The values of ``--set KEY=V1,V2``, each checked as a setting before any model is loaded."""
    from anoseg import Config, ConfigError
    from anoseg.config import parse_setting

    if key not in EVAL_ONLY:
        raise SystemExit(f"--set {key}: only {', '.join(EVAL_ONLY)} can change without training")
    try:
        values = [parse_setting(key, t) for t in texts.split(",")]  # its errors name --set KEY=VALUE
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    try:
        for v in values:
            Config().replace(**{key: v})  # validated on construction
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    return values


def append_record(out: Path, record: dict) -> None:
    """Add one row to `out` as it stands on disk (see resultsfile), the file replaced whole."""
    from anoseg.fileio import write_text_atomic

    with locked(out):
        write_text_atomic(out, json.dumps({"results": [*read_rows(out), record]}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="MODEL=DATA")
    ap.add_argument("--set", required=True, metavar="KEY=V1,V2,...", help=f"one of {', '.join(EVAL_ONLY)}")
    ap.add_argument("--fix", action="append", default=[], metavar="KEY=VALUE",
                    help="another of those settings, the same in every evaluation (repeatable)")
    ap.add_argument("--out", default=str(HERE / "eval_settings.json"))
    args = ap.parse_args()
    key, _, texts = args.set.partition("=")
    values = parse_values(key, texts)
    fixed = {}
    for text in args.fix:
        name, _, value = text.partition("=")
        if name == key or name in fixed:
            raise SystemExit(f"--fix {text}: {name} is already set (by --set or another --fix)")
        one = parse_values(name, value)
        if len(one) != 1:
            raise SystemExit(f"--fix {text}: one value only (a sweep over values is --set's)")
        fixed[name] = one[0]
    bad = [p for p in args.pairs if "=" not in p]
    if bad:
        raise SystemExit(f"{bad[0]}: expected MODEL=DATA")
    pairs = [p.partition("=")[::2] for p in args.pairs]

    import anoseg

    out = Path(args.out)
    for folder, data in pairs:
        try:
            model = anoseg.load(folder, device="cpu")
        except anoseg.AnosegError as e:
            raise SystemExit(str(e)) from None
        model.detector = None  # the map's own image score
        model.config = model.config.replace(**fixed)
        for value, m, seconds in evaluations(model, data, key, values):
            append_record(out, {"model": folder, "data": data, **fixed, key: value, **{k: m[k] for k in KEYS},
                                "seconds": round(seconds, 1)})
            shown = " ".join(f"{k}={v}" for k, v in {**fixed, key: value}.items())
            print(f"{folder} {shown}: " + " ".join(f"{k} {m[k]:.3f}" for k in KEYS), flush=True)


if __name__ == "__main__":
    main()
