"""Training under torchrun: 2 gloo processes on the CPU give the same model as one process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from anoseg.checkpoint import load_tensors

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

SCRIPT = textwrap.dedent("""
    import os, sys
    from anoseg import profile_config, train
    from anoseg.checkpoint import module_state, save_tensors
    data, out, steps, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cfg = profile_config("tiny", steps=steps, batch_size=8, checkpoint_every=4, ema_decay=0.9, lambda_rec=1.0,
                         precision=precision)
    model = train(cfg, data, out, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    save_tensors(f"{out}/rank{rank}.safetensors", module_state("generator", model.generator))
""")


def run_training(script, data, out, steps, procs, precision="fp32"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = (launcher if procs > 1 else [sys.executable]) + [str(script), str(data), str(out), str(steps), precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(demo_root, tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    run_training(script, demo_root, tmp_path / "two", 10, 2)
    run_training(script, demo_root, tmp_path / "one", 10, 1)
    r0, r1 = load_tensors(tmp_path / "two" / "rank0.safetensors"), load_tensors(tmp_path / "two" / "rank1.safetensors")
    single = load_tensors(tmp_path / "one" / "rank0.safetensors")
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        assert torch.allclose(r0[k].float(), single[k].float(), atol=1e-3, rtol=1e-3), f"{k} differs from 1 process"
    # only rank 0 wrote the model, and it is the one the ranks hold
    saved = load_tensors(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(saved[k], r0[k]) for k in saved)
    assert not list((tmp_path / "two").glob(".*.tmp"))


def test_two_processes_train_in_bf16(demo_root, tmp_path):
    # the global batch norm once met bfloat16 activations with fp32 statistics and stopped the run
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    run_training(script, demo_root, tmp_path / "bf16", 2, 2, precision="bf16")
    assert (tmp_path / "bf16" / "model.safetensors").is_file()


def test_ranks_train_in_one_precision_when_their_hardware_disagrees(demo_root, tmp_path):
    # auto resolves on each rank's own hardware; here rank 1 finds bf16 faster and rank 0 does not
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import anoseg.trainer
        rank = os.environ["RANK"]
        anoseg.trainer.resolve_precision = lambda precision, device: "bf16" if rank == "1" else "fp32"
        from anoseg import profile_config, train
        model = train(profile_config("tiny", steps=2, batch_size=8, precision="auto"), sys.argv[1], sys.argv[2],
                      progress=False)
        open(f"{sys.argv[2]}/rank{rank}.precision", "w").write(model.meta["precision"])
    """))
    run_training(script, demo_root, tmp_path / "auto", 2, 2)
    assert [(tmp_path / "auto" / f"rank{r}.precision").read_text() for r in (0, 1)] == ["fp32", "fp32"]


def test_global_batch_must_split_evenly(demo_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "anoseg",
           "train", str(demo_root), "--out", str(tmp_path / "run"), "--profile", "tiny", "--steps", "2",
           "--batch-size", "5", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "batch_size 5 (the global batch) must be divisible by the number of processes (2)" in proc.stderr
