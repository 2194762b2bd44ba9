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
import anoseg, anoseg.api, anoseg.cli, anoseg.visualize, anoseg.evaluate, anoseg.predict
anoseg.train, anoseg.AnoSegModel  # the lazy names resolve
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
