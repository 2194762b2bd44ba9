"""anoseg train-all: every category, N at a time, finished ones skipped, one summary."""

import csv
import json
import shutil

import pytest

from anoseg.cli import main
from anoseg.errors import DataError
from anoseg.train_all import plan


@pytest.fixture()
def root(demo_root, tmp_path):
    r = tmp_path / "mvtec"
    for name in ("alpha", "beta"):
        shutil.copytree(demo_root, r / name)
    broken = r / "gamma" / "train" / "good"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not a png")
    (r / "notes").mkdir()  # not a category: ignored
    return r


def read_summary(out):
    with open(out / "summary.csv", newline="") as f:
        return {row["category"]: row for row in csv.DictReader(f)}


def test_train_all_two_at_a_time_then_skips_finished(root, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["train-all", str(root), "--out", str(out), "--profile", "tiny", "--steps", "3", "--batch-size", "4",
            "--jobs", "2", "--quiet"]
    assert main(args) == 2  # gamma fails ...
    err = capsys.readouterr().err
    assert "training failed for gamma" in err
    rows = read_summary(out)
    assert rows["alpha"]["status"] == rows["beta"]["status"] == "trained"  # ... the others do not
    gamma = rows["gamma"]["status"]
    assert gamma.startswith("failed (exit 2): only 1 normal image")  # the child's error, passed back as JSON
    assert json.loads((out / "gamma" / "train_error.json").read_text())["type"] == "DataError"
    # every category trained with the one configuration the parent wrote, not with re-typed options
    cfg = json.loads((out / "train_all_config.json").read_text())
    assert cfg["profile"] == "tiny" and cfg["steps"] == 3 and cfg["batch_size"] == 4
    assert json.loads((out / "alpha" / "config.json").read_text())["steps"] == 3
    assert (out / "alpha" / "model.safetensors").is_file() and (out / "summary.md").is_file()
    assert float(rows["alpha"]["map_threshold"]) >= 0 and rows["alpha"]["steps"] == "3"

    before = (out / "alpha" / "model.safetensors").read_bytes()
    shutil.rmtree(root / "gamma")
    assert main(args) == 0
    rows = read_summary(out)
    assert rows["alpha"]["status"] == rows["beta"]["status"] == "already trained"
    assert (out / "alpha" / "model.safetensors").read_bytes() == before


def test_plan_resumes_interrupted_categories_and_checks_names(root, tmp_path):
    (tmp_path / "runs" / "beta").mkdir(parents=True)
    (tmp_path / "runs" / "beta" / "checkpoint.json").write_text("{}")
    actions = {j.category: j.action for j in plan(root, tmp_path / "runs")}
    assert actions == {"alpha": "train", "beta": "resume", "gamma": "train"}
    with pytest.raises(DataError, match="no such category under .*: delta"):
        plan(root, tmp_path / "runs", only=["delta"])
    with pytest.raises(DataError, match="is one category"):
        plan(root / "alpha", tmp_path / "runs")
    with pytest.raises(DataError, match="no categories found"):
        plan(root / "notes", tmp_path / "runs")
