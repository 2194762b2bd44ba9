"""Inputs a user can give that once ended in a traceback, an HTTP 500 or lost results: each now gets a clear
error naming the problem (exit status 2) or the right result."""

import json
import shutil

import pytest
import torch

from anoseg import AnosegError, load
from anoseg.checkpoint import load_tensors, save_tensors
from anoseg.cli import main
from anoseg.modelfolder import WEIGHTS_FILE


def good_image(demo_root):
    return demo_root / "test" / "good" / "000.png"


def test_out_below_a_regular_file_is_one_clear_line(tiny_model_dir, demo_root, tmp_path, capsys):
    blocker = tmp_path / "existing.txt"
    blocker.write_text("a file")
    assert main(["predict", str(tiny_model_dir), str(good_image(demo_root)), "--out", str(blocker / "sub"),
                 "--quiet"]) == 2
    assert "existing.txt is a file, not a folder; give --out a folder" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "mps", "xla", "meta", "cuda:x"])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_unknown_or_unusable_device_is_refused_by_name(tiny_model_dir, demo_root, tmp_path, capsys, device,
                                                          command):
    args = [str(good_image(demo_root))] if command == "predict" else [str(demo_root)]
    assert main([command, str(tiny_model_dir), *args, "--out", str(tmp_path / "o"), "--device", device,
                 "--quiet"]) == 2
    assert f"device {device!r}: use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["-1", "-2"])
def test_a_negative_thread_count_is_refused_by_name(demo_root, tmp_path, capsys, text):
    assert main(["train", str(demo_root), "--out", str(tmp_path / "m"), "--profile", "tiny", "--num-threads", text,
                 "--quiet"]) == 2
    assert f"setting num_threads={text}: must not be negative" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_serve_refuses_a_non_finite_upload_limit_at_start(value):
    from anoseg.serve import ServeSettings

    with pytest.raises(AnosegError, match="--max-upload-mb .*: must be a positive number"):
        ServeSettings(max_upload_mb=value)


def test_a_model_with_non_finite_weights_is_refused_and_nothing_is_written(tiny_model_dir, demo_root, tmp_path,
                                                                           capsys):
    folder = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_tensors(folder / WEIGHTS_FILE)
    save_tensors(folder / WEIGHTS_FILE, {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                         for k, v in tensors.items()})
    meta_before = (folder / "model.json").read_text()
    for argv in (["predict", str(folder), str(good_image(demo_root)), "--out", str(tmp_path / "p")],
                 ["evaluate", str(folder), str(demo_root), "--out", str(tmp_path / "e")],
                 ["calibrate", str(folder)]):
        assert main([*argv, "--quiet"] if argv[0] != "calibrate" else argv) == 2
        err = capsys.readouterr().err
        assert "not finite numbers (NaN or infinity)" in err and len(err.strip().splitlines()) == 1, err
    assert (folder / "model.json").read_text() == meta_before
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


def test_a_file_inside_the_output_folder_is_named_as_such(tiny_model_dir, demo_root, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "od"
    out.mkdir()
    shutil.copy(good_image(demo_root), out / "ok.png")
    monkeypatch.chdir(out)
    assert main(["predict", str(tiny_model_dir), "ok.png", "--out", ".", "--quiet"]) == 2
    assert "ok.png: inside the output folder ., which predict never reads" in capsys.readouterr().err


def test_a_second_run_into_a_folder_of_results_is_refused_and_the_rows_are_kept(tiny_model_dir, demo_root,
                                                                                tmp_path, capsys):
    out = tmp_path / "r6"
    assert main(["predict", str(tiny_model_dir), str(demo_root / "test" / "good"), "--out", str(out),
                 "--quiet"]) == 0
    rows = (out / "predictions.jsonl").read_text()
    assert len(rows.splitlines()) == 4
    assert main(["predict", str(tiny_model_dir), str(good_image(demo_root)), "--out", str(out), "--quiet"]) == 2
    assert "holds the results of an earlier run; continue it with --resume, or give another --out" in \
        capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == rows


def test_resume_without_the_record_of_inputs_is_refused(tiny_model_dir, demo_root, tmp_path, capsys):
    out = tmp_path / "rl"
    assert main(["predict", str(tiny_model_dir), str(demo_root / "test" / "good"), "--out", str(out),
                 "--quiet"]) == 0
    (out / "predict_inputs.json").unlink()
    assert main(["predict", str(tiny_model_dir), str(demo_root / "test" / "spot"), "--out", str(out), "--resume",
                 "--quiet"]) == 2
    assert "holds results but not their record of inputs" in capsys.readouterr().err
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(tiny_model_dir, demo_root, tmp_path):
    out = tmp_path / "k"
    inputs = [str(demo_root / "test" / "good")]
    assert main(["predict", str(tiny_model_dir), *inputs, "--out", str(out), "--quiet"]) == 0
    leftover = out / ".004_overlay.png.0123456789ab.tmp"  # what a kill -9 during a write leaves
    leftover.write_bytes(b"half an overlay")
    other = out / ".notes.tmp"  # not a name our writes make: left alone
    other.write_text("mine")
    assert main(["predict", str(tiny_model_dir), *inputs, "--out", str(out), "--resume", "--quiet"]) == 0
    assert not leftover.exists() and other.exists()
    assert load(tiny_model_dir) is not None and json.loads((out / "predict_inputs.json").read_text())


def test_a_double_star_glob_through_two_symlink_loops_ends_and_finds_each_file_once(demo_root, tmp_path):
    import subprocess
    import sys

    g = tmp_path / "g"
    (g / "sub").mkdir(parents=True)
    shutil.copy(good_image(demo_root), g / "a.png")
    shutil.copy(good_image(demo_root), g / "sub" / "b.png")
    (g / "sub" / "loop").symlink_to("..")
    (g / "sub" / "loop_b").symlink_to("../sub")
    code = ("import sys; from anoseg.inputs import iter_inputs; "
            "print('\\n'.join(str(p.relative_to(sys.argv[1])) for p, _ in iter_inputs([sys.argv[1] + '/**/*.png'])))")
    found = subprocess.run([sys.executable, "-c", code, str(g)], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["a.png", "sub/b.png"]  # links to folders are not followed, as for folders


@pytest.mark.parametrize("host", ["taken", "256.1.1.1"])
def test_serve_binds_before_it_announces_and_a_bad_address_is_one_line(tiny_model_dir, capsys, host):
    import socket

    pytest.importorskip("uvicorn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address = "127.0.0.1" if host == "taken" else host
        assert main(["serve", str(tiny_model_dir), "--host", address, "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out and f"cannot serve on {address}:{port}" in err and len(err.strip().splitlines()) == 1


def test_every_file_of_an_input_folder_is_scored_or_listed_with_its_reason(tiny_model_dir, demo_root, tmp_path,
                                                                          capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    image = Image.open(good_image(demo_root)).convert("RGB")
    for name, kind in (("a.gif", "GIF"), ("b.webp", "WEBP"), ("c.ppm", "PPM"), ("d.jpe", "JPEG"), ("e.jfif", "JPEG")):
        image.save(photos / name, kind)
    (photos / "notes.txt").write_text("not a picture")
    out = tmp_path / "p"
    assert main(["predict", str(tiny_model_dir), str(photos), "--out", str(out), "--quiet"]) == 0
    assert "notes.txt" in capsys.readouterr().err  # a warning names it
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == ["a.gif", "b.webp", "c.ppm", "d.jpe", "e.jfif"]
    skipped = (out / "skipped.txt").read_text()
    assert "notes.txt" in skipped and "not an image" in skipped
    assert main(["predict", str(tiny_model_dir), str(photos / "a.gif"), "--out", str(tmp_path / "one"),
                 "--quiet"]) == 0  # named alone, too


def test_a_damaged_line_in_the_middle_of_the_results_costs_that_line_alone(tiny_model_dir, demo_root, tmp_path,
                                                                            capsys):
    out = tmp_path / "r"
    inputs = [str(demo_root / "test" / "good"), str(demo_root / "test" / "spot")]
    assert main(["predict", str(tiny_model_dir), *inputs, "--out", str(out), "--quiet"]) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 7
    damaged = lines[:2] + ["garbage, not json\n"] + lines[3:]  # line 3 of 7 overwritten
    (out / "predictions.jsonl").write_text("".join(damaged))
    assert main(["predict", str(tiny_model_dir), *inputs, "--out", str(out), "--resume", "--quiet"]) == 0
    assert "1 damaged line(s) dropped; their images are scored again" in capsys.readouterr().err
    after = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert after[:2] + after[2:6] == lines[:2] + lines[3:] and len(after) == 7  # six kept, one scored again
    assert json.loads(after[-1])["path"] == json.loads(lines[2])["path"]


@pytest.mark.parametrize("option, value, problem", [
    ("--map-threshold", "-5", "must be a number in [0, 1] (map values lie there)"),
    ("--map-threshold", "nan", "must be a number in [0, 1]"),
    ("--image-threshold", "7", "must be a number in [0, 1]"),  # no detector: the score is the map's
    ("--image-threshold", "inf", "must be a number in [0, 1]"),
])
def test_thresholds_outside_what_they_compare_with_are_refused_by_option(tiny_model_dir, demo_root, tmp_path,
                                                                         capsys, option, value, problem):
    assert main(["predict", str(tiny_model_dir), str(good_image(demo_root)), "--out", str(tmp_path / "p"), option,
                 value, "--quiet"]) == 2
    assert f"{option} {float(value)}: {problem}" in capsys.readouterr().err


def test_each_skipped_file_is_one_line_spelled_alike_in_the_file_and_the_warning(tiny_model_dir, demo_root,
                                                                                 tmp_path, capsys):
    import os

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(good_image(demo_root), photos / "ok.png")
    (photos / "two\nlines.png").write_bytes(b"not a png")
    with open(os.path.join(os.fsencode(photos), b"\xff.png"), "wb") as f:  # a name that is not UTF-8
        f.write(b"not a png either")
    out = tmp_path / "p"
    assert main(["predict", str(tiny_model_dir), str(photos), "--out", str(out), "--quiet"]) == 0
    lines = (out / "skipped.txt").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    assert len(lines) == 2
    assert any("two\\nlines.png" in line for line in lines) and any("\\xff.png" in line for line in lines)
    err = capsys.readouterr().err
    assert all(line in err for line in lines)  # the warnings spell each file as skipped.txt does


@pytest.mark.parametrize("name", ["a" * 296 + ".png", "é" * 100 + ".png"])
def test_saved_upload_names_keep_their_letters_and_extension(tiny_model_dir, demo_root, tmp_path, name):
    from urllib.parse import quote

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from anoseg.serve import ServeSettings, create_app

    client = TestClient(create_app(load(tiny_model_dir, device="cpu"), ServeSettings(save_uploads=str(tmp_path))))
    r = client.post("/predict", content=good_image(demo_root).read_bytes(), headers={"x-filename": quote(name)})
    assert r.status_code == 200, r.text
    saved = r.json()["saved_as"]
    assert saved.endswith(".png") and (tmp_path / saved).is_file() and len(saved.encode()) <= 255
    assert ("é" in saved) == ("é" in name)
