"""Ablation: the default recipe against the paper's and with each part switched off, on the real categories.

    python bench/ablation.py                 # every variant x category, fast profile length (15,000 steps of 8)
    python bench/ablation.py --quick         # 3,000 steps: a smaller run with the same variants
    python bench/ablation.py --only commutator --variants default,paper --jobs 2

Each run trains in its own process (`--jobs` at a time, CPU threads split between them) and is written
to bench/ablation.json as soon as it ends, so an interrupted ablation continues where it stopped
(`--fresh` starts again). bench/ablation.md is rewritten from the JSON after every run. With the
environment variable ABLATION_KEEP=DIR the trained models and their evaluations are kept in DIR, and a
run stopped part-way there goes on from its last checkpoint.
Variants that change only how maps are shaped or scored (`no_peak_boost`, `no_broad`, `no_smoothing`, `smoothing_4`,
`image_score_max`: settings in anoseg.config.MAP_SHAPING and IMAGE_SCORING) train nothing: after the training
runs they are evaluated on the `default` model of the same category, seed and steps (kept in ABLATION_KEEP by
an earlier run, else trained once for them), and their rows say "default's weights". A variant with another
batch size trains proportionally more or fewer steps (`run_steps`), so it sees as many images as the others;
its rows give the steps it trained.
Runtime on 2 CPU cores: one run of the profile (15,000 steps of 8 without the reconstruction loss, so without
the image decoder; bf16 by `precision` auto on a CPU with AVX512-BF16, `channels_last`) took 1,111-1,916 s of
training two at a time (measured 2026-12-04 on a day when the machine was fast, the longer ones with evaluations
running beside them; the day before, 13,000 steps two at a time took 1,888-2,007 s: the machine's speed differs
from one session to the next), plus about 2 (bottle) to 7 (magnetic tile) minutes of evaluation. Every variant on
all three categories, one seed, is 77 trained variants, about 230 such runs (batch-size variants take
proportionally longer or shorter, variants with the reconstruction loss a third longer): about 80 hours with two
at a time, estimated from the slower day's run times, never run in one go. --quick trains a fifth of the
profile's steps (3,000) and evaluates the same (estimated; last measured 2026-11-26 at 600 steps of 16: 21 runs
in 88 minutes).
On a lent GPU, bench/gpu_ablation.sh runs 16 at once (measured 2026-11-27: 2000 steps in about 3 minutes
each).
Variants change the `fast` profile's settings; `paper` is the paper's recipe at the fast profile's size
(square resize, hard augmentation only, opaque pastes, no U-Net skips, no weight average).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from arguments import name_list, positive_int, seed_list
from resultsfile import locked, read_rows
from run_bench import rescored

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CATEGORIES = {"bottle": "mvtec_ad", "commutator": "kolektorsdd", "magnetic_tile": "magnetic_tile"}
# cracks and scratches up to 3x longer, from straight to curly: the default since the eighteenth session
LONG_CRACKS = {"crack_points_max": 240, "crack_turn_min": 0.02}
VARIANTS: dict[str, dict] = {
    "default": {},
    "paper": {"resize_mode": "square", "second_short_side": 0, "anomaly_families": ["paste"], "opacity_min": 1.0,
              "seg_skips": False, "ema_decay": 0.0},
    "no_hard_augmentation": {"anomaly_families": "OTHERS"},  # the default's families without "paste"
    "paste_only": {"anomaly_families": ["paste"], "opacity_min": 1.0},  # the paper's augmentation, new geometry
    "no_adversarial_loss": {"lambda_adv": 0.0},  # the same as default since the fast profile dropped it
    "no_coord_channels": {"coord_channels": False},
    "square_resize": {"resize_mode": "square", "second_short_side": 0},
    "one_scale": {"second_short_side": 0},  # trains on and maps one scale (short side 128) only
    "short_side_256": {"short_side": 256, "second_short_side": 0},  # one scale, twice as fine; crops still 128
    "two_scales_192": {"second_short_side": 192},  # a nearer second scale (128 and 192)
    "opaque": {"opacity_min": 1.0},
    "no_noise": {"anomaly_families": "-noise"},
    "no_crack": {"anomaly_families": "-crack"},
    "with_shading": {"anomaly_families": ["paste", "noise", "crack", "shading"]},  # + large shading changes
    "with_band": {"anomaly_families": ["paste", "noise", "crack", "band"]},  # + bands across the surface
    "no_streak": {"anomaly_families": "-streak"},  # the default before the twenty-sixth session
    # half the streaks at a random angle, not along the surface's own grain
    "streak_any_angle": {"streak_own_grain": 0.5},
    # half the streak regions a band across the image (10-50% of it), as `uneven` grinding crosses a tile
    "streak_bands": {"streak_band": 0.5},
    "square_with_shading": {"resize_mode": "square", "second_short_side": 0,
                            "anomaly_families": ["paste", "noise", "crack", "shading"]},
    "no_smoothing": {"smoothing_sigma": 0.0},
    "smoothing_4": {"smoothing_sigma": 4.0},  # the map smoothing before 2026-11-26 (fourth session)
    "residual_map": {"map_sees_residual": True},  # the map head also sees |input - reconstruction|
    "no_seg_skips": {"seg_skips": False},  # the map decoder without U-Net skips (as the paper's)
    "skips_no_input": {"seg_skips_drop_fine": 1},  # skips from every encoder stage, not from the input
    "skips_deep": {"seg_skips_drop_fine": 2},  # skips from the encoder stages at 1/4 size and coarser only
    "skips_deepest": {"seg_skips_drop_fine": 3},  # one skip, from the last encoder stage before the code
    "bce_loss": {"seg_loss": "bce"},  # plain binary cross-entropy on the map instead of the focal loss
    "focal_gamma_1": {"focal_gamma": 1.0},  # a milder focal loss, between the default (2) and bce (0)
    "asymmetric_loss": {"seg_loss": "asymmetric"},  # focal on normal pixels, plain cross-entropy on defect pixels
    "bce_defect_5": {"seg_loss": "bce", "seg_defect_weight": 5.0},  # bce, each defect pixel counted five times
    "with_dice": {"seg_dice_weight": 1.0},  # plus a soft Dice loss per image: small defects weigh as large ones
    # bce, defect pixels 2 or more pixels inside their region counted five times; thin cracks and rims once
    "bce_defect_5_inset_2": {"seg_loss": "bce", "seg_defect_weight": 5.0, "seg_defect_inset": 2},
    # the profile's batch since the twenty-seventh session (was 16): its rows before then name it
    "batch_8": {"batch_size": 8},  # half the batch, so twice the steps (run_steps): the same images seen
    "batch_16": {"batch_size": 16},  # the default before the twenty-seventh session: 3000 steps of 16
    "crop_overhang": {"crop_overhang": 0.5},  # training crops reach the image's sides far more often
    "crop_overhang_025": {"crop_overhang": 0.25},  # half that overhang: the sides trained on less often
    "batch_12": {"batch_size": 12},  # between batch 8 and 16: 4000 steps of 12, the same images seen
    "batch_8_lr_half": {"batch_size": 8, "lr": 1e-4},  # the same, at half the learning rate
    "batch_8_no_mask_texture": {"batch_size": 8, "mask_texture_factor": 0.0},  # batch_8, faint changes labelled defect
    "batch_8_label_smoothing": {"batch_size": 8, "seg_label_smoothing": 0.1},  # batch_8, map targets 0.05 and 0.95
    "faint_cracks": {"crack_contrast_min": 0.15},  # cracks from faint to black (default: from 40% of the way)
    "batch_8_faint_cracks": {"batch_size": 8, "crack_contrast_min": 0.15},  # batch_8 with faint_cracks
    "short_cracks": {"crack_points_max": 80, "crack_turn_min": 0.25},  # the cracks before: 20-80 points, all curly
    "hard_cracks": {"crack_soft": False},  # the cracks before: sharp edges, one strength along the whole crack
    "train_flips": {"train_augment_flip": True},  # mirror half the training images left-right
    "fewer_anomalies": {"anomaly_ratio": 0.3},  # 30% of each batch gets a synthetic anomaly (default 50%)
    "more_anomalies": {"anomaly_ratio": 0.7},  # 70%
    "width_20": {"base_channels": 20},  # wider networks (1.4x the CPU step time of width 16)
    "adam_beta1_09": {"beta1": 0.9},  # Adam's usual momentum (0.5 is the GAN habit; fast has no adversarial loss)
    "mask_diff_008": {"mask_min_diff": 0.08},  # a synthetic pixel counts as defect only where it changed by 0.08
    "mask_diff_004": {"mask_min_diff": 0.04},  # ... by 0.04 (default 0.02)
    "no_mask_texture": {"mask_texture_factor": 0.0},  # a synthetic pixel counts as defect where it changed by 0.02
    "mask_texture_4": {"mask_texture_factor": 4.0},  # ... by 0.02 and by 4 times the image's own grain (default 3)
    # the encoder serves the map alone; training skips the image decoder, a step about a quarter cheaper (the same
    # as default since the fast profile dropped the loss, thirty-fifth session)
    "no_reconstruction_loss": {"lambda_rec": 0.0},
    # the paper's masked reconstruction loss (the fast profile's before the thirty-fifth session, at 10000 steps)
    "with_reconstruction_loss": {"lambda_rec": 1.0},
    "with_adversarial_loss": {"lambda_adv": 0.1},  # the paper's adversarial loss on (image, map) pairs
    "small_regions": {"region_max": 0.08},  # paste and noise regions up to 8% of the image (as before)
    "regions_half": {"region_max": 0.5},  # synthetic anomalies up to half the image (large defects: uneven, fray)
    "streak_half": {"streak_region_max": 0.5},  # only streak regions (texture changes) up to half the image
    # crops of the coarser scale get regions only up to region_max, as the finer scale's (the default before the
    # thirty-ninth session, when they went up to half the image: coarse_region_max 0.5)
    "no_coarse_regions": {"coarse_region_max": 0.0},
    "coarse_regions_07": {"coarse_region_max": 0.7},  # coarse-scale crops' regions up to 70% of the crop
    "faint": {"opacity_min": 0.2},  # fainter synthetic anomalies (opacity from 0.2): low-contrast defects
    "ema_long": {"ema_decay": 0.9995},  # no different at 2000 steps: the warm-up keeps the decay below 0.9955
    "ema_window_1000": {"ema_warmup": 3},  # the average's decay reaches 0.999 at step 1997, not 8990
    "ema_window_500": {"ema_warmup": 5},  # decay 0.998 at step 2000: about the last 500 steps
    "constant_lr": {"lr_schedule": "constant"},  # no cosine: the same rate to the last step
    "cosine_lr_high": {"lr_schedule": "cosine", "lr": 5e-4},  # higher peak rate (2.5x), then down to 0
    "lr_2e4": {"lr": 2e-4},  # the peak rate before the thirty-fourth session (2026-12-04; now 3e-4)
    "lr_4e4": {"lr": 4e-4},  # a higher peak rate still (4e-4 against 3e-4) along the same cosine
    "feather_8": {"edge_feather": 8},  # paste and noise regions blend in over a soft edge up to 8 px wide
    "no_peak_boost": {"peak_boost": 0.0},  # maps as averaged, narrow peaks not raised (weights as `default`'s)
    "narrow_broad": {"broad_weight": 0.25, "broad_sigma": 12.0},  # the broad share before the fortieth session
    "no_broad": {"broad_weight": 0.0},  # no broad share of the map (the default before the twenty-ninth session)
    "image_score_max": {"image_score_topk_weight": 0.0},  # the image score is the map maximum alone (as before)
    "bf16": {"precision": "bf16"},  # networks under bfloat16 autocast, in training and inference
    "fp32": {"precision": "fp32"},  # fp32 on any hardware: with --steps 6000, the default before 2026-12-03
    "previous_default": {"lambda_adv": 0.1, "region_max": 0.08, "second_short_side": 0},  # fast before 2026-11-26
    # names of the rows measured against the previous default (see BASELINES); not run any more
    "large_regions": {"region_max": 0.25},
    "cosine_lr": {"lr_schedule": "cosine"},  # learning rates fall along half a cosine to 0 at the last step
    "mask_texture_3": {"mask_texture_factor": 3.0},  # ... by 0.02 and by 3 times the image's own grain
    "bce_defect_2": {"seg_loss": "bce", "seg_defect_weight": 2.0},  # bce, each defect pixel counted twice
    "long_cracks": LONG_CRACKS,
    "batch_8_long_cracks": {"batch_size": 8, **LONG_CRACKS},
    "long_soft_cracks": {**LONG_CRACKS, "crack_soft": True},
    "soft_cracks": {"crack_soft": True},  # cracks as photographed: soft edges, strength varying along them
    # + streakier texture regions, half of them at a random angle (measured against the profile without streak)
    "with_streak": {"anomaly_families": ["paste", "noise", "crack", "streak"], "streak_own_grain": 0.5},
}
# kept to label old rows; not in the default list of variants
LEGACY = ("large_regions", "cosine_lr", "mask_texture_3", "bce_defect_2", "long_cracks", "batch_8_long_cracks",
          "long_soft_cracks", "soft_cracks", "with_streak", "batch_8", "bf16")
# Rows of variants whose settings no longer exist: what they were, to read the rows by (not run any more)
RETIRED = {  # thirty-eighth session (docs/design.md): each mapped large regions apart; none kept bottle's AUPRO
    "fine_head": "region_max 0.5 and a second output channel of the map decoder that learned only regions up to a "
                 "quarter of the image, the map the mean of the two (setting fine_head_region_max 0.25, commit "
                 "c28aaaf)",
    "coarse_map": "a coarse map from a half-width decoder without skips on the first map's encoder features, "
                  "detached, learning regions up to half the image while the first map learned those up to a "
                  "quarter; the map the mean of the two (setting coarse_map_region_max 0.5, commit 8123002)",
    "coarse_net": "the same with the coarse map from a half-width encoder and decoder of its own (setting "
                  "coarse_map_region_max 0.5, commit c6748c9)",
}
# Rows measured before the fast profile changed carry a `baseline`: their variant changed that profile.
BASELINES = {"previous": "the fast profile before 2026-11-26 (lambda_adv 0.1, region_max 0.08): each variant "
                         "changed that profile, so `default` here is the variant `previous_default` of "
                         "bench/ablation.py, and `no_adversarial_loss` was an adversarial weight of 0 against 0.1",
             "one_scale": "the fast profile before it mapped at two scales (2026-11-26, second_short_side 0): each "
                          "variant changed that profile, so `default` here is the variant `one_scale` of "
                          "bench/ablation.py, and the then variant `two_scales` (second_short_side 256) became "
                          "the default (its rows are under `two_scales_sigma4`'s `default`)",
             "two_scales_sigma4": "the fast profile with two scales and smoothing_sigma 4 (2026-11-26, before "
                                  "sigma 2): each variant changed that profile; today's default differs only in "
                                  "its map smoothing, which is applied after training, so its `default` rows are "
                                  "the same models as this profile's, evaluated by `python bench/run_bench.py "
                                  "--reuse`",
             "constant_2000": "the fast profile before 2026-11-27 (2000 steps at a constant learning rate): "
                              "each variant changed that profile, so `default` here is that profile, and the "
                              "variant `cosine_lr` at 3000 steps is today's default but for `peak_boost` (2 since "
                              "the eighth session; applied after training, so measured on trained models in "
                              "bench/eval_settings.json)",
             "no_grain_rule": "the fast profile before the thirteenth session (2026-11-27; mask_texture_factor 0): "
                              "each variant changed that profile, so `default` here is the variant "
                              "`no_mask_texture`, and the variant `mask_texture_3` is today's default (its "
                              "full-size rows of seeds 0 and 1 are the models of bench/results.json until the "
                              "fifteenth session)",
             "focal_map_loss": "the fast profile before the fifteenth session (2026-11-27; focal map loss, "
                               "seg_defect_weight 1): each variant changed that profile, so `default` here is "
                               "that profile, and the variant `bce_defect_2` is today's default (its full-size "
                               "rows of seeds 0 and 1 were the models of bench/results.json until the "
                               "eighteenth session)",
             "short_cracks": "the fast profile before the eighteenth session (2026-11-28; synthetic cracks of 20-80 "
                             "points, all curly: crack_points_max 80, crack_turn_min 0.25): each variant changed "
                             "that profile (its own rows are the `bce_defect_2` rows measured against the "
                             "profile before the fifteenth session; today it is the variant `short_cracks`), and "
                             "the variant `long_cracks` has the settings of the profile from then to the "
                             "twentieth session (today's variant `hard_cracks`); `long_soft_cracks` has the "
                             "default settings of the twentieth to twenty-fifth sessions, `batch_8_long_cracks` "
                             "those of `batch_8` with `hard_cracks`)",
             "hard_cracks": "the fast profile before the twentieth session (2026-12-01; long synthetic cracks with "
                            "sharp edges and one strength along each crack: crack_soft off): each variant changed "
                            "that profile, so the profile itself is the `long_cracks` rows of the section measured "
                            "against the short cracks, and the variant `soft_cracks` has the default settings of the "
                            "twentieth to twenty-fifth sessions "
                            "(its rows of seeds 0 and 1 are the models of bench/results.json from the twentieth "
                            "to the twenty-sixth session)",
             "no_streak": "the fast profile before the twenty-sixth session (2026-12-02; anomaly families paste, "
                          "noise and crack, without streak): each variant changed that profile, so `default` here "
                          "is today's variant `no_streak`, and the variant then named `with_streak_own` (streak "
                          "added, every streak along the surface's own grain) is today's default: its rows are "
                          "listed as `default` under the profile measured against batch 16",
             "batch_16": "the fast profile before the twenty-seventh session (2026-12-03; batch 16 for 3000 steps): "
                         "each variant changed that profile, so `default` here is today's variant `batch_16`, and "
                         "the variant `batch_8` (the same images in 6000 steps of 8) is today's default: its rows "
                         "are listed as `default` under the fp32 profile of 6000 steps",
             "fp32_6000": "the fast profile before the thirty-first session (2026-12-03; fp32 for 6000 steps): "
                          "each variant changed that profile, so `default` here is today's variant `fp32` at "
                          "--steps 6000, and the variant `bf16` at 8000 steps (bf16 is what `precision` auto "
                          "gives on this CPU) was the default of the thirty-first and thirty-second sessions: "
                          "its rows are listed as `default` under the profile of 8000 steps",
             "steps_8000": "the fast profile before the thirty-third session (2026-12-04; 8000 steps): `default` "
                           "here is that profile, which `--variants lr_2e4 --steps 8000` trains today; the same "
                           "recipe at 10000 steps was the default of the thirty-third session, its rows under "
                           "the profile with lr 2e-4",
             "lr_2e4": "the fast profile before the thirty-fourth session (2026-12-04; generator learning rate 2e-4): "
                       "each variant changed that profile, so `default` here is today's variant `lr_2e4`, and the "
                       "variant `lr_3e4` (a 1.5x higher peak rate) is today's default: its rows are listed as "
                       "`default` under the current fast profile",
             "rec_10000": "the fast profile before the thirty-fifth session (2026-12-04; 10000 steps with the masked "
                          "reconstruction loss): each variant changed that profile, so `default` here is today's "
                          "variant `with_reconstruction_loss` at --steps 10000, and the variant "
                          "`no_reconstruction_loss` at 13000 steps (the image decoder skipped, so the same training "
                          "time) was the default of the thirty-fifth session: its rows are listed as `default` "
                          "under the profile of 13000 steps",
             "quarter_regions": "the fast profile before the thirty-ninth session (2026-12-05; synthetic regions "
                                "up to a quarter of the image at both scales: coarse_region_max 0): each variant "
                                "changed that profile, so `default` here is today's variant `no_coarse_regions`, "
                                "and the variant then named `coarse_regions_half` (regions up to half the image in "
                                "crops of the coarser scale) is today's default: its rows are listed as `default` "
                                "under the current fast profile",
             "broad_quarter": "the fast profile before the fortieth session (2026-12-05; a broad share of the map of "
                              "0.25 at sigma 12): each variant changed that profile; today's default differs only "
                              "in its map shaping (0.5 at sigma 16), applied after training, so its `default` rows "
                              "are the same models as today's `default`, whose rows under that profile's shaping "
                              "are today's variant `narrow_broad`",
             "steps_13000": "the fast profile before the thirty-sixth session (2026-12-04; 13000 steps): `default` "
                            "here is that profile, which `--steps 13000` trains today; the same recipe at 15000 "
                            "steps is today's default, its rows under the current fast profile"}
KEYS = ("pixel_auroc", "aupro", "pixel_ap", "image_auroc")


def overrides(variant: str) -> dict:
    """The variant's settings, with family lists resolved against the default's."""
    from anoseg.config import profile_config

    families = list(profile_config("fast").anomaly_families)
    out = dict(VARIANTS[variant])
    spec = out.get("anomaly_families")
    if spec == "OTHERS":
        out["anomaly_families"] = [f for f in families if f != "paste"]
    elif isinstance(spec, str) and spec.startswith("-"):
        out["anomaly_families"] = [f for f in families if f != spec[1:]]
    if "anomaly_families" in out and not out["anomaly_families"]:
        raise SystemExit(f"variant {variant}: the default has no other anomaly family to keep")
    return out


def run_steps(variant: str, steps: int) -> int:
    """The steps a variant trains for in a run of `steps`: scaled by the profile's batch over the variant's, so
    a variant with another batch size sees as many images as the others."""
    from anoseg.config import profile_config

    batch = profile_config("fast").batch_size
    return steps * batch // VARIANTS[variant].get("batch_size", batch)


def other_sigmas(model, root: Path) -> dict[str, dict]:
    """The same model evaluated with each map smoothing in ABLATION_SIGMAS (comma-separated; evaluation only)."""
    from eval_settings import evaluations

    texts = list(filter(None, os.environ.get("ABLATION_SIGMAS", "").split(",")))
    runs = list(evaluations(model, root, "smoothing_sigma", [float(t) for t in texts]))
    return {text: {k: m[k] for k in KEYS} for text, (_, m, _) in zip(texts, runs)}


def evaluation_only(variant: str) -> bool:
    """True for a variant that changes only how maps are shaped or scored (MAP_SHAPING, IMAGE_SCORING): it has the
    `default` variant's weights, so it is measured on that model instead of training the same weights again."""
    from anoseg.config import IMAGE_SCORING, MAP_SHAPING

    return bool(VARIANTS[variant]) and set(VARIANTS[variant]) <= {*MAP_SHAPING, *IMAGE_SCORING}


def trained_model(cfg, root: Path, folder: Path, keep: bool):
    """`cfg` trained on `root` in `folder`; a model kept there by an earlier run with the same training settings
    is loaded instead of trained again (ABLATION_KEEP; settings used only after training, anoseg.train.LATER,
    may differ); one with other settings is moved aside to NAME.oldN."""
    import anoseg
    from anoseg.modelfolder import WEIGHTS_FILE

    if keep and (folder / WEIGHTS_FILE).exists():  # written last: a finished model
        try:
            model = anoseg.load(folder)
        except anoseg.AnosegError as e:
            print(f"{folder}: not reused ({e})", file=sys.stderr)
        else:
            if same_training(model.config, cfg) and "train_seconds" in model.meta:
                return rescored(model, cfg, folder)
            aside = next(folder.with_name(f"{folder.name}.old{i}") for i in range(1, 1000)
                         if not folder.with_name(f"{folder.name}.old{i}").exists())
            folder.rename(aside)  # a model of an earlier profile: kept, not overwritten
            print(f"{folder}: not reused (its settings differ; moved to {aside.name}); training again",
                  file=sys.stderr)
    if keep and resumable(cfg, folder):  # a run stopped part-way (killed, or out of session time) goes on from there
        print(f"{folder}: resuming its checkpoint", file=sys.stderr)
        return anoseg.train(cfg, root, folder, resume=True, progress=False)
    return anoseg.train(cfg, root, folder, overwrite=True, progress=False)


def same_training(saved, cfg) -> bool:
    """Whether a kept model's settings `saved` train as `cfg` does: those used only after training
    (anoseg.train.LATER: maps, scores, thresholds, the detector) may differ."""
    from anoseg.train import LATER

    return saved.replace(**{k: getattr(cfg, k) for k in LATER}) == cfg


def resumable(cfg, folder: Path) -> bool:
    """Whether `folder` holds an unfinished run of `cfg`'s training settings (its checkpoint, no model yet)."""
    from anoseg.config import Config
    from anoseg.modelfolder import CONFIG_FILE, has_checkpoint, is_finished

    if not has_checkpoint(folder) or is_finished(folder):
        return False
    try:
        saved = Config.load(folder / CONFIG_FILE)
    except Exception as e:  # noqa: BLE001 - an unreadable folder is trained again, and says why
        print(f"{folder}: not resumed ({e})", file=sys.stderr)
        return False
    return same_training(saved, cfg)


def run_one(variants: list[str], category: str, seed: int, steps: int, threads: int, data: Path = DATA) -> list[dict]:
    """Train and evaluate one variant (inside a child process). Several evaluation-only variants are measured
    together on the `default` variant's model: kept in ABLATION_KEEP by an earlier run, or trained here once."""
    import torch

    import anoseg

    torch.set_num_threads(threads)
    trained = "default" if all(map(evaluation_only, variants)) else variants[0]
    if len(variants) > 1 and trained != "default":
        raise ValueError(f"only evaluation-only variants share a model: {variants}")
    cfg = anoseg.profile_config("fast", seed=seed, steps=steps, **overrides(trained))
    root = data / CATEGORIES[category] / category
    keep = os.environ.get("ABLATION_KEEP")  # a folder to keep the trained models in (for later inspection)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep) / f"{category}_{trained}_{seed}_{steps}" if keep else Path(tmp)
        model = trained_model(cfg, root, folder, bool(keep))
        base = model.config
        for variant in variants:
            model.config = base.replace(**overrides(variant)) if trained != variant else base  # map settings only
            evals = folder / ("eval" if trained == variant else f"eval_{variant}")
            result = anoseg.evaluate(model, root, evals if keep else None, progress=False)
            m = result["metrics"]
            records.append({"dataset": CATEGORIES[category], "category": category, "variant": variant, "seed": seed,
                            "steps": steps, **{k: m[k] for k in KEYS}, "image_auroc_topk": m["image_auroc_topk"],
                            "per_defect_type": result["per_defect_type"],
                            "train_seconds": model.meta["train_seconds"], "settings": overrides(variant),
                            "device": str(model.device), "data": str(data),
                            **({"weights_of": "default"} if trained != variant else {})})
        by_sigma = other_sigmas(model, root) if trained == variants[0] else {}
    if by_sigma:
        records[0]["by_sigma"] = by_sigma
    return records


def data_label(record: dict) -> str:
    """A short name for the data a row was measured on: the real images, or which scaled copy."""
    data = record.get("data", str(DATA))
    if "(" in data:
        return data[data.index("(") + 1:-1]
    return "full size" if data == str(DATA) else data


def write_tables(path: Path, records: list[dict], command: str) -> None:
    path.with_suffix(".json").write_text(json.dumps({"command": command, "results": records}, indent=2) + "\n")
    devices = sorted({r.get("device", "cpu") for r in records})
    data = sorted({r.get("data", str(DATA)) for r in records})
    commands = sorted({r["command"] for r in records if r.get("command")} | {command})
    lines = ["# Ablation", "", f"Commands: {'; '.join(f'`{c}`' for c in commands)}. Device(s): {', '.join(devices)}; "
             f"data: {', '.join(data)}. "
             "Each row: one training run of the `fast` profile with the variant's settings, evaluated on the "
             "category's test split. See bench/ablation.py for what each variant changes; variant x category "
             "pairs not listed have not been run yet. Training times depend on the device and on how many runs "
             "shared it."]
    order = [*VARIANTS, *RETIRED]
    ordered = sorted(records, key=lambda r: (r.get("baseline", ""), r["category"], order.index(r["variant"]),
                                             data_label(r), r["steps"], r["seed"]))
    retired = sorted({r["variant"] for r in records} & set(RETIRED))
    if retired:
        lines += ["", "Retired variants (their settings are no longer in the code):", "",
                  *(f"- `{v}`: {RETIRED[v]}." for v in retired)]
    for baseline in sorted({r.get("baseline", "") for r in ordered}):
        lines += ["", f"## Measured against {BASELINES[baseline] if baseline else 'the current fast profile'}", "",
                  "| category | variant | seed | steps | device | data | pixel AUROC | AUPRO@0.3 | pixel AP "
                  "| image AUROC | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in ordered if r.get("baseline", "") == baseline):
            device = r.get("device", "cpu")
            variant = f"{r['variant']} (default's weights)" if r.get("weights_of") else r["variant"]
            lines.append(f"| {r['category']} | {variant} | {r['seed']} | {r['steps']} | {device} | "
                         f"{data_label(r)} | "
                         + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {r['train_seconds']:.0f} |")
    sigma_rows = [(r, s, m) for r in ordered for s, m in r.get("by_sigma", {}).items()]
    if sigma_rows:
        lines += ["", "## The same models with other map smoothing (evaluation only)", "",
                  "| category | variant | seed | smoothing_sigma | pixel AUROC | AUPRO@0.3 | pixel AP | image AUROC |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['category']} | {r['variant']} | {r['seed']} | {s} | " + " | ".join(f"{m[k]:.3f}" for k in KEYS)
                  + " |" for r, s, m in sigma_rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def variant_list(text: str) -> list[str]:
    """--variants: known variants; a retired one is refused with what it was."""
    for name in text.split(","):
        if name in RETIRED:
            raise argparse.ArgumentTypeError(f"variant {name!r} is retired (its settings are no longer in the code): "
                                             f"{RETIRED[name]}")
    return name_list(text, list(VARIANTS), "variant")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the profile's steps")
    ap.add_argument("--steps", type=positive_int, help="training steps per run (overrides --quick)")
    ap.add_argument("--only", default=",".join(CATEGORIES), type=lambda t: name_list(t, list(CATEGORIES), "category"),
                    help="comma-separated categories")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in LEGACY),
                    type=variant_list, help="comma-separated variants")
    ap.add_argument("--seeds", default="0", type=seed_list, help="comma-separated seeds")
    ap.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (CPU threads are split between them)")
    ap.add_argument("--threads", type=positive_int,
                    help="CPU threads per run (default: the CPU count split between jobs)")
    ap.add_argument("--out", default=str(HERE / "ablation"), help="results file stem (.json and .md)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in the output file")
    ap.add_argument("--data", default=str(DATA), help="the data root (default ../shared/data; a scaled copy from "
                    "bench/make_small_data.py on a GPU machine)")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # variant category seed steps threads (child)
    args = ap.parse_args()
    data = Path(args.data)
    if args.one:
        v, c, seed, steps, threads = args.one
        for record in run_one(v.split(","), c, int(seed), int(steps), int(threads), data):
            print(json.dumps(record))  # one line each: the parent reads the last len(variants) lines
        return
    from anoseg.config import profile_config

    profile_steps = profile_config("fast").steps
    steps = args.steps if args.steps is not None else (profile_steps // 5 if args.quick else profile_steps)
    variants, categories = args.variants, args.only
    if not data.is_dir():
        raise SystemExit(f"{data}: the real data is not here; nothing to run")
    out = Path(args.out)
    old = [] if args.fresh else read_rows(out.with_suffix(".json"))
    done = {(r["variant"], r["category"], r["seed"], r["steps"]) for r in old
            if not r.get("baseline") and r.get("data", str(DATA)) == str(data)}
    # seed-major, then variant, then category: an interrupted run has covered every category evenly
    todo = [(v, c, s) for s in args.seeds for v in variants for c in categories
            if (v, c, s, run_steps(v, steps)) not in done]
    # evaluation-only variants of one category and seed share one child (and the default's model), after training
    trains = [job for job in todo if not evaluation_only(job[0])]
    groups: dict[tuple[str, int], list[str]] = {}
    for v, c, s in (job for job in todo if evaluation_only(job[0])):
        groups.setdefault((c, s), []).append(v)
    phases = [trains, [(",".join(vs), c, s) for (c, s), vs in groups.items()]]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    command = "python bench/ablation.py " + " ".join(sys.argv[1:])
    mine: list[dict] = []  # this run's rows: with --fresh, all the file keeps
    lock = threading.Lock()

    def child(job: tuple[str, str, int]) -> None:
        vs, c, s = job
        start = time.perf_counter()
        # a group of evaluation-only variants (comma-separated) trains nothing of its own: the default's steps
        one = [vs, c, str(s), str(run_steps(vs.split(",")[0], steps)), str(threads)]
        proc = subprocess.run([sys.executable, __file__, "--one", *one, "--data", str(data)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{c} {vs} seed {s}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            return
        lines = proc.stdout.strip().splitlines()[-len(vs.split(",")):]
        new = [{**json.loads(line), "command": command} for line in lines]
        with lock, locked(out.with_suffix(".json")):  # merged into the file as it stands (see resultsfile)
            mine.extend(new)
            write_tables(out, mine if args.fresh else [*read_rows(out.with_suffix(".json")), *new], command)
        for r in new:
            print(f"{c} {r['variant']} seed {s}: " + " ".join(f"{k} {r[k]:.3f}" for k in KEYS)
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)

    longer = "".join(f", {v} {run_steps(v, steps)}" for v in sorted({j[0] for j in trains})
                     if run_steps(v, steps) != steps)
    print(f"{len(trains)} training run(s) of {steps} steps{longer} and {len(todo) - len(trains)} evaluation-only, "
          f"{args.jobs} at a time", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if phases[1] and not os.environ.get("ABLATION_KEEP"):
            os.environ["ABLATION_KEEP"] = tmp  # the children keep `default` models for the evaluation-only ones
        for phase in phases:  # evaluation-only variants after training: they may need a `default` model
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(child, phase))


if __name__ == "__main__":
    main()
