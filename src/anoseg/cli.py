"""Command line: ``anoseg train | predict | evaluate | demo``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import api
from .config import MAP_SETTINGS, PROFILES, Config, parse_setting, profile_config
from .distributed import is_main_process, shutdown_process_group
from .errors import ERROR_FILE_ENV, AnosegError, ConfigError
from .modelfolder import read_config

# Common settings get their own flags; every other Config field is reachable with --set KEY=VALUE.
TRAIN_FLAGS = {
    "steps": (int, "training iterations"),
    "batch_size": (int, "images per training batch"),
    "image_size": (int, "model input size in pixels (8 times a power of two)"),
    "lr": (float, "peak learning rate (Adam)"),
    "seed": (int, "random seed; the same seed reproduces a run"),
    "device": (str, "auto, cpu, cuda or cuda:N"),
    "num_threads": (int, "CPU threads for torch (0 = default)"),
    "max_minutes": (float, "stop training after this many minutes (0 = no limit)"),
    "checkpoint_every": (int, "save a checkpoint every N steps"),
}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to typed Config overrides."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        if key in ("version", "profile"):
            raise ConfigError(f"--set {key}: unknown setting (see docs/settings.md or anoseg train --help)")
        out[key] = parse_setting(key, value)
    return out


def _threshold_options(p: argparse.ArgumentParser) -> None:
    # --threshold and --detector-threshold: the names before the two thresholds had their own, still accepted
    p.add_argument("--map-threshold", "--threshold", dest="map_threshold", type=float,
                   help="override the map threshold (the lowest map value an outline holds; given here, in every "
                        "image)")
    p.add_argument("--image-threshold", "--detector-threshold", dest="image_threshold", type=float,
                   help="override the image threshold (the verdict on the image score: the detector's, "
                        "else the map's image score)")


def _training_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("--profile", default="fast", choices=list(PROFILES),
                   help="settings preset: paper (256 px, as in the paper), fast (CPU), tiny (tests/demo)")
    t.add_argument("--config", help="start from a saved config.json instead of a profile")
    for name, (kind, text) in TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set lambda_adv=0.05 (repeatable; see docs/settings.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anoseg", description="AnoSeg anomaly segmentation: learn normal parts from "
                                "defect-free images, then paint where new images show defects (1 = defect).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on defect-free images",
                       description="Train on the normal images of DATA: an MVTec AD category folder "
                       "(uses DATA/train/good) or a folder of images. Writes the model to --out.")
    t.add_argument("data", help="MVTec category folder or folder of normal images")
    t.add_argument("--out", required=True, help="model folder to write (config, checkpoints, weights)")
    _training_options(t)
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--overwrite", action="store_true", help="replace a model or checkpoint already in --out")
    t.add_argument("--save-examples", type=int, default=0, metavar="N",
                   help="also save a grid of N synthetic training examples (--out/synthetic_examples.png)")
    t.add_argument("--detector", action="store_true",
                   help="also train the image-level anomaly detector (paper section 3.4) afterwards")
    t.add_argument("--evaluate", action="store_true",
                   help="evaluate on DATA/test afterwards (MVTec layout) into --out/eval")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    ta = sub.add_parser("train-all", help="train every category of an MVTec-layout root",
                        description="Train ROOT/<category> for every category into OUT/<category>, one after "
                        "another or --jobs at a time; finished categories are skipped, interrupted ones resumed. "
                        "Writes OUT/summary.csv and OUT/summary.md.")
    ta.add_argument("root", help="folder of MVTec categories (each with train/good)")
    ta.add_argument("--out", required=True, help="folder for one model folder per category")
    _training_options(ta)
    ta.add_argument("--jobs", type=int, default=1, help="categories trained at the same time (default 1)")
    ta.add_argument("--only", action="append", default=[], metavar="CATEGORY", help="train only these (repeatable)")
    ta.add_argument("--evaluate", action="store_true", help="evaluate each category on its test split")
    ta.add_argument("--quiet", action="store_true", help="no progress bar")

    td = sub.add_parser("train-detector", help="train the image-level anomaly detector for a trained model",
                        description="Train the second GAN of paper section 3.4 on the model's normal training "
                        "images; its score then decides the image verdict in predict and evaluate.")
    td.add_argument("model", help="trained model folder (the detector is saved into it)")
    td.add_argument("data", nargs="?", help="normal images (default: the data the model was trained on)")
    td.add_argument("--steps", type=int, help="detector training iterations (setting detector_steps)")
    td.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="detector settings, e.g. --set detector_lr=1e-4 (see docs/settings.md)")
    td.add_argument("--resume", action="store_true",
                    help="continue an interrupted detector run from its checkpoint (same settings)")
    td.add_argument("--overwrite", action="store_true",
                    help="start again although an interrupted run left a checkpoint")
    td.add_argument("--quiet", action="store_true", help="no progress bars")

    ca = sub.add_parser("calibrate", help="choose a trained model's thresholds again (no training)",
                        description="Choose the image threshold (verdict), the map threshold (outlines' floor) and "
                        "the map background (where outline edges are measured from) "
                        "again from the held-out normal images the model lists, e.g. with other "
                        f"quantiles, with other map settings ({', '.join(MAP_SETTINGS)}: they change the maps, not "
                        "the weights), or for a model saved before the map had its own threshold or its map "
                        "background. The detector stays.")
    ca.add_argument("model", help="trained model folder")
    ca.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="threshold_quantile, map_threshold_quantile or a map setting, "
                    "e.g. --set map_threshold_quantile=0.995 or --set peak_boost=2")

    pr = sub.add_parser("predict", help="anomaly maps for new images",
                        description="Write, per image, a heat-map overlay PNG (defect regions outlined), the raw "
                        "map (16-bit PNG, value/65535, or .npy) and a line in predictions.csv/.jsonl.")
    pr.add_argument("model", help="trained model folder")
    pr.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (quote globs)")
    pr.add_argument("--out", required=True, help="folder for the results")
    _threshold_options(pr)
    pr.add_argument("--map-format", choices=["png", "npy"], default="png", help="raw map format")
    pr.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the model's setting)")
    pr.add_argument("--workers", type=int, default=0,
                    help="processes that decode images beside the model (default 0: in the main process)")
    pr.add_argument("--resume", action="store_true",
                    help="keep the results already in --out and score only the images not in predictions.jsonl")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("evaluate", help="metrics on a labelled test set",
                        description="Pixel AUROC, AUPRO (FPR <= 0.3), pixel AP, image AUROC, F1-max, IoU and F1 of "
                        "the outlines, best IoU and AUPIMO. Writes metrics.json, metrics.md, scores.csv, roc.png, "
                        "pro.png.")
    ev.add_argument("model", help="trained model folder")
    ev.add_argument("data", nargs="?", help="MVTec category folder (uses DATA/test and DATA/ground_truth)")
    ev.add_argument("--normal", help="folder of normal test images (plain layout)")
    ev.add_argument("--abnormal", help="folder of defect test images (plain layout)")
    ev.add_argument("--masks", help="folder of masks named like the defect images (NAME.png or NAME_mask.png)")
    ev.add_argument("--out", required=True, help="folder for the results")
    _threshold_options(ev)
    ev.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    ex = sub.add_parser("export", help="export a model to ONNX (map and score out)",
                        description="Write model.onnx and model.onnx.json (input size, normalisation, thresholds) "
                        "and check that ONNX Runtime gives the same maps as PyTorch.")
    ex.add_argument("model", help="trained model folder")
    ex.add_argument("--out", help="folder for model.onnx and model.onnx.json (default: the model folder)")
    ex.add_argument("--batch", type=int, help="fixed batch size (default: dynamic batch)")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")

    sv = sub.add_parser("serve", help="REST API and inspection web page for a model",
                        description="Serve POST /predict, GET /health, API docs at /docs and an inspection page "
                        "at / (drop an image, see the heat map, outlined defects and the verdict).")
    sv.add_argument("model", help="trained model folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this PC only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20 MB)")
    sv.add_argument("--max-pixels", type=int, default=40_000_000,
                    help="largest declared image size in pixels (default 40 million; guards against bombs)")
    sv.add_argument("--max-concurrent", type=int, default=1,
                    help="images decoded and mapped at the same time (default 1); others wait their turn, and "
                    "after 60 s get 503 busy: this bounds the server's memory, whatever the number of clients")
    sv.add_argument("--save-uploads", metavar="FOLDER",
                    help="keep every upload in FOLDER (default: uploads are never written to disk)")
    sv.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the model's setting)")

    d = sub.add_parser("demo", help="make a small synthetic data set, train, evaluate and predict on it",
                       description="Generates DATA (MVTec layout) if absent, trains the tiny profile, evaluates "
                       "and writes overlays: the whole pipeline in a few minutes on a CPU.")
    d.add_argument("--data", default="demo_data", help="where to write the synthetic data set")
    d.add_argument("--out", default="demo_run", help="folder for the model and results")
    d.add_argument("--steps", type=int, default=None, help="training iterations (default 800)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _train_config(args: argparse.Namespace) -> Config:
    # a new run from a saved recipe: what this version cannot train is refused, not silently dropped
    base = read_config(args.config, for_training=True) if args.config else profile_config(args.profile)
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    overrides.update(parse_sets(args.set))
    return base.replace(**overrides)


def _cmd_train(args: argparse.Namespace, progress: bool) -> None:
    cfg = _train_config(args)
    if args.save_examples:
        api.save_synthetic_examples(cfg, args.data, Path(args.out) / "synthetic_examples.png", args.save_examples)
    model = api.train(cfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite, progress=progress)
    if not is_main_process():  # torchrun: rank 0 reports, trains the detector and evaluates
        return
    print(f"model written to {args.out} (map threshold {model.map_threshold:.4f}, image threshold "
          f"{model.image_threshold:.4f}, {model.meta['train_seconds']:.0f} s)")
    if args.detector:
        _detector_written(args.out, api.train_detector(args.out, args.data, progress=progress))
    if args.evaluate:
        _print_metrics(api.evaluate(model, args.data, Path(args.out) / "eval", progress=progress))


def _cmd_train_all(args: argparse.Namespace, progress: bool) -> None:
    from .train_all import train_all

    rows = train_all(args.root, args.out, _train_config(args), jobs=args.jobs, evaluate=args.evaluate,
                     only=args.only, progress=progress)
    failed = [r["category"] for r in rows if r["status"].startswith("failed")]
    print(Path(args.out, "summary.md").read_text(), end="")
    print(f"{len(rows)} categories, {len(failed)} failed; summary in {args.out}/summary.csv")
    if failed:
        raise AnosegError(f"training failed for {', '.join(failed)} (see each train_all.log)")


def _cmd_calibrate(args: argparse.Namespace, progress: bool) -> None:  # noqa: ARG001 (no progress bar)
    model = api.calibrate(args.model, overrides=parse_sets(args.set))
    print(f"{args.model}: map threshold {model.map_threshold:.4f}, map background {model.map_background:.4f}, "
          f"image threshold {model.image_threshold:.4f}")


def _cmd_train_detector(args: argparse.Namespace, progress: bool) -> None:
    overrides = parse_sets(args.set)
    if args.steps is not None:
        overrides["detector_steps"] = args.steps
    bad = [k for k in overrides if not k.startswith("detector_")]
    if bad:
        raise ConfigError(f"train-detector takes detector settings only, not {', '.join(bad)}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    _detector_written(args.model, api.train_detector(args.model, args.data, overrides=overrides, progress=progress,
                                                     resume=args.resume, overwrite=args.overwrite))


def _cmd_predict(args: argparse.Namespace, progress: bool) -> None:
    from .predict import predict_stream

    model = api.load(args.model, device=args.device)
    summary = predict_stream(model, args.inputs, args.out, map_threshold=args.map_threshold,
                             image_threshold=args.image_threshold, map_format=args.map_format,
                             progress=progress, resume=args.resume, workers=args.workers)
    done = f" ({summary.already_done} already done)" if summary.already_done else ""
    print(f"{summary.scored} image(s) scored{done}, {summary.defects} defect, {summary.skipped} skipped, "
          f"{summary.scored / max(summary.seconds, 1e-9):.1f} img/s; results in {args.out}/predictions.csv")


def _cmd_evaluate(args: argparse.Namespace, progress: bool) -> None:
    if not args.data and not (args.normal or args.abnormal):
        raise AnosegError("give an MVTec category folder, or --normal/--abnormal/--masks folders")
    model = api.load(args.model, device=args.device)
    result = api.evaluate(model, args.data, args.out, map_threshold=args.map_threshold,
                          image_threshold=args.image_threshold, normal=args.normal,
                          abnormal=args.abnormal, masks=args.masks, progress=progress)
    _print_metrics(result)
    print(f"results in {args.out}/metrics.json and metrics.md")


def _cmd_export(args: argparse.Namespace, progress: bool) -> None:  # noqa: ARG001
    from .export import check_export, export_onnx

    model = api.load(args.model, device="cpu")
    path = export_onnx(model, args.out or args.model, batch=args.batch, opset=args.opset)
    diff = check_export(model, path.parent)
    print(f"ONNX model written to {path} (+ {path.name}.json); ONNX Runtime vs PyTorch max map difference "
          f"{diff:.2e}")


def _cmd_serve(args: argparse.Namespace, progress: bool) -> None:  # noqa: ARG001
    from .serve import ServeSettings, serve

    settings = ServeSettings(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
                             max_pixels=args.max_pixels, save_uploads=args.save_uploads,
                             max_concurrent=args.max_concurrent)
    serve(api.load(args.model, device=args.device), settings, model_name=args.model)


def _cmd_demo(args: argparse.Namespace, progress: bool) -> None:
    start = time.perf_counter()
    _print_metrics(api.demo(args.data, args.out, steps=args.steps, progress=progress))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open {args.out}/eval/metrics.md and "
          f"{args.out}/predictions/*_overlay.png")


COMMANDS = {"train": _cmd_train, "train-all": _cmd_train_all, "train-detector": _cmd_train_detector,
            "calibrate": _cmd_calibrate,
            "predict": _cmd_predict, "evaluate": _cmd_evaluate, "export": _cmd_export, "serve": _cmd_serve,
            "demo": _cmd_demo}


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args, not getattr(args, "quiet", False))
    return 0


def _detector_written(folder: str, model) -> None:
    print(f"detector written to {folder} (image threshold {model.detector.image_threshold:.4f}, "
          f"{model.detector.meta['train_seconds']:.0f} s)")


def _print_metrics(result: dict[str, Any]) -> None:
    from .evaluate import markdown_table

    print(markdown_table(result))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """The CLI's warnings as one plain line (the process-wide format is left alone)."""
    (file or sys.stderr).write(f"anoseg: warning: {message}\n")


def _report_error(error: AnosegError) -> None:
    """For a parent process (train-all): the error as JSON in the file it names, not a line to parse."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"error": str(error), "type": type(error).__name__}) + "\n")


def main(argv: list[str] | None = None) -> int:
    previous = warnings.showwarning
    warnings.showwarning = _show_warning  # only while the command runs
    try:
        return run(argv)
    except AnosegError as e:
        print(f"anoseg: error: {e}", file=sys.stderr)
        _report_error(e)
        return 2
    except KeyboardInterrupt:
        print("anoseg: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
        shutdown_process_group()


if __name__ == "__main__":
    sys.exit(main())
