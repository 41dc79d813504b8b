"""preflight.py: what a run checks before any weights load, so that a bad setting costs seconds, not hours.
check_config: each flag's type, range and what the method needs. memory_plan: per-GPU bytes of every part and phase,
estimated from the model configs alone (gpu_check.py measures the peaks); check_plan refuses what cannot fit.
resolve_model: model names as local directories.

    python train.py --config configs/kk_qwen3_0.6b_8k.toml --plan true                    # this machine's GPUs
    python train.py --config configs/kk_qwen3_0.6b_8k.toml --plan true --plan_gpus 8x140  # 8 GPUs of 140 GiB
"""
import dataclasses
import math
import os
import tomllib

import torch
import torch.distributed as dist

import policy
import rlad

GIB = 2**30
# The download command of the huggingface_hub that requirements.txt resolves to (its console script `hf`; the older
# `huggingface-cli` is gone from it). tests/test_plan_offline.py checks it against the installed package.
DOWNLOAD = "hf download"
# Per-GPU memory no tensor of ours holds (from source, not measured; docs/scale.md): NCCL, ~0.6 GiB per communicator
# x up to 3 (world, HSDP shard, replicate); the CUDA context, ~0.5 GiB; vLLM's CUDA-graph pool, which sleep keeps.
OUTSIDE_TENSORS = 3 * GIB

# ----------------------------------------------------------------------------- 1. the config's types and ranges
RULES = [("max_steps group_size prompts_per_step mini_batches ppo_epochs micro_batch_tokens max_tokens "
          "max_prompt_tokens train_per_level eval_per_level eval_n keep_last logit_chunk teacher_token_budget "
          "max_num_seqs kd_topk log_samples_groups".split(), lambda v: v >= 1, ">= 1"),
         ("seed eval_every save_every warmup_steps kv_cache_memory_mb weight_decay kd_coef kd_coef_end kd_anneal "
          "kd_clamp kl_coef ent_coef ent_target ent_delta ent_coef_max teacher_clamp eval_temperature "
          "max_logprob_mismatch log_samples_every shard_group".split(),
          lambda v: v >= 0, ">= 0"),
         ("lr temperature max_grad_norm dist_timeout_min teacher_timeout_s".split(), lambda v: v > 0, "> 0"),
         ("alpha min_lr_ratio".split(), lambda v: 0 <= v <= 1, "in [0, 1]"),
         (["topd_alpha"], lambda v: 0 < v < 1, "in (0, 1) (1 would be plain on-policy distillation: method distill)"),
         ("eps_low eps_high".split(), lambda v: 0 <= v < 1, "in [0, 1)"),
         ("top_p eval_top_p gpu_memory_utilization".split(), lambda v: 0 < v <= 1, "in (0, 1]")]
CHOICES = {"lr_schedule": ("constant", "cosine"), "engine": ("vllm", "hf"), "loss_agg": rlad.LOSS_AGGS,
           "kd_kl": rlad.KL_KINDS}

def parse_flags(Config, argv):
    """A Config (train.py's dataclass) from its defaults < `--config FILE.toml` < `--key value` flags. Unknown keys,
    bad booleans and values of the wrong type are one-line errors."""
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    args, values = list(argv), {}
    if "--config" in args:
        i = args.index("--config")
        path = args[i + 1] if i + 1 < len(args) else ""
        if not os.path.isfile(path):
            raise SystemExit(f"--config {path!r}: no such file (presets are in configs/)")
        with open(path, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise SystemExit(f"--config {path}: not valid TOML ({e})") from None
        del args[i:i + 2]
    if len(args) % 2 or not all(a.startswith("--") for a in args[::2]):
        raise SystemExit(f"arguments must be --key value pairs; got {args}")
    for key, raw in zip(args[::2], args[1::2]):
        key = key[2:].replace("-", "_")
        kind = kinds.get(key, str)
        if kind is bool and raw.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--{key} takes true or false, got {raw!r}")
        try:
            values[key] = raw.lower() in ("true", "1") if kind is bool else kind(raw)
        except ValueError:
            raise SystemExit(f"--{key} {raw!r}: expected {kind.__name__}") from None
    if unknown := [key for key in values if key not in kinds]:
        raise SystemExit(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(kinds)}")
    return Config(**values)

def check_config(cfg, world: int):
    """SystemExit with one line naming the flag, for any setting that would fail later (or silently do nothing)."""
    for f in dataclasses.fields(cfg):
        value, want = getattr(cfg, f.name), ((int, float) if f.type is float else f.type)  # an int may be a float
        if not isinstance(value, want) or (isinstance(value, bool) and f.type is not bool):  # but a bool is no int
            raise SystemExit(f"--{f.name} {value!r}: expected {f.type.__name__} (check the preset or the flag)")
        if f.type is float and not math.isfinite(value):  # inf passes every range below; nan fails them unclearly
            raise SystemExit(f"--{f.name} {value!r}: must be a finite number")
    for names, rule, text in RULES:
        for name in names:
            if not rule(getattr(cfg, name)):
                raise SystemExit(f"--{name} {getattr(cfg, name)!r}: must be {text}")
    for name, allowed in {"method": tuple(rlad.METHODS), **CHOICES}.items():  # METHODS may have grown since import
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} {getattr(cfg, name)!r}: use one of {', '.join(allowed)}")
    import tasks
    import teacher
    try:  # both say what is wrong in one line of their own
        tasks.load(cfg.task)
        if cfg.teacher_url and rlad.uses_teacher(cfg.method):
            teacher.check_served_temperature(cfg.temperature)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for name in ("train_levels", "eval_levels"):
        if not all(p.strip().isdigit() and int(p) >= 2 for p in getattr(cfg, name).split(",") if p.strip()):
            raise SystemExit(f"--{name} {getattr(cfg, name)!r}: expected comma-separated integers >= 2, e.g. 3,4,5")
    if cfg.sft_data and not os.path.isfile(cfg.sft_data):
        raise SystemExit(f"--sft_data {cfg.sft_data}: no such file (eval.py --sft_out writes one)")
    if cfg.group_size < 2 and rlad.METHODS[cfg.method]["advantages"]:
        raise SystemExit(f"--group_size {cfg.group_size}: group advantages need at least 2 responses per prompt")
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {cfg.prompts_per_step} is not divisible by the world size {world}")
    if cfg.shard_group and world % cfg.shard_group and not cfg.plan_gpus:  # --plan_gpus: a plan for other machines
        raise SystemExit(f"--shard_group {cfg.shard_group} does not divide the world size {world} (0: a node's ranks)")
    if needs_teacher(cfg) and not cfg.teacher:
        raise SystemExit(f"--method {cfg.method} needs a teacher: pass --teacher PATH_OR_HUB_NAME")
    for name in ("model", "teacher") if needs_teacher(cfg) else ("model",):
        path = getattr(cfg, name)  # a path rather than a hub name ("org/name"): /, ., ~ or more than one "/"
        local = not path.startswith("tiny") and (path.startswith(("/", ".", "~")) or path.count("/") > 1)
        if local and not os.path.isdir(os.path.expanduser(path)):
            raise SystemExit(f"--{name} {path}: no such directory (give a local checkpoint or a hub name)")

def check_model(cfg, config) -> None:
    """The settings that need the student's config.json (read, no weights yet): the context and the vocabulary."""
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    context = getattr(config, "max_position_embeddings", None)
    if context and scaling.get("factor"):  # YaRN and the like stretch the positions (vLLM derives its limit alike)
        context = int(context * scaling["factor"])
    if context and cfg.max_prompt_tokens + cfg.max_tokens > context:
        raise SystemExit(f"--max_prompt_tokens {cfg.max_prompt_tokens} + --max_tokens {cfg.max_tokens} exceeds "
                         f"{cfg.model}'s context of {context} positions (max_position_embeddings): lower either")
    if rlad.METHODS[cfg.method].get("teacher_topk") and cfg.kd_topk > config.vocab_size:
        raise SystemExit(f"--kd_topk {cfg.kd_topk} exceeds the student's vocabulary ({config.vocab_size} ids)")

def needs_teacher(cfg) -> bool:
    """The teacher's weights live on these ranks: the method scores tokens with it, and not via --teacher_url."""
    return rlad.uses_teacher(cfg.method) and not cfg.teacher_url

# ----------------------------------------------------------------------------- 2. the memory plan
def shapes(name: str) -> dict:
    """Parameter counts (all, the largest layer, the rest: embeddings, norm, head), sizes, KV bytes: config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:  # not cached and no hub (offline, no network, gated): one line that says what to do
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        where = " (HF_HUB_OFFLINE=1: the hub is not asked)" if offline else " or on the hub"
        detail = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise SystemExit(f"memory plan: no config.json for {name} in the Hugging Face cache{where}: run "
                         f"`{DOWNLOAD} {name}` where there is network (HF_HUB_OFFLINE=1 then reads the "
                         f"cache alone), or pass a local directory ({detail})") from None
    with torch.device("meta"):  # no memory, no weights: the module tree alone
        lm = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in lm.parameters())  # tied embeddings count once
    layers = [sum(p.numel() for p in layer.parameters()) for layer in policy.decoder_layers(lm)]
    import rollout
    return {"params": total, "layer": max(layers), "root": total - sum(layers), "hidden": config.hidden_size,
            "intermediate": getattr(config, "intermediate_size", None) or config.n_inner or 4 * config.hidden_size,
            "layers": len(layers), "vocab": config.vocab_size, "kv_bytes_per_token": rollout.kv_bytes_per_token(config)}

def shard_group(cfg, world: int) -> int:
    """Ranks sharding one model copy (HSDP replicates across them): --shard_group, else a node's (--plan_gpus: 8)."""
    return cfg.shard_group or (min(world, 8) if cfg.plan_gpus else int(os.environ.get("LOCAL_WORLD_SIZE", world)))

def memory_plan(cfg, world: int, gpu_bytes: float, student: dict, teacher) -> dict:
    """Bytes per GPU of each part and phase; the update's compute copy is FSDP2's bf16 root + two layers in flight."""
    P, shard = student["params"], shard_group(cfg, world)
    act_layer = 2 * (6 * student["hidden"] + 4 * student["intermediate"])  # bf16 bytes per token per layer
    saved = 2 * student["hidden"] * student["layers"] + act_layer if cfg.grad_checkpointing else \
        act_layer * student["layers"]  # checkpointing keeps each layer's input, then recomputes one layer
    head = cfg.logit_chunk * student["vocab"] * (2 + 4 + 2)  # a chunk's bf16 logits, float32 temporary, bf16 grad
    t_dev = 0 if not teacher or cfg.teacher_offload else 2 * teacher["params"] / (shard if cfg.teacher_shard else 1)
    parts = {"student fp32 masters": 4 * P / shard, "AdamW state (fp32 m, v)": 8 * P / shard,
             "reference (bf16)": 2 * P / shard if cfg.kl_coef > 0 else 0, "teacher (bf16)": t_dev,
             "gradients (fp32, update only)": 4 * P / shard,
             "bf16 compute copy (update only)": 2 * (student["root"] + 2 * student["layer"]),
             "activations (update only)": cfg.micro_batch_tokens * saved + head,
             # topk_kd: per micro-batch token, the teacher's k ids (int64) and log-probs, the student's log-probs of
             # them, their gradient, and the loss's (k + 1)-bucket tensors: ~32 bytes per id, never [T, V]
             "top-k tensors (update only)": cfg.micro_batch_tokens * 32 * k if (k := topk_ids(cfg)) else 0,
             "vLLM share (rollout only)": cfg.gpu_memory_utilization * gpu_bytes,
             "NCCL, CUDA context (estimate)": OUTSIDE_TENSORS}
    resident = sum(v for k, v in parts.items() if "only)" not in k)  # held through every phase
    teacher_pass = 0 if teacher is None else \
        cfg.teacher_token_budget * 2 * teacher["hidden"] * 4 + cfg.logit_chunk * teacher["vocab"] * 6 + \
        (2 * teacher["layer"] * 2 if cfg.teacher_shard or cfg.teacher_offload else 0) + \
        cfg.teacher_token_budget * 16 * topk_ids(cfg)  # topk_kd: the pass's [tokens, k] ids and log-probs
    kv = max(parts["vLLM share (rollout only)"] - 2 * P - 2 * GIB, 0)  # minus the engine's weights and overhead
    phases = {"rollout": resident + parts["vLLM share (rollout only)"], "teacher pass": resident + teacher_pass,
              "update": resident + sum(v for k, v in parts.items() if "update only" in k)}
    return {"parts": parts, "gpu": gpu_bytes, "world": world, "phases": phases,
            "kv_tokens": kv / student["kv_bytes_per_token"], "seq_tokens": cfg.max_prompt_tokens + cfg.max_tokens,
            "rollout_seqs": -(-cfg.prompts_per_step // world) * cfg.group_size,
            "max_util": max(gpu_bytes - resident - GIB, 0) / gpu_bytes}  # and 1 GiB of allocator slack

def topk_ids(cfg) -> int:
    """The teacher's top-k per position the method reads (rlad.METHODS' teacher_topk: kd_topk), else 0."""
    return cfg.kd_topk if rlad.METHODS[cfg.method].get("teacher_topk") else 0

def format_plan(plan: dict, cfg) -> str:
    g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    lines = [f"memory plan per GPU ({plan['world']} x {plan['gpu'] / GIB:.2f} GiB; student {cfg.model}, teacher "
             f"{cfg.teacher if needs_teacher(cfg) else '-'}; estimates from the model configs):"]
    lines += [f"  {name:34s} {g(b)}" for name, b in plan["parts"].items() if b]
    lines += [f"  phase {name:28s} {g(b)}  {'ok' if b <= plan['gpu'] else 'DOES NOT FIT'}"
              for name, b in plan["phases"].items()]
    seqs, seq_tokens = plan["rollout_seqs"], plan["seq_tokens"]
    at_once = min(int(plan["kv_tokens"] // seq_tokens), cfg.max_num_seqs, seqs)
    lines.append(f"  vLLM KV cache: ~{plan['kv_tokens'] / 1e6:.2f}M tokens; one rollout batch is {seqs} sequences x "
                 f"{seq_tokens} = {seqs * seq_tokens / 1e6:.2f}M tokens at full length: {at_once} run at once "
                 f"({100 * at_once / seqs:.0f}%)")
    lines.append(f"  gpu_memory_utilization {cfg.gpu_memory_utilization} (at most {plan['max_util']:.2f} leaves the "
                 "trainer room during rollouts)")
    return "\n".join(lines)

def check_plan(plan: dict, cfg):
    """Refuse what cannot fit, naming the number and the flag to change (in this order: rollout, update, teacher)."""
    fixes = {"rollout": ("rollouts need", f" (the trainer's resident state + vLLM's share): lower "
                         f"--gpu_memory_utilization to {plan['max_util']:.2f} or less, or --teacher_shard true / "
                         "--teacher_offload true, or use more GPUs"),
             "update": ("the update needs", ": pass --grad_checkpointing true, lower --micro_batch_tokens (now "
                        f"{cfg.micro_batch_tokens}), or use more GPUs"),
             "teacher pass": ("the teacher pass needs", ": pass --teacher_shard true or --teacher_offload true, or "
                              f"lower --teacher_token_budget (now {cfg.teacher_token_budget})")}
    for phase, (what, fix) in fixes.items():
        if plan["phases"][phase] > plan["gpu"]:
            raise SystemExit(f"memory plan: {what} {plan['phases'][phase] / GIB:.2f} GiB per GPU of "
                             f"{plan['gpu'] / GIB:.2f}{fix}")
    if plan["kv_tokens"] < plan["seq_tokens"]:
        raise SystemExit(f"memory plan: vLLM's share leaves a KV cache of ~{plan['kv_tokens']:.0f} tokens, less "
                         f"than one sequence ({plan['seq_tokens']}): raise --gpu_memory_utilization (now "
                         f"{cfg.gpu_memory_utilization}) or lower --max_tokens")

def plan_for(cfg, world: int, paths: dict):
    """The plan for this run (or for --plan_gpus NxGIB), or None on a machine without GPUs."""
    if cfg.plan_gpus:
        try:
            world, gib = cfg.plan_gpus.lower().split("x")
            world, gpu_bytes = int(world), float(gib) * GIB
        except ValueError:
            raise SystemExit(f"--plan_gpus {cfg.plan_gpus!r}: expected GPUSxGIB, e.g. 8x140 (8 H200)") from None
    elif torch.cuda.is_available():
        gpu_bytes = torch.cuda.mem_get_info()[1]
    else:
        return None
    teacher = shapes(paths["teacher"]) if needs_teacher(cfg) else None
    return memory_plan(cfg, world, gpu_bytes, shapes(paths["model"]), teacher)

def plan_run(cfg, world: int, say=print) -> bool:
    """Print the memory plan and refuse a config that cannot fit. False when --plan true asked for the plan alone.
    Without a GPU nothing is planned, unless --plan_gpus says for what (--plan alone: the paper's 8 x H200 node)."""
    if cfg.plan and not cfg.plan_gpus and not torch.cuda.is_available():
        cfg = dataclasses.replace(cfg, plan_gpus="8x140")
    # hub names stay names: AutoConfig reads their config.json only; a served teacher is not planned at all
    names = {k: resolve_model(getattr(cfg, k), cfg, k) if getattr(cfg, k) in TINY else getattr(cfg, k)
             for k in ("model", "teacher") if k == "model" or needs_teacher(cfg)}
    if (plan := plan_for(cfg, world, names)) is not None:
        say(format_plan(plan, cfg))
        check_plan(plan, cfg)
    return not cfg.plan

# ----------------------------------------------------------------------------- 3. model names -> local directories
TINY = {"tiny": dict(seed_offset=0), "tiny-teacher": dict(hidden_size=128, num_layers=4, num_heads=4,
                                                          num_kv_heads=2, intermediate_size=256, seed_offset=1)}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # no .bin / .pth duplicates

def resolve_model(name: str, cfg, flag: str) -> str:
    """A local directory for `name`; a collective. Rank 0 writes tiny models to run_dir/models/NAME; the first rank of
    each node fetches hub names (snapshot_download honours HF_HUB_OFFLINE; node-local caches work), then all read."""
    import policy
    if name in TINY:
        path = os.path.join(cfg.run_dir, "models", name)
        if dist.get_rank() == 0 and not os.path.isfile(os.path.join(path, "config.json")):
            import tiny
            kwargs = dict(TINY[name])
            tiny.save_tiny(path, seed=cfg.seed + kwargs.pop("seed_offset"), **kwargs)
        dist.barrier()
        return path
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    from huggingface_hub import snapshot_download
    error = ""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            snapshot_download(name, allow_patterns=HUB_FILES)
        except Exception as e:  # no network, not cached, no such repo, gated: say which, on one line
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if policy.reduce_ints([1 if error else 0], "sum")[0]:  # a barrier that also tells every rank about a failure
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        where = " or in its cache (HF_HUB_OFFLINE=1)" if offline else ""
        raise SystemExit(f"--{flag} {name}: not a local directory and not found on the Hugging Face hub{where} "
                         f"({error or 'on another node'}): check the name, run `{DOWNLOAD} {name}` where "
                         "there is network, or pass a local directory")
    return snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True)
