"""The training image store: in memory or a cache file, the same crops; the cache is used again on resume and
built again when the inputs change."""

import numpy as np
import pytest
import torch

from anoseg import data, image_store, training
from anoseg.checkpoint import load_tensors
from anoseg.config import profile_config
from anoseg.data import TrainingImages, train_images
from anoseg.image_store import CACHE_FILE, INDEX_FILE, ImageStore
from anoseg.trainer import checkpoint_weights


@pytest.fixture
def on_disk(monkeypatch):
    """Every set counts as too large for memory: the store goes to the cache file."""
    monkeypatch.setattr(data, "MEMORY_SHARE", 0.0)


def count_decodes(monkeypatch) -> list:
    calls = []
    real = data.load_image

    def counting(path, *a, **k):
        calls.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(data, "load_image", counting)
    return calls


def test_store_round_trip_in_memory_and_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(3, 4, 5), (3, 8, 2), (3, 1, 1)]]
    memory = ImageStore([a.shape for a in arrays])
    disk = ImageStore.create_cache(tmp_path, [a.shape for a in arrays])
    for i, a in enumerate(arrays):
        memory.put(i, a)
        disk.put(i, a)
    disk.seal("k")
    again = ImageStore.open_cache(tmp_path, "k")
    assert memory.nbytes == disk.nbytes == (tmp_path / CACHE_FILE).stat().st_size == 60 + 48 + 3
    for i, a in enumerate(arrays):
        assert np.array_equal(memory[i], a) and np.array_equal(disk[i], a) and np.array_equal(again[i], a)
    assert ImageStore.open_cache(tmp_path, "other inputs") is None
    with pytest.raises(ValueError, match="planned"):
        memory.put(0, np.zeros((3, 2, 2), np.uint8))


@pytest.mark.parametrize("second", [0, 128])
def test_cache_file_gives_the_crops_memory_gives(demo_root, tmp_path, monkeypatch, second):
    cfg = profile_config("tiny", resize_mode="aspect", second_short_side=second)
    files = train_images(demo_root)[:6]
    memory = TrainingImages.load(files, cfg, progress=False, cache_dir=tmp_path)
    assert memory.store.in_memory and not (tmp_path / CACHE_FILE).exists()
    monkeypatch.setattr(data, "MEMORY_SHARE", 0.0)
    disk = TrainingImages.load(files, cfg, progress=False, cache_dir=tmp_path)
    assert not disk.store.in_memory and (tmp_path / CACHE_FILE).stat().st_size == memory.store.nbytes
    assert "cache file" in disk.description and "MB at working size" in disk.description
    a = memory.subset(np.arange(1, 6)).crops(np.array([4, 0, 2, 2]), np.random.default_rng(1))
    b = disk.subset(np.arange(1, 6)).crops(np.array([4, 0, 2, 2]), np.random.default_rng(1))
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


def test_cache_used_again_while_inputs_are_unchanged(demo_root, tmp_path, monkeypatch, on_disk):
    folder = tmp_path / "images"
    folder.mkdir()
    for f in train_images(demo_root)[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = profile_config("tiny")
    decodes = count_decodes(monkeypatch)
    TrainingImages.load(train_images(folder), cfg, progress=False, cache_dir=tmp_path / "run")
    assert len(decodes) == 4
    TrainingImages.load(train_images(folder), cfg, progress=False, cache_dir=tmp_path / "run")
    assert len(decodes) == 4  # nothing decoded again
    changed = train_images(folder)[0]
    changed.write_bytes(train_images(demo_root)[5].read_bytes())  # new content, same name
    again = TrainingImages.load(train_images(folder), cfg, progress=False, cache_dir=tmp_path / "run")
    assert len(decodes) == 8  # built again
    assert np.array_equal(again.image(0), TrainingImages.load([changed], cfg, progress=False).image(0))


def test_training_from_the_cache_file_resumes_and_cleans_up(demo_root, tmp_path, monkeypatch, on_disk):
    cfg = profile_config("tiny", steps=4, checkpoint_every=2, batch_size=4, lr_schedule="constant")
    training.train(cfg, demo_root, tmp_path / "full", progress=False)
    assert not (tmp_path / "full" / CACHE_FILE).exists()  # a finished run leaves no cache behind

    def crash(run, stopped_early):
        raise RuntimeError("killed after step 2")

    with monkeypatch.context() as m:
        m.setattr(training, "_finish", crash)
        with pytest.raises(RuntimeError, match="killed"):
            training.train(cfg.replace(steps=2), demo_root, tmp_path / "part", progress=False)
    assert (tmp_path / "part" / INDEX_FILE).exists()
    decodes = count_decodes(monkeypatch)
    model = training.train(cfg, demo_root, tmp_path / "part", resume=True, progress=False)
    assert decodes == []  # the resumed run read the cache, decoded nothing
    assert "cache file" in model.meta["train_images"]
    a = load_tensors(checkpoint_weights(tmp_path / "full"))
    b = load_tensors(checkpoint_weights(tmp_path / "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as the uninterrupted run
    assert not any(p.name.startswith("train_images") for p in (tmp_path / "part").iterdir())


def test_available_memory_is_positive():
    assert image_store.available_memory() > 0


def test_a_full_disk_while_building_the_cache_is_named(demo_root, tmp_path, monkeypatch, on_disk):
    import errno

    from anoseg.errors import OutputError

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image_store.os, "pwrite", full)
    with pytest.raises(OutputError, match="No space left on device.*MB beside the run"):
        TrainingImages.load(train_images(demo_root)[:3], profile_config("tiny"), progress=False, cache_dir=tmp_path)
    assert not (tmp_path / INDEX_FILE).exists()  # a half-built cache is never used
