"""checkpoint.py through real train.py runs on gloo ranks: sharded trainer state (DCP), exact resume at the same
world size, resume at another world size, and a SIGKILL in the middle of a save.

The toy task (tests/train_helper.py: reward = share of lowercase letters) gives real gradients from the first step.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1")
HELPER = os.path.join(ROOT, "tests", "train_helper.py")
TOY = [HELPER, "toy", "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--prompts_per_step", "4",
       "--group_size", "4", "--max_tokens", "8", "--lr", "1e-2", "--eval_every", "0", "--save_every", "2",
       "--keep_last", "3"]
ONE = [sys.executable]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, run_dir, *flags):
    p = subprocess.run(cmd + TOY + list(flags) + ["--run_dir", str(run_dir)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def weights(run_dir, step):
    import safetensors.torch
    return safetensors.torch.load_file(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "model.safetensors"))


def test_resume_at_the_same_and_at_another_world_size(tmp_path):
    full, cut, other = tmp_path / "full", tmp_path / "cut", tmp_path / "other"
    run(TWO, full, "--max_steps", "4")
    run(TWO, cut, "--max_steps", "2")
    ckpt = cut / "checkpoints" / "step_000002"
    assert {"model.safetensors", "config.json", "generation_config.json", "trainer_state.pt", "rng_rank0.pt",
            "rng_rank1.pt"} <= set(os.listdir(ckpt)) and os.path.isfile(ckpt / "trainer" / ".metadata")
    assert len([f for f in os.listdir(ckpt / "trainer") if f.endswith(".distcp")]) == 2  # each rank its own shard
    assert json.load(open(ckpt / "generation_config.json"))["eos_token_id"] is not None
    shutil.copytree(cut, other)
    run(TWO, cut, "--max_steps", "4", "--resume", "true")
    # 2 -> 2: the final weights are byte-identical to the uninterrupted run's
    a, b = open(full / "checkpoints" / "step_000004" / "model.safetensors", "rb").read(), \
        open(cut / "checkpoints" / "step_000004" / "model.safetensors", "rb").read()
    assert a == b
    w0, w4 = weights(full, 2), weights(full, 4)
    assert max((w4[k] - w0[k]).abs().max().item() for k in w0) > 1e-3  # steps 3-4 really trained
    # 2 -> 1: runs to its end; the masters and optimizer are resharded exactly, the reduction order is not
    out = run(ONE, other, "--max_steps", "4", "--resume", "true")
    assert "saved at world size 2, resuming at 1" in out
    w1 = weights(other, 4)
    assert max((w1[k] - w4[k]).abs().max().item() for k in w4) < 1e-4


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, tiny_tokenizer):
    """A student large enough that a save takes a while (~24M parameters: ~400 MB of weights, masters and AdamW
    state to write and fsync); the run is killed while .tmp_step_000004 is being written, then resumed."""
    import tiny
    model = tiny.save_tiny(str(tmp_path / "student"), tiny_tokenizer, hidden_size=512, num_layers=8, num_heads=8,
                           num_kv_heads=4, head_dim=64, intermediate_size=1376)
    run_dir = tmp_path / "run"
    cmd = ONE + TOY + ["--max_steps", "6", "--model", model, "--run_dir", str(run_dir)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    tmp, deadline = run_dir / "checkpoints" / ".tmp_step_000004", time.monotonic() + 600
    while not tmp.is_dir() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert tmp.is_dir(), "the save was not caught in progress"
    assert not (run_dir / "checkpoints" / "step_000004").exists()
    import checkpoint
    assert checkpoint.latest_checkpoint(str(run_dir)).endswith("step_000002")
    out = run(ONE, run_dir, "--max_steps", "6", "--model", model, "--resume", "true")
    assert "resumed from" in out and "step_000002 at step 2" in out
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_000002", "step_000004", "step_000006"]
    saved = weights(run_dir, 6)
    assert all(torch.isfinite(t).all() for t in saved.values())
