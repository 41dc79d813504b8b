"""checkpoint.py: atomic, resumable training checkpoints that are also ready-to-serve Hugging Face models.

RUN_DIR/checkpoints/step_000123/ holds
  model.safetensors (past 4 GiB: model-0000k-of-0000n.safetensors + model.safetensors.index.json), config.json,
  generation_config.json, tokenizer files
      the student in its compute dtype (bf16 on GPU, fp32 on CPU): `vllm serve DIR`, `from_pretrained(DIR)` and
      eval.py take it as it is; generation_config.json carries the EOS ids, so `vllm serve` stops as training did
  trainer/            torch.distributed.checkpoint (DCP): the fp32 masters and the AdamW state, each rank writing its
                      own shards; DCP reshards them on load, so a resume may use another world size
  rng_rank{r}.pt      each rank's RNG state (torch, python, cuda)
  trainer_state.pt    the step (= data position), config, counters; written last, so it marks the checkpoint complete

Atomic: everything goes into .tmp_step_NNNNNN (on a filesystem every rank sees), is fsynced, and rank 0 renames it
into place, then fsyncs the parent: a crash mid-save leaves a temp dir that is ignored and later overwritten, never
a half checkpoint under a step_ name. The last `keep_last` are kept.

Resume: at the same world size it is exact (final weights byte-identical to an uninterrupted run's). At another, the
masters and optimizer are resharded exactly, rank r takes rank r % saved-world's RNG state (which train.py does not
draw from: its sampling seeds follow each prompt's global position) and the gradient reduction order changes, so
weights agree to float rounding only.
"""
import copy
import json
import os
import random
import shutil

import torch
import torch.distributed as dist

SHARD_BYTES = 4 * 2**30  # the serving weights are split into files of about this size

def latest_checkpoint(run_dir: str):
    """The newest complete checkpoint (renamed into place only once fully written), or None."""
    root = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    done = [d for d in done if os.path.isfile(os.path.join(root, d, "trainer_state.pt"))]
    return os.path.join(root, done[-1]) if done else None

def save_checkpoint(run_dir: str, step: int, *, model, opt, tokenizer, state: dict, keep_last: int, dtype=None):
    """Write RUN_DIR/checkpoints/step_NNNNNN atomically; a collective. model: the FSDP2 policy.Policy (its `.lm` is
    the HF model); dtype: the serving dtype (None: as trained); state: what the trainer wants back on resume."""
    import policy
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    main = dist.get_rank() == 0
    root = os.path.join(run_dir, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f".tmp_step_{step:06d}")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a temp dir left by a crash
        os.makedirs(tmp)
    dist.barrier()
    write_serving_weights(tmp, policy.full_params(model, dtype), main)  # gathered one tensor at a time
    model_state, optim_state = get_state_dict(model, opt)  # sharded: each rank's own part
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "trainer"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_rank{dist.get_rank()}.pt"))
    dist.barrier()  # every rank's shards are written
    if main:
        config = copy.deepcopy(model.lm.config)
        config.dtype = dtype or next(model.parameters()).dtype
        config.save_pretrained(tmp)
        model.lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step}, os.path.join(tmp, "trainer_state.pt"))
        fsync_tree(tmp)  # every byte on disk before the rename makes the checkpoint visible
        shutil.rmtree(final, ignore_errors=True)  # a rerun of the same step (e.g. a resumed run's SIGTERM)
        os.rename(tmp, final)
        fsync_tree(root)  # the rename itself is durable
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-max(keep_last, 1)]:
            shutil.rmtree(os.path.join(root, old))  # keep the newest keep_last (at least 1)
    dist.barrier()

def write_serving_weights(out: str, named_tensors, main: bool):
    """Rank 0 writes the gathered tensors as safetensors files of about SHARD_BYTES (others only join gathers)."""
    import safetensors.torch
    files, part, size = [], {}, 0  # files: (path, tensor names) of each part written
    def flush():
        name = os.path.join(out, f"part{len(files)}.safetensors")
        safetensors.torch.save_file(part, name, metadata={"format": "pt"})
        files.append((name, list(part)))
    for name, tensor in named_tensors:  # every rank iterates: each item is an all-gather
        if main:
            part[name] = tensor.cpu().contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= SHARD_BYTES:
                flush()
                part, size = {}, 0
    if not main:
        return
    if part or not files:
        flush()
    n = len(files)
    finals = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for (path, _), final in zip(files, finals):
        os.rename(path, os.path.join(out, final))
    if n > 1:
        weight_map = {name: final for (_, names), final in zip(files, finals) for name in names}
        total = sum(os.path.getsize(os.path.join(out, final)) for final in finals)
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)

def fsync_tree(path: str):
    """fsync every file under `path` and every directory's entry list (rename is durable only after this)."""
    for root, _, files in os.walk(path):
        for fd in [os.open(os.path.join(root, name), os.O_RDONLY) for name in files + ["."]]:
            os.fsync(fd)
            os.close(fd)

def load_trainer_state(path: str, model, opt) -> dict:
    """Restore the fp32 masters and the optimizer (DCP, resharded to this world size) and this rank's RNG from
    `path`; return the rest of the saved state (step, config, counters). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, opt)
    saved = {"model": model_state, "optim": optim_state}
    dcp.load(saved, checkpoint_id=os.path.join(path, "trainer"))
    set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    saved_world = len([f for f in os.listdir(path) if f.startswith("rng_rank")])
    if saved_world != dist.get_world_size() and dist.get_rank() == 0:
        print(f"checkpoint {path}: saved at world size {saved_world}, resuming at {dist.get_world_size()}: masters "
              f"and optimizer resharded; rank r takes rank r % {saved_world}'s RNG state", flush=True)
    rng = torch.load(os.path.join(path, f"rng_rank{dist.get_rank() % saved_world}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
