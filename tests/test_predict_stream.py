"""Streaming predict: DataLoader workers, results appended as they come, --resume after an interruption."""

import csv
import json

import numpy as np
import pytest

from anoseg import load
from anoseg.cli import main
from anoseg.inputs import iter_inputs
from anoseg.predict import predict, predict_stream

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
    from anoseg.errors import DataError

    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_inputs([tmp_path / "missing"]))


def test_resume_lists_each_unreadable_file_once(model, tmp_path):
    src = tmp_path / "in"
    write_png(src / "a.png", np.zeros((20, 20, 3), np.uint8))
    (src / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning):
        predict(model, [src], tmp_path / "out", progress=False)
    for _ in range(2):
        with pytest.warns(UserWarning):
            predict(model, [src], tmp_path / "out", progress=False, resume=True)
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert len(lines) == 1 and "broken.png" in lines[0]


def test_resume_matches_inputs_however_spelled(model, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos.parent)
    out = tmp_path / "out"
    predict(model, [photos.name], out, progress=False)
    first = rows(out)[1]
    for spelled in (f"./{photos.name}", str(photos), f"{photos.name}/../{photos.name}"):
        summary = predict_stream(model, [spelled], out, progress=False, resume=True)
        assert summary.already_done == 23 and summary.scored == 0
    assert rows(out)[1] == first  # nothing scored twice


def test_resume_with_other_inputs_is_refused(model, photos, tmp_path):
    from anoseg.errors import DataError

    out = tmp_path / "out"
    predict(model, [photos / "line2"], out, progress=False)
    with pytest.raises(DataError, match="--resume: the inputs differ"):
        predict(model, [photos], out, progress=False, resume=True)


def test_glob_through_a_symlink_loop_scores_each_file_once(model, tmp_path):
    names = tmp_path / "names"
    for i in range(4):
        write_png(names / "sub" / f"{i}.png", np.zeros((20, 20, 3), np.uint8))
    (names / "sub" / "loop").symlink_to("..")
    records = predict(model, [str(names / "**" / "*.png")], tmp_path / "out", progress=False)
    assert len(records) == 4


def test_file_names_that_are_not_utf8(model, tmp_path):
    import os

    src = tmp_path / "nu"
    write_png(src / "a.png", np.zeros((20, 20, 3), np.uint8))
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    write_png(src / odd, np.full((20, 20, 3), 9, np.uint8))
    out = tmp_path / "out"
    predict(model, [src], out, progress=False)
    table, lines = rows_bytes_safe(out)
    assert len(table) == len(lines) == 2
    paths = {ln["path"] for ln in lines}
    assert str(src / odd) in paths  # lossless: os.fsencode gives the original bytes back
    assert os.fsencode(str(src / odd)) in {os.fsencode(r["path"]) for r in table}
    summary = predict_stream(model, [src], out, progress=False, resume=True)
    assert summary.already_done == 2 and summary.scored == 0


def rows_bytes_safe(out):
    with open(out / "predictions.csv", newline="", errors="surrogateescape") as f:
        table = list(csv.DictReader(f))
    return table, [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]


def test_evaluate_with_a_file_name_that_is_not_utf8(model, tmp_path):
    import os

    from anoseg import evaluate

    odd = os.fsdecode(b"caf\xe9.png")
    write_png(tmp_path / "ok" / odd, np.zeros((20, 20, 3), np.uint8))
    write_png(tmp_path / "ok" / "b.png", np.zeros((20, 20, 3), np.uint8))
    evaluate(model, None, tmp_path / "eval", normal=tmp_path / "ok", progress=False)
    with open(tmp_path / "eval" / "scores.csv", newline="", errors="surrogateescape") as f:
        table = list(csv.DictReader(f))
    assert {os.fsencode(r["path"]) for r in table} == {os.fsencode(str(tmp_path / "ok" / n)) for n in (odd, "b.png")}
