"""Worker for tests/test_teacher_dist.py: a sharded (FSDP2) teacher on 2 gloo ranks, results saved per rank.

    torchrun --nproc_per_node 2 tests/dist_teacher_worker.py MODEL_DIR OUT_DIR [offload]

Rank r scores its own list of sequences (the ranks get different numbers and lengths, and rank 1 gets an
empty list in the second call), so the dummy-forward padding inside Teacher.logprobs is exercised. The
test compares the saved numbers with an unsharded teacher in the parent process. With `offload`, the teacher is
also offloaded: FSDP2's CPUOffloadPolicy, the code path GPUs take, here over a CPU mesh.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def rank_sequences(rank: int, call: int):
    """Deterministic (prompt_ids, response_ids) for one rank and call; the parent rebuilds the same lists."""
    g = torch.Generator().manual_seed(100 * call + rank)
    count = [[7, 2], [3, 0]][call][rank]
    seqs = []
    for _ in range(count):
        p = torch.randint(0, 512, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(0, 512, (int(torch.randint(0, 48, (1,), generator=g)),), generator=g).tolist()
        seqs.append((p, r))
    return seqs


def main():
    model_dir, out_dir, offload = sys.argv[1], sys.argv[2], sys.argv[3:] == ["offload"]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import teacher
    t = teacher.Teacher(model_dir, device="cpu", token_budget=64, shard=True, offload=offload)
    fsdp_params = [fp for g in t.model._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params]
    offloaded = [fp.offload_to_cpu for fp in fsdp_params]  # the root's: embeddings, norm, LM head
    # Sharded for real: each rank holds only part of every decoder layer's weights between calls.
    from torch.distributed.tensor import DTensor
    local = sum(p.to_local().numel() for p in t.model.parameters())
    full = sum(p.numel() for p in t.model.parameters())
    results, stats, sharded_after = [], [], []
    for call in range(2):
        results.append(t.logprobs(rank_sequences(rank, call)))
        stats.append(t.last_stats)
        # After the pass every parameter, the root's (embeddings, norm, LM head) included, is a shard again: the
        # gathered full weights are freed, not left resident until the next call.
        sharded_after.append(all(isinstance(p, DTensor) for p in t.model.lm.parameters()))
    torch.save({"results": results, "local_numel": local, "full_numel": full, "stats": stats,
                "sharded_after": sharded_after, "offloaded": offloaded},
               os.path.join(out_dir, f"rank{rank}.pt"))
    from dist_load_worker import leave_together
    leave_together()


if __name__ == "__main__":
    main()
