"""A teacher sharded with FSDP2 over 2 real gloo ranks (torchrun), offloaded or not, returns the unsharded teacher's
numbers."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import teacher
from dist_teacher_worker import rank_sequences

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("offload", [False, True])
def test_sharded_teacher_matches_unsharded(tiny_model_dir, tmp_path, offload):
    """offload: ranks 1.. build their meta-initialised shards on the compute device, as rank 0's buffers are, and
    FSDP2's CPUOffloadPolicy moves the parameter shards to CPU memory (on GPUs a rank building on CPU instead
    would broadcast its CPU buffers against rank 0's GPU ones)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_teacher_worker.py"), tiny_model_dir, str(tmp_path)] + ["offload"] * offload
    # Own process group, so that on a hang the workers die with torchrun instead of outliving the test.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError("sharded teacher run hung (ranks out of step?):\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]

    reference = teacher.Teacher(tiny_model_dir, device="cpu", token_budget=64)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["local_numel"] < 0.75 * saved["full_numel"]  # each rank holds about half the weights
        assert saved["offloaded"] and all(x == offload for x in saved["offloaded"])  # the policy was applied
        for call in range(2):
            seqs = rank_sequences(rank, call)
            got = saved["results"][call]
            assert len(got) == len(seqs)
            for g, want, (_, r) in zip(got, reference.logprobs(seqs), seqs):
                assert g.shape == (len(r),)
                torch.testing.assert_close(g, want, atol=1e-5, rtol=0)
    # The ranks had different numbers of micro-batches; the one with fewer padded with dummy forwards.
    stats = [torch.load(tmp_path / f"rank{rank}.pt")["stats"] for rank in range(2)]
    for call in range(2):
        steps = [s[call]["micro_batches"] + s[call]["dummy_batches"] for s in stats]
        assert steps[0] == steps[1]
        assert stats[0][call]["micro_batches"] != stats[1][call]["micro_batches"]
    assert stats[1][1]["sequences"] == 0 and stats[1][1]["dummy_batches"] > 0
    assert all(torch.load(tmp_path / f"rank{rank}.pt")["sharded_after"] == [True, True] for rank in range(2))
