"""train.py: the RL loop for GRPO, KDRL, RLAD (TRRD), on-policy distillation and the SFT baseline, hand-written,
torchrun + FSDP2. Equations: docs/algorithm.md and rlad.py.

One step, the headings of the loop in main():
  1. each rank takes its share of `prompts_per_step` prompts (a seeded permutation per pass over the data)
  2. its colocated rollout engine (vLLM, or transformers) samples `group_size` responses per prompt, seeded by
     the prompt's global position in the data stream (the same samples at any world size); sft trains on the
     teacher's samples (drawn up front by the teacher's own vLLM engine, kept if correct) or on the data's
     ground-truth `target` / `answer` text
  3. rewards.score_batch scores them (math in worker processes, with a time limit per answer)
  4. rlad.group_advantages, optionally dropping groups whose rewards are all equal (zero advantage)
  5. the teacher scores every kept token (methods whose rlad.METHODS row says teacher_logp); the student
     recomputes pi_old under no_grad when the policy moves within the step (ppo_epochs or mini_batches > 1:
     otherwise the update's own forward IS pi_old), and the frozen reference when kl_coef > 0. The engine's
     own log-probs are only compared with the trainer's (`logprob_mismatch`), never used
  6. ppo_epochs x mini-batches x micro-batches (token budget). Each micro-batch loss is divided by the GLOBAL
     token count of its mini-batch, so gradients equal the full-batch gradient for any world size; every rank
     runs the same number of forward/backward passes (empty micro-batches pad the short ones)
  7. clip the grad norm, skip (and count) a non-finite step, AdamW
  8. weight sync: at the engine's next wake the new weights stream in, one gathered parameter at a time (bf16 on
     GPU); the engine sleeps at level 2 between rollouts, so its own copy is discarded, not offloaded
  9. one JSON line per step in RUN_DIR/metrics.jsonl (one collective for all metrics); sample logs, eval and
     checkpoints on schedule (checkpoint.py: HF-format student + sharded trainer state, atomic, the last kept)
Before any weights load, preflight.py checks the config, resolves hub names and prints the memory plan.

    python train.py --config configs/cpu_quickstart.toml    # one CPU process, a tiny model learning in ~30 s
    python train.py                                          # the paper's K&K RLAD: Qwen3-0.6B <- Qwen3-8B
    torchrun --nproc_per_node 8 train.py --config configs/kk_qwen3_1.7b_8k.toml --method grpo
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py --config ...
    python train.py --config ... --resume true               # continue from the newest complete checkpoint
    python train.py --config ... --plan true                 # the memory plan per GPU, then exit

Plain `python train.py` is a process group of one (gloo, or nccl on a GPU; in memory, no port), so FSDP2 and
the collectives run the same code at every world size. Flags: any Config field as `--key value`, after the
preset given by `--config`; an unknown key is an error. A new method is a function and a row in rlad.METHODS;
this file reads only the row. Left out, on purpose: tensor/pipeline parallel students, a remote or multi-GPU
rollout engine, sequence packing (rows are sorted and right-padded; `pad_frac` reports the waste), and
asynchronous (off-policy) rollouts.
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
import tomllib
from dataclasses import dataclass
from types import SimpleNamespace

if importlib.metadata.version("torch").endswith("+cpu"):  # the CPU build (docs/cpu.md): set before torch loads
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # else vLLM's first generate compiles for 10-20 s
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import policy  # noqa: E402
import preflight  # noqa: E402
import rlad  # noqa: E402


@dataclass
class Config:
    # run
    run_dir: str = "runs/kk_rlad"           # metrics.jsonl, checkpoints/ and (tiny preset) models/ go here
    seed: int = 0                           # data order, sampling, tiny-model init
    resume: bool = False                    # continue from the newest complete checkpoint in run_dir
    max_steps: int = 300                    # RL steps (one rollout batch each)
    # models: hub name or local dir; "tiny" / "tiny-teacher" are made on the fly by tiny.py into run_dir/models
    model: str = "Qwen/Qwen3-0.6B"          # the student
    teacher: str = "Qwen/Qwen3-8B"          # kdrl / rlad / distill / sft(teacher); must share the tokenizer
    # task and data
    task: str = "kk"                        # kk | math | arith, or module:name for a task of your own
                                            # (docs/own_task.md: its examples and its scorer)
    train_data: str = ""                    # comma-separated jsonl/parquet files or hf:NAME[:CONFIG]:SPLIT hub
                                            # datasets; "" = the task's generator
    eval_data: str = ""                     # idem; "" = held-out generated problems (K&K: PPL2..PPL8)
    kk_people: str = "3,4,5,6,7"            # generated K&K training puzzles: people per puzzle
    arith_levels: str = "2,3,4,5,6,7,8"     # generated arithmetic problems (task arith): operands per problem
    eval_levels: str = ""                   # generated held-out problems at these levels only (K&K people, arith
                                            # operands); "" = every level (PPL2..PPL8, L2..L8)
    train_per_level: int = 2000             # generated training problems per level
    max_prompt_tokens: int = 1024           # longer prompts are dropped from the training and eval sets
    # algorithm (docs/algorithm.md)
    method: str = "rlad"                    # a key of rlad.METHODS: grpo | kdrl | rlad | distill | sft
    group_size: int = 8                     # G responses per prompt
    prompts_per_step: int = 256             # global prompts per step (all ranks), divisible by world size
    mini_batches: int = 8                   # optimizer steps per epoch (paper 256/32 read as verl's mini-batch 32)
    ppo_epochs: int = 1                     # passes over each rollout batch
    micro_batch_tokens: int = 16384         # most tokens (padding included) in one forward/backward
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
    sft_source: str = "teacher"             # sft: "teacher" samples (kept if correct), or "data": each example's
                                            # "target" text (the whole answer turn), else its reference "answer"
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
    gpu_memory_utilization: float = 0.5     # vLLM's share of the GPU (it sleeps during training)
    max_num_seqs: int = 256                 # vLLM's concurrent sequences (its batch)
    kv_cache_memory_mb: int = 0             # vLLM KV cache size (needed on CPU); 0 = vLLM's default
    enforce_eager: bool = False             # vLLM without CUDA graphs (faster start, slower decode)
    # teacher pass
    teacher_token_budget: int = 16384       # most tokens in one teacher forward
    teacher_shard: bool = False             # FSDP2-shard the teacher across ranks (32B teachers)
    teacher_offload: bool = False           # keep the teacher in CPU memory between passes (small GPUs)
    teacher_url: str = ""                   # the teacher pass from vLLM server(s) instead (http://host:8000/v1,
                                            # comma-separated replicas): no teacher weights here; temperature 1
    teacher_timeout_s: float = 300.0        # served teacher: retry a failed request this long, then stop the run
    # evaluation, checkpoints, logging
    eval_every: int = 50                    # 0 = never; also at the last step
    eval_per_level: int = 100               # held-out problems per level
    eval_n: int = 1                         # samples per eval problem (Mean@n)
    eval_temperature: float = 0.6           # the paper's evaluation sampling
    eval_top_p: float = 0.95                # idem
    save_every: int = 50                    # 0 = only at the end and on SIGTERM
    keep_last: int = 3                      # checkpoints kept
    wandb_project: str = ""                 # log to wandb too (when installed)
    tensorboard_dir: str = ""               # log to TensorBoard here too (when installed)
    log_samples_every: int = 50             # every this many steps, RUN_DIR/samples/step_NNNNNN.jsonl: per-token
                                            # student / teacher log-probs, the teacher's relation and the clip of
                                            # a few groups (`python eval.py show RUN_DIR` draws them); 0 = never
    log_samples_groups: int = 4             # groups (a prompt and its G responses) per sample log, from rank 0
    # distributed and preflight
    shard_group: int = 0                    # FSDP2 shards within groups of this many ranks, replicated across
                                            # groups (HSDP): 0 = the ranks of one node (flat FSDP on one node);
                                            # the world size forces flat FSDP across nodes
    dist_timeout_min: float = 120.0         # collective timeout: ranks wait at collectives after uneven phases
                                            # (rollouts, per-rank eval of 30K-token answers, rank 0's checkpoint
                                            # write), which take minutes to an hour at the paper's scale; the
                                            # 10-minute NCCL default would kill such a run
    plan: bool = False                      # print the memory plan (preflight.py) and exit
    plan_gpus: str = ""                     # plan for GPUSxGIB (e.g. 8x140: 8 H200) instead of this machine


# ----------------------------------------------------------------------------- config: preset TOML + --key value
def parse_config(argv) -> Config:
    """Config defaults < `--config FILE.toml` < `--key value` flags. Unknown keys are errors."""
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    args, values = list(argv), {}
    if "--config" in args:
        i = args.index("--config")
        path = args[i + 1] if i + 1 < len(args) else ""
        if not os.path.isfile(path):
            raise SystemExit(f"--config {path!r}: no such file (presets are in configs/)")
        with open(path, "rb") as f:
            values = tomllib.load(f)
        del args[i:i + 2]
    if len(args) % 2 or not all(a.startswith("--") for a in args[::2]):
        raise SystemExit(f"arguments must be --key value pairs; got {args}")
    for key, raw in zip(args[::2], args[1::2]):
        key, kind = key[2:].replace("-", "_"), kinds.get(key[2:].replace("-", "_"), str)
        if kind is bool and raw.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--{key} takes true or false, got {raw!r}")
        try:
            values[key] = raw.lower() in ("true", "1") if kind is bool else kind(raw)
        except ValueError:
            raise SystemExit(f"--{key} {raw!r}: expected {kind.__name__}") from None
    for key in values:
        if key not in kinds:
            raise SystemExit(f"unknown config key {key!r}; valid keys: {', '.join(kinds)}")
    return Config(**values)


# ----------------------------------------------------------------------------- distributed helpers
def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args):
    if is_main():
        print(*args, flush=True)


def setup_distributed(timeout_min: float = 120.0):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a process group of one (in memory, no port).
    timeout_min bounds every collective (gloo and NCCL alike): see Config.dist_timeout_min."""
    from datetime import timedelta
    timeout = timedelta(minutes=timeout_min)
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized() and "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
    elif not dist.is_initialized():  # vLLM reuses an existing default group; FSDP2 works the same at world size 1
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return rank, world, device


class Metrics:
    """A step's metrics as device tensors (no host sync while they accumulate), merged across ranks at the end
    of the step by ONE collective: weighted means sum(value * weight) / sum(count or weight), and maxima.
    Every rank must record the same names (it does: each rank runs the same code on its own rows)."""

    def __init__(self):
        self.sums, self.maxes = {}, {}

    def mean(self, name: str, value, weight=1.0, count=None):
        s, w = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (s + value * weight, w + (weight if count is None else count))

    def max(self, name: str, value):
        old = self.maxes.get(name)
        self.maxes[name] = value if old is None else torch.maximum(torch.as_tensor(old), torch.as_tensor(value))

    def reduce(self, device) -> dict:
        names, mnames = sorted(self.sums), sorted(self.maxes)
        local = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).reshape(())
                             for n in names for x in self.sums[n]] +
                            [torch.as_tensor(self.maxes[n], dtype=torch.float64, device=device).reshape(())
                             for n in mnames] + [torch.zeros((), dtype=torch.float64, device=device)])  # [K]
        every = local.new_empty(dist.get_world_size() * local.numel())  # [world * K]
        dist.all_gather_single(every, local)
        every = every.view(dist.get_world_size(), -1)  # [world, K]
        sums, maxes = every[:, :2 * len(names)].sum(0).tolist(), every[:, 2 * len(names):-1].amax(0).tolist()
        out = {n: sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else 0.0 for i, n in enumerate(names)}
        out.update(zip(mnames, maxes))
        return out


@contextlib.contextmanager
def timed(times: dict, key: str):
    """Add the block's wall seconds to times[key] (the slowest rank's value is logged)."""
    t = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t


# ----------------------------------------------------------------------------- models
def make_engine(path: str, cfg: Config, device, rank: int):
    import rollout
    if cfg.engine == "hf":
        return rollout.HFEngine(path, device=device)
    return rollout.VLLMEngine(path, dtype="bfloat16" if device.type == "cuda" else "float32",
                              max_model_len=cfg.max_prompt_tokens + cfg.max_tokens,
                              gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed + rank,
                              enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs,
                              kv_cache_memory_bytes=cfg.kv_cache_memory_mb * 2**20 or None)


# ----------------------------------------------------------------------------- data
def load_examples(cfg: Config, split: str) -> list:
    """data.load_examples for the training or evaluation split (files when given, else the task's generator)."""
    files = [f for f in (cfg.train_data if split == "train" else cfg.eval_data).split(",") if f]
    levels = {"kk": cfg.kk_people, "arith": cfg.arith_levels}.get(cfg.task, "") if split == "train" else cfg.eval_levels
    per_level = cfg.train_per_level if split == "train" else cfg.eval_per_level
    try:
        return data.load_examples(cfg.task, files, split, per_level, cfg.seed,
                                  [int(x) for x in levels.split(",") if x] or None)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"{split} data: {e}") from None


def sample_seed(cfg: Config, position: int, n: int, stream: int = 0) -> int:
    """Seed of a rank's first prompt, at GLOBAL `position` in a sampling stream (0: rollouts, 1: eval), n samples each.

    rollout.py seeds prompt i of a call with seed + i * n (vLLM's sample j with seed + i * n + j), so every global
    prompt gets its own random streams: none shared between ranks or steps, and the same samples on 1 or 8 ranks.
    The modulo keeps seeds in vLLM's range (below 2**31); streams repeat only after ~2**30 / n prompts.
    """
    return (cfg.seed * 100_000_007 + stream * 2**30 + position * n) % (2**31 - 1)


# ----------------------------------------------------------------------------- setup: data, models, state
def setup(cfg: Config, train_examples=None, eval_examples=None, score_fn=None) -> SimpleNamespace:
    """Everything the loop needs, every cheap check before the first model loads. Returns the run's state."""
    import rewards
    from transformers import AutoTokenizer
    preflight.check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = setup_distributed(cfg.dist_timeout_min)
    if not preflight.plan_run(cfg, world, print0):  # --plan true: the plan was all that was asked for
        return None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.run_dir, exist_ok=True)
    shard_group = cfg.shard_group or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, device=device, spec=rlad.METHODS[cfg.method],
                          teacher_engine=None, mesh=policy.device_mesh(device, world, shard_group),
                          score_fn=score_fn or rewards.score_batch)
    # --- data and tokenizers (a task of your own brings both its examples and its scorer)
    if ":" in cfg.task and train_examples is None:
        task_examples, run.score_fn = data.load_task(cfg.task)
        train_examples = task_examples("train")
        eval_examples = (task_examples("eval") if cfg.eval_every else []) if eval_examples is None else eval_examples
    train_examples = load_examples(cfg, "train") if train_examples is None else train_examples
    eval_examples = (load_examples(cfg, "eval") if cfg.eval_every else []) if eval_examples is None else eval_examples
    run.student_path = preflight.resolve_model(cfg.model, cfg, "model")
    run.teacher_path = preflight.resolve_model(cfg.teacher, cfg, "teacher") if preflight.needs_teacher(cfg) else None
    run.tokenizer = AutoTokenizer.from_pretrained(run.student_path)
    run.teacher = None
    if cfg.teacher_url and run.spec["teacher_logp"]:  # checked now (answers, same tokenizer), before any weights load
        import teacher as teacher_lib
        run.teacher = teacher_lib.ServedTeacher(cfg.teacher_url, run.tokenizer, temperature=cfg.temperature,
                                                max_len=cfg.max_prompt_tokens + cfg.max_tokens, name=cfg.model,
                                                token_budget=cfg.teacher_token_budget, timeout_s=cfg.teacher_timeout_s)
    if run.teacher_path:
        import teacher as teacher_lib
        try:
            teacher_lib.check_tokenizers(run.tokenizer, AutoTokenizer.from_pretrained(run.teacher_path), cfg.model,
                                         cfg.teacher)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    for what, examples in (("training", train_examples), ("eval", eval_examples)):
        kept, prompts = data.build_prompts(examples, run.tokenizer, cfg.max_prompt_tokens)
        if len(kept) < len(examples):  # now, not at the first generate: max_model_len is prompt + response
            print0(f"dropped {len(examples) - len(kept)} of {len(examples)} {what} prompts over "
                   f"{cfg.max_prompt_tokens} tokens (raise --max_prompt_tokens to keep them)")
        if what == "training":
            run.train_examples, run.prompts = kept, prompts
    run.eval_examples = kept
    if not run.train_examples:
        raise SystemExit(f"empty training set (task {cfg.task!r}, train_data {cfg.train_data!r}, after the prompt "
                         f"length filter max_prompt_tokens={cfg.max_prompt_tokens})")
    load_models(run)
    # --- metrics file, logger, signals
    run.metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if is_main():
        path, keep = run.metrics_path, run.start if run.resumed else -1
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        with open(path, "w") as f:  # a fresh run starts a fresh file; a resume drops steps past the checkpoint
            f.writelines(ln + "\n" for ln in lines if json.loads(ln)["step"] <= keep)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    run.wandb = run.tensorboard = None
    if cfg.wandb_project and is_main():  # imported only when asked for
        import wandb
        wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.run_dir)
        run.wandb = wandb
    if cfg.tensorboard_dir and is_main():
        from torch.utils.tensorboard import SummaryWriter
        run.tensorboard = SummaryWriter(cfg.tensorboard_dir)
    signal.signal(signal.SIGTERM, lambda *_: STOP.update(signal=1))
    n_params = sum(p.numel() for p in run.student.parameters()) * (world if device.type == "cpu" else 1)
    print0(f"{cfg.method}: student {cfg.model} ({run.student_path}, ~{n_params / 1e6:.1f}M params), teacher "
           f"{cfg.teacher if run.teacher_path else cfg.teacher_url if run.teacher else '-'} ({run.teacher_path}), "
           f"world {world}, {len(run.train_examples)} train / {len(run.eval_examples)} eval prompts, steps "
           f"{run.start}..{cfg.max_steps}")
    return run


def load_models(run):
    """The engine first (vLLM sizes its share of the GPU at start), then student, reference, teacher, optimizer."""
    cfg, device, world = run.cfg, run.device, run.world
    ckpt = checkpoint.latest_checkpoint(cfg.run_dir) if cfg.resume else None
    start_from = ckpt or run.student_path
    if run.spec["samples"] == "teacher" and cfg.sft_source == "teacher":  # the SFT baseline's data, drawn first
        run.teacher_engine = make_engine(run.teacher_path, cfg, device, run.rank)
        first = int(os.path.basename(ckpt)[len("step_"):]) if ckpt else 0
        run.teacher_samples = {step: sample_prompts(run, step, run.teacher_engine, compact=True)
                               for step in range(first, cfg.max_steps)}
        run.teacher_engine.sleep()  # level 2: its GPU memory goes back before the student's engine starts
    run.engine = make_engine(start_from, cfg, device, run.rank) \
        if run.spec["samples"] == "student" or cfg.eval_every else None
    if run.engine is not None:
        run.engine.sleep()
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


# ----------------------------------------------------------------------------- the step's pieces
def refresh_engine(run, times):
    """Step 8: stream the trainer's weights into the sleeping engine (one full_tensor per parameter; the engine
    wakes only its weights' memory for this), then wake it. Every sleep is level 2, which discards the engine's
    weights (they are overwritten anyway), so every wake starts with a sync."""
    with timed(times, "sync"):
        run.engine.load_weights(policy.full_params(run.student, torch.bfloat16 if run.device.type == "cuda" else None))
        run.engine.wake()


def my_prompts(run, step: int):
    """(indices of this rank's prompts at `step`, global position of its first prompt in the step)."""
    cfg = run.cfg
    idx = data.step_prompts(len(run.train_examples), step, cfg.prompts_per_step, run.rank, run.world, cfg.seed)
    return idx, run.rank * (cfg.prompts_per_step // run.world)


def sample_prompts(run, step: int, engine, compact: bool = False) -> list:
    """engine's group_size samples of each of this rank's prompts at `step`, seeded by the prompt's global position
    (the same samples at any world size, and after a resume). compact: token ids as int32 tensors (the SFT baseline
    keeps every step's teacher samples in memory)."""
    cfg, (idx, idx0) = run.cfg, my_prompts(run, step)
    outs = engine.generate([run.prompts[i][0] for i in idx], n=cfg.group_size, max_tokens=cfg.max_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p,
                           seed=sample_seed(cfg, step * cfg.prompts_per_step + idx0, cfg.group_size))
    if not compact:
        return outs
    return [[dict(o, response_ids=torch.tensor(o["response_ids"], dtype=torch.int32), logprobs=None) for o in group]
            for group in outs]


def rollout(run, step: int, times: dict):
    """Steps 1-2: this rank's prompts at `step` and their samples, as rows (the schema below). -> rows, exs, prefills"""
    cfg, tok, (idx, idx0) = run.cfg, run.tokenizer, my_prompts(run, step)
    exs = [run.train_examples[i] for i in idx]
    pids, prefills = [run.prompts[i][0] for i in idx], [run.prompts[i][1] for i in idx]  # (prompt_ids, prefill)
    if run.spec["samples"] == "student":
        refresh_engine(run, times)
    with timed(times, "rollout"):
        if run.spec["samples"] == "student":
            outs = sample_prompts(run, step, run.engine)
            run.engine.sleep()
        elif cfg.sft_source == "teacher":
            outs = [[dict(o, response_ids=o["response_ids"].tolist()) for o in group]  # drawn up front (load_models)
                    for group in run.teacher_samples.pop(step)]
        else:  # the data's own answer turn, one "sample" per prompt
            outs = [[{"response_ids": tok((ex.get("target") or ex["answer"]).removeprefix(pf),
                                          add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                      "finish_reason": "stop"}] for ex, pf in zip(exs, prefills)]
    # A row is one sampled response; it carries everything the step learns about it:
    #   prompt, response  token ids (the response ends with EOS when the sample stopped)
    #   group             index of its prompt in this rank's share (a group's G samples are adjacent)
    #   uid               global response id within the step, the same at any world size (deals mini-batches)
    #   truncated         hit max_tokens;  engine: the engine's log-probs [R] (diagnostic; student samples only)
    #   correct (3.), adv (4.), teacher / old / ref (5.): log-probs [R] under the teacher, pi_old, pi_ref
    rows = [{"prompt": pids[p], "response": list(o["response_ids"]), "group": p,
             "uid": (idx0 + p) * len(group) + i, "truncated": o["finish_reason"] == "length",
             **({"engine": torch.tensor(o["logprobs"])} if run.spec["samples"] == "student" else {})}
            for p, group in enumerate(outs) for i, o in enumerate(group)]
    return rows, exs, prefills


def select_rows(rows: list, reward: torch.Tensor, cfg: Config, m: Metrics) -> list:
    """Step 4. Set each row's group advantage; keep what is trained on: informative groups (when filtering),
    non-empty responses; for the teacher's samples (sft) the correct ones (every target when they are data)."""
    if rlad.METHODS[cfg.method]["samples"] == "teacher":
        return [r for r in rows if r["response"] and (r["correct"] or cfg.sft_source == "data")]
    adv = rlad.group_advantages(reward, cfg.group_size, scale=cfg.adv_scale)  # [N]
    informative = rlad.group_is_informative(reward, cfg.group_size).tolist()  # [P]
    for r, a in zip(rows, adv.tolist()):
        r["adv"] = a
    m.mean("groups_kept", sum(informative) if cfg.filter_groups else len(informative), 1.0, len(informative))
    return [r for r in rows if r["response"] and (informative[r["group"]] or not cfg.filter_groups)]


def lr_at(step: int, cfg: Config) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr


def loss_options(cfg: Config, coefs: dict) -> dict:
    """rlad.policy_loss's keywords from the config (kd_coef and the entropy coefficient change per step)."""
    return dict(alpha=cfg.alpha, eps_low=cfg.eps_low, eps_high=cfg.eps_high, teacher_clamp=cfg.teacher_clamp or None,
                kd_coef=coefs["kd"], kd_kl=cfg.kd_kl, kd_clamp=cfg.kd_clamp or None, kl_coef=cfg.kl_coef,
                loss_agg=cfg.loss_agg, max_len=cfg.max_tokens)


def micro_step(model, b: dict, cfg: Config, world: int, denom: int, coefs: dict, m: Metrics, first_epoch: bool):
    """Forward + backward of one micro-batch; its loss is a share of the mini-batch loss (global `denom`)."""
    lp, ent = policy.forward(model, b, entropy_grad=coefs["ent"] > 0)  # [B, R], [B, R]
    mask, w = b["mask"], b["tokens"]
    old = b.get("old", lp.detach())  # one epoch, one mini-batch: the update's own forward IS pi_old
    logged = [i for i, r in enumerate(b["rows"]) if r.get("log")] if first_epoch else []
    info = {} if logged else None  # the per-token view of rows that go into the sample log
    loss, metrics = rlad.policy_loss(cfg.method, lp, old, b["adv"], mask, teacher_logp=b.get("teacher"),
                                     ref_logp=b.get("ref"), num_tokens=denom, **loss_options(cfg, coefs),
                                     kd_mask=b["wrong"] if cfg.kd_wrong_only else None, token_info=info)
    for i in logged:  # values this step computed anyway: no extra forward, one copy per logged micro-batch
        r, n = b["rows"][i], len(b["rows"][i]["response"])
        r["student_logp"] = lp[i, :n].detach().float().cpu().tolist()
        r["clipped"] = info["clipped"][i, :n].cpu().tolist() if "clipped" in info else None
    if "engine" in b and first_epoch:  # engine vs trainer log-probs of the same weights and tokens
        gap = torch.where(mask, (old - b["engine"]).abs(), 0.0)  # [B, R]
        m.mean("logprob_mismatch", gap.sum() / max(w, 1), w)
        m.max("logprob_mismatch_max", gap.max())
    if coefs["ent"] > 0:  # entropy bonus (Skywork-OR1 adaptive entropy control steers its coefficient)
        loss = loss - coefs["ent"] * rlad.aggregate(ent, mask, cfg.loss_agg, denom, cfg.max_tokens)
    (loss * world).backward()  # FSDP averages gradients over ranks: * world makes it the global sum
    for k, v in metrics.items():  # loss terms are partial sums of the mini-batch loss; the rest are token means
        m.mean(k, v, 1.0, 0.0) if k == "loss" or k.startswith("loss/") else m.mean(k, v, w)
    m.mean("entropy", rlad.masked_mean(ent.detach(), mask), w)
    m.mean("pad_frac", 1.0 - b["real"] / b["slots"], b["slots"] if b["real"] else 0)


def update(model, opt, rows, cfg, device, world, step, coefs, m: Metrics) -> int:
    """Steps 6-7: PPO epochs x mini-batches x micro-batches on this rank's rows; returns the skipped-step count.

    Every micro-batch loss is divided by its mini-batch's GLOBAL token (or sequence) count, and multiplied by the
    world size because FSDP averages gradients over ranks: the accumulated gradient is the full-batch gradient.
    """
    M, skipped = cfg.mini_batches, 0
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    for epoch in range(cfg.ppo_epochs):
        # A seeded shuffle of the step's GLOBAL response ids deals responses to mini-batches: mini-batch m holds
        # the same responses whatever the world size (ranks just hold different parts of it).
        uids = policy.agree([max((r["uid"] for r in rows), default=0) + 1])[0]
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + epoch)
        deal = (torch.randperm(uids, generator=g) % M).tolist()
        minis = [[r for r in rows if deal[r["uid"]] == k] for k in range(M)]
        plans = [policy.pack(mb, cfg.micro_batch_tokens) for mb in minis]
        sums = policy.agree([sum(len(r["response"]) for r in mb) for mb in minis] + [len(mb) for mb in minis],
                            dist.ReduceOp.SUM)  # global tokens, then global sequences, per mini-batch
        n_micro = policy.agree([len(p) for p in plans])  # empty micro-batches pad the short ranks
        for k in range(M):
            tokens, seqs = sums[k], sums[M + k]
            if tokens == 0:  # nothing anywhere (every group filtered): no step at all, on every rank
                continue
            denom = tokens if cfg.loss_agg == "token-mean" else seqs
            for j in range(n_micro[k]):
                b = policy.collate(plans[k][j] if j < len(plans[k]) else [], device)
                micro_step(model, b, cfg, world, denom, coefs, m, epoch == 0)
            for name in [n for n in m.sums if n == "loss" or n.startswith("loss/")]:
                m.mean(name, 0.0, 0.0, 1.0 / world)  # averaged over mini-batches
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if torch.isfinite(norm):  # one host sync per optimizer step
                opt.step()
                m.mean("grad_norm", norm, 1.0 / world)
            else:
                skipped += 1
            opt.zero_grad(set_to_none=True)
    return skipped


def run_eval(run, times) -> dict:
    """Mean@n per level on the held-out problems, each rank sampling its share (eval.evaluate_ranks)."""
    cfg = run.cfg
    refresh_engine(run, times)
    out = evaluation.evaluate_ranks(run.engine, run.tokenizer, run.eval_examples, rank=run.rank, world=run.world,
                                    device=run.device, seed=sample_seed(cfg, 0, cfg.eval_n, stream=1),
                                    order_seed=cfg.seed, n=cfg.eval_n, max_tokens=cfg.max_tokens,
                                    temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, score_fn=run.score_fn)
    run.engine.sleep()
    return out


def step_metrics(run, step, rows, kept, scores, reward, m: Metrics, times: dict, kd_coef: float) -> dict:
    """Step 9's numbers: means over all ranks' rollouts, totals over ranks (count 1 / world), the slowest phase."""
    n_tok, world = sum(len(r["response"]) for r in rows), run.world
    for name, total, count in (
            ("reward", reward.sum(), len(rows)), ("accuracy", sum(r["correct"] for r in rows), len(rows)),
            ("format_ok", sum(bool(s["format_ok"]) for s in scores), len(rows)), ("response_len", n_tok, len(rows)),
            ("truncated", sum(r["truncated"] for r in rows), len(rows)), ("kept_rows", len(kept), 1 / world),
            ("tokens_generated", n_tok, 1 / world),
            ("tokens_trained", sum(len(r["response"]) for r in kept), 1 / world)):
        m.mean(name, total, 1.0, count)
    m.max("response_len_max", max((len(r["response"]) for r in rows), default=0))
    m.max("stop", STOP["signal"])
    for k, v in times.items():
        m.max(f"time/{k}", v)  # the slowest rank sets the pace
    out = m.reduce(run.device)
    out.update(step=step + 1, lr=lr_at(step, run.cfg), kd_coef=kd_coef, ent_coef=run.ent_coef,
               skipped_steps=run.skipped, tokens_per_s=out["tokens_generated"] / out["time/step"],
               update_tokens_per_s=out["tokens_trained"] / max(out["time/update"], 1e-9))
    return out


def frozen_logprobs(run, kept: list, m: Metrics, times: dict):
    """Step 5: r["teacher"], r["old"], r["ref"]: log-probs of each kept row's tokens under the frozen models."""
    cfg = run.cfg
    with timed(times, "teacher"):
        if run.teacher is not None:  # local or served alike: float32 CPU tensors (a collective: every rank calls)
            for r, lp in zip(kept, run.teacher.logprobs([(r["prompt"], r["response"]) for r in kept])):
                r["teacher"] = lp
            m.mean("teacher_pad_frac", run.teacher.last_stats.get("pad_fraction", 0.0), 1 / run.world)
    # pi_old only when the policy moves within the step; otherwise the update's own first forward is pi_old
    moves = run.spec["old_logp"] and (cfg.ppo_epochs > 1 or cfg.mini_batches > 1)
    with timed(times, "old_logp"):
        for key, model in (("old", run.student if moves else None), ("ref", run.ref)):
            if model is not None:
                for r, lp in zip(kept, policy.score(model, kept, cfg.micro_batch_tokens, run.device)[0]):
                    r[key] = lp


def finish_step(run, step: int, out: dict, bar) -> bool:
    """Step 9 after the metrics: entropy control, eval, the JSON line, checkpoint. True when SIGTERM asks to stop."""
    cfg = run.cfg
    stop, last = out.pop("stop") > 0, step + 1 == cfg.max_steps
    if cfg.ent_target > 0:  # Skywork-OR1 adaptive entropy control: push the coefficient toward the target
        delta = cfg.ent_delta if out["entropy"] < cfg.ent_target else -cfg.ent_delta
        run.ent_coef = min(max(run.ent_coef + delta, 0.0), cfg.ent_coef_max)
    if run.engine is not None and run.eval_examples and cfg.eval_every and ((step + 1) % cfg.eval_every == 0
                                                                            or last):
        out.update(run_eval(run, {}))
    if is_main():
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(out) + "\n")
        if run.wandb is not None:
            run.wandb.log(out, step=step + 1)
        for k, v in out.items() if run.tensorboard is not None else ():
            run.tensorboard.add_scalar(k, v, step + 1)
        bar.set_postfix(reward=f"{out['reward']:.3f}", acc=f"{out['accuracy']:.3f}", s=f"{out['time/step']:.1f}")
    bar.update(1)
    if last or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0):
        state = {"config": dataclasses.asdict(cfg), "skipped_steps": run.skipped, "ent_coef": run.ent_coef}
        checkpoint.save_checkpoint(cfg.run_dir, step + 1, run.student, run.opt, run.tokenizer, state, cfg.keep_last,
                                   dtype=torch.bfloat16 if run.device.type == "cuda" else None)
    if stop:
        print0(f"SIGTERM: checkpoint written at step {step + 1}; rerun with --resume true to continue")
    return stop


# ----------------------------------------------------------------------------- the loop
STOP = {"signal": 0}  # set by SIGTERM: finish the step, write a checkpoint, exit


def main(cfg: Config, train_examples=None, eval_examples=None, score_fn=None):
    """Train. A fork with its own task passes examples (data.py's dict shape) and score_fn(examples, texts) ->
    [{"reward", "correct", "format_ok"}] (rewards.score_batch's contract); eval_examples are scored by eval.py."""
    from tqdm import tqdm
    run = setup(cfg, train_examples, eval_examples, score_fn)
    if run is None:  # --plan true: the plan was all that was asked for
        return
    bar = tqdm(total=cfg.max_steps, initial=run.start, disable=not is_main(), desc=cfg.method)
    for step in range(run.start, cfg.max_steps):
        m, times, t_step = Metrics(), {"sync": 0.0}, time.perf_counter()
        for k in ("loss", "grad_norm"):  # present (0) even in a step without an update (everything filtered)
            m.mean(k, 0.0, 0.0)

        # 1-2. this rank's prompts and their samples
        rows, exs, prefills = rollout(run, step, times)

        # 3. rewards (CPU, worker processes for math)
        with timed(times, "reward"):
            texts = [prefills[r["group"]] + run.tokenizer.decode(r["response"], skip_special_tokens=True)
                     for r in rows]
            scores = run.score_fn([exs[r["group"]] for r in rows], texts)
            reward = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)  # [N]
            for r, s, text in zip(rows, scores, texts):
                r.update(correct=bool(s["correct"]), reward=float(s["reward"]), text=text)

        # 4. group advantages, optional zero-advantage filter (sft: keep the correct samples)
        kept = select_rows(rows, reward, cfg, m)
        log_samples = cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0 and is_main()
        logged = set(sorted({r["group"] for r in kept})[:cfg.log_samples_groups]) if log_samples else set()
        for r in kept:  # the first few groups that are trained on
            r["log"] = r["group"] in logged

        # 5. teacher log-probs of every kept token (a collective when sharded: every rank calls it), pi_old, pi_ref
        frozen_logprobs(run, kept, m, times)

        # 6-7. PPO epochs x mini-batches x micro-batches, clip, skip non-finite, AdamW
        with timed(times, "update"):
            kd_coef = max(cfg.kd_coef_end, cfg.kd_coef - cfg.kd_anneal * step) if cfg.kd_anneal else cfg.kd_coef
            run.skipped += update(run.student, run.opt, kept, cfg, run.device, run.world, step,
                                  {"kd": kd_coef, "ent": run.ent_coef}, m)
            if run.device.type == "cuda":
                torch.cuda.synchronize()

        # 8. weight sync: refresh_engine streams the new weights into the engine at its next wake
        if log_samples:  # the few groups marked at step 4, with what steps 5-6 computed for them
            evaluation.write_samples(os.path.join(cfg.run_dir, "samples", f"step_{step + 1:06d}.jsonl"), step + 1,
                                     kept, run.tokenizer, cfg)

        # 9. metrics (one collective), eval, checkpoint
        times["step"] = time.perf_counter() - t_step
        out = step_metrics(run, step, rows, kept, scores, reward, m, times, kd_coef)
        if finish_step(run, step, out, bar):
            break
    bar.close()
    # vLLM's shutdown destroys the default process group: every collective first, the engine last (docs/cpu.md).
    dist.barrier()
    if run.tensorboard is not None:
        run.tensorboard.close()
    for engine in (run.teacher_engine, run.engine):
        if engine is not None:
            engine.shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
