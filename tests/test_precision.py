"""bf16 autocast and torch.compile as settings; both run on the CPU too (the GPU figures are measured elsewhere)."""

import numpy as np
import pytest
import torch

from anoseg import AnoSegModel, load, profile_config, train


def test_bf16_training_and_maps_run_and_stay_close_to_fp32(demo_root, tmp_path):
    cfg = profile_config("tiny", steps=3, batch_size=4, precision="bf16")
    model = train(cfg, demo_root, tmp_path / "m", progress=False)
    assert model.meta["steps_done"] == 3 and np.isfinite(model.map_threshold)
    weights = dict(load(tmp_path / "m").generator.named_parameters())
    assert all(w.dtype == torch.float32 for w in weights.values())  # weights stay fp32
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    a = model.predict_images(images)
    model.config = model.config.replace(precision="fp32")
    b = model.predict_images(images)
    for x, y in zip(a, b):
        assert x.anomaly_map.dtype == np.float32
        assert np.abs(x.anomaly_map - y.anomaly_map).max() < 0.05  # bf16 rounding, not another model


def test_compile_falls_back_with_a_warning_where_it_fails(demo_root, tmp_path, monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = profile_config("tiny", steps=2, batch_size=4, compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed .*no compiler here.*running without it"):
        model = train(cfg, demo_root, tmp_path / "m", progress=False)
    assert model.meta["steps_done"] == 2


def test_bad_precision_is_refused():
    from anoseg.errors import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        AnoSegModel(profile_config("tiny", precision="fp16"))


@pytest.fixture
def timed_cpu(monkeypatch):
    """Sets what the timed step says (bf16's and fp32's seconds) and forgets any earlier verdict."""
    from anoseg import runtime

    def set_times(bf16: float, fp32: float) -> list[int]:
        calls = []
        runtime._bf16_faster_on_this_cpu.cache_clear()
        monkeypatch.setattr(runtime, "cpu_step_seconds", lambda: calls.append(1) or {"bf16": bf16, "fp32": fp32})
        return calls

    yield set_times
    runtime._bf16_faster_on_this_cpu.cache_clear()


@pytest.mark.parametrize("avx512_bf16, amx, bf16_s, want",
                         [(False, False, 0.5, "fp32"), (True, False, 0.6, "bf16"), (False, True, 0.6, "bf16"),
                          (True, False, 1.2, "fp32"), (True, True, 0.95, "fp32")])
def test_auto_precision_takes_bf16_only_where_the_cpu_has_it_and_it_is_faster(monkeypatch, timed_cpu, avx512_bf16,
                                                                               amx, bf16_s, want):
    from anoseg.runtime import autocast, resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    calls = timed_cpu(bf16=bf16_s, fp32=1.0)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == want
    assert resolve_precision("auto", cpu) == want  # asked again: the same verdict, not timed again
    assert len(calls) == (1 if avx512_bf16 or amx else 0)  # without bf16 in hardware nothing is timed
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"  # as asked
    conv = torch.nn.Conv2d(1, 1, 1)
    with autocast("auto", cpu):
        out = conv(torch.ones(1, 1, 2, 2))
    assert out.dtype == (torch.bfloat16 if want == "bf16" else torch.float32)


def test_the_timed_step_runs_without_grad_and_leaves_random_state_and_threads_alone():
    from anoseg.runtime import cpu_step_seconds

    torch.manual_seed(3)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    for context in (torch.no_grad, torch.inference_mode):  # as inference asks for the precision
        torch.manual_seed(3)
        with context():
            seconds = cpu_step_seconds(repeats=1)
        assert set(seconds) == {"bf16", "fp32"} and all(0 < s < 60 for s in seconds.values())
        assert torch.equal(torch.rand(3), expected)
        assert torch.get_num_threads() == threads


def test_auto_precision_trains_and_records_what_it_ran_in(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model = train(profile_config("tiny", steps=2, batch_size=4, precision="auto"), demo_root, tmp_path / "m",
                  progress=False)
    assert model.config.precision == "auto" and model.meta["precision"] == "fp32"
    assert load(tmp_path / "m").meta["precision"] == "fp32"


@pytest.mark.parametrize("major, want", [(7, "fp32"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_on_cuda_needs_ampere_or_later(monkeypatch, major, want):
    from types import SimpleNamespace

    from anoseg.runtime import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    assert resolve_precision("auto", torch.device("cuda")) == want  # a V100 emulates bf16: slower than fp32
