"""Runs the project's real training loop (train.main) on a toy task, or one update step on fixed data.

    python tests/train_helper.py toy --config configs/tiny_cpu.toml --run_dir DIR [--key value ...]
    [torchrun --nproc_per_node 2|4] tests/train_helper.py update OUT.pt MODEL_DIR [SHARD_GROUP [METHOD]]
    torchrun --nproc_per_node 2 tests/train_helper.py timeout MINUTES    # rank 1 arrives 30 s late
    torchrun --nproc_per_node 2 tests/train_helper.py metrics            # rank 1 records a metric rank 0 does not
    torchrun --nproc_per_node 2 tests/train_helper.py apart DIR0 DIR1 --config ... --run_dir RELATIVE [--key value ...]
        # train.main with rank r working in DIRr: a relative run_dir names a different directory on each rank

toy: prompts whose reward is the fraction of generated characters that are lowercase letters or spaces. A
random tiny model scores about 0.5 with a wide spread, so group advantages are informative from the first
step and a policy that learns shows it within a few dozen CPU steps. Everything else is the real loop: vLLM
rollouts, teacher, FSDP2 update, weight sync, checkpoints. Each example also carries a ground-truth `target`
for sft.

update: a fixed batch of 4 prompts x 4 responses (rewards chosen so that group 3 is all-equal and filtered),
split 2 + 2 groups over 2 ranks or all on one, goes through train.set_advantages, train.keep_rows, policy.logprobs
and train.update with SGD(lr=1): the saved weights are w - grad, so comparing them compares gradients. The step's
metrics are then merged across ranks (policy.Metrics.reduce) and saved with the weights.
"""
import dataclasses
import os
import sys

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import policy  # noqa: E402
import rlad  # noqa: E402
import train  # noqa: E402

LETTERS = set("abcdefghijklmnopqrstuvwxyz ")


class ToyTask:
    """A task (tasks.py's interface): the reward is the share of lowercase letters or spaces."""
    @staticmethod
    def examples(split, source=None, n=64):
        return [{"task": "toy", "question": f"Write a sentence ({i}).", "answer": "0", "level": "toy",
                 "id": f"toy{i}", "target": "the knight is a knave"} for i in range(n if split == "train" else 0)]

    @staticmethod
    def score(examples, texts):
        out = []
        for text in texts:
            reward = sum(c in LETTERS for c in text) / len(text) if text else 0.0
            out.append({"reward": reward, "correct": reward >= 0.75, "format_ok": True})
        return out


def update_case(out_path, model_dir, shard_group=0, method="rlad"):
    """One train.update on fixed data; rank r of w gets groups [r*4/w, (r+1)*4/w). The rows carry teacher log-probs
    only when the method reads them, as train.main's do."""
    rank, world, device = train.setup_distributed()
    cfg = train.Config(model=model_dir, method=method, group_size=4, prompts_per_step=4, mini_batches=2, ppo_epochs=2,
                       micro_batch_tokens=48, filter_groups=True, max_grad_norm=1e9, max_tokens=16, seed=0,
                       temperature=1.0, lr=1.0, warmup_steps=0, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([1., 0, 0, 1, 0.5, 0.5, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1])  # group 3 all equal: filtered
    rows = []
    for p in range(4):
        prompt = torch.randint(3, 500, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for i in range(4):
            n = int(torch.randint(1, 12, (1,), generator=g))
            rows.append(policy.Row(prompt=prompt, response=torch.randint(3, 500, (n,), generator=g).tolist(), group=p,
                                   uid=4 * p + i, reward=float(rewards[4 * p + i]),
                                   correct=bool(rewards[4 * p + i] > 0), teacher_logp=-6 + torch.randn(n, generator=g)))
    if not rlad.uses_teacher(method):
        for r in rows:
            r.teacher_logp = None
    per = 4 // world
    my_rows = [dataclasses.replace(r, group=r.group - rank * per) for r in rows[rank * per * 4:(rank + 1) * per * 4]]
    mesh = policy.device_mesh(device, world, shard_group)  # shard_group < world: HSDP (replicate x shard)
    student = policy.load(model_dir, device, world, chunk=cfg.logit_chunk, temperature=cfg.temperature, mesh=mesh)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    run = train.Run(cfg=cfg, rank=rank, world=world, device=device, needs=rlad.METHODS[cfg.method], student=student,
                    opt=opt)
    m = policy.Metrics()
    kept = []
    for p in range(per):  # group by group, as train.main hands them over
        group = [r for r in my_rows if r.group == p]
        train.set_advantages(run, group)
        kept += train.keep_rows(run, group, m)
    for r, lp in zip(kept, policy.logprobs(student, kept, cfg.micro_batch_tokens, device)[0]):
        r.old_logp = lp
    train.update(run, kept, 0, m)
    line = m.reduce(device)  # a collective: every rank must hold the same metric names
    weights = {name: t.clone() for name, t in policy.full_params(student)}
    if train.is_main():
        torch.save({"weights": weights, "kept": len(kept), "metrics": line}, out_path)
    print(f"rank {rank}: kept {len(kept)} rows, mesh {tuple(mesh.shape)}", flush=True)
    from dist_load_worker import leave_together
    leave_together()


def late_rank(minutes: float):
    """train.setup_distributed with a collective timeout; rank 1 reaches the all_reduce 30 s after rank 0."""
    import time
    rank, _, _ = train.setup_distributed(minutes)
    if rank == 1:
        time.sleep(30)
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        print(f"rank {rank}: all_reduce returned after {time.monotonic() - start:.1f} s", flush=True)
    except RuntimeError as e:
        print(f"rank {rank}: all_reduce failed after {time.monotonic() - start:.1f} s: {str(e)[:200]}", flush=True)
        os._exit(3)


def metrics_mismatch():
    """Rank 1 records a metric that rank 0 does not: policy.Metrics.reduce stops both ranks, naming the metrics."""
    rank, _, device = train.setup_distributed(0.5)
    m = policy.Metrics()
    m.mean("reward", 1.0, 1)
    if rank == 1:
        m.mean("teacher_log_ratio", 0.0, 0)
    try:
        m.reduce(device)
    except RuntimeError as e:
        print(f"rank {rank}: {e}", flush=True)
        sys.exit(3)
    print(f"rank {rank}: merged", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "toy":
        train.main(train.parse_config(sys.argv[2:]), task=ToyTask)
    elif sys.argv[1] == "update":
        update_case(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0, *sys.argv[5:6])
    elif sys.argv[1] == "timeout":
        late_rank(float(sys.argv[2]))
    elif sys.argv[1] == "metrics":
        metrics_mismatch()
    elif sys.argv[1] == "apart":
        os.chdir(sys.argv[2 + int(os.environ.get("RANK", 0))])
        train.main(train.parse_config(sys.argv[4:]))
    else:
        sys.exit(__doc__)
