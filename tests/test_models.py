"""Network shapes and the config."""

import json

import pytest
import torch

from anoseg import Config, ConfigError, profile_config
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


def test_dropping_fine_skips_removes_their_channels_only():
    # the fast profile's encoder stages have 16, 32, 64 and 128 channels, from 64 px down to the 8 x 8 code
    def map_inputs(drop):  # input channels of the map decoder's stages and of its head
        g = Generator(profile_config("fast", seg_skips_drop_fine=drop))
        with torch.no_grad():
            assert g.anomaly_map(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 128, 128)
        return [s[1].in_channels for s in g.map_decoder.stages], g.map_decoder.head.in_channels
    no_skips = Generator(profile_config("fast", seg_skips=False)).map_decoder
    plain = [s[1].in_channels for s in no_skips.stages], no_skips.head.in_channels
    assert map_inputs(0) == ([128, 64 + 64, 32 + 32, 16 + 16], 8 + 5)  # every skip; the input has 5 channels
    assert map_inputs(1) == ([128, 64 + 64, 32 + 32, 16 + 16], 8)  # the input's skip is gone
    assert map_inputs(2) == ([128, 64 + 64, 32 + 32, 16], 8)  # and encoder stage 0's (64 px)
    assert map_inputs(3) == ([128, 64 + 64, 32, 16], 8)  # only the 16 px stage is left
    assert plain == ([128, 64, 32, 16], 8)
    assert Config.from_dict({k: v for k, v in profile_config("fast").to_dict().items()
                             if k != "seg_skips_drop_fine"}).seg_skips_drop_fine == 0  # configs saved before


def test_config_round_trip(tmp_path):
    cfg = profile_config("fast", seed=7, region_shapes=("rect",))
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("change,match", [
    ({"image_size": 100}, "image_size"), ({"p_rotate": 1.5}, "p_rotate"), ({"seg_loss": "dice"}, "seg_loss"),
    ({"region_min": 0.5, "region_max": 0.1}, "region_min"), ({"device": "tpu"}, "device"),
    ({"ema_warmup": 1}, "ema_warmup=1: must be at least 2"), ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"edge_feather": -1}, "edge_feather=-1: must not be negative"),
    ({"map_threshold_quantile": 0.0}, "map_threshold_quantile"),
    ({"focal_gamma": -0.5}, "focal_gamma=-0.5: must not be negative"),
    ({"seg_loss": "bce", "focal_gamma": 1.0}, "focal_gamma=1.0: only applies with seg_loss=focal or asym"),
    ({"seg_defect_weight": 0.0}, "seg_defect_weight=0.0: must be positive"),
    ({"seg_defect_inset": -1}, "seg_defect_inset=-1: must not be negative"),
    ({"seg_defect_inset": 2}, "seg_defect_inset=2: only applies with a seg_defect_weight other than 1"),
    ({"seg_defect_weight": 2.0, "seg_defect_inset": 9}, r"seg_defect_inset=9: must be at most image_size / 8 \(8\)"),
    ({"seg_dice_weight": -1.0}, "seg_dice_weight=-1.0: must not be negative"),
    ({"crack_points_max": 20}, "crack_points_max=20: must be at least 21"),
    ({"crack_turn_min": 0.0}, r"crack_turn_min=0.0: must lie in \(0, 0.25\]"),
    ({"crack_contrast_min": 0.0}, r"crack_contrast_min=0.0: must lie in \(0, 1\]"),
    ({"seg_label_smoothing": 1.0}, r"seg_label_smoothing=1.0: must lie in \[0, 1\)"),
    ({"seg_label_smoothing": -0.1}, r"seg_label_smoothing=-0.1: must lie in \[0, 1\)"),
    ({"seg_skips_drop_fine": 3}, r"seg_skips_drop_fine=3: must lie in \[0, 2\]: the map decoder has 3 skips"),
    ({"seg_skips_drop_fine": -1}, "seg_skips_drop_fine=-1: must lie in"),
    ({"seg_skips": False, "seg_skips_drop_fine": 1}, "seg_skips_drop_fine=1: only applies with seg_skips=true"),
])
def test_config_rejects_bad_values(change, match):
    with pytest.raises(ConfigError, match=match):
        profile_config("tiny", **change)


def test_config_from_other_version_or_unknown_keys(tmp_path):
    d = profile_config("tiny").to_dict()
    (tmp_path / "a.json").write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(ConfigError, match="version 99"):
        Config.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({**d, "colour": 1}))
    with pytest.raises(ConfigError, match="colour"):
        Config.load(tmp_path / "b.json")
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
    from anoseg.errors import ConfigError

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


def test_map_that_sees_the_residual():
    cfg = profile_config("tiny", map_sees_residual=True)
    g = Generator(cfg).eval()
    assert g.map_decoder.head.in_channels == Generator(profile_config("tiny")).map_decoder.head.in_channels + 1
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        recon, amap = g(x)
        assert torch.allclose(g.anomaly_map(x), amap)
        # the map depends on the reconstruction: a different image decoder gives a different map
        g.image_decoder.head.bias.add_(0.5)
        assert not torch.allclose(g.anomaly_map(x), amap)


def test_focal_gamma_weighs_pixels_by_their_error():
    from anoseg.train import segmentation_loss

    target = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[0.1, 0.6, 0.9, 0.3]])
    bce = torch.nn.functional.binary_cross_entropy(pred, target, reduction="none")
    p_t = torch.tensor([[0.9, 0.4, 0.9, 0.3]])
    assert torch.allclose(segmentation_loss(pred, target, "focal", 0.0), segmentation_loss(pred, target, "bce", 0.0))
    assert torch.allclose(segmentation_loss(pred, target, "focal", 1.0), ((1 - p_t) * bce).mean())
    assert torch.allclose(segmentation_loss(pred, target, "focal", Config.focal_gamma), ((1 - p_t) ** 2 * bce).mean())
    assert Config.focal_gamma == 2.0  # the default weighting every model before the setting was trained with


def test_asymmetric_loss_is_focal_on_normal_pixels_and_bce_on_defect_pixels():
    from anoseg.train import segmentation_loss

    target = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[0.1, 0.6, 0.9, 0.3]])
    bce = torch.nn.functional.binary_cross_entropy(pred, target, reduction="none")
    weight = torch.tensor([[0.1**2, 0.6**2, 1.0, 1.0]])  # (1 - p_t) ** 2 on normal pixels, 1 on defect pixels
    assert torch.allclose(segmentation_loss(pred, target, "asymmetric", 2.0), (weight * bce).mean())


@pytest.mark.parametrize("kind", ["bce", "focal", "asymmetric", "l1"])
def test_defect_weight_multiplies_only_defect_pixels(kind):
    from anoseg.train import segmentation_loss

    target = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[0.1, 0.6, 0.9, 0.3]])
    normal = target == 0
    plain = 4 * segmentation_loss(pred, target, kind, 2.0)
    weighted = 4 * segmentation_loss(pred, target, kind, 2.0, defect_weight=5.0)
    only_normal = 2 * segmentation_loss(pred[normal][None], target[normal][None], kind, 2.0)
    assert torch.allclose(weighted - only_normal, 5 * (plain - only_normal))  # the defect pixels' share, times 5


def test_defect_inset_weighs_up_only_pixels_deep_inside_a_region():
    from anoseg.train import segmentation_loss

    target = torch.zeros(1, 1, 16, 16)
    target[..., 2, 1:15] = 1.0  # a crack one pixel wide
    target[..., 6:13, 4:11] = 1.0  # a 7 x 7 block: its 3 x 3 centre lies 2 pixels inside
    pred = torch.full_like(target, 0.3)
    per_pixel = 256 * segmentation_loss(pred, target, "bce", 0.0)
    inset = 256 * segmentation_loss(pred, target, "bce", 0.0, defect_weight=5.0, inset=2)
    one_defect = float(torch.nn.functional.binary_cross_entropy(torch.tensor(0.3), torch.tensor(1.0)))
    assert torch.allclose(inset - per_pixel, torch.tensor(4 * one_defect * 9))  # the 9 centre pixels, 4 more each
    assert torch.allclose(segmentation_loss(pred, target, "bce", 0.0, 5.0, 0),
                          segmentation_loss(pred, target, "bce", 0.0, 5.0))  # inset 0: every defect pixel


def test_label_smoothing_asks_for_e_half_on_normal_and_one_minus_e_half_on_defect_pixels():
    from anoseg.train import segmentation_loss

    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1.0
    smoothed = torch.where(target > 0, 0.95, 0.05)
    for kind in ("bce", "focal"):
        pred = torch.full_like(target, 0.5).requires_grad_(True)
        segmentation_loss(pred, target, kind, 2.0, smoothing=0.1).backward()
        assert (pred.grad[target > 0] < 0).all() and (pred.grad[target == 0] > 0).all()
    pred = smoothed.clone().requires_grad_(True)  # at the smoothed targets the bce loss is at its minimum
    segmentation_loss(pred, target, "bce", 0.0, defect_weight=2.0, smoothing=0.1).backward()
    assert torch.allclose(pred.grad, torch.zeros_like(pred), atol=1e-6)
    pred = torch.where(target > 0, 0.999, 0.001).requires_grad_(True)  # a sure answer is pushed back
    segmentation_loss(pred, target, "bce", 0.0, smoothing=0.1).backward()
    assert (pred.grad[target > 0] > 0).all() and (pred.grad[target == 0] < 0).all()
    assert torch.equal(segmentation_loss(smoothed, target, "bce", 0.0, smoothing=0.0),
                       segmentation_loss(smoothed, target, "bce", 0.0))  # 0: the hard targets, as before
    # asymmetric: defect pixels are chosen by the mask, so they keep plain cross-entropy (towards 0.95) when smoothed
    pred = torch.full_like(target, 0.7)
    bce = torch.nn.functional.binary_cross_entropy(pred, smoothed, reduction="none")
    focal = (1 - (pred * smoothed + (1 - pred) * (1 - smoothed))) ** 2
    expected = torch.where(target > 0, bce, focal * bce).mean()
    assert torch.allclose(segmentation_loss(pred, target, "asymmetric", 2.0, smoothing=0.1), expected)


def test_dice_loss_weighs_each_image_alike_and_penalises_responses_on_normal_images():
    from anoseg.train import dice_loss

    small, large = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    small[..., 0, :4] = 1.0  # 4 defect pixels
    large[..., :4, :] = 1.0  # 32 defect pixels
    half_small, half_large = small.clone(), large.clone()
    half_small[..., 0, :2] = 0.0  # half of each defect found, nothing else
    half_large[..., :2, :] = 0.0
    assert torch.allclose(dice_loss(small, small), torch.tensor(0.0))
    assert torch.allclose(dice_loss(half_small, small), torch.tensor(1 - 5 / 7))  # (2 * 2 + 1) / (2 + 4 + 1)
    assert torch.allclose(dice_loss(half_large, large), torch.tensor(1 - 33 / 49))  # about as much, though 8x larger
    both = dice_loss(torch.cat([half_small, half_large]), torch.cat([small, large]))
    assert torch.allclose(both, torch.tensor((2 - 5 / 7 - 33 / 49) / 2))  # the mean over images
    normal = torch.zeros(1, 1, 4, 4)
    assert torch.allclose(dice_loss(torch.full_like(normal, 0.5), normal), torch.tensor(8 / 9))  # sum p / (sum p + 1)


def test_dice_weight_adds_that_many_dice_losses_to_the_map_loss():
    from anoseg.inference import resolve_device
    from anoseg.train import Trainer

    cfg = profile_config("tiny", steps=1, batch_size=4, anomaly_ratio=1.0)
    images = torch.randint(0, 256, (4, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    seg = [Trainer(cfg.replace(seg_dice_weight=w), resolve_device("cpu")).step(images)["seg"] for w in (0.0, 1.0, 2.0)]
    assert seg[1] > seg[0] + 0.01  # the first step's map is far from the masks: the Dice loss is large
    assert seg[2] - seg[0] == pytest.approx(2 * (seg[1] - seg[0]), rel=1e-4)  # the same batch and map each time


@pytest.mark.parametrize("build", [Generator, Discriminator, DetectorGenerator])
def test_channels_last_changes_the_memory_order_not_the_outputs(build):
    torch.manual_seed(0)
    last = build(profile_config("tiny", channels_last=True)).eval()
    plain = build(profile_config("tiny", channels_last=False)).eval()
    plain.load_state_dict(last.state_dict())
    convs = [p for p in last.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # 1 x 1 kernels are both orders at once
    assert all(p.is_contiguous() for p in plain.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    second = torch.rand(2, 1, 64, 64) if build is not Generator else None
    with torch.no_grad():
        out_last = last(x, second) if second is not None else last(x)
        out_plain = plain(x, second) if second is not None else plain(x)
    for a, b in zip(out_last, out_plain):
        assert torch.allclose(a, b, atol=1e-5)
