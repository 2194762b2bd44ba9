"""The image-level anomaly detector: score formula, training, save/load, use in predict and evaluate."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from anoseg import evaluate, load, predict, profile_config, train
from anoseg.detector import pair_scores
from anoseg.modelfolder import DETECTOR_WEIGHTS


class IdentityDisc(nn.Module):
    """Features = the (image, mask) pair itself, so the score can be computed by hand."""

    def forward(self, image, mask):
        return None, torch.cat([image, mask], dim=1)


def test_score_formula_known_values():
    image = torch.zeros(1, 3, 2, 2)
    recon = torch.full((1, 3, 2, 2), 0.5)
    amap = torch.ones(1, 1, 2, 2)
    # real pair (0, mask 0 -> -1), fake pair (0.5, map 1 -> +1): per pixel (3 * 0.25 + 4) / 4
    mse = (3 * 0.25 + 4) / 4
    # features: real (0, 0) against fake (0.5, 1) at 4 pixels: sqrt(4 * (3 * 0.25 + 1))
    feat = math.sqrt(4 * 1.75)
    got = pair_scores(IdentityDisc(), image, recon, amap)
    assert got.item() == pytest.approx(1.0 * mse + 0.1 * feat)  # the paper's weights


def test_score_is_per_image_and_zero_for_a_perfect_normal_pair():
    image = torch.rand(3, 3, 4, 4)
    amap = torch.zeros(3, 1, 4, 4)
    got = pair_scores(IdentityDisc(), image, image.clone(), amap)
    assert got.shape == (3,) and torch.allclose(got, torch.zeros(3))


def test_detector_round_trip(detector_model, demo_root):
    a = load(detector_model)
    b = load(detector_model)
    assert a.detector is not None and a.detector.image_threshold is not None
    img = np.zeros((40, 50, 3), np.uint8)
    pa, pb = a.predict_images([img])[0], b.predict_images([img])[0]
    assert pa.detector_score is not None and pa.score == pa.detector_score
    assert pa.detector_score == pytest.approx(pb.detector_score, rel=1e-6)
    for key, value in a.detector.generator.state_dict().items():
        assert torch.equal(value, b.detector.generator.state_dict()[key])


def test_predict_and_evaluate_use_the_detector(detector_model, demo_root, tmp_path):
    model = load(detector_model)
    records = predict(model, [demo_root / "test" / "good"], tmp_path / "p", progress=False)
    for r in records:
        assert r["image_threshold"] == model.detector.image_threshold and r["map_threshold"] == model.map_threshold
        assert r["image_threshold"] != r["map_threshold"]  # a detector model has two different thresholds
        assert r["verdict"] == ("defect" if r["detector_score"] > model.detector.image_threshold else "normal")
    from sklearn.metrics import roc_auc_score

    m = evaluate(model, demo_root, tmp_path / "e", progress=False)["metrics"]
    rows = list(csv.DictReader(open(tmp_path / "e" / "scores.csv")))
    labels = [int(r["label"]) for r in rows]
    for key, column in (("image_auroc_max", "max_score"), ("image_auroc_topk", "topk_score"),
                        ("image_auroc_detector", "detector_score")):
        assert m[key] == pytest.approx(roc_auc_score(labels, [float(r[column]) for r in rows]), abs=1e-4), key
    assert m["image_auroc"] == m["image_auroc_detector"]


def test_retraining_anoseg_removes_the_stale_detector(detector_model, demo_root, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(detector_model, folder)
    with pytest.warns(UserWarning, match="detector is removed"):
        train(profile_config("tiny", steps=2, batch_size=4), demo_root, folder, overwrite=True, progress=False)
    assert not (folder / DETECTOR_WEIGHTS).exists() and load(folder).detector is None


def test_image_threshold_judges_the_map_maximum_without_a_detector(tiny_model_dir, demo_root, tmp_path):
    import csv

    model = load(tiny_model_dir)
    predict(model, [demo_root / "test" / "good"], tmp_path, image_threshold=0.0, progress=False)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["verdict"] == "defect" and float(r["image_threshold"]) == 0.0 for r in rows)
    assert all(float(r["map_threshold"]) == model.map_threshold for r in rows)  # the outlines keep their own


def _interrupt_at(monkeypatch, stop_step):
    """Make the detector loop see a Ctrl-C during step `stop_step` (0-based), as a user pressing it would."""
    import os
    import signal

    import anoseg.detector_training as dt

    real = dt._detector_step

    def step(*args):
        real(*args)
        if args[-1] == stop_step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(dt, "_detector_step", step)


def test_an_interrupted_detector_resumes_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    from anoseg import AnosegError, train_detector
    from anoseg.modelfolder import DETECTOR_CKPT_STATE, DETECTOR_CKPT_STEM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparison: one summation order
    try:
        whole, parts = tmp_path / "whole", tmp_path / "parts"
        shutil.copytree(tiny_model_dir, whole)
        shutil.copytree(tiny_model_dir, parts)
        train_detector(whole, overrides={"detector_steps": 6}, progress=False)
        with monkeypatch.context() as m:
            _interrupt_at(m, 3)
            with pytest.raises(AnosegError, match="interrupted at step 4.*--resume"):
                train_detector(parts, overrides={"detector_steps": 6}, progress=False)
        assert (parts / DETECTOR_CKPT_STATE).is_file() and not (parts / DETECTOR_WEIGHTS).exists()
        with pytest.raises(AnosegError, match="--resume.*--overwrite"):  # the checkpoint is never lost silently
            train_detector(parts, progress=False)
        # the one resume policy: the run keeps its recipe (a new rate is named and ignored); detector_steps=6 comes
        # from the checkpoint
        with pytest.warns(UserWarning, match="ignored: detector_lr"):
            train_detector(parts, overrides={"detector_lr": 1e-3}, progress=False, resume=True)
        assert not (parts / DETECTOR_CKPT_STATE).exists() and not list(parts.glob(f"{DETECTOR_CKPT_STEM}*"))
        a, b = load(whole).detector, load(parts).detector
        for net in ("generator", "discriminator"):
            sa, sb = getattr(a, net).state_dict(), getattr(b, net).state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), net
        assert b.meta["steps_done"] == 6 and a.image_threshold == b.image_threshold
    finally:
        torch.set_num_threads(threads)


def test_detector_batch_size_sets_the_detector_batch_alone(tiny_model_dir, tmp_path, monkeypatch):
    """The fast profile trains AnoSeg in batches of 8 and its detector, as measured, in batches of 16."""
    import anoseg.detector_training as dt
    from anoseg import train_detector

    seen = []
    step = dt._detector_step
    monkeypatch.setattr(dt, "_detector_step", lambda det, amap, x01, *rest: (seen.append(len(x01)),
                                                                              step(det, amap, x01, *rest)))
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    batch = load(folder).config.detector_batch_size
    train_detector(folder, overrides={"detector_steps": 2}, progress=False)
    train_detector(folder, overrides={"detector_steps": 2, "detector_batch_size": 3}, progress=False, overwrite=True)
    assert seen == [batch, batch, 3, 3] and batch == 16
    fast = profile_config("fast")
    assert (fast.batch_size, fast.detector_batch_size) == (8, 16)


def test_a_detector_for_a_model_an_older_anoseg_trained_keeps_how_that_model_was_trained(tiny_model_copy):
    import json

    from anoseg import train_detector

    retired = {"seg_loss": "l1", "anomaly_families": ["paste", "shading"], "edge_feather": 2}
    saved = {**json.loads((tiny_model_copy / "config.json").read_text()), **retired}
    (tiny_model_copy / "config.json").write_text(json.dumps(saved))
    train_detector(tiny_model_copy, overrides={"detector_steps": 2}, progress=False)
    assert json.loads((tiny_model_copy / "config.json").read_text()) == {**saved, "detector_steps": 2}
    assert (tiny_model_copy / DETECTOR_WEIGHTS).is_file()


def test_resume_without_a_detector_checkpoint_says_so(tiny_model_dir, tmp_path):
    from anoseg import AnosegError, train_detector

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    with pytest.raises(AnosegError, match="no detector checkpoint"):
        train_detector(folder, overrides={"detector_steps": 2}, progress=False, resume=True)


def test_a_kill_between_detector_weights_and_json_keeps_the_previous_pair(tiny_model_dir, tmp_path, monkeypatch):
    import sys

    from anoseg import train_detector

    checkpoint_mod = sys.modules["anoseg.checkpoint"]
    real_save_json, calls = checkpoint_mod.save_json, []

    def crash_on_second(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second resume point: its weights are written, its JSON never lands
            raise RuntimeError("simulated power cut")
        real_save_json(path, data)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole, parts = tmp_path / "whole", tmp_path / "parts"
        shutil.copytree(tiny_model_dir, whole)
        shutil.copytree(tiny_model_dir, parts)
        train_detector(whole, overrides={"detector_steps": 8}, progress=False)  # resume points at 3 and 6
        with monkeypatch.context() as m:
            m.setattr(checkpoint_mod, "save_json", crash_on_second)
            with pytest.raises(RuntimeError, match="power cut"):
                train_detector(parts, overrides={"detector_steps": 8}, progress=False)
        train_detector(parts, progress=False, resume=True)  # from step 3, whose weights are still there
        a, b = load(whole).detector, load(parts).detector
        sa, sb = a.generator.state_dict(), b.generator.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    finally:
        torch.set_num_threads(threads)
