"""One rank of tests/test_rollout_dist.py, launched by torchrun --nproc_per_node 2 (gloo, CPU).

The trainer's order of events: init the process group, build this rank's engine (all ranks together),
sync weights, generate, keep using collectives, then shut the engine down *last* (vLLM's teardown destroys
the default process group) and destroy the group only if it is still there.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_rollout_worker.py MODEL_DIR OUT_DIR
"""
import copy
import json
import os
import sys

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import rollout  # noqa: E402


def main(model_dir, out_dir):
    from transformers import AutoModelForCausalLM
    result = {}
    try:  # building before the process group exists must fail loudly, not grab a 1-rank group
        rollout.VLLMEngine(model_dir, dtype="float32", max_model_len=128)
    except RuntimeError as e:
        result["early_build_error"] = str(e)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = rollout.VLLMEngine(model_dir, dtype="float32", max_model_len=128, seed=rank, max_num_seqs=8,
                                kv_cache_memory_bytes=32 * 2**20)
    result["world_after_build"] = dist.get_world_size()
    result["local_world_size_env"] = os.environ.get("LOCAL_WORLD_SIZE")

    # The same update on every rank, as after an FSDP optimizer step (seeded perturbation).
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    new = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    engine.load_weights(new.named_parameters())
    prompt = [[100 + rank, 101, 102, 103]]
    sample = engine.generate(prompt, n=2, max_tokens=16, seed=rank)[0]
    err, moved = 0.0, 0.0
    for s in sample:
        ids = torch.tensor([prompt[0] + s["response_ids"]])
        with torch.no_grad():
            ref_new = torch.log_softmax(new(ids).logits[0, 3:-1], -1)
            ref_old = torch.log_softmax(hf(ids).logits[0, 3:-1], -1)
        idx = torch.tensor(s["response_ids"])[:, None]
        lp = torch.tensor(s["logprobs"])
        err = max(err, (lp - ref_new.gather(-1, idx).squeeze(-1)).abs().max().item())
        moved = max(moved, (lp - ref_old.gather(-1, idx).squeeze(-1)).abs().max().item())

    # Collectives still work after building, syncing and generating: gather every rank's numbers.
    stats = torch.tensor([err, moved, float(rank)])
    everyone = [torch.zeros(3) for _ in range(world)]
    dist.all_gather(everyone, stats)
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    result.update(errors=[e[0].item() for e in everyone], moved=[e[1].item() for e in everyone],
                  ranks=[int(e[2].item()) for e in everyone], all_reduce=total.item())
    dist.barrier()

    engine.shutdown()  # last: tears down the default process group too
    result["initialized_after_shutdown"] = dist.is_initialized()
    if dist.is_initialized():
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
