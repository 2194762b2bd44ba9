"""Training under faults: kills, Ctrl-C, NaN losses, a collapsed discriminator, failed checkpoint writes."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from anoseg import AnosegError, OutputError, fileio, profile_config, train
from anoseg.checkpoint import load_tensors
from anoseg.data import Crops
from anoseg.modelfolder import CKPT_STATE, read_config
from anoseg.runtime import resolve_device
from anoseg.trainer import Trainer, TrainingUnstable, checkpoint_weights

losses_mod = sys.modules["anoseg.losses"]
trainer_mod = sys.modules["anoseg.trainer"]
checkpoint_mod = sys.modules["anoseg.checkpoint"]
STEPS = 40


def train_cmd(root, out, *extra):
    # one CPU thread: multi-threaded CPU kernels may sum in another order in another process, and a GAN
    # turns a last-bit difference into a visible one; these tests are about checkpoints, not about that
    return [sys.executable, "-m", "anoseg", "train", str(root), "--out", str(out), "--profile", "tiny",
            "--steps", str(STEPS), "--checkpoint-every", "2", "--batch-size", "4", "--num-threads", "1", "--quiet",
            *extra]


def wait_for_checkpoint(folder, proc, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if (folder / CKPT_STATE).exists():
            return
        time.sleep(0.02)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def readable_checkpoint(folder) -> int:
    """Load the checkpoint the way --resume does; returns its step."""
    trainer = Trainer(read_config(folder / "config.json"), resolve_device("cpu"))
    trainer.load(folder)
    return trainer.step_done


def test_a_checkpoint_removes_temporary_files_that_killed_writes_left(tmp_path):
    """A kill during the training log's write (seen once in CI) left `.train_log.csv.*.tmp` for good."""
    trainer = Trainer(profile_config("tiny"), resolve_device("cpu"))
    stale = [tmp_path / ".train_log.csv.0123456789ab.tmp", tmp_path / ".config.json.0123456789ab.tmp"]
    for path in stale:
        path.write_text("half a write")
    (tmp_path / ".other.txt.0123456789ab.tmp").write_text("not ours")
    trainer.save(tmp_path, {})
    assert not any(path.exists() for path in stale)
    assert (tmp_path / ".other.txt.0123456789ab.tmp").exists()  # only the files training writes


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(demo_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(train_cmd(demo_root, full), check=True, timeout=300)
    rng = random.Random(0)
    resume: list[str] = []
    steps_seen = []
    for _ in range(3):
        proc = subprocess.Popen(train_cmd(demo_root, part, *resume), stderr=subprocess.DEVNULL)
        wait_for_checkpoint(part, proc)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        steps_seen.append(readable_checkpoint(part))  # whatever the moment, the checkpoint loads
        resume = ["--resume"]
    subprocess.run(train_cmd(demo_root, part, "--resume"), check=True, timeout=300)
    assert not list(part.glob(".*.tmp")), "temporary files of killed writes are cleaned up by the next checkpoint"
    assert steps_seen == sorted(steps_seen)
    assert_same_tensors(load_tensors(full / "model.safetensors"), load_tensors(part / "model.safetensors"))
    assert_same_tensors(load_tensors(checkpoint_weights(full)), load_tensors(checkpoint_weights(part)))


def test_crash_between_weights_and_json_leaves_the_previous_checkpoint(demo_root, tmp_path, monkeypatch):
    cfg = profile_config("tiny", steps=4, checkpoint_every=2, batch_size=4)
    calls = []
    real_save_json = checkpoint_mod.save_json  # the one mechanism behind every resume point

    def crash_on_second(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: its weights are written, its JSON never lands
            raise RuntimeError("simulated power cut")
        real_save_json(path, data)

    monkeypatch.setattr(checkpoint_mod, "save_json", crash_on_second)
    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg, demo_root, tmp_path / "run", progress=False)
    monkeypatch.setattr(checkpoint_mod, "save_json", real_save_json)
    assert readable_checkpoint(tmp_path / "run") == 2
    model = train(cfg, demo_root, tmp_path / "run", resume=True, progress=False)
    assert model.meta["steps_done"] == 4
    assert [p.name for p in (tmp_path / "run").glob("checkpoint*.safetensors")] == ["checkpoint-00000004.safetensors"]


def test_ctrl_c_saves_an_exact_checkpoint(demo_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(train_cmd(demo_root, full), check=True, timeout=300)
    proc = subprocess.Popen(train_cmd(demo_root, part), stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(part, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("training finished before the interrupt arrived")
    assert proc.returncode == 2, err
    assert "interrupted at step" in err and "--resume" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert readable_checkpoint(part) == step
    subprocess.run(train_cmd(demo_root, part, "--resume"), check=True, timeout=300)
    assert_same_tensors(load_tensors(full / "model.safetensors"), load_tensors(part / "model.safetensors"))


def nan_seg_loss_at(calls_with_nan: set[int]):
    real = losses_mod.segmentation_loss
    count = [0]

    def loss(*args):
        count[0] += 1
        out = real(*args)
        return out * float("nan") if count[0] in calls_with_nan else out

    return loss


def test_nan_loss_rolls_back_with_a_lower_learning_rate(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(losses_mod, "segmentation_loss", nan_seg_loss_at({5}))
    cfg = profile_config("tiny", steps=8, checkpoint_every=4, batch_size=4, lr_schedule="constant")
    with pytest.warns(UserWarning, match="rolled back to the checkpoint at step 4 with the learning rate x0.5"):
        model = train(cfg, demo_root, tmp_path / "run", progress=False)
    assert model.meta["steps_done"] == 8
    assert model.meta["rollbacks"] == 1 and model.meta["lr_scale"] == 0.5
    assert all(torch.isfinite(t).all() for t in model.generator.state_dict().values() if t.is_floating_point())
    state = json.loads((tmp_path / "run" / CKPT_STATE).read_text())
    assert state["opt_g"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * 0.5)


def test_nan_before_any_checkpoint_restarts_from_the_beginning(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(losses_mod, "segmentation_loss", nan_seg_loss_at({2}))
    cfg = profile_config("tiny", steps=4, checkpoint_every=100, batch_size=4)
    with pytest.warns(UserWarning, match="rolled back to the start"):
        model = train(cfg, demo_root, tmp_path / "run", progress=False)
    assert model.meta["steps_done"] == 4 and model.meta["rollbacks"] == 1


def test_endless_nan_stops_with_a_clear_error_and_no_nan_weights(demo_root, tmp_path, monkeypatch):
    cfg = profile_config("tiny", steps=8, checkpoint_every=2, batch_size=4)
    monkeypatch.setattr(trainer_mod, "MAX_ROLLBACKS", 2)
    monkeypatch.setattr(losses_mod, "segmentation_loss", nan_seg_loss_at(set(range(3, 1000))))
    with pytest.warns(UserWarning), pytest.raises(AnosegError, match="gave up after 2 rollback"):
        train(cfg, demo_root, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    weights = load_tensors(checkpoint_weights(tmp_path / "run"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_collapsed_discriminator_is_caught(demo_root, tmp_path, monkeypatch):
    # every discriminator loss counts as "collapsed", so the check must fire after 3 steps
    monkeypatch.setattr(trainer_mod, "COLLAPSE_D_LOSS", 1e9)
    monkeypatch.setattr(trainer_mod, "COLLAPSE_PATIENCE", 3)
    monkeypatch.setattr(trainer_mod, "MAX_ROLLBACKS", 1)
    cfg = profile_config("tiny", steps=10, batch_size=4, lambda_adv=0.1)
    with pytest.warns(UserWarning, match="discriminator collapsed"), pytest.raises(AnosegError, match="unstable"):
        train(cfg, demo_root, tmp_path / "run", progress=False)


def test_nan_weights_are_never_written(demo_root, tmp_path):
    trainer = Trainer(profile_config("tiny"), resolve_device("cpu"))
    with torch.no_grad():
        next(trainer.generator.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingUnstable, match="non-finite weights"):
        trainer.save(tmp_path, {})
    assert not (tmp_path / CKPT_STATE).exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(demo_root, tmp_path, monkeypatch):
    cfg = profile_config("tiny", steps=4, checkpoint_every=2, batch_size=4)
    real = checkpoint_mod.save_tensors
    calls = []

    def no_space(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_on_second(path, tensors):
        calls.append(path)
        if len(calls) == 2:  # the disk fills up while the second checkpoint is written
            return fileio._write_atomic(path, no_space)
        return real(path, tensors)

    monkeypatch.setattr(checkpoint_mod, "save_tensors", full_on_second)
    with pytest.raises(OutputError, match="No space left on device"):
        train(cfg, demo_root, tmp_path / "run", progress=False)
    assert readable_checkpoint(tmp_path / "run") == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_unwritable_output_folder(demo_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        train(profile_config("tiny", steps=1, batch_size=4), demo_root, blocker / "run", progress=False)


def test_overwrite_starts_clean(demo_root, tmp_path):
    cfg = profile_config("tiny", steps=2, checkpoint_every=1, batch_size=4)
    train(cfg, demo_root, tmp_path / "run", progress=False)
    train(cfg.replace(steps=1), demo_root, tmp_path / "run", overwrite=True, progress=False)
    assert readable_checkpoint(tmp_path / "run") == 1


def test_without_the_adversarial_loss_there_is_no_discriminator(tmp_path, monkeypatch):
    # lambda_adv = 0 (the fast profile): no discriminator, no collapse check even when every loss "collapses"
    monkeypatch.setattr(trainer_mod, "COLLAPSE_D_LOSS", 1e9)
    monkeypatch.setattr(trainer_mod, "COLLAPSE_PATIENCE", 1)
    cfg = profile_config("tiny", lambda_adv=0.0)
    trainer = Trainer(cfg, resolve_device("cpu"))
    assert trainer.discriminator is None and trainer.opt_d is None
    g_before = [p.detach().clone() for p in trainer.generator.parameters()]
    images = torch.randint(0, 256, (4, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    for _ in range(3):
        losses = trainer.step(Crops(images))
    assert losses["d"] == 0.0 and losses["adv"] == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(g_before, trainer.generator.parameters()))
    trainer.save(tmp_path, {})
    saved = load_tensors(checkpoint_weights(tmp_path))
    assert not any(k.startswith(("discriminator.", "opt_d.")) for k in saved)
    assert any(k.startswith("ema.") for k in saved)
    monkeypatch.undo()  # with a discriminator, the patched limits would call its first step a collapse
    with_adv = Trainer(cfg.replace(lambda_adv=0.1), resolve_device("cpu"))
    d_before = [p.detach().clone() for p in with_adv.discriminator.parameters()]
    with_adv.step(Crops(images))
    assert not all(torch.equal(a, b) for a, b in zip(d_before, with_adv.discriminator.parameters()))


def test_without_a_reconstruction_loss_the_image_decoder_is_skipped_and_the_map_trains_the_same(monkeypatch):
    # lambda_rec = lambda_adv = 0: nothing reads the reconstruction, so the step skips the image decoder
    cfg = profile_config("tiny", lambda_adv=0.0, lambda_rec=0.0, ema_decay=0.0, anomaly_ratio=1.0)
    images = torch.randint(0, 256, (4, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    calls = []
    skipped, full = Trainer(cfg, resolve_device("cpu")), Trainer(cfg, resolve_device("cpu"))
    decoder_before = [p.detach().clone() for p in skipped.generator.image_decoder.parameters()]
    full.reconstruct = True
    skipped.generator.image_decoder.register_forward_hook(lambda *_: calls.append(1))
    for _ in range(2):
        loss_skipped, loss_full = skipped.step(Crops(images)), full.step(Crops(images))
    assert calls == []
    assert loss_skipped["rec"] == 0.0 and loss_full["rec"] > 0.0
    assert loss_skipped["seg"] == pytest.approx(loss_full["seg"], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(decoder_before, skipped.generator.image_decoder.parameters()))
    for name, value in full.generator.map_decoder.state_dict().items():
        assert torch.allclose(skipped.generator.map_decoder.state_dict()[name], value, atol=1e-5), name
    assert Trainer(cfg.replace(lambda_rec=0.5), resolve_device("cpu")).reconstruct


def test_cosine_schedule_sets_the_rates_and_resumes_on_the_same_curve(tmp_path):
    from anoseg.trainer import schedule_factor

    cfg = profile_config("tiny", lr_schedule="cosine", steps=4, batch_size=4, lambda_adv=0.1)
    assert [round(schedule_factor(cfg, t), 6) for t in range(5)] == [1.0, 0.853553, 0.5, 0.146447, 0.0]
    assert schedule_factor(cfg.replace(lr_schedule="constant"), 3) == 1.0
    images = torch.randint(0, 256, (4, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    whole = Trainer(cfg, resolve_device("cpu"))
    for _ in range(4):
        whole.step(Crops(images))
    # the last step ran at step index 3
    assert whole.opt_g.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.146447, rel=1e-5)
    assert whole.opt_d.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.146447, rel=1e-5)
    first = Trainer(cfg, resolve_device("cpu"))
    for _ in range(2):
        first.step(Crops(images))
    first.save(tmp_path, {})
    second = Trainer(cfg, resolve_device("cpu"))
    second.load(tmp_path)
    for _ in range(2):
        second.step(Crops(images))
    for a, b in zip(whole.generator.parameters(), second.generator.parameters()):
        assert torch.equal(a, b)
