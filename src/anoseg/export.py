"""ONNX export of a trained model, and a small ONNX Runtime runner that gives the same results as PyTorch.

The graph takes normalised images and returns the smoothed anomaly map and the image score, so a line
PC needs only ONNX Runtime, NumPy and an image library. The sidecar JSON says how to feed it.
"""

from __future__ import annotations

import io
import json
import logging
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import load_json
from .config import Config
from .errors import AnosegError, ModelFileError
from .fileio import _write_atomic, make_output_dir, write_text_atomic
from .geometry import MAX_ASPECT, Geometry
from .inference import AnoSegModel, Prediction, by_working_shape, model_input, predictions_from_maps
from .scoring import OUTLINE_EDGE, OUTLINE_REACH, OUTLINE_RULE, TOPK_FRACTION, ImageScorer

RESIZE_DOC = {
    "square": "square, bilinear, to image_size x image_size (aspect ratio not kept)",
    "aspect": "bilinear, short side to image_size, long side to keep the aspect ratio "
              "(at most max_aspect times the short side), rounded to a multiple of image_size / 8; images of one "
              "batch must share that shape",
}
SECOND_RESIZE_DOC = ("as image, with the short side at second_short_side; the map comes out at image's shape "
                     "(the two scales' maps averaged inside the graph)")
ONNX_FILE = "model.onnx"
ONNX_META = "model.onnx.json"
EXPORT_FORMAT = 1


class ExportGraph(nn.Module):
    """What the ONNX file computes: image in [-1, 1] (and image2, the second scale) -> (smoothed map, the map's
    image score[, detector score])."""

    def __init__(self, model: AnoSegModel) -> None:
        super().__init__()
        self.model = model
        self.generator = model.generator  # registered, so the exporter sees the weights as parameters
        det = model.detector
        self.detector_nets = nn.ModuleList([det.generator, det.discriminator] if det is not None else [])

    def forward(self, image: torch.Tensor, image2: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        # an ONNX graph holds fp32 operators only: traced under bf16 autocast, it would feed bfloat16 tensors to
        # Conv, which ONNX Runtime refuses
        raw, maps = self.model.fused_maps([image] if image2 is None else [image, image2], precision="fp32")
        maps = maps.clamp(0.0, 1.0)
        outputs = (maps, self.model.scorer(maps, exportable=True)[0])
        if self.model.detector is not None:
            outputs += (self.model.detector.score(image, raw),)
        return outputs


MIN_OPSET = 18  # the oldest opset torch's ONNX exporter writes


def check_opset(opset: int) -> None:
    """Refuse, before any work, an opset the exporter cannot write (it would fall back to 18 silently)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise AnosegError(f"--opset {opset}: not supported; choose {MIN_OPSET} to {newest}")


def file_opset(path: Path) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def input_names(cfg: Config) -> list[str]:
    return ["image", "image2"] if cfg.second_short_side else ["image"]


def example_inputs(cfg: Config, batch: int | None) -> tuple[tuple[torch.Tensor, ...], tuple[dict, ...] | None]:
    """Example inputs of the export, and which of their dimensions stay free (batch; the sides in aspect mode)."""
    n = batch or 2
    batch_dim = {} if batch else {0: torch.export.Dim("batch", min=1, max=4096)}
    if cfg.resize_mode == "square":
        return (torch.zeros(n, 3, cfg.image_size, cfg.image_size),), ((batch_dim,) if batch_dim else None)
    unit = cfg.image_size // 8  # whole images of any working shape: multiples of image_size / 8
    examples, dynamic = [], []
    for i, side in enumerate(cfg.scales):
        most = int(side // unit * MAX_ASPECT) + 1
        tag = "" if i == 0 else str(i + 1)
        # sides that differ from each other and from the other input's: no shape gets fixed by chance
        examples.append(torch.zeros(n, 3, 2 * side + 2 * i * unit, side + (1 + 2 * i) * unit))
        dynamic.append({**batch_dim, 2: unit * torch.export.Dim(f"rows{tag}", min=8, max=most),
                        3: unit * torch.export.Dim(f"cols{tag}", min=8, max=most)})
    return tuple(examples), tuple(dynamic)


def output_names(model: AnoSegModel) -> list[str]:
    return ["map", "map_score"] + (["detector_score"] if model.detector is not None else [])


def export_onnx(model: AnoSegModel, out: str | Path, batch: int | None = None, opset: int = 18) -> Path:
    """Write ``model.onnx`` and ``model.onnx.json`` into folder `out`; returns the ONNX path.

    `batch` fixes the batch size; None (default) leaves it dynamic.
    """
    if batch is not None and batch < 1:
        raise AnosegError(f"--batch {batch}: must be at least 1 (or leave it out for a dynamic batch)")
    check_opset(opset)
    cfg = model.config
    out = make_output_dir(out)
    graph = ExportGraph(model).to("cpu").eval()  # moves the model's networks to the CPU, in eval mode
    examples, dynamic = example_inputs(cfg, batch)
    names = output_names(model)
    inputs = input_names(cfg)

    def write(path: Path) -> None:
        # the exporter is chatty (progress lines, warnings about torchvision); none of it concerns the user
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, examples, input_names=inputs, output_names=names,
                                        dynamic_shapes=dynamic, opset_version=opset, dynamo=True,
                                        external_data=False, verbose=False)
            program.save(str(path), external_data=False)
        quiet.setLevel(level)

    try:
        _write_atomic(out / ONNX_FILE, write)
    finally:
        graph.to(model.device)
    thresholds = model.thresholds()
    meta = {
        "format": EXPORT_FORMAT,
        "onnx": ONNX_FILE,
        "input": {"name": "image", "shape": [batch or "batch", 3, *(
                      [cfg.image_size] * 2 if cfg.resize_mode == "square" else ["height", "width"])],
                  "dtype": "float32", "layout": "NCHW", "colour": "RGB",
                  "resize": RESIZE_DOC[cfg.resize_mode],
                  "normalise": "x = pixel / 127.5 - 1 for 8-bit RGB pixels (0..255)", "scale": 1 / 127.5,
                  "offset": -1.0},
        "outputs": {"map": "B x 1 x H x W smoothed anomaly map in [0, 1], 1 = defect; resize (bilinear) to "
                           "the image's own size",
                    "map_score": "B: the map's image score, (1 - w) * its maximum + w * the mean of its k highest "
                                 "pixels (w = image_score_topk_weight, k = round(topk_fraction * H * W), at least 1)",
                    **({"detector_score": "B: the anomaly detector's score (decides the verdict)"}
                       if model.detector is not None else {})},
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "max_aspect": MAX_ASPECT,
        **({"second_input": {"name": "image2", "shape": [batch or "batch", 3, "height2", "width2"],
                             "resize": SECOND_RESIZE_DOC}, "second_short_side": cfg.second_short_side}
           if cfg.second_short_side else {}),
        "batch": batch,
        "map_threshold": thresholds.map,
        "map_background": thresholds.background,
        "outline": {"rule": OUTLINE_RULE, "edge_fraction": OUTLINE_EDGE, "reach_fraction": OUTLINE_REACH},
        "score_output": "detector_score" if model.detector is not None else "map_score",
        "image_threshold": thresholds.image,
        "topk_fraction": TOPK_FRACTION,
        "image_score_topk_weight": cfg.image_score_topk_weight,
        "precision": "fp32",  # a bf16 model's graph computes in fp32: its maps differ by bf16's rounding
        "opset": file_opset(out / ONNX_FILE),  # what the file holds, not what was asked
        "torch": torch.__version__,
    }
    write_text_atomic(out / ONNX_META, json.dumps(meta, indent=2) + "\n")
    return out / ONNX_FILE


class OnnxModel:
    """Runs an exported model with ONNX Runtime; `maps_for_batch` mirrors :class:`AnoSegModel`'s."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise AnosegError("onnxruntime is not installed: pip install 'anoseg[deploy]'") from None
        folder = Path(folder)
        self.meta = load_json(folder / ONNX_META)
        if self.meta.get("format") != EXPORT_FORMAT:
            raise ModelFileError(f"{folder / ONNX_META}: export format {self.meta.get('format')!r} is not supported")
        options = ort.SessionOptions()
        # no busy-waiting between runs: idle ONNX Runtime threads would take the CPU from everything else
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for damaged files
            raise ModelFileError(f"{folder / ONNX_FILE}: cannot load the ONNX model ({e})") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.size = int(self.meta["image_size"])
        self.geometry = Geometry(self.size, self.meta.get("resize_mode", "square"),
                                 int(self.meta.get("second_short_side", 0)))
        retired = {"short_side": (0, self.size), "max_aspect": (MAX_ASPECT,), "topk_fraction": (TOPK_FRACTION,)}
        if any(self.meta.get(k, same[0]) not in same for k, same in retired.items()):
            raise ModelFileError(f"{folder / ONNX_META}: exported by an older anoseg with a geometry or score this "
                                 "version does not reproduce (short_side, max_aspect, topk_fraction); export it again")
        self.scorer = ImageScorer(float(self.meta.get("image_score_topk_weight", 0.0)))
        # "threshold": the image threshold's name in sidecars written before the two had their own names
        self.image_threshold = self.meta.get("image_threshold", self.meta.get("threshold"))
        self.map_threshold = self.meta.get("map_threshold")
        self.map_background = self.meta.get("map_background")

    def run(self, x: np.ndarray, *second: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs for a normalised batch (B x 3 x H x W float32 in [-1, 1]), and for two-scale models the
        same images at the second scale."""
        names = ["image", "image2"][:len(self.geometry.scales)]
        feed = {name: a.astype(np.float32, copy=False) for name, a in zip(names, (x, *second))}
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def maps_for_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        fixed = self.meta.get("batch")
        if fixed and len(images) != fixed:
            raise AnosegError(f"this ONNX model was exported for batches of {fixed}, got {len(images)}")
        return by_working_shape(images, self.geometry, self._maps_same_shape)

    def _maps_same_shape(self, images: list[np.ndarray], shapes: tuple[tuple[int, int], ...]) -> list[Prediction]:
        res = self.run(*(model_input(images, shape) for shape in shapes))
        return predictions_from_maps(torch.from_numpy(res["map"]), images, self.scorer, res.get("detector_score"))


def check_export(model: AnoSegModel, folder: str | Path, n: int = 2, seed: int = 0) -> float:
    """Largest difference between the ONNX Runtime and PyTorch maps on random images (same sizes).

    PyTorch computes in fp32 here, as the graph does, so the figure measures the export, not bf16's rounding.
    """
    runner = OnnxModel(folder)
    rng = np.random.default_rng(seed)
    fixed = runner.meta.get("batch")
    # a graph of a fixed batch takes whole batches of one working shape; a dynamic one, any sizes
    images = [rng.integers(0, 256, (96 if fixed else 96 + 13 * i, 120, 3), dtype=np.uint8) for i in range(fixed or n)]
    ours = model.maps_for_batch(images, precision="fp32")
    theirs = runner.maps_for_batch(images)
    return max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in zip(ours, theirs))


def onnx_images_per_second(folder: str | Path, n: int = 64, batch: int = 32, threads: int | None = None,
                           seed: int = 0) -> float:
    """End-to-end images/s of the ONNX runner on random 256 px RGB images (resize, network, map back)."""
    runner = OnnxModel(folder, threads=threads)
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(n)]
    runner.maps_for_batch(images[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, n, batch):
        runner.maps_for_batch(images[i:i + batch])
    return n / (time.perf_counter() - start)

