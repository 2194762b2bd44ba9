"""Streaming predict: DataLoader workers, results appended as they come, --resume after an interruption."""

import csv
import json

import numpy as np
import pytest

from anoseg import load
from anoseg.cli import main
from anoseg.predict import iter_inputs, predict, predict_stream

from .conftest import write_png


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(23):
        sub = "" if i < 10 else "line2/"
        write_png(root / f"{sub}{i:03d}.png", rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = load(tiny_model_dir, device="cpu")
    m.config = m.config.replace(batch_size_infer=4)
    return m


def rows(out):
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return table, [json.loads(ln) for ln in lines]


def test_workers_give_the_same_results_in_the_same_order(model, photos, tmp_path):
    a = predict(model, [photos], tmp_path / "a", progress=False)
    b = predict(model, [photos], tmp_path / "b", progress=False, workers=2)
    assert len(a) == 23 and [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["score"] for r in a] == [r["score"] for r in b]
    assert [r["overlay"] for r in a] == [r["overlay"] for r in b]
    assert any(r["overlay"].startswith("line2__") for r in a)


def test_resume_after_an_interruption_scores_each_image_once(model, photos, tmp_path, monkeypatch):
    full = predict(model, [photos], tmp_path / "full", progress=False)
    out = tmp_path / "part"
    real = model.maps_for_batch
    calls = []

    def dies_on_third_batch(images):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(images)

    monkeypatch.setattr(model, "maps_for_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_stream(model, [photos], out, progress=False)
    monkeypatch.setattr(model, "maps_for_batch", real)
    table, lines = rows(out)
    assert len(table) == len(lines) == 8  # two batches of 4 were on disk before the interruption
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"path": "half a line')  # as a kill in the middle of a write leaves it

    summary = predict_stream(model, [photos], out, progress=False, resume=True)
    assert summary.already_done == 8 and summary.scored == 15
    table, lines = rows(out)
    assert [r["path"] for r in lines] == [r["path"] for r in full]
    assert [r["score"] for r in lines] == [r["score"] for r in full]
    assert [r["path"] for r in table] == [r["path"] for r in full]

    again = predict_stream(model, [photos], out, progress=False, resume=True)
    assert again.scored == 0 and again.already_done == 23


def test_stream_keeps_no_rows_and_cli_reports_speed(tiny_model_dir, photos, tmp_path, capsys):
    model = load(tiny_model_dir, device="cpu")
    summary = predict_stream(model, [photos], tmp_path / "s", progress=False)
    assert summary.records == [] and summary.scored == 23
    assert main(["predict", str(tiny_model_dir), str(photos), "--out", str(tmp_path / "c"), "--quiet",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "23 image(s) scored" in printed and "img/s" in printed


def test_inputs_are_found_lazily_without_repeats(photos, tmp_path):
    found = iter_inputs([photos / "line2", photos, str(photos / "*.png"), photos / "000.png"])
    assert next(found)[0].parent.name == "line2"  # a generator: the first file comes before the walk ends
    paths = [p for p, _ in found]
    assert len(paths) + 1 == 23 and len(set(paths)) == len(paths)
    with pytest.raises(Exception, match="no such file or folder"):
        list(iter_inputs([tmp_path / "missing"]))
