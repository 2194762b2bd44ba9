"""Network shapes and the config."""

import json

import pytest
import torch

from anoseg import ConfigError, profile_config
from anoseg.detector import DetectorGenerator
from anoseg.models import Discriminator, Generator


def test_paper_profile_code_is_8x8x512():
    cfg = profile_config("paper")
    g = Generator(cfg).eval()
    x = torch.zeros(1, 5, 256, 256)
    with torch.no_grad():
        code = g.encoder(x)[-1]
        recon, amap = g(torch.zeros(1, 3, 256, 256))
    assert code.shape == (1, 512, 8, 8)
    assert recon.shape == (1, 3, 256, 256) and amap.shape == (1, 1, 256, 256)
    # the two decoders have the same shape in the paper profile
    shapes = lambda m: [p.shape for n, p in m.named_parameters() if not n.startswith("head")]  # noqa: E731
    assert shapes(g.image_decoder) == shapes(g.map_decoder)


@pytest.mark.parametrize("profile", ["fast", "tiny"])
def test_outputs_in_range(profile):
    cfg = profile_config(profile)
    g, d = Generator(cfg).eval(), Discriminator(cfg)
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        recon, amap = g(x)
        logits, feats = d(recon, amap)
    assert recon.min() >= -1 and recon.max() <= 1
    assert amap.min() >= 0 and amap.max() <= 1
    assert feats.shape[-1] == 8 and logits.shape[1] == 1
    assert torch.allclose(g.anomaly_map(x), amap)


def test_skips_feed_every_encoder_stage_and_the_input_into_the_map_decoder():
    # the fast profile's encoder stages have 16, 32, 64 and 128 channels, from 64 px down to the 8 x 8 code
    def map_inputs(cfg):  # input channels of the map decoder's stages and of its head
        g = Generator(cfg)
        with torch.no_grad():
            assert g.anomaly_map(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 128, 128)
        return [s[1].in_channels for s in g.map_decoder.stages], g.map_decoder.head.in_channels

    assert map_inputs(profile_config("fast")) == ([128, 64 + 64, 32 + 32, 16 + 16], 8 + 5)  # the input has 5
    assert map_inputs(profile_config("fast", seg_skips=False)) == ([128, 64, 32, 16], 8)
    assert map_inputs(profile_config("fast", coord_channels=False))[1] == 8 + 3


def test_config_round_trip(tmp_path):
    from anoseg.modelfolder import read_config

    cfg = profile_config("fast", seed=7, anomaly_families=("paste", "crack"))
    cfg.save(tmp_path / "c.json")
    assert read_config(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("change,match", [
    ({"image_size": 100}, "image_size"), ({"anomaly_ratio": 1.5}, "anomaly_ratio"), ({"seg_loss": "dice"}, "seg_loss"),
    ({"region_min": 0.5, "region_max": 0.1}, "region_min"), ({"device": "tpu"}, "device"),
    ({"lr_schedule": "linear"}, "lr_schedule"), ({"anomaly_families": ("paste", "shading")}, "anomaly_families"),
    ({"map_threshold_quantile": 0.0}, "map_threshold_quantile"), ({"num_threads": -1}, "num_threads=-1"),
    ({"seg_defect_weight": 0.0}, "seg_defect_weight=0.0: must be positive"),
    ({"broad_sigma": 0.0}, "broad_sigma=0.0: must be positive"), ({"peak_boost": -1.0}, "peak_boost=-1.0"),
    ({"detector_batch_size": 0}, "detector_batch_size=0: must be at least 1"),
    ({"smoothing_sigma": float("nan")}, "smoothing_sigma=nan: must be a finite number"),
])
def test_config_rejects_bad_values(change, match):
    with pytest.raises(ConfigError, match=match):
        profile_config("tiny", **change)


def test_config_from_other_version_or_unknown_keys(tmp_path):
    from anoseg.modelfolder import read_config

    d = profile_config("tiny").to_dict()
    (tmp_path / "a.json").write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(ConfigError, match="version 99"):
        read_config(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({**d, "colour": 1}))
    with pytest.raises(ConfigError, match="colour"):
        read_config(tmp_path / "b.json")
    with pytest.raises(ConfigError, match="unknown profile"):
        profile_config("huge")


def test_settings_doc_is_current():
    from pathlib import Path

    from anoseg.config import settings_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert doc.read_text() == settings_markdown(), "regenerate docs/settings.md with anoseg.config.settings_markdown()"


def test_a_setting_with_an_unknown_annotation_is_refused():
    import dataclasses

    from anoseg.config import Config

    @dataclasses.dataclass
    class Odd(Config):
        odd: "set[int]" = dataclasses.field(default_factory=set)  # noqa: F821 - a type nobody checks

    with pytest.raises(ConfigError, match="annotation 'set\\[int\\]' is not one of"):
        Odd()


def test_set_values_are_typed_by_the_one_table():
    from anoseg.cli import parse_sets
    from anoseg.errors import ConfigError

    got = parse_sets(["steps=5", "lr=0.1", "seg_skips=off", "anomaly_families=paste, crack", "device=cpu"])
    assert got == {"steps": 5, "lr": 0.1, "seg_skips": False, "anomaly_families": ("paste", "crack"), "device": "cpu"}
    with pytest.raises(ConfigError, match="expected a value of type int"):
        parse_sets(["steps=many"])
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_sets(["nonsense=1"])


def test_focal_loss_weighs_pixels_by_their_error():
    from anoseg.losses import FOCAL_GAMMA, segmentation_loss

    target = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[0.1, 0.6, 0.9, 0.3]])
    bce = torch.nn.functional.binary_cross_entropy(pred, target, reduction="none")
    p_t = torch.tensor([[0.9, 0.4, 0.9, 0.3]])
    assert torch.allclose(segmentation_loss(pred, target, "bce"), bce.mean())
    assert torch.allclose(segmentation_loss(pred, target, "focal"), ((1 - p_t) ** FOCAL_GAMMA * bce).mean())
    assert FOCAL_GAMMA == 2.0


@pytest.mark.parametrize("kind", ["bce", "focal"])
def test_defect_weight_multiplies_only_defect_pixels(kind):
    from anoseg.losses import segmentation_loss

    target = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[0.1, 0.6, 0.9, 0.3]])
    normal = target == 0
    plain = 4 * segmentation_loss(pred, target, kind)
    weighted = 4 * segmentation_loss(pred, target, kind, defect_weight=5.0)
    only_normal = 2 * segmentation_loss(pred[normal][None], target[normal][None], kind)
    assert torch.allclose(weighted - only_normal, 5 * (plain - only_normal))  # the defect pixels' share, times 5


def test_the_loss_adds_its_terms_with_their_weights():
    from anoseg.losses import SEG_WEIGHT, AnoSegLoss, masked_reconstruction_loss, segmentation_loss

    g = torch.Generator().manual_seed(0)
    amap, mask = torch.rand(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.8).float()
    x, recon = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    adv = torch.tensor(0.7)
    total, parts = AnoSegLoss("bce", 2.0, lambda_rec=0.5, lambda_adv=0.1)(amap, mask, x, recon, adv)
    seg, rec = segmentation_loss(amap, mask, "bce", 2.0), masked_reconstruction_loss(recon, x, mask)
    assert torch.allclose(total, SEG_WEIGHT * seg + 0.5 * rec + 0.1 * adv)
    assert torch.equal(parts["seg"], seg) and torch.equal(parts["rec"], rec)
    total, parts = AnoSegLoss("bce", 2.0)(amap, mask, x, None, torch.tensor(0.0))
    assert float(parts["rec"]) == 0.0 and torch.allclose(total, SEG_WEIGHT * seg)
    assert not AnoSegLoss().needs_reconstruction and AnoSegLoss(lambda_adv=0.1).needs_reconstruction


def test_masked_reconstruction_loss_counts_normal_pixels_only():
    from anoseg.losses import masked_reconstruction_loss

    x = torch.zeros(1, 3, 4, 4)
    recon = torch.zeros(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    recon[..., :2, :] = 5.0  # wrong only where the mask says defect
    assert float(masked_reconstruction_loss(recon, x, mask)) == 0.0
    recon[..., 3, 0] = 1.0  # one normal pixel wrong by 1 in each of 3 channels, of 8 normal pixels x 3 channels
    assert float(masked_reconstruction_loss(recon, x, mask)) == pytest.approx(3 / 24)


@pytest.mark.parametrize("build", [Generator, Discriminator, DetectorGenerator])
def test_weights_are_channels_last(build):
    torch.manual_seed(0)
    net = build(profile_config("tiny")).eval()
    convs = [p for p in net.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # 1 x 1 kernels are both orders at once
