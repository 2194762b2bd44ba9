"""Importing anoseg changes nothing in the process and stays light."""

import subprocess
import sys

CHECK = r"""
import os, sys, warnings
calls = []
real_umask = os.umask
os.umask = lambda mask: calls.append(mask) or real_umask(mask)
import matplotlib
matplotlib.use("pdf")
fmt, show = warnings.formatwarning, warnings.showwarning
import anoseg.config
assert "matplotlib.pyplot" not in sys.modules
assert "torch" not in sys.modules, "the settings alone must not load PyTorch"
import anoseg, anoseg.api, anoseg.cli, anoseg.visualize, anoseg.evaluate, anoseg.predict
anoseg.train, anoseg.AnoSegModel  # the lazy names resolve
import anoseg.training, anoseg.demo  # a module that shares its name with a function does not replace the function
assert callable(anoseg.train) and callable(anoseg.demo) and callable(anoseg.evaluate) and callable(anoseg.predict)
assert sys.modules["anoseg.training"].Trainer
assert not calls, f"umask touched: {calls}"
assert matplotlib.get_backend().lower() == "pdf", matplotlib.get_backend()
assert warnings.formatwarning is fmt and warnings.showwarning is show
print("OK")
"""


def test_import_changes_nothing_in_the_process():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr


def test_cli_restores_the_warning_hook(capsys):
    import warnings

    from anoseg.cli import main

    before = warnings.showwarning
    assert main(["evaluate", "/nonexistent-model", "--out", "/tmp/x"]) == 2
    assert warnings.showwarning is before


def _package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative imports, at any depth in the file)."""
    import ast
    from pathlib import Path

    import anoseg

    root = Path(anoseg.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[name] = deps - {name}
    return graph


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_layering_inference_imports_no_training_code_and_no_cycles():
    graph = _package_imports()
    assert not {"augment", "train", "detector_training", "distributed", "train_all"} & _closure(graph, "inference")
    for module in graph:  # no module reaches itself
        if module not in ("__init__", "__main__"):
            assert module not in _closure(graph, module), f"import cycle through {module}"
