"""All settings of a run in one typed dataclass, saved as JSON beside every checkpoint.

The dataclass defaults are the recommended recipe (profile ``fast``); ``paper`` states the paper's recipe
in full, ``tiny`` is ``fast`` at a size that trains in seconds. A setting is here because a user may need
to change it; fixed choices are named constants beside the code that uses them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_VERSION = 1

SEG_LOSSES = ("focal", "bce")
ANOMALY_FAMILIES = ("paste", "noise", "crack", "streak")
RESIZE_MODES = ("square", "aspect")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "auto")

# Value rules: (settings, test, what a failing value must be). The first broken rule is reported.
RANGE_RULES: list[tuple[tuple[str, ...], Any, str]] = [
    (("base_channels", "max_channels", "steps", "batch_size", "batch_size_infer", "checkpoint_every",
      "detector_steps", "detector_batch_size"), lambda v: v >= 1, "must be at least 1"),
    (("anomaly_ratio", "holdout_fraction", "image_score_topk_weight"), lambda v: 0.0 <= v <= 1.0,
     "must lie in [0, 1]"),
    (("threshold_quantile", "map_threshold_quantile", "opacity_min"), lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]"),
    (("ema_decay",), lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)"),
    (("mask_min_diff",), lambda v: 0.0 <= v < 1.0, "must lie in [0, 1) (pixels lie in [0, 1]: at 1 nothing is marked)"),
    (("lr", "detector_lr", "broad_sigma", "seg_defect_weight"), lambda v: v > 0, "must be positive"),
    (("lambda_rec", "lambda_adv", "smoothing_sigma", "max_minutes", "mask_texture_factor", "peak_boost",
      "broad_weight", "num_threads"), lambda v: v >= 0, "must not be negative"),
]
# Settings by what they touch. A trained model takes new values of MAP_SETTINGS in `calibrate` (they shape maps,
# scores and thresholds, not the weights); a resumed run takes new values of RESUMABLE and keeps the rest.
MAP_SETTINGS = ("smoothing_sigma", "broad_weight", "broad_sigma", "peak_boost", "image_score_topk_weight",
                "threshold_quantile", "map_threshold_quantile")
DETECTOR_SETTINGS = ("detector_steps", "detector_batch_size", "detector_lr")
RUNTIME_SETTINGS = ("device", "precision", "compile", "num_threads", "batch_size_infer")
RESUMABLE = ("steps", "checkpoint_every", "max_minutes", *RUNTIME_SETTINGS, *MAP_SETTINGS, *DETECTOR_SETTINGS)

CHOICES: dict[str, tuple[str, ...]] = {
    "anomaly_families": ANOMALY_FAMILIES, "resize_mode": RESIZE_MODES, "seg_loss": SEG_LOSSES,
    "lr_schedule": LR_SCHEDULES, "precision": PRECISIONS,
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
    except ValueError:
        raise ConfigError(f"--set {name}={text}: expected a value of type {kind}") from None


@dataclass
class Config:
    """Settings for model, synthetic anomalies, training, maps and thresholds, detector and runtime.

    The defaults are the ``fast`` recipe. Use :func:`profile_config` for the named profiles and
    override single fields with :meth:`replace`.
    """

    profile: str = "fast"  # name of the preset these settings started from
    # --- model -------------------------------------------------------------------
    image_size: int = 128  # square crop the networks train on; the encoder always ends at 8x8
    base_channels: int = 16  # width of the first encoder stage, doubled per stage
    max_channels: int = 256  # cap on the width (512 in the paper profile)
    seg_skips: bool = True  # U-Net skips from encoder into the map decoder (not in the paper)
    coord_channels: bool = True  # append x, y in [-1, 1] to the input (CoordConv; the paper's second technique)
    resize_mode: str = "aspect"  # square: squash to image_size; aspect: short side to image_size, train on crops
    second_short_side: int = 256  # aspect mode: also train on and map each image at this short side (0 = one scale)
    # --- synthetic anomalies -----------------------------------------------------------
    hard_augmentation: bool = True  # pasted copies rotated, patch-shuffled, jittered (the paper's first technique)
    anomaly_ratio: float = 0.5  # share of each batch that gets a synthetic anomaly
    anomaly_families: tuple[str, ...] = ("paste", "noise", "crack", "streak")  # kinds; paste is the paper's
    opacity_min: float = 0.5  # each anomaly is blended in with an opacity drawn from [opacity_min, 1] (1 = opaque)
    region_min: float = 0.005  # a region's area as a share of the crop, lower bound
    region_max: float = 0.25  # upper bound
    coarse_region_max: float = 0.5  # upper bound in crops of the coarser of two scales
    mask_min_diff: float = 0.02  # synthetic pixels that changed less than this are not marked as defect
    mask_texture_factor: float = 3.0  # ... nor less than this times the surface's grain (0: the fixed floor only)
    # --- training --------------------------------------------------------------------
    steps: int = 15000  # training iterations (one batch each)
    batch_size: int = 8  # images per batch
    lr: float = 3e-4  # peak learning rate (Adam), of generator and discriminator
    lr_schedule: str = "cosine"  # constant, or cosine: the rate falls along half a cosine to 0 at `steps`
    seg_loss: str = "bce"  # map loss: bce (binary cross-entropy) or focal (gamma 2)
    seg_defect_weight: float = 2.0  # a defect pixel counts this many times as much as a normal one in the map loss
    lambda_rec: float = 0.0  # weight of the masked reconstruction loss (0: the image decoder is not trained)
    lambda_adv: float = 0.0  # weight of the adversarial loss (the paper's third technique; 0: no discriminator step)
    ema_decay: float = 0.999  # the model keeps an exponential moving average of the generator weights (0 = off)
    checkpoint_every: int = 500  # save a resumable checkpoint every N steps
    max_minutes: float = 0.0  # stop training after this wall time (0 = no limit); makes runs non-repeatable
    seed: int = 0  # the same seed and settings reproduce a run (on the same device)
    # --- maps, scores and thresholds -------------------------------------------------
    smoothing_sigma: float = 2.0  # Gaussian smoothing of each scale's map, in its own pixels
    broad_weight: float = 0.5  # c: the map becomes (m + c x blur(m, broad_sigma)) / (1 + c) (0 = off)
    broad_sigma: float = 16.0  # the Gaussian of broad_weight, in pixels of the first scale (large defects rise whole)
    peak_boost: float = 2.0  # raise the map where it stands above its surroundings, by this times the excess (0 = off)
    image_score_topk_weight: float = 0.5  # w: the image score is (1 - w) x the map's maximum + w x its top-1% mean
    holdout_fraction: float = 0.1  # share of normal training images kept out to choose the thresholds
    threshold_quantile: float = 0.99  # quantile of held-out normal image scores: the image threshold (verdict)
    map_threshold_quantile: float = 0.999  # quantile of held-out normal map pixels: outlines' floor where judged normal
    # --- anomaly detector (paper section 3.4; trained with train --detector) -----------
    detector_steps: int = 400  # detector training iterations
    detector_batch_size: int = 16  # images per detector training batch
    detector_lr: float = 2e-4  # Adam learning rate of both detector networks
    # --- runtime (may change on resume; never change the recipe) -----------------------
    device: str = "auto"  # "auto" picks CUDA when available, else CPU
    precision: str = "auto"  # bf16: networks in bfloat16 autocast (losses, EMA, Adam in fp32); auto: bf16 where faster
    compile: bool = False  # torch.compile the networks (falls back to eager, with a warning, where it fails)
    num_threads: int = 0  # CPU threads for torch (0 = torch's default)
    batch_size_infer: int = 16  # images per forward pass in predict and evaluate

    def __post_init__(self) -> None:
        self._check_types()
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
        yield from self._choice_problems()
        if self.max_channels < self.base_channels:
            yield "max_channels", "must be at least base_channels"
        if not 0.0 < self.region_min <= self.region_max < 1.0:
            yield "region_min", "need 0 < region_min <= region_max < 1"
        if not self.region_min <= self.coarse_region_max < 1.0:
            yield "coarse_region_max", "need region_min <= coarse_region_max < 1"
        yield from self._scale_problems()
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            yield "device", "use auto, cpu, cuda or cuda:N"

    def _choice_problems(self) -> Iterator[tuple[str, str]]:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(v not in allowed for v in values):
                yield name, f"choose from {', '.join(allowed)}"

    def _scale_problems(self) -> Iterator[tuple[str, str]]:
        n, side = self.image_size, self.second_short_side
        if not side:
            return
        if self.resize_mode != "aspect":
            yield "second_short_side", "only applies with resize_mode=aspect (set second_short_side=0 with square)"
        elif side < n or side % max(n // 8, 1):
            yield "second_short_side", (f"must be 0 or a multiple of image_size / 8 ({n // 8}) of at least "
                                        f"image_size ({n})")
        elif side == n:
            yield "second_short_side", "must differ from image_size, the first scale's short side; 0 maps at one scale"

    @property
    def encoder_stages(self) -> int:
        """How often the encoder halves the input to reach its 8 x 8 code (log2(image_size / 8))."""
        return int(math.log2(max(self.image_size // 8, 1)))  # max: a broken image_size is reported, not raised

    @property
    def scales(self) -> tuple[int, ...]:
        """The short side of each scale the model maps at: image_size, then second_short_side when set."""
        return (self.image_size, self.second_short_side) if self.second_short_side else (self.image_size,)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values, with the format version."""
        d = dataclasses.asdict(self)
        d["anomaly_families"] = list(self.anomaly_families)
        return {**d, "version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Settings from :meth:`to_dict`'s form; old model folders are converted by :mod:`anoseg.modelfolder`."""
        if not isinstance(data, dict):
            raise ConfigError("configuration must be a JSON object")
        data = dict(data)
        version = data.pop("version", None)
        if version != CONFIG_VERSION:
            raise ConfigError(
                f"configuration version {version!r} is not supported by this anoseg (expects {CONFIG_VERSION})"
            )
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"configuration has unknown setting(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"configuration is invalid: {e}") from None

    def save(self, path: str | Path, keep: dict[str, Any] | None = None) -> None:
        """Write config.json; `keep`: entries an older anoseg wrote that today's settings cannot hold (a trained
        model's record of how it was trained, :func:`anoseg.modelfolder.read_model_config`)."""
        from .fileio import write_text_atomic

        write_text_atomic(Path(path), json.dumps({**self.to_dict(), **(keep or {})}, indent=2) + "\n")


PROFILES: dict[str, dict[str, Any]] = {
    # The recommended recipe: the dataclass defaults. Evidence for each choice: docs/design.md.
    "fast": {},
    # The paper's recipe as far as its text states it: 256 px squares, an 8x8x512 code, two decoders of the same
    # shape, hard augmentation by pasting only, coordinate channels, masked reconstruction and adversarial losses,
    # the plain map. Where the paper is silent (region sizes, loss weights, smoothing) it keeps the defaults.
    "paper": dict(image_size=256, base_channels=64, max_channels=512, seg_skips=False, coord_channels=True,
                  resize_mode="square", second_short_side=0, hard_augmentation=True, anomaly_families=("paste",),
                  opacity_min=1.0, mask_min_diff=0.0, mask_texture_factor=0.0, steps=20000, batch_size=16,
                  lr=2e-4, lr_schedule="constant", seg_loss="focal", seg_defect_weight=1.0, lambda_rec=1.0,
                  lambda_adv=0.1, ema_decay=0.0, broad_weight=0.0, peak_boost=0.0, image_score_topk_weight=0.0),
    # The fast recipe at a size that trains in seconds: for tests and the demo.
    "tiny": dict(image_size=64, base_channels=8, max_channels=32, second_short_side=128, steps=200,
                 checkpoint_every=100),
}


def profile_config(profile: str = "fast", **overrides: Any) -> Config:
    """The configuration of a named profile, with optional overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}: choose from {', '.join(PROFILES)}")
    return Config(profile=profile, **PROFILES[profile]).replace(**overrides)


def resumed(saved: Config, asked: Config, may_change: Iterable[str]) -> Config:
    """The one resume policy, for AnoSeg and detector runs alike: a resumed run keeps the recipe it started with.
    Settings in `may_change` are taken from `asked`; any other that `asked` sets differently is named in a
    warning and ignored."""
    may_change = set(may_change)
    ignored = [f.name for f in dataclasses.fields(Config) if f.name not in may_change | {"profile"}
               and getattr(saved, f.name) != getattr(asked, f.name)]
    if ignored:
        warnings.warn(f"resuming with the saved settings; ignored: {', '.join(ignored)}", stacklevel=3)
    return saved.replace(**{k: getattr(asked, k) for k in may_change})


def settings_markdown() -> str:
    """docs/settings.md, generated from this file's field comments so the two never disagree."""
    import inspect
    import re

    lines = [
        "# Settings", "",
        "All settings live in one dataclass, `anoseg.config.Config`, saved as `config.json` beside every model",
        "and checkpoint. Change any of them with `anoseg train --set KEY=VALUE` (lists comma-separated) or",
        "`profile_config(\"fast\", KEY=VALUE)` in Python. The defaults are the `fast` recipe; the other profiles",
        "override some of them (table at the end).",
        "Generated from `src/anoseg/config.py` by `anoseg.config.settings_markdown()`.",
    ]
    for line in inspect.getsource(Config).splitlines():
        head = re.match(r"\s+# --- (.+?) -+$", line)
        if head:
            lines += ["", f"## {head.group(1)[0].upper()}{head.group(1)[1:]}", "",
                      "| setting | default | meaning |", "|---|---|---|"]
            continue
        m = re.match(r"\s{4}(\w+): [^=]+ = (.+?)(?:\s+# (.*))?$", line)
        if m and m.group(1) != "profile":
            lines.append(f"| `{m.group(1)}` | `{m.group(2)}` | {m.group(3) or ''} |")
    lines += ["", "`profile` names the preset a configuration started from. `config.json` also records its format",
              "`version`: a model saved with another format is converted or refused with a clear error.",
              "", "## Profiles", "", "| profile | overrides |", "|---|---|"]
    for name, values in PROFILES.items():
        text = ", ".join(f"`{k}={v}`" for k, v in values.items()) or "none: the defaults"
        lines.append(f"| `{name}` | {text} |")
    return "\n".join(lines) + "\n"
