"""checkpoint.py: atomic, resumable training checkpoints that are also ready-to-serve Hugging Face models.

RUN_DIR/checkpoints/step_000123/ holds
  model.safetensors, config.json, tokenizer files  the student as a plain HF model: `vllm serve DIR`,
                                                   `AutoModelForCausalLM.from_pretrained(DIR)` and eval.py take it
                                                   as it is (full tensors gathered from FSDP2 shards, HF names),
                                                   so no conversion script stands between training and evaluation
  trainer_state.pt                                 what an exact resume needs beyond the weights: the optimizer
                                                   (full state dict, loadable at another world size), every rank's
                                                   RNG (torch, python, cuda), the step (= data position: train.py's
                                                   prompt order is a function of the step), the run's config and
                                                   the trainer's own counters

Why it is written the way it is:
- atomic: rank 0 writes into .tmp_step_NNNNNN, fsyncs every file, renames the directory into place, then fsyncs
  the parent. A crash (or a preempted node) mid-write leaves a temp dir that is ignored and later overwritten,
  never a half checkpoint under a step_ name; `latest_checkpoint` trusts only directories with trainer_state.pt,
  and experiments/mini_repro treats the final step's directory as "this run is finished".
- rank 0 writes, every rank gathers: weights and optimizer state are collectives over the FSDP2 shards, so every
  rank calls `save_checkpoint`; a barrier at the end keeps ranks from running ahead of a checkpoint in progress.
- the last `keep_last` are kept: a long run's disk use stays bounded and a resume still has a fallback.

    import checkpoint
    path = checkpoint.latest_checkpoint(run_dir)          # newest complete step_NNNNNN, or None
    checkpoint.save_checkpoint(run_dir, step, student.full_params(policy), policy, opt, tokenizer, state, keep_last)
    state = checkpoint.load_trainer_state(path, policy, opt)   # restores optimizer and RNG, returns the rest
"""
import os
import random
import shutil

import torch
import torch.distributed as dist


def latest_checkpoint(run_dir: str):
    """The newest complete checkpoint (renamed into place only once fully written), or None."""
    root = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    done = [d for d in done if os.path.isfile(os.path.join(root, d, "trainer_state.pt"))]
    return os.path.join(root, done[-1]) if done else None


def save_checkpoint(run_dir: str, step: int, weights, policy, opt, tokenizer, state: dict, keep_last: int):
    """Write RUN_DIR/checkpoints/step_NNNNNN atomically; a collective (every rank calls it).

    weights: (hf_name, full tensor) pairs, gathered one at a time (student.full_params: every rank drains it);
    policy: the FSDP2 root module with the HF model as `.lm` (its config is saved beside the weights);
    state: what the trainer wants back on resume (step, config, counters), saved with the optimizer and RNG.
    """
    import safetensors.torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    main = dist.get_rank() == 0
    tensors = {name: t.cpu().clone() for name, t in weights if main}  # every rank joins each gather
    optim = get_optimizer_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, {"torch": torch.get_rng_state(), "python": random.getstate(),
                                  "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if main:
        root = os.path.join(run_dir, "checkpoints")
        final, tmp = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f".tmp_step_{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)  # a temp dir left by a crash
        os.makedirs(tmp)
        safetensors.torch.save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        policy.lm.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step, "optimizer": optim, "rng": rngs}, os.path.join(tmp, "trainer_state.pt"))
        fsync_tree(tmp)  # every byte on disk before the rename makes the checkpoint visible
        shutil.rmtree(final, ignore_errors=True)  # a rerun of the same step (e.g. a resumed run's SIGTERM)
        os.rename(tmp, final)
        fsync_tree(root)  # the rename itself is durable
        prune(root, keep_last)
    dist.barrier()


def prune(root: str, keep_last: int):
    """Delete all but the newest `keep_last` (at least 1) step_ directories under `root`."""
    for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-max(keep_last, 1)]:
        shutil.rmtree(os.path.join(root, old))


def fsync_tree(path: str):
    """fsync every file under `path` and every directory's entry list (rename is durable only after this)."""
    for root, _, files in os.walk(path):
        for fd in [os.open(os.path.join(root, name), os.O_RDONLY) for name in files + ["."]]:
            os.fsync(fd)
            os.close(fd)


def load_trainer_state(path: str, policy, opt) -> dict:
    """Restore the optimizer (read by rank 0, broadcast) and this rank's RNG from `path`; return the rest of the
    saved state (step, config, the trainer's counters). Model weights are not touched: load them from `path` as
    from any HF model directory. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    main = dist.get_rank() == 0
    state = [torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
             if main else None]
    optim = state[0].pop("optimizer") if main else {}
    dist.broadcast_object_list(state, src=0)
    set_optimizer_state_dict(policy, opt, optim,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    rngs = state[0].pop("rng")
    if len(rngs) != dist.get_world_size() and main:
        print(f"checkpoint {path}: saved at world size {len(rngs)}, resuming at {dist.get_world_size()}: rank r "
              f"takes rank r % {len(rngs)}'s RNG state (train.py's sampling seeds do not depend on it)", flush=True)
    rng = rngs[dist.get_rank() % len(rngs)]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state[0]
