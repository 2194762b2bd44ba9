"""Ablation: a profile against itself with one part changed (a variant), on the real categories.

    python bench/ablation.py                             # every variant x category, the fast profile
    python bench/ablation.py --only commutator --variants default,opaque --seeds 0,1 --jobs 2
    python bench/ablation.py --profile paper \\
        --variants default,no_hard_augmentation,no_coord_channels,no_adversarial_loss   # the paper's ablation

The variants are data: bench/variants.json, a table of setting overrides, each with one line on what it changes.
Each run trains in its own process (`--jobs` at a time, CPU threads split between them) and is merged into
bench/ablation.json as soon as it ends, so an interrupted ablation continues where it stopped (`--fresh` starts
again); bench/ablation.md is rewritten from the JSON after every run. With ABLATION_KEEP=DIR the trained models
are kept in DIR, and a run stopped part-way there goes on from its last checkpoint. Variants that change only
map settings (anoseg.config.MAP_SETTINGS) train nothing: they are evaluated on the `default` model of the same
category, seed and steps, and their rows say "default's weights". A variant with another batch size trains
proportionally more or fewer steps, so it sees as many images as the others.
Time on 2 CPU cores: one fast run (15,000 steps) takes about 20 minutes two at a time, plus 2 (bottle) to 7
(magnetic tile) minutes of evaluation. Rows measured against earlier profiles: bench/history/.
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

from arguments import name_list, positive_int, recorded_command, seed_list
from resultsfile import locked, read_rows
from run_bench import _f, rescored

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CATEGORIES = {"bottle": "mvtec_ad", "commutator": "kolektorsdd", "magnetic_tile": "magnetic_tile",
              "tire": "mvtec3d_tire", "ball_screw_drive": "bsdata"}
VARIANTS: dict[str, dict] = json.loads((HERE / "variants.json").read_text())
KEYS = ("pixel_auroc", "aupro", "pixel_ap", "image_auroc", "seg_f1")
SCORE_KEYS = ("pixel_auroc", "aupro", "seg_f1")  # the recipe score: their mean (docs/design.md, acceptance rule)


def overrides(variant: str) -> dict:
    """The variant's settings."""
    return dict(VARIANTS[variant]["set"])


def run_steps(variant: str, steps: int, profile: str = "fast") -> int:
    """The steps a variant trains for in a run of `steps`: scaled by the profile's batch over the variant's, so
    a variant with another batch size sees as many images as the others."""
    from anoseg.config import profile_config

    batch = profile_config(profile).batch_size
    return steps * batch // overrides(variant).get("batch_size", batch)


def evaluation_only(variant: str) -> bool:
    """True for a variant that changes only map settings (MAP_SETTINGS): it has the `default` variant's weights,
    so it is measured on that model instead of training the same weights again."""
    from anoseg.config import MAP_SETTINGS

    return bool(overrides(variant)) and set(overrides(variant)) <= set(MAP_SETTINGS)


def trained_model(cfg, root: Path, folder: Path, keep: bool):
    """`cfg` trained on `root` in `folder`; a model kept there by an earlier run with the same training settings
    is loaded instead of trained again (ABLATION_KEEP; settings that may change on resume may differ); one with
    other settings is moved aside to NAME.oldN."""
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
    if keep and resumable(cfg, folder):  # a run stopped part-way (killed, or out of time) goes on from there
        print(f"{folder}: resuming its checkpoint", file=sys.stderr)
        return anoseg.train(cfg, root, folder, resume=True, progress=False)
    return anoseg.train(cfg, root, folder, overwrite=True, progress=False)


def same_training(saved, cfg) -> bool:
    """Whether a kept model's settings `saved` train as `cfg` does: those a resumed run may change (maps,
    scores, thresholds, the detector, runtime) may differ."""
    from anoseg.config import RESUMABLE

    return saved.replace(**{k: getattr(cfg, k) for k in RESUMABLE if k != "steps"}) == cfg


def resumable(cfg, folder: Path) -> bool:
    """Whether `folder` holds an unfinished run of `cfg`'s training settings (its checkpoint, no model yet)."""
    from anoseg.modelfolder import CONFIG_FILE, has_checkpoint, is_finished, read_config

    if not has_checkpoint(folder) or is_finished(folder):
        return False
    try:
        saved = read_config(folder / CONFIG_FILE, for_training=True)
    except Exception as e:  # noqa: BLE001 - an unreadable folder is trained again, and says why
        print(f"{folder}: not resumed ({e})", file=sys.stderr)
        return False
    return same_training(saved, cfg)


def run_one(variants: list[str], category: str, seed: int, steps: int, threads: int, data: Path = DATA,
            profile: str = "fast") -> list[dict]:
    """Train and evaluate one variant (inside a child process). Several evaluation-only variants are measured
    together on the `default` variant's model: kept in ABLATION_KEEP by an earlier run, or trained here once."""
    import torch

    import anoseg
    from anoseg.calibrate import calibrate

    torch.set_num_threads(threads)
    trained = "default" if all(map(evaluation_only, variants)) else variants[0]
    if len(variants) > 1 and trained != "default":
        raise ValueError(f"only evaluation-only variants share a model: {variants}")
    cfg = anoseg.profile_config(profile, seed=seed, steps=steps, **overrides(trained))
    root = data / CATEGORIES[category] / category
    keep = os.environ.get("ABLATION_KEEP")  # a folder to keep the trained models in (for later inspection)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep) / f"{profile}_{category}_{trained}_{seed}_{steps}" if keep else Path(tmp)
        model = trained_model(cfg, root, folder, bool(keep))
        base, thresholds = model.config, (model.map_threshold, model.map_score_threshold)
        for variant in variants:
            model.config = base.replace(**overrides(variant)) if trained != variant else base  # map settings only
            model.map_threshold, model.map_score_threshold = thresholds
            if trained != variant:  # other maps: their thresholds chosen again, as `anoseg calibrate` does
                calibrate(model, [Path(f) for f in model.meta["holdout_files"]])
            evals = folder / ("eval" if trained == variant else f"eval_{variant}")
            result = anoseg.evaluate(model, root, evals if keep else None, progress=False)
            m = result["metrics"]
            records.append({"dataset": CATEGORIES[category], "category": category, "profile": profile,
                            "variant": variant, "seed": seed,
                            "steps": steps, **{k: m.get(k) for k in KEYS}, "image_auroc_topk": m["image_auroc_topk"],
                            "per_defect_type": result["per_defect_type"],
                            "train_seconds": model.meta["train_seconds"], "settings": overrides(variant),
                            "device": str(model.device), "data": data_label({"data": str(data)}),
                            **({"weights_of": "default"} if trained != variant else {})})
    return records


def data_label(record: dict) -> str:
    """A short name for the data a row was measured on: the real images, or which scaled copy."""
    data = record.get("data", "full size")
    if "(" in data:
        return data[data.index("(") + 1:-1]
    return "full size" if data in (str(DATA), "full size") else Path(data).name


def write_tables(path: Path, records: list[dict], command: str) -> None:
    path.with_suffix(".json").write_text(json.dumps({"command": command, "results": records}, indent=2) + "\n")
    commands = sorted({r["command"] for r in records if r.get("command")} | {command})
    lines = ["# Ablation", "", f"Commands: {'; '.join(f'`{c}`' for c in commands)}.",
             "Each row: one training run of the profile with the variant's settings (bench/variants.json), "
             "evaluated on the category's test split; variant x category pairs not listed have not been run. "
             "Training times depend on the device and on how many runs shared it.", "",
             "| profile | category | variant | seed | steps | device | data | pixel AUROC | AUPRO@0.3 | pixel AP "
             "| image AUROC | seg F1 | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(VARIANTS)
    for r in sorted(records, key=lambda r: (r.get("profile", "fast"), r["category"], order.index(r["variant"]),
                                            data_label(r), r["steps"], r["seed"])):
        variant = f"{r['variant']} (default's weights)" if r.get("weights_of") else r["variant"]
        lines.append(f"| {r.get('profile', 'fast')} | {r['category']} | {variant} | {r['seed']} | {r['steps']} | "
                     f"{r.get('device', 'cpu')} | {data_label(r)} | " + " | ".join(_f(r.get(k)) for k in KEYS)
                     + f" | {r['train_seconds']:.0f} |")
    lines += acceptance_lines(records)
    lines += ["", "Variants:", "", *(f"- `{name}`: {v['about']}." for name, v in VARIANTS.items())]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _score(r: dict) -> float | None:
    values = [r.get(k) for k in SCORE_KEYS]
    return None if any(v is None for v in values) else sum(values) / len(values)


def verdict(default: list[dict], variant: list[dict]) -> dict | None:
    """The acceptance rule (docs/design.md) for one variant against the default, on the same runs; None where
    the runs do not cover every category with two seeds, or lack a figure."""
    runs = {(r["category"], r["seed"]): r for r in variant}
    base = {(r["category"], r["seed"]): r for r in default}
    keys = sorted(set(runs) & set(base))
    seeds = {c: [s for cc, s in keys if cc == c] for c in CATEGORIES}
    if any(len(v) < 2 for v in seeds.values()) or any(_score(runs[k]) is None or _score(base[k]) is None
                                                       for k in keys):
        return None
    new, old = (sum(_score(d[k]) for k in keys) / len(keys) for d in (runs, base))
    falls = []
    for c, ss in seeds.items():
        for f in SCORE_KEYS:
            before = [base[(c, s)][f] for s in ss]
            after = sum(runs[(c, s)][f] for s in ss) / len(ss)
            if sum(before) / len(before) - after > max(before) - min(before):
                falls.append(f"{c} {f}")
    return {"score": new, "default": old, "falls": falls, "keep": new > old and not falls}


def acceptance_lines(records: list[dict]) -> list[str]:
    """Each variant judged by the acceptance rule, where its runs and the default's cover five categories and two
    seeds with the same profile, steps and data."""
    lines = []
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in records:
        key = (r.get("profile", "fast"), r["steps"], data_label(r))
        groups.setdefault(key, {}).setdefault(r["variant"], []).append(r)
    for (profile, steps, data), variants in sorted(groups.items()):
        for name, runs in variants.items():
            if name == "default" or "default" not in variants:
                continue
            v = verdict(variants["default"], runs)
            if v is not None:
                lines.append(f"| {profile} | {steps} | {data} | {name} | {v['score']:.4f} | {v['default']:.4f} "
                             f"| {v['score'] - v['default']:+.4f} | {', '.join(v['falls']) or 'none'} "
                             f"| {'keep' if v['keep'] else 'reject'} |")
    head = ["", "## Acceptance rule (docs/design.md)", "",
            "Recipe score: the mean over five categories and two seeds of pixel AUROC, AUPRO and seg F1. A variant "
            "is kept only if its score rises and no category's figure falls by more than the default's spread over "
            "seeds.", ""]
    if not lines:
        return head + ["No variant has yet run on all five categories with two seeds beside the default."]
    return head + ["| profile | steps | data | variant | score | default's | change | falls beyond the spread "
                   "| verdict |", "|---|---|---|---|---|---|---|---|---|", *lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the profile's steps")
    ap.add_argument("--steps", type=positive_int, help="training steps per run (overrides --quick)")
    ap.add_argument("--only", default=",".join(CATEGORIES), type=lambda t: name_list(t, list(CATEGORIES), "category"),
                    help="comma-separated categories")
    ap.add_argument("--profile", default="fast", choices=("fast", "paper", "tiny"),
                    help="the profile the variants change")
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda t: name_list(t, list(VARIANTS), "variant"),
                    help="comma-separated variants (bench/variants.json)")
    ap.add_argument("--seeds", default="0", type=seed_list, help="comma-separated seeds")
    ap.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (CPU threads are split between them)")
    ap.add_argument("--threads", type=positive_int,
                    help="CPU threads per run (default: the CPU count split between jobs)")
    ap.add_argument("--out", default=str(HERE / "ablation"), help="results file stem (.json and .md)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in the output file")
    ap.add_argument("--data", default=str(DATA), help="the data root (default ../shared/data; a scaled copy from "
                    "bench/make_small_data.py on a GPU machine)")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # variant category seed steps threads profile
    args = ap.parse_args()
    data = Path(args.data)
    if args.one:
        v, c, seed, steps, threads, profile = args.one
        for record in run_one(v.split(","), c, int(seed), int(steps), int(threads), data, profile):
            print(json.dumps(record))  # one line each: the parent reads the last len(variants) lines
        return
    from anoseg.config import profile_config

    profile_steps = profile_config(args.profile).steps
    steps = args.steps if args.steps is not None else (profile_steps // 5 if args.quick else profile_steps)
    variants, categories = args.variants, args.only
    if not data.is_dir():
        raise SystemExit(f"{data}: the real data is not here; nothing to run")
    out = Path(args.out)
    old = [] if args.fresh else read_rows(out.with_suffix(".json"))
    done = {(r["variant"], r["category"], r["seed"], r["steps"]) for r in old
            if r.get("profile", "fast") == args.profile and data_label(r) == data_label({"data": str(data)})}
    # seed-major, then variant, then category: an interrupted run has covered every category evenly
    todo = [(v, c, s) for s in args.seeds for v in variants for c in categories
            if (v, c, s, run_steps(v, steps, args.profile)) not in done]
    # evaluation-only variants of one category and seed share one child (and the default's model), after training
    trains = [job for job in todo if not evaluation_only(job[0])]
    groups: dict[tuple[str, int], list[str]] = {}
    for v, c, s in (job for job in todo if evaluation_only(job[0])):
        groups.setdefault((c, s), []).append(v)
    phases = [trains, [(",".join(vs), c, s) for (c, s), vs in groups.items()]]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    command = recorded_command("ablation.py", sys.argv[1:])
    mine: list[dict] = []  # this run's rows: with --fresh, all the file keeps
    lock = threading.Lock()

    def child(job: tuple[str, str, int]) -> None:
        vs, c, s = job
        start = time.perf_counter()
        # a group of evaluation-only variants (comma-separated) trains nothing of its own: the default's steps
        one = [vs, c, str(s), str(run_steps(vs.split(",")[0], steps, args.profile)), str(threads), args.profile]
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

    longer = "".join(f", {v} {run_steps(v, steps, args.profile)}" for v in sorted({j[0] for j in trains})
                     if run_steps(v, steps, args.profile) != steps)
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
