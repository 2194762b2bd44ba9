"""Saving and loading weights as safetensors (never pickle) next to JSON metadata, atomically; resume points."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelFileError
from .fileio import _write_atomic, temp_files, write_text_atomic


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _write_atomic(Path(path), lambda p: save_file(flat, str(p)))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e})") from None


def finite_weights(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`tensors` when every floating-point value is a finite number; else a one-line ModelFileError."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        raise ModelFileError(f"{path}: holds weights that are not finite numbers (NaN or infinity); the model "
                             "cannot make maps, train it again")
    return tensors


def save_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def module_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    """Load `prefix.*` tensors into a module, with a clear error for missing keys or wrong shapes."""
    own = module.state_dict()
    sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelFileError(f"{source}: weights do not fit the configuration ({prefix}: {what})")
    for k, v in sub.items():
        if v.shape != own[k].shape:
            raise ModelFileError(
                f"{source}: weights do not fit the configuration ({prefix}.{k} has shape {tuple(v.shape)}, "
                f"expected {tuple(own[k].shape)})"
            )
    module.load_state_dict(sub)


def optimizer_state(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and plain JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        plain["state"][str(pid)] = {}
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}.{pid}.{name}"] = val
            else:
                plain["state"][str(pid)][name] = val
    return tensors, plain


def load_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                   plain: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, st in plain["state"].items():
        state[int(pid)] = dict(st)
    for key, val in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_resume_point(folder: Path, state_file: str, stem: str, step: int, tensors: dict[str, torch.Tensor],
                      state: dict[str, Any]) -> None:
    """Write a resume point that survives a kill at any moment.

    The weights go to a new file named after the step (``<stem>-<step>.safetensors``); the JSON that names
    them is renamed into place last, and only then are older weights (and temporary files a kill left
    behind) removed. Whenever the process dies, `state_file` names a complete weights file that matches it.
    """
    weights = f"{stem}-{step:08d}.safetensors"
    save_tensors(folder / weights, tensors)
    save_json(folder / state_file, {"step": step, "weights": weights, **state})
    for old in [*folder.glob(f"{stem}*.safetensors"), *temp_files(folder, stem)]:
        if old.name != weights:
            old.unlink(missing_ok=True)


def resume_weights(folder: Path, state_file: str, legacy: str) -> Path:
    """The weights file that `state_file` names (`legacy`: the one fixed name older files used)."""
    if not (folder / state_file).is_file():
        return folder / legacy
    name = load_json(folder / state_file).get("weights", legacy)
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ModelFileError(f"{folder / state_file}: bad weights file name {name!r}")
    return folder / name


def remove_resume_point(folder: Path, state_file: str, stem: str) -> None:
    for old in [folder / state_file, *folder.glob(f"{stem}*.safetensors"), *temp_files(folder, stem)]:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag the loop checks between steps; a second one aborts at once."""
    hit = []

    def handler(signum, frame):  # noqa: ARG001
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
        yield lambda: False
        return
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)
