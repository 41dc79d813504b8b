"""policy.load across 2 real gloo ranks (torchrun): one read from disk on rank 0, meta-device models elsewhere,
weights and buffers broadcast, equal on every rank to a plain from_pretrained (untied and tied embeddings)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_rank0_load_and_broadcast_equals_from_pretrained(tiny_model_dir, tiny_tied_model_dir, which):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1")
    model_dir = tiny_model_dir if which == "untied" else tiny_tied_model_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_load_worker.py"), model_dir]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    found = re.findall(r"rank (\d) trainable=(True|False) shard=(True|False): weights (True|False) buffers (True|False)",
                       out)
    assert len(found) == 6 and all(w == b == "True" for *_, w, b in found), out[-3000:]
