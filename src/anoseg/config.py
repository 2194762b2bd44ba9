"""All settings of a run in one typed dataclass, saved as JSON beside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_VERSION = 1

SEG_LOSSES = ("focal", "bce", "l1", "asymmetric")
TTA_FLIPS = {"none": [()], "h": [(), (3,)], "v": [(), (2,)], "hv": [(), (3,), (2,), (2, 3)]}  # flipped dims
REGION_SHAPES = ("rect", "ellipse", "scar")
ANOMALY_FAMILIES = ("paste", "noise", "crack", "shading", "band", "streak")
RESIZE_MODES = ("square", "aspect")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "auto")


# Value rules: (settings, test, what a failing value must be). The first broken rule is reported.
RANGE_RULES: list[tuple[tuple[str, ...], Any, str]] = [
    (("base_channels", "max_channels", "steps", "batch_size", "batch_size_infer", "checkpoint_every",
      "detector_steps", "permute_grid", "holdout_min"), lambda v: v >= 1, "must be at least 1"),
    (("ema_warmup",), lambda v: v >= 2, "must be at least 2 (at 1 the average would never move)"),
    (("crack_points_max",), lambda v: v >= 21, "must be at least 21 (a crack has 20 points or more)"),
    (("crack_turn_min",), lambda v: 0.0 < v <= 0.25, "must lie in (0, 0.25]"),
    (("anomaly_ratio", "p_rotate", "p_permute", "p_jitter", "holdout_fraction", "crop_overhang", "streak_own_grain",
      "streak_band", "image_score_topk_weight"),
     lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]"),
    (("threshold_quantile", "map_threshold_quantile", "topk_fraction", "opacity_min", "crack_contrast_min"),
     lambda v: 0.0 < v <= 1.0,
     "must lie in (0, 1]"),
    (("max_aspect",), lambda v: 1.0 <= v <= 64.0, "must lie in [1, 64]"),
    (("ema_decay", "seg_label_smoothing"), lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)"),
    (("mask_min_diff",), lambda v: 0.0 <= v < 1.0, "must lie in [0, 1) (pixels lie in [0, 1]: at 1 nothing is marked)"),
    (("rollback_lr_factor",), lambda v: 0.0 < v < 1.0, "must lie in (0, 1)"),
    (("lr", "lr_d", "detector_lr", "peak_sigma", "broad_sigma", "seg_defect_weight"), lambda v: v > 0,
     "must be positive"),
    (("lambda_seg", "lambda_rec", "lambda_adv", "smoothing_sigma", "max_minutes", "jitter_strength",
      "mask_texture_factor", "collapse_d_loss", "detector_lambda_adv", "detector_lambda_rec", "detector_lambda_cls",
      "detector_lambda_fm", "detector_w_mse", "detector_w_feat", "max_rollbacks", "collapse_patience", "edge_feather",
      "peak_boost", "broad_weight", "focal_gamma", "seg_defect_inset", "seg_dice_weight", "detector_batch_size"),
     lambda v: v >= 0,
     "must not be negative"),
]
# Settings that shape the maps after the networks, not the weights: a trained model takes new values of them
# on resume, in `calibrate` (which chooses its thresholds again) and in bench/eval_settings.py.
MAP_SHAPING = ("smoothing_sigma", "broad_weight", "broad_sigma", "peak_boost", "peak_sigma", "tta_flips")
# Settings that turn a map into the image score: like MAP_SHAPING, a trained model takes new values of them.
IMAGE_SCORING = ("topk_fraction", "image_score_topk_weight")
CHOICES: dict[str, tuple[str, ...]] = {
    "region_shapes": REGION_SHAPES, "anomaly_families": ANOMALY_FAMILIES, "resize_mode": RESIZE_MODES,
    "seg_loss": SEG_LOSSES, "lr_schedule": LR_SCHEDULES, "tta_flips": tuple(TTA_FLIPS), "precision": PRECISIONS,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# The one table of setting types: each annotation used in Config -> (type check, parser of command-line text).
KINDS: dict[str, tuple[Any, Any]] = {
    "int": (_is_int, int),
    "float": (lambda v: isinstance(v, float), float),
    "bool": (lambda v: isinstance(v, bool), _parse_bool),
    "str": (lambda v: isinstance(v, str), str),
    "tuple[str, ...]": (lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v),
                        lambda t: tuple(x.strip() for x in t.split(",") if x.strip())),
    "dict[str, Any]": (lambda v: isinstance(v, dict), json.loads),
}


def _kind(f: dataclasses.Field) -> str:
    kind = str(f.type)
    if kind not in KINDS:  # a new setting with a type nobody checks: fail loudly, never accept silently
        raise ConfigError(f"setting {f.name}: annotation {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def parse_setting(name: str, text: str) -> Any:
    """A setting's value from command-line text (``--set KEY=VALUE``), typed by its annotation."""
    f = next((f for f in dataclasses.fields(Config) if f.name == name), None)
    if f is None:
        raise ConfigError(f"--set {name}: unknown setting (see docs/settings.md or anoseg train --help)")
    kind = _kind(f)
    try:
        return KINDS[kind][1](text)
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"--set {name}={text}: expected a value of type {kind}") from None


@dataclass
class Config:
    """Settings for model, synthetic anomalies, training, scoring and thresholds.

    Use :func:`profile_config` for the named profiles (``paper``, ``fast``, ``tiny``)
    and override single fields with :meth:`replace`.
    """

    profile: str = "fast"  # name of the preset these settings started from
    # --- model -------------------------------------------------------------------
    image_size: int = 128  # square model input; the encoder always ends at 8x8
    base_channels: int = 16  # width of the first encoder stage, doubled per stage
    max_channels: int = 256  # cap on the width (512 in the paper profile)
    seg_skips: bool = True  # U-Net skips from encoder into the map decoder (not in the paper)
    seg_skips_drop_fine: int = 0  # with seg_skips: leave out this many of the finest skips (the input counts first)
    map_sees_residual: bool = False  # the map decoder's last layer also sees |input - reconstruction|
    coord_channels: bool = True  # append x, y in [-1, 1] to the input (CoordConv)
    resize_mode: str = "square"  # square: squash to image_size; aspect: short side to image_size, train on crops
    max_aspect: float = 4.0  # aspect mode: the long side is at most this many times the short side (longer is squashed)
    short_side: int = 0  # aspect mode: the short side inside the model (0 = image_size); crops stay image_size
    second_short_side: int = 0  # aspect mode: also train on and map each image at this short side; maps averaged
    crop_overhang: float = 0.0  # aspect mode: crop offsets drawn this share of a crop beyond each side, then clamped
    # --- synthetic anomalies (hard augmentation) -----------------------------------
    anomaly_ratio: float = 0.5  # share of each batch that gets a synthetic anomaly
    anomaly_families: tuple[str, ...] = ("paste",)  # kinds: paste (paper), noise, crack, shading, band, streak
    opacity_min: float = 1.0  # each anomaly is blended in with an opacity drawn from [opacity_min, 1] (1 = opaque)
    crack_contrast_min: float = 0.4  # a crack darkens or brightens the surface by a share drawn from [this, 1]
    crack_points_max: int = 80  # a crack's random walk has 20 to this many points (0.3-1.5 px apart)
    crack_turn_min: float = 0.25  # a crack turns by this to 0.25 radians a point (log-uniform; lower = straighter)
    crack_soft: bool = False  # cracks with anti-aliased edges, fading along their length, half of them blurred
    region_min: float = 0.005  # pasted area as a share of the image, lower bound
    region_max: float = 0.08  # upper bound
    region_shapes: tuple[str, ...] = ("rect", "ellipse", "scar")  # shapes of pasted regions, one drawn per anomaly
    p_rotate: float = 0.5  # probability that the pasted source is rotated (any angle)
    p_permute: float = 0.5  # probability that its patches are shuffled
    p_jitter: float = 0.5  # probability of colour jitter
    permute_grid: int = 4  # the augmented copy is cut into grid x grid patches and shuffled
    jitter_strength: float = 0.4  # brightness/contrast/saturation range, hue is a quarter of it
    streak_own_grain: float = 1.0  # share of streak anomalies that run along the surface's own grain (else any angle)
    streak_band: float = 0.0  # share of streak anomalies whose region is a band across the image (else a blob)
    streak_region_max: float = 0.0  # streak blobs span region_min to this share of the image (0 = region_max)
    coarse_region_max: float = 0.0  # in crops of the coarser of two scales regions go up to this (0 = region_max)
    edge_feather: int = 0  # paste and noise regions blend in over a soft edge up to this many pixels wide (0 = sharp)
    mask_min_diff: float = 0.02  # pasted pixels that changed less than this are not marked as defect
    mask_texture_factor: float = 0.0  # ... nor less than this times the image grain (median gap to a 5 px mean); 0: off
    # --- training --------------------------------------------------------------------
    steps: int = 2000  # training iterations (one batch each)
    batch_size: int = 16  # images per batch
    lr: float = 2e-4  # generator learning rate (Adam)
    lr_d: float = 2e-4  # discriminator learning rate
    lr_schedule: str = "constant"  # constant, or cosine: both rates fall along half a cosine to 0 at `steps`
    beta1: float = 0.5  # Adam betas, as usual for GANs
    beta2: float = 0.999  # second Adam beta
    seg_loss: str = "focal"  # map loss: focal, bce, l1, or asymmetric (focal on normal pixels, bce on defect pixels)
    seg_defect_weight: float = 1.0  # a defect pixel counts this many times as much as a normal one in the map loss
    seg_defect_inset: int = 0  # >0: seg_defect_weight applies only this many pixels or more inside a defect region
    # (thin cracks and region rims count once, as normal pixels do)
    seg_dice_weight: float = 0.0  # add this times a soft Dice loss per image, so a small defect counts as a large one
    seg_label_smoothing: float = 0.0  # e > 0: map targets e/2 (normal) and 1 - e/2 (defect), not 0 and 1
    focal_gamma: float = 2.0  # the focal loss weighs each pixel by (1 - p_t) ** focal_gamma (0: plain cross-entropy)
    lambda_seg: float = 10.0  # weight of the segmentation loss
    lambda_rec: float = 1.0  # weight of the masked (normal pixels only) L1 reconstruction loss
    lambda_adv: float = 0.1  # weight of the adversarial loss on (image, map) pairs
    ema_decay: float = 0.999  # keep an exponential moving average of the generator weights (0 = off); the model uses it
    ema_warmup: int = 10  # the average's decay at step t is min(ema_decay, (1 + t) / (ema_warmup + t))
    train_augment_flip: bool = False  # random flips of training images (off: many parts are not symmetric)
    checkpoint_every: int = 500  # save a resumable checkpoint every N steps
    max_rollbacks: int = 3  # on a non-finite loss or a collapsed discriminator, go back to the last checkpoint ...
    rollback_lr_factor: float = 0.5  # ... with both learning rates times this; after max_rollbacks, stop with an error
    collapse_d_loss: float = 1e-3  # the discriminator counts as collapsed when its loss stays below this ...
    collapse_patience: int = 200  # ... for this many steps in a row (0 = never)
    max_minutes: float = 0.0  # stop training after this wall time (0 = no limit); makes runs non-repeatable
    seed: int = 0  # the same seed and settings reproduce a run (on the same device)
    device: str = "auto"  # "auto" picks CUDA when available, else CPU
    # auto: bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX)
    precision: str = "fp32"  # bf16: networks in bfloat16 autocast (losses, EMA, Adam in fp32); auto: bf16 where native
    compile: bool = False  # torch.compile the networks (falls back to eager, with a warning, where it fails)
    channels_last: bool = True  # weights in channels-last memory order: same maths, CPU training steps ~1.3x faster
    num_threads: int = 0  # CPU threads for torch (0 = torch's default)
    # --- maps, scores and thresholds -------------------------------------------------
    smoothing_sigma: float = 4.0  # Gaussian smoothing of the map before scoring, in model-input pixels
    peak_boost: float = 0.0  # raise the map where it stands above its surroundings, by this times the excess (0 = off)
    peak_sigma: float = 2.0  # the surroundings for peak_boost: a Gaussian of this sigma, in pixels of the first scale
    broad_weight: float = 0.0  # c: the map becomes (m + c x blur(m, broad_sigma)) / (1 + c) before peak_boost (0 = off)
    broad_sigma: float = 12.0  # the Gaussian of broad_weight, in pixels of the first scale (large defects rise whole)
    tta_flips: str = "none"  # test-time augmentation: average the maps of flipped inputs (none, h, v, hv)
    holdout_fraction: float = 0.1  # share of normal training images kept out to choose the threshold
    holdout_min: int = 2  # at least this many held-out images (when holdout_fraction > 0)
    threshold_quantile: float = 0.99  # quantile of held-out normal image scores used as the image threshold (verdict)
    map_threshold_quantile: float = 0.999  # quantile of held-out normal map pixels used as the map threshold (outlines)
    batch_size_infer: int = 16  # images per forward pass in predict and evaluate
    topk_fraction: float = 0.01  # the top-k image score averages this share of the highest map pixels
    image_score_topk_weight: float = 0.0  # w: the map's image score is (1 - w) x its maximum + w x its top-k mean
    # --- anomaly detector (paper section 3.4; trained with train --detector) -----------
    detector_steps: int = 400  # detector training iterations
    detector_batch_size: int = 0  # images per detector training batch (0 = batch_size)
    detector_lr: float = 2e-4  # Adam learning rate of both detector networks
    detector_lambda_adv: float = 1.0  # adversarial loss weight (generator side)
    detector_lambda_rec: float = 10.0  # L1 reconstruction loss weight
    detector_lambda_cls: float = 1.0  # auxiliary normal-vs-synthetic classification loss weight
    detector_lambda_fm: float = 1.0  # feature matching loss weight (penultimate discriminator layer)
    detector_w_mse: float = 1.0  # score = w_mse * MSE(real pair, fake pair) + w_feat * feature distance
    detector_w_feat: float = 0.1
    version: int = CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free notes, kept with the model

    def __post_init__(self) -> None:
        self._check_types()
        self.region_shapes = tuple(self.region_shapes)
        self.anomaly_families = tuple(self.anomaly_families)
        self.validate()

    def _check_types(self) -> None:
        """Refuse values of the wrong type (a hand-edited or foreign config.json) with the setting's name."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _kind(f)
            if kind == "float" and _is_int(value):
                setattr(self, f.name, float(value))
            elif not KINDS[kind][0](value):
                raise ConfigError(f"setting {f.name}={value!r}: expected {kind}")

    # ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        for name, why in self._problems():
            raise ConfigError(f"setting {name}={getattr(self, name)!r}: {why}")

    def _problems(self) -> Iterator[tuple[str, str]]:
        """(setting, what is wrong) for every broken rule, in the order the rules are listed."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                yield f.name, "must be a finite number"
        n = self.image_size
        if n < 16 or n % 8 or not math.log2(n // 8).is_integer():
            yield "image_size", "must be 8 times a power of two, at least 16 (e.g. 64, 128, 256)"
        for names, ok, why in RANGE_RULES:
            yield from ((name, why) for name in names if not ok(getattr(self, name)))
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(v not in allowed for v in values):
                yield name, f"choose from {', '.join(allowed)}"
        yield from self._scale_problems()
        if self.max_channels < self.base_channels:
            yield "max_channels", "must be at least base_channels"
        yield from self._map_loss_problems()
        yield from self._skip_problems()
        yield from self._region_problems()
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            yield "device", "use auto, cpu, cuda or cuda:N"

    def _region_problems(self) -> Iterator[tuple[str, str]]:
        if not 0.0 < self.region_min <= self.region_max < 1.0:
            yield "region_min", "need 0 < region_min <= region_max < 1"
        for name in ("streak_region_max", "coarse_region_max"):
            if getattr(self, name) and not self.region_min <= getattr(self, name) < 1.0:
                yield name, f"need 0 (= region_max) or region_min <= {name} < 1"

    def _map_loss_problems(self) -> Iterator[tuple[str, str]]:
        if self.seg_loss not in ("focal", "asymmetric") and self.focal_gamma != Config.focal_gamma:  # changed
            yield "focal_gamma", (f"only applies with seg_loss=focal or asymmetric, not {self.seg_loss} "
                                  "(focal_gamma=0 is plain bce)")
        if self.seg_defect_inset and self.seg_defect_weight == 1.0:
            yield "seg_defect_inset", "only applies with a seg_defect_weight other than 1"
        if self.seg_defect_inset > self.image_size // 8:
            yield "seg_defect_inset", f"must be at most image_size / 8 ({self.image_size // 8})"

    @property
    def first_short_side(self) -> int:
        """The first scale's short side in aspect mode: short_side, or image_size when 0."""
        return self.short_side or self.image_size

    @property
    def encoder_stages(self) -> int:
        """How often the encoder halves the input to reach its 8 x 8 code (log2(image_size / 8))."""
        return int(math.log2(max(self.image_size // 8, 1)))  # max: a broken image_size is reported, not raised

    def _skip_problems(self) -> Iterator[tuple[str, str]]:
        drop, skips = self.seg_skips_drop_fine, self.encoder_stages  # one skip per stage
        if drop and not self.seg_skips:
            yield "seg_skips_drop_fine", "only applies with seg_skips=true"
        elif not 0 <= drop < skips:
            yield "seg_skips_drop_fine", (f"must lie in [0, {skips - 1}]: the map decoder has {skips} skips at "
                                          f"image_size {self.image_size} (seg_skips=false leaves out all)")

    def _scale_problems(self) -> Iterator[tuple[str, str]]:
        n = self.image_size
        for name in ("short_side", "second_short_side"):
            side = getattr(self, name)
            if side and self.resize_mode != "aspect":
                yield name, f"only applies with resize_mode=aspect (set {name}=0 with square)"
            elif side and (side < n or side % max(n // 8, 1)):
                yield name, f"must be 0 or a multiple of image_size / 8 ({n // 8}) of at least image_size ({n})"
        if self.second_short_side and self.second_short_side == self.first_short_side:
            yield "second_short_side", ("must differ from the first scale (short_side, or image_size when 0); "
                                        "0 maps at one scale")

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["region_shapes"] = list(self.region_shapes)
        d["anomaly_families"] = list(self.anomaly_families)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        if not isinstance(data, dict):
            raise ConfigError("configuration must be a JSON object")
        version = data.get("version")
        if version != CONFIG_VERSION:
            raise ConfigError(
                f"configuration version {version!r} is not supported by this anoseg (expects {CONFIG_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"configuration has unknown setting(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"configuration is invalid: {e}") from None

    def save(self, path: str | Path) -> None:
        from .fileio import write_text_atomic

        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except OSError as e:  # a folder, no permission, ...
            raise ConfigError(f"{path}: cannot read the configuration ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)


PROFILES: dict[str, dict[str, Any]] = {
    # As close to the paper as its text allows: 256 px, 8x8x512 code, decoders of the same shape.
    "paper": dict(image_size=256, base_channels=64, max_channels=512, seg_skips=False,
                  steps=20000, batch_size=16, ema_decay=0.0),
    # Sized to train one category on 2 CPU cores within 30 minutes: about 22 in bf16 (2000 steps alone took 174 s,
    # thirty-fifth session), about 28 in fp32.
    # Batch 8: twice the updates of batch 16 for the same images (better on all three real categories since
    # streaks, docs/design.md). bf16 where the hardware computes it natively makes a step about a third cheaper,
    # and channels-last weights another quarter: spent on 10000 steps instead of 6000 (each step up better on
    # all three, docs/design.md); elsewhere `auto` trains in fp32. The detector keeps batch 16. Peak learning
    # rate 3e-4, not 2e-4: more learned in the same steps (magnetic tile and commutator gain on two seeds,
    # bottle gains on two seeds of three; docs/design.md, thirty-fourth session). No reconstruction loss: nothing
    # after training reads the reconstruction, so the image decoder is skipped and the same time buys 13000 steps
    # instead of 10000 (docs/design.md, thirty-fifth session); `paper` keeps the loss. 15000 steps, not 13000:
    # magnetic tile gains on both seeds and meets its image AUROC target, nine of twelve mean figures over the three
    # surfaces gain or hold (docs/design.md, thirty-sixth session). Synthetic regions up to half the image in crops
    # of the coarser scale only: magnetic tile's large defects are learned where they fit, and the fine scale keeps
    # the sharp maps small defects need (docs/design.md, thirty-ninth session). A broad share of the map of 0.5 at
    # sigma 16, not 0.25 at 12: magnetic tile's large defects, annotated wider than the map answers, meet their
    # target on both seeds and the commutator gains, for 0.016 of bottle's AUPRO (docs/design.md, fortieth session).
    "fast": dict(image_size=128, base_channels=16, max_channels=256, seg_skips=True,
                 steps=15000, precision="auto", lr=3e-4, lr_schedule="cosine", batch_size=8, detector_batch_size=16,
                 smoothing_sigma=2.0, broad_weight=0.5, broad_sigma=16.0, peak_boost=2.0,
                 resize_mode="aspect", anomaly_families=("paste", "noise", "crack", "streak"),
                 opacity_min=0.5, region_max=0.25, coarse_region_max=0.5, lambda_adv=0.0, lambda_rec=0.0,
                 second_short_side=256, mask_texture_factor=3.0, seg_loss="bce", seg_defect_weight=2.0,
                 crack_points_max=240, crack_turn_min=0.02, crack_soft=True, image_score_topk_weight=0.5),
    # For tests and the demo: seconds, not minutes.
    "tiny": dict(image_size=64, base_channels=8, max_channels=32, seg_skips=True,
                 steps=200, batch_size=8, checkpoint_every=100, holdout_min=2, ema_decay=0.0),
}


def profile_config(profile: str = "fast", **overrides: Any) -> Config:
    """The configuration of a named profile, with optional overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}: choose from {', '.join(PROFILES)}")
    return Config(profile=profile, **PROFILES[profile]).replace(**overrides)


def settings_markdown() -> str:
    """docs/settings.md, generated from this file's field comments so the two never disagree."""
    import inspect
    import re

    lines = [
        "# Settings", "",
        "All settings live in one dataclass, `anoseg.config.Config`, saved as `config.json` beside every model",
        "and checkpoint. Change any of them with `anoseg train --set KEY=VALUE` (lists comma-separated) or",
        "`profile_config(\"fast\", KEY=VALUE)` in Python. Defaults are the `fast` profile's; the other profiles",
        "override some of them (table at the end).",
        "Generated from `src/anoseg/config.py` by `anoseg.config.settings_markdown()`.",
    ]
    for line in inspect.getsource(Config).splitlines():
        head = re.match(r"\s+# --- (.+?) -+$", line)
        if head:
            lines += ["", f"## {head.group(1).capitalize()}", "", "| setting | default | meaning |", "|---|---|---|"]
            continue
        m = re.match(r"\s{4}(\w+): [^=]+ = (.+?)(?:\s+# (.*))?$", line)
        if m and m.group(1) not in ("version", "extra", "profile"):
            lines.append(f"| `{m.group(1)}` | `{m.group(2)}` | {m.group(3) or ''} |")
    lines += ["", "`profile` names the preset a configuration started from; `version` marks the file format (a model",
              "saved with another format version is refused with a clear error); `extra` is a free dictionary.",
              "", "## Profiles", "", "| profile | overrides |", "|---|---|"]
    for name, values in PROFILES.items():
        lines.append(f"| `{name}` | " + ", ".join(f"`{k}={v}`" for k, v in values.items()) + " |")
    return "\n".join(lines) + "\n"
