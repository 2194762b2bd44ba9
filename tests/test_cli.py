"""The command line: help, and one clear line (exit 2) for every kind of bad input."""

import numpy as np
import pytest

from anoseg.cli import main
from tests.conftest import write_png


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    # one error line, after any one-line warnings about skipped files
    assert lines[-1].startswith("anoseg: error:") and "Traceback" not in err
    assert all(ln.startswith("anoseg: warning:") for ln in lines[:-1]), err
    return lines[-1]


def _subcommands():
    import argparse

    from anoseg.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_covers_every_subcommand():
    assert set(_subcommands()) == {"train", "train-all", "train-detector", "calibrate", "predict", "evaluate", "export",
                                   "serve", "demo"}


@pytest.mark.parametrize("cmd", sorted(_subcommands()))
def test_help_explains_options(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: anoseg {cmd}")
    for action in _subcommands()[cmd]._actions:  # every option is listed with its help text
        for flag in action.option_strings:
            assert flag in out, flag
        if action.help and action.help != "==SUPPRESS==":
            assert action.help.split("%")[0][:25] in " ".join(out.split()), action.help


def test_missing_and_empty_training_folder(tmp_path, capsys):
    assert "folder not found" in _err(capsys, ["train", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    (tmp_path / "empty").mkdir()
    assert "no training images" in _err(capsys, ["train", str(tmp_path / "empty"), "--out", str(tmp_path / "m")])


def test_training_folder_with_a_bad_file(tmp_path, capsys):
    for i in range(4):
        write_png(tmp_path / "d" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "d" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n trunc")
    err = _err(capsys, ["train", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--profile", "tiny"])
    assert "x.png" in err


def test_bad_setting(tmp_path, capsys):
    assert "lambda_xyz" in _err(capsys, ["train", str(tmp_path), "--out", str(tmp_path / "m"),
                                         "--set", "lambda_xyz=1"])
    assert "expected a value" in _err(capsys, ["train", str(tmp_path), "--out", str(tmp_path / "m"),
                                               "--set", "steps=many"])


def _mvtec(tmp_path, mask_shape=(16, 16), orphan=False):
    root = tmp_path / "cat"
    for i in range(3):
        write_png(root / "train" / "good" / f"{i}.png", np.zeros((16, 16, 3), np.uint8))
    write_png(root / "test" / "good" / "0.png", np.zeros((16, 16, 3), np.uint8))
    write_png(root / "test" / "dent" / "0.png", np.zeros((16, 16, 3), np.uint8))
    write_png(root / "ground_truth" / "dent" / "0_mask.png", np.full(mask_shape, 255, np.uint8))
    if orphan:
        write_png(root / "ground_truth" / "dent" / "7_mask.png", np.zeros(mask_shape, np.uint8))
    return root


def test_evaluate_mask_size_mismatch(tiny_model_dir, tmp_path, capsys):
    root = _mvtec(tmp_path, mask_shape=(16, 20))
    err = _err(capsys, ["evaluate", str(tiny_model_dir), str(root), "--out", str(tmp_path / "e"), "--quiet"])
    assert "0_mask.png" in err and "20x16" in err
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_evaluate_mask_without_image(tiny_model_dir, tmp_path, capsys):
    root = _mvtec(tmp_path, orphan=True)
    err = _err(capsys, ["evaluate", str(tiny_model_dir), str(root), "--out", str(tmp_path / "e")])
    assert "7_mask.png: mask has no matching image" in err


def test_evaluate_defect_without_mask(tiny_model_dir, tmp_path, capsys):
    root = _mvtec(tmp_path)
    (root / "ground_truth" / "dent" / "0_mask.png").unlink()
    assert "has no mask" in _err(capsys, ["evaluate", str(tiny_model_dir), str(root), "--out", str(tmp_path / "e")])


def test_predict_missing_input_and_model(tiny_model_dir, tmp_path, capsys):
    assert "nope.png: no such file" in _err(capsys, ["predict", str(tiny_model_dir), str(tmp_path / "nope.png"),
                                                    "--out", str(tmp_path / "p")])
    assert "model folder not found" in _err(capsys, ["predict", str(tmp_path / "m"), str(tmp_path),
                                                    "--out", str(tmp_path / "p")])


def test_cli_train_predict_evaluate(demo_root, tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["train", str(demo_root), "--out", str(model), "--profile", "tiny", "--steps", "3",
                 "--batch-size", "4", "--save-examples", "4", "--quiet"]) == 0
    assert (model / "synthetic_examples.png").exists()
    assert main(["predict", str(model), str(demo_root / "test" / "good"), "--out", str(tmp_path / "p"),
                 "--map-threshold", "0.5", "--map-format", "npy", "--quiet"]) == 0
    assert len(list((tmp_path / "p").glob("*_map.npy"))) == 4
    assert main(["evaluate", str(model), str(demo_root), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert "pixel AUROC" in capsys.readouterr().out


def test_mvtec_root_instead_of_category(tmp_path, capsys):
    _mvtec(tmp_path)
    err = _err(capsys, ["train", str(tmp_path), "--out", str(tmp_path / "m")])
    assert "several MVTec categories" in err and "cat" in err


def test_predict_rejects_nan_threshold_and_skips_own_outputs(tiny_model_dir, demo_root, tmp_path, capsys):
    err = _err(capsys, ["predict", str(tiny_model_dir), str(demo_root / "test" / "good"), "--out", str(tmp_path / "p"),
                        "--threshold", "nan"])
    assert "--map-threshold nan: must be a number in [0, 1]" in err
    photos = tmp_path / "photos"
    for i in range(2):
        write_png(photos / f"{i}.png", np.zeros((16, 16, 3), np.uint8))
    for resume in ([], ["--resume"]):  # the second run must not pick up the first run's overlays
        assert main(["predict", str(tiny_model_dir), str(photos), "--out", str(photos / "pred"), "--quiet",
                     *resume]) == 0
    assert len(list((photos / "pred").glob("*_overlay.png"))) == 2


def test_predict_when_no_image_can_be_read(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"nope")
    err = _err(capsys, ["predict", str(tiny_model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "p"),
                        "--quiet"])
    assert "none of the 1 image(s) could be read" in err and "a.png" in err
    assert not (tmp_path / "p" / "predictions.csv").exists()


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_predict_out_is_an_existing_file(tiny_model_dir, demo_root, tmp_path, capsys, resume):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code = main(["predict", str(tiny_model_dir), str(demo_root / "test" / "good"), "--out", str(target), *resume])
    err = capsys.readouterr().err
    assert code == 2 and "results.txt: exists and is not a folder" in err and "Traceback" not in err
    assert target.read_text() == "keep me"


def test_progress_outside_a_terminal_is_a_few_plain_lines(demo_root, tmp_path):
    import subprocess
    import sys
    import time

    from anoseg.progress import LOG_INTERVAL_S

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "anoseg", "train", str(demo_root), "--out", str(tmp_path / "m"),
                           "--profile", "tiny", "--set", "steps=40", "--set", "batch_size=4"],
                          capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
    training = [ln for ln in proc.stderr.splitlines() if ln.startswith("training")]
    # the first line, the last, and at most one per interval between (a busy machine takes longer: more lines)
    assert 1 <= len(training) <= 2 + seconds // LOG_INTERVAL_S and "40/40" in training[-1]
