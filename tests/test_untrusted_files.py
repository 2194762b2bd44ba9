"""Untrusted model files and user-given output names."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from anoseg import load
from anoseg.checkpoint import load_tensors
from anoseg.errors import ModelFileError
from anoseg.fileio import safe_name
from anoseg.predict import predict

from .conftest import write_png


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_key(tiny_model_dir, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    tensors = load_tensors(broken / "model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"do not fit the configuration .*missing"):
        load(broken)


def test_wrong_shape(tiny_model_dir, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    tensors = load_tensors(broken / "model.safetensors")
    key = next(k for k, v in tensors.items() if v.ndim == 4)
    tensors[key] = tensors[key][:1]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"has shape .* expected"):
        load(broken)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(version=999), "version 999 is not supported"),
    (lambda c: c.update(image_size="big"), "image_size"),
    (lambda c: c.update(no_such_setting=1), "no_such_setting"),
])
def test_config_from_another_version_or_tampered(tiny_model_dir, tmp_path, change, match):
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((broken / "config.json").read_text())
    change(cfg)
    (broken / "config.json").write_text(json.dumps(cfg))
    from anoseg.errors import AnosegError

    with pytest.raises(AnosegError, match=match):
        load(broken)


def test_a_pickle_is_never_unpickled(tiny_model_dir, tmp_path):
    import pickle

    broken = copy_model(tiny_model_dir, tmp_path / "m")

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    (broken / "model.safetensors").write_bytes(pickle.dumps({"generator.x": Boom()}))
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load(broken)
    assert not (tmp_path / "pwned").exists()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_safe_name_never_leaves_its_folder(name):
    out = Path("/out")
    cleaned = safe_name(name)
    assert cleaned and "/" not in cleaned and "\\" not in cleaned and cleaned not in (".", "..")
    assert (out / cleaned).resolve().parent == out


def test_predict_writes_only_inside_the_output_folder(tiny_model_dir, tmp_path):
    model = load(tiny_model_dir)
    src = tmp_path / "in"
    img = np.zeros((20, 20, 3), dtype=np.uint8)
    for rel in ["..b.png", "a/..b.png", "a/b/../../c.png", "-rf.png", "x y/..%2f..%2fz.png", ".hidden.png"]:
        write_png(src / rel, img)
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    records = predict(model, [src], out, progress=False)
    assert len(records) == 6
    assert len({r["overlay"] for r in records}) == 6
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or p.is_relative_to(out) for p in created if p != out.parent)


@pytest.mark.parametrize("name", ["../../outside.safetensors", "/etc/passwd", "checkpoint.pkl", 7])
def test_checkpoint_naming_a_file_outside_its_folder_is_refused(tiny_model_dir, tmp_path, name):
    from anoseg.modelfolder import CKPT_STATE
    from anoseg.trainer import checkpoint_weights

    run = copy_model(tiny_model_dir, tmp_path / "m")
    state = json.loads((run / CKPT_STATE).read_text())
    state["weights"] = name
    (run / CKPT_STATE).write_text(json.dumps(state))
    with pytest.raises(ModelFileError, match="bad weights file name"):
        checkpoint_weights(run)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "true", "\"0.5\""])
def test_non_finite_or_non_number_threshold_in_model_json_is_refused(tiny_model_dir, tmp_path, value):
    broken = copy_model(tiny_model_dir, tmp_path / "m")
    meta = json.loads((broken / "model.json").read_text())
    meta.pop("map_threshold")
    for key in ("map_threshold", "threshold"):  # today's name, and the one models trained before it use
        text = json.dumps({**meta, key: 0.0}).replace(f'"{key}": 0.0', f'"{key}": {value}')
        (broken / "model.json").write_text(text)
        with pytest.raises(ModelFileError, match=r"model\.json: map_threshold .* must be a finite number"):
            load(broken)
    meta["map_threshold"] = 0.5  # the map maximum's threshold is checked the same way
    text = json.dumps({**meta, "map_score_threshold": 0.0}).replace('"map_score_threshold": 0.0',
                                                                   f'"map_score_threshold": {value}')
    (broken / "model.json").write_text(text)
    with pytest.raises(ModelFileError, match=r"model\.json: map_score_threshold .* must be a finite number"):
        load(broken)
    meta["map_score_threshold"] = 0.5  # and the map background, which must also lie where map values do
    for bad in (value, "1.5", "-0.1"):
        text = json.dumps({**meta, "map_background": 0.0}).replace('"map_background": 0.0', f'"map_background": {bad}')
        (broken / "model.json").write_text(text)
        with pytest.raises(ModelFileError, match=r"model\.json: map_background .* must be a number in \[0, 1\]"):
            load(broken)


@pytest.mark.parametrize("setting", ["smoothing_sigma", "lr", "region_max"])
def test_non_finite_setting_in_config_json_is_refused(tiny_model_dir, tmp_path, setting):
    from anoseg.errors import ConfigError

    broken = copy_model(tiny_model_dir, tmp_path / "m")
    text = (broken / "config.json").read_text()
    cfg = json.loads(text)
    cfg[setting] = 12345.5
    (broken / "config.json").write_text(json.dumps(cfg).replace("12345.5", "NaN"))
    with pytest.raises(ConfigError, match=f"setting {setting}=nan: must be a finite number"):
        load(broken)


def test_config_json_that_is_a_folder(tiny_model_dir, tmp_path):
    from anoseg.errors import ConfigError

    broken = copy_model(tiny_model_dir, tmp_path / "m")
    (broken / "config.json").unlink()
    (broken / "config.json").mkdir()
    with pytest.raises(ConfigError, match="config.json: cannot read the configuration"):
        load(broken)
