"""ONNX export: ONNX Runtime gives the same maps and scores as PyTorch."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from anoseg import load  # noqa: E402
from anoseg.cli import main  # noqa: E402
from anoseg.errors import AnosegError, ModelFileError  # noqa: E402
from anoseg.export import ONNX_FILE, ONNX_META, OnnxModel, check_export, export_onnx  # noqa: E402
from anoseg.scoring import OUTLINE_EDGE, OUTLINE_REACH  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(load(tiny_model_dir, device="cpu"), out)
    return out


def test_onnx_matches_pytorch_on_images_of_any_size(tiny_model_dir, exported):
    model = load(tiny_model_dir, device="cpu")
    runner = OnnxModel(exported)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (37, 201), (300, 90)]]
    ours, theirs = model.maps_for_batch(images), runner.maps_for_batch(images)
    for a, b, im in zip(ours, theirs, images):
        assert b.anomaly_map.shape == im.shape[:2]
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-4
        assert abs(a.score - b.score) <= 1e-4 and abs(a.topk_score - b.topk_score) <= 1e-4
    assert runner.image_threshold == model.image_threshold and runner.map_threshold == model.map_threshold
    assert runner.map_background == model.map_background is not None


def test_dynamic_batch_and_sidecar(exported, tiny_model_dir):
    meta = json.loads((exported / ONNX_META).read_text())
    model = load(tiny_model_dir)
    assert meta["image_size"] == model.config.image_size and meta["image_threshold"] == model.image_threshold
    assert meta["map_threshold"] == model.map_threshold and meta["map_background"] == model.map_background
    assert meta["outline"]["edge_fraction"] == OUTLINE_EDGE and meta["outline"]["reach_fraction"] == OUTLINE_REACH
    assert meta["input"]["scale"] == pytest.approx(1 / 127.5) and meta["input"]["offset"] == -1.0
    runner = OnnxModel(exported)
    s, s2 = meta["image_size"], meta["second_short_side"]  # the tiny profile maps at two scales
    assert meta["second_input"]["name"] == "image2" and s2 == model.config.second_short_side
    for b in (1, 5):
        out = runner.run(np.zeros((b, 3, s, 2 * s), np.float32), np.zeros((b, 3, s2, 2 * s2), np.float32))
        assert out["map"].shape == (b, 1, s, 2 * s) and out["map_score"].shape == (b,)


def test_fixed_batch_export_via_cli(tiny_model_dir, tmp_path, capsys):
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path), "--batch", "3"]) == 0
    printed = capsys.readouterr().out
    diff = float(printed.rsplit("difference ", 1)[1])
    assert diff <= 1e-4
    runner = OnnxModel(tmp_path)
    with pytest.raises(AnosegError, match="batches of 3"):
        runner.maps_for_batch([np.zeros((8, 8, 3), np.uint8)])
    assert check_export(load(tiny_model_dir, device="cpu"), tmp_path) <= 1e-4


def test_export_with_detector_scores_like_pytorch(detector_model, tmp_path):
    model = load(detector_model, device="cpu")
    export_onnx(model, tmp_path)
    runner = OnnxModel(tmp_path)
    assert "detector_score" in runner.outputs
    # the sidecar names both thresholds: the detector's decides the verdict, the map's outlines pixels
    assert runner.image_threshold == model.detector.image_threshold != runner.map_threshold == model.map_threshold
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    for a, b in zip(model.maps_for_batch(images), runner.maps_for_batch(images)):
        assert abs(a.detector_score - b.detector_score) <= 1e-4 * max(1.0, abs(a.detector_score))
        assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-4)


def test_bad_export_inputs(tiny_model_dir, tmp_path, capsys):
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path), "--batch", "0"]) == 2
    assert "--batch 0" in capsys.readouterr().err
    (tmp_path / ONNX_FILE).write_bytes(b"not onnx")
    (tmp_path / ONNX_META).write_text(json.dumps({"format": 1, "image_size": 64}))
    with pytest.raises(ModelFileError, match="cannot load the ONNX model"):
        OnnxModel(tmp_path)
    (tmp_path / ONNX_META).write_text(json.dumps({"format": 99}))
    with pytest.raises(ModelFileError, match="export format 99"):
        OnnxModel(tmp_path)


@pytest.mark.parametrize("opset", ["7", "17", "99"])
def test_unsupported_opset_is_refused_before_export(tiny_model_dir, tmp_path, capsys, opset):
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path), "--opset", opset]) == 2
    assert f"--opset {opset}: not supported" in capsys.readouterr().err
    assert not (tmp_path / ONNX_FILE).exists() and not (tmp_path / ONNX_META).exists()


def test_sidecar_records_the_opset_the_file_has(tiny_model_dir, tmp_path):
    import onnx

    export_onnx(load(tiny_model_dir, device="cpu"), tmp_path, opset=20)
    declared = {o.domain: o.version for o in onnx.load(str(tmp_path / ONNX_FILE)).opset_import}
    assert json.loads((tmp_path / ONNX_META).read_text())["opset"] == declared[""] == 20


def test_blended_image_score_exports_like_pytorch(tiny_model_copy, tmp_path):
    from anoseg import calibrate

    calibrate(tiny_model_copy, overrides={"image_score_topk_weight": 0.5})
    model = load(tiny_model_copy, device="cpu")
    export_onnx(model, tmp_path)
    meta = json.loads((tmp_path / ONNX_META).read_text())
    assert meta["image_score_topk_weight"] == 0.5
    runner = OnnxModel(tmp_path)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (41, 150)]]
    for a, b in zip(model.maps_for_batch(images), runner.maps_for_batch(images)):
        assert abs(a.score - b.score) <= 1e-4 and a.score == a.map_score
        assert a.map_score == pytest.approx(0.5 * (a.max_score + a.topk_score), abs=1e-6)
    first = np.asarray(images[0], np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    second = np.zeros((1, 3, meta["second_short_side"], meta["second_short_side"]), np.float32)
    raw = runner.run(first, second)
    flat = raw["map"].reshape(1, -1)
    k = max(1, round(0.01 * flat.shape[1]))
    want = 0.5 * flat.max(1) + 0.5 * np.sort(flat, 1)[:, ::-1][:, :k].mean(1)
    assert np.abs(raw["map_score"] - want).max() <= 1e-5  # the graph's own output, for runtimes other than ours


def test_broad_share_exports_like_pytorch(tiny_model_copy, tmp_path):
    from anoseg import calibrate

    calibrate(tiny_model_copy, overrides={"broad_weight": 1.0, "broad_sigma": 8.0})
    model = load(tiny_model_copy, device="cpu")
    export_onnx(model, tmp_path)
    runner = OnnxModel(tmp_path)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (41, 150)]]
    for a, b in zip(model.maps_for_batch(images), runner.maps_for_batch(images)):
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-4 and abs(a.score - b.score) <= 1e-4


def test_bf16_model_exports_an_fp32_graph(tiny_model_copy, tmp_path):
    # traced under bf16 autocast, the graph fed bfloat16 to Conv and ONNX Runtime refused to load it
    model = load(tiny_model_copy, device="cpu")
    model.config = model.config.replace(precision="bf16")
    export_onnx(model, tmp_path)
    assert model.config.precision == "bf16"  # the model itself is left as it was
    assert json.loads((tmp_path / ONNX_META).read_text())["precision"] == "fp32"
    assert check_export(model, tmp_path) <= 1e-4  # against PyTorch in fp32
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    for a, b in zip(model.maps_for_batch(images), OnnxModel(tmp_path).maps_for_batch(images)):
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 0.05  # bf16 rounding, not another model
