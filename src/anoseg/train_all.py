"""Train every category of an MVTec-layout root, one after another or several at a time.

Each category trains in its own process (``anoseg train``), so one failure or one crash does not stop
the others and each run's memory is returned when it ends. Finished categories are skipped, interrupted
ones resumed, and one summary table (CSV + Markdown) lists them all.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import Config, profile_config
from .data import is_mvtec_category
from .errors import ERROR_FILE_ENV, DataError
from .fileio import make_output_dir, write_text_atomic
from .modelfolder import META_FILE, has_checkpoint, is_finished
from .progress import bar as progress_bar

SUMMARY_FIELDS = ["category", "status", "seconds", "train_seconds", "steps", "map_threshold", "pixel_auroc", "aupro",
                  "image_auroc", "log"]


ERROR_FILE = "train_error.json"  # a failed child leaves its error here (see cli.main)


@dataclass
class Job:
    category: str
    data: Path
    out: Path
    action: str  # train, resume or skip


def find_categories(root: str | Path) -> list[Path]:
    """Category folders (holding train/good) directly under `root`, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    if is_mvtec_category(root):
        raise DataError(f"{root}: is one category (it holds train/good); use anoseg train, or give its parent")
    cats = sorted(p for p in root.iterdir() if p.is_dir() and is_mvtec_category(p))
    if not cats:
        raise DataError(f"{root}: no categories found (expected ROOT/<category>/train/good)")
    return cats


def plan(root: str | Path, out: str | Path, only: list[str] | None = None) -> list[Job]:
    """What to do for each category: skip finished models, resume checkpoints, train the rest."""
    cats = find_categories(root)
    if only:
        unknown = sorted(set(only) - {c.name for c in cats})
        if unknown:
            raise DataError(f"no such category under {root}: {', '.join(unknown)}")
        cats = [c for c in cats if c.name in only]
    jobs = []
    for cat in cats:
        folder = Path(out) / cat.name
        action = ("skip" if is_finished(folder)
                  else "resume" if has_checkpoint(folder) else "train")
        jobs.append(Job(cat.name, cat, folder, action))
    return jobs


def _run(job: Job, config_file: Path, evaluate: bool, threads: int) -> dict:
    start = time.perf_counter()
    row: dict = {"category": job.category, "status": {"skip": "already trained"}.get(job.action, job.action)}
    if job.action != "skip":
        make_output_dir(job.out)
        log, error_file = job.out / "train_all.log", job.out / ERROR_FILE
        error_file.unlink(missing_ok=True)
        # the settings travel as a config file and the error comes back as JSON: nothing is re-typed or parsed
        cmd = [sys.executable, "-m", "anoseg", "train", str(job.data), "--out", str(job.out), "--quiet",
               "--config", str(config_file)]
        if job.action == "resume":
            cmd.append("--resume")
        if evaluate:
            cmd.append("--evaluate")
        env = {**os.environ, ERROR_FILE_ENV: str(error_file)}
        if threads:  # several categories at once: share the cores instead of fighting over them
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        row["log"] = str(log)
        if code:
            row["status"] = f"failed (exit {code}): {_child_error(error_file, log)[:200]}"
        else:
            row["status"] = "trained" if job.action == "train" else "resumed"
    row["seconds"] = round(time.perf_counter() - start, 1)
    meta = job.out / META_FILE
    if meta.is_file():
        m = json.loads(meta.read_text())
        row.update(train_seconds=m.get("train_seconds"), steps=m.get("steps_done"),
                   map_threshold=m.get("map_threshold", m.get("threshold")))
    metrics = job.out / "eval" / "metrics.json"
    if metrics.is_file():
        values = json.loads(metrics.read_text()).get("metrics", {})
        row.update({k: values.get(k) for k in ("pixel_auroc", "aupro", "image_auroc")})
    return row


def _child_error(error_file: Path, log: Path) -> str:
    """The failed child's error message: from its JSON error file, else the last line of its log."""
    try:
        return str(json.loads(error_file.read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        return last[0]


def train_all(root: str | Path, out: str | Path, config: Config | None = None, jobs: int = 1,
              evaluate: bool = False, only: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Train each category of `root` into `out/<category>`; writes ``out/summary.csv`` and ``summary.md``.

    Every category trains with `config` (default: the ``fast`` profile); `jobs` categories train at the
    same time, the CPU threads shared between them.
    """
    if jobs < 1:
        raise DataError(f"--jobs {jobs}: must be at least 1")
    todo = plan(root, out, only)
    make_output_dir(out)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    config = (config or profile_config("fast")).replace(**({"num_threads": threads} if threads else {}))
    config_file = Path(out) / "train_all_config.json"
    config.save(config_file)
    rows: dict[str, dict] = {}
    bar = progress_bar(total=len(todo), desc="categories", unit="cat", disable=not progress)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(_run, j, config_file, evaluate, threads): j for j in todo}
        for fut in futures:
            row = fut.result()
            rows[row["category"]] = row
            bar.update(1)
            bar.set_postfix_str(f"{row['category']}: {row['status'][:40]}", refresh=False)
            write_summary(Path(out), [rows[j.category] for j in todo if j.category in rows])
    bar.close()
    return [rows[j.category] for j in todo]


def write_summary(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "summary.csv", buf.getvalue())

    def f(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(SUMMARY_FIELDS[:-1]) + " |", "|" + "---|" * (len(SUMMARY_FIELDS) - 1)]
    lines += ["| " + " | ".join(f(r.get(k)) for k in SUMMARY_FIELDS[:-1]) + " |" for r in rows]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
