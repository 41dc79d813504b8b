"""One run of at most 4 minutes on one GPU that measures what only a GPU can show; its JSON feeds the README.

Models are built from their Qwen3 configs with random weights (speed and memory do not depend on the values):
torch and transformers only, no vLLM, no model hub. Each part runs in its own try/except: an error prints its
traceback and is recorded, an out-of-memory is recorded as "OOM" with the part's sizes, and the next part runs.

  dist        a process group of one (120 s collective timeout) and an all-reduce whose result is checked
  logprobs    rlad.token_logprobs forward + backward on bf16 logits at T = 32768, V = 151936: peak memory above
              the logits, the largest single allocation from the CUDA memory history against the 19.9 GB of a
              float32 [T, V], time; a plain float32 log_softmax of the same logits for comparison
  memory_fit  each GPU preset (configs/*.toml) as the trainer holds it: its student shape under FSDP2 (fp32
              masters, AdamW) with the Qwen3-8B-shaped teacher resident, a teacher pass and two train.update
              calls on one full micro-batch; measured peaks next to preflight.memory_plan's phases
  padding     policy.forward + backward of the Qwen3-1.7B shape: padded micro-batches of mixed RL lengths against
              equal lengths with the same tokens: tokens/s, pad fraction, MFU
  teacher     Teacher.logprobs of the 8B shape (bf16) on K&K-like sequences against the model's own forward (full
              logits) on the same micro-batches: tokens/s, ratio, pad fraction, peak memory
  sync        policy.full_params of the FSDP2 1.7B student, fp32 against bf16: seconds and GB
  adamw       AdamW foreach=True against fused=True on the 1.7B student's parameters: ms per step
  vllm        where vLLM is installed (else one line says so): the rollout engine's sleep -> sync -> wake cycle on
              tiny Qwen3- and Qwen2-shaped models, each in a process of its own (one process holds one engine):
              three cycles give the greedy reference's tokens and log-probs (1e-2) and the buffers of a
              collective_rpc snapshot, free memory after each sleep drifts < 256 MiB, a fourth cycle with changed
              weights matches transformers' forward of them. Sleep mode never runs on vLLM's CPU build

    python benchmarks/gpu_check.py                          # one H100 / H200: about 3-4 minutes
    python benchmarks/gpu_check.py --parts logprobs,adamw   # a subset (dist always runs first)
    python benchmarks/gpu_check.py --dry-run                # tiny sizes on CPU: every code path in seconds

Every number goes into one JSON (--json, default gpu_check.json), rewritten atomically after every part, so a run
killed at a time limit still leaves the parts it finished ("finished": false until the end); one line per part as
it finishes, the whole JSON printed at the end. Budget on an H200 (ESTIMATE_S, from each part's docstring):
start-up ~15 s, dist 5, logprobs 10, memory_fit 90, padding 20, teacher 20, sync 10, adamw 15, vllm 60 (where
vLLM is installed; last, so the budget drops it first): about 3-4 minutes. A
part whose estimate would end past --max-seconds (210) is skipped and recorded so, and so is a memory_fit preset
starting after --fit-seconds (75) of that part: the script ends within about 4 minutes, inside a 5-minute limit.
MFU = model FLOPs (6 N per token plus causal attention, 6 L d n per token of an n-token sequence, for forward +
backward; 2 N and 2 L d n for a forward) over the card's dense bf16 peak (PEAK_BF16).
"""
import argparse
import dataclasses
import gc
import glob
import json
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import policy  # noqa: E402
import preflight  # noqa: E402
import rlad  # noqa: E402
import teacher as teacher_lib  # noqa: E402
import train  # noqa: E402
from benchmarks.bench_teacher import make_lengths  # noqa: E402

GIB = 2**30
VOCAB = 151936
SHAPES = {  # Qwen3 configs: the students the presets name and the 8B teacher
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
TINY = {  # --dry-run: the same three roles, distinct shapes, vocabulary 512
    "0.6b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=48, tie_word_embeddings=True),
    "8b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}
MODEL_SHAPE = {"Qwen/Qwen3-0.6B": "0.6b", "Qwen/Qwen3-1.7B": "1.7b", "Qwen/Qwen3-1.7B-Base": "1.7b",
               "Qwen/Qwen3-8B": "8b", "Qwen/Qwen3-8B-Base": "8b"}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)
DRY = 128  # --dry-run divides the presets' token counts by this
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
PARTS = ("logprobs", "memory_fit", "padding", "teacher", "sync", "adamw", "vllm")
ESTIMATE_S = {"dist": 5, "logprobs": 10, "memory_fit": 90, "padding": 20, "teacher": 20, "sync": 10, "adamw": 15,
              "vllm": 60}


# ----------------------------------------------------------------------------- helpers
def is_cuda(device) -> bool:
    return device.type == "cuda"


def sync(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def reset_peak(device) -> int:
    """Synchronise, reset the peak counters; the bytes allocated now (0 on CPU)."""
    if not is_cuda(device):
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peaks(device, base: int = 0) -> dict:
    """Peak allocated (above `base`) and reserved GiB since the last reset_peak, and allocated now."""
    if not is_cuda(device):
        return {"memory": "skipped: no CUDA"}
    torch.cuda.synchronize()
    return {"peak_alloc_gib": gib(torch.cuda.max_memory_allocated() - base),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
            "alloc_now_gib": gib(torch.cuda.memory_allocated())}


def gib(n) -> float:
    return round(n / GIB, 3)


def timed(fn, device):
    """(seconds, fn's result) with a synchronise on each side."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def peak_flops(device):
    name = torch.cuda.get_device_name(device) if is_cuda(device) else "cpu"
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def model_flops(n_params: int, layers: int, d_attn: int, lens, passes: int = 6) -> float:
    """passes = 6 (forward + backward) or 2 (forward): passes * N per token plus causal attention,
    passes * L * d * n per token of an n-token sequence (half of the full 2 * passes * L * d * n)."""
    return sum(passes * n_params * n + passes * layers * d_attn * n * n for n in lens)


def mfu(flops: float, seconds: float, device):
    peak = peak_flops(device)
    return round(flops / seconds / peak, 4) if peak and seconds > 0 else None


def build(shape: str, dtype, device, dry: bool):
    """A random Qwen3ForCausalLM of `shape`, built in `dtype` directly on `device` (no float32 copy first)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(**(TINY if dry else SHAPES)[shape], vocab_size=512 if dry else VOCAB,
                      max_position_embeddings=40960)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return Qwen3ForCausalLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(default)


def dims(lm) -> tuple:
    """(parameters, layers, attention width) for the MFU formula; tied embeddings count once."""
    c = lm.config
    return sum(p.numel() for p in lm.parameters()), c.num_hidden_layers, c.num_attention_heads * c.head_dim


def plan_shapes(lm) -> dict:
    """The dict preflight.shapes returns, from a built model instead of a hub config."""
    c = lm.config
    total = sum(p.numel() for p in lm.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in lm.get_decoder().layers]
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return {"params": total, "layer": max(layers), "root": total - sum(layers), "hidden": c.hidden_size,
            "intermediate": c.intermediate_size, "layers": len(layers), "vocab": c.vocab_size,
            "kv_bytes_per_token": 2 * len(layers) * kv_heads * c.head_dim * 2}


def random_ids(n: int, vocab: int, g) -> list:
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def summary(res: dict, prefix: str = "") -> str:
    """One line of key=value for a result dict (nested keys joined by '.'; lists and the per-preset details, printed
    as they finish, left out)."""
    out = []
    for k, v in res.items():
        if k in ("presets", "plan_parts_gib"):
            out.append(f"{prefix}{k}=({len(v)}, above)")
        elif isinstance(v, dict):
            out.append(summary(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            out.append(f"{prefix}{k}={v:.4g}")
        elif not isinstance(v, list):
            out.append(f"{prefix}{k}={v}")
    return " ".join(x for x in out if x)


# ----------------------------------------------------------------------------- dist
def part_dist(args, state, res):
    """The trainer's process group (train.setup_distributed, a group of one outside torchrun) and a checked
    all-reduce. ~5 s (CUDA and NCCL initialisation)."""
    rank, world, device = train.setup_distributed(timeout_min=2.0)
    state.update(rank=rank, world=world, device=device)
    res.update(backend=dist.get_backend(), rank=rank, world=world, device=str(device), timeout_s=120)
    x = torch.full((1024,), float(rank + 1), device=device)
    seconds, _ = timed(lambda: dist.all_reduce(x), device)
    expected = world * (world + 1) / 2
    res.update(all_reduce_value=x[0].item(), all_reduce_expected=expected, all_reduce_ok=bool((x == expected).all()),
               all_reduce_ms=round(1e3 * seconds, 3))
    if not res["all_reduce_ok"]:
        raise RuntimeError(f"all_reduce gave {x[0].item()}, expected {expected}")


# ----------------------------------------------------------------------------- logprobs
def start_history(max_entries: int) -> str:
    """Start the CUDA allocator's history (the signature varies across torch versions); which call worked."""
    record = torch.cuda.memory._record_memory_history
    for how, kw in (("kwargs+clear", dict(enabled="all", context="alloc", stacks="python", max_entries=max_entries,
                                          clear_history=True)),
                    ("kwargs", dict(enabled="all", context="alloc", stacks="python", max_entries=max_entries)),
                    ("legacy bool", dict(enabled=True, trace_alloc_max_entries=max_entries))):
        try:
            record(**kw)
            return how
        except TypeError:
            continue
    record()
    return "defaults"


def stop_history():
    try:
        torch.cuda.memory._record_memory_history(enabled=None)
    except TypeError:
        torch.cuda.memory._record_memory_history(False)


def largest_allocs(snapshot, skip_size: int) -> dict:
    """Largest 'alloc' in the snapshot's device traces (all, and other than blocks of `skip_size` bytes, the
    logits' gradient); falls back to the segments' current blocks when the format has no traces."""
    out = {"snapshot_keys": sorted(snapshot) if isinstance(snapshot, dict) else str(type(snapshot))}
    traces = snapshot.get("device_traces") if isinstance(snapshot, dict) else None
    sizes, segment_sizes = [], []
    for trace in traces or []:
        for e in trace if isinstance(trace, list) else []:
            if isinstance(e, dict) and e.get("action") == "alloc":
                sizes.append(int(e.get("size", 0)))
            elif isinstance(e, dict) and e.get("action") == "segment_alloc":
                segment_sizes.append(int(e.get("size", 0)))
    out["source"] = "device_traces"
    if not sizes and isinstance(snapshot, dict):  # no traces: what is allocated now (a lower bound)
        out["source"] = "segments (current blocks only)"
        for seg in snapshot.get("segments", []):
            for block in seg.get("blocks", []):
                if str(block.get("state", "")).startswith("active"):
                    sizes.append(int(block.get("size", 0)))
    other = [s for s in sizes if not 0 <= s - skip_size < 2**21]  # the gradient, rounded up by the allocator
    out.update(alloc_events=len(sizes), largest_alloc_bytes=max(sizes, default=None),
               largest_alloc_other_than_grad_bytes=max(other, default=None),
               largest_segment_alloc_bytes=max(segment_sizes, default=None))
    return out


def part_logprobs(args, state, res):
    """rlad.token_logprobs forward + backward at T = 32768, V = 151936, bf16 logits (10.0 GB) that require grad.
    H200 estimate ~10 s: each pass streams ~40 GB (~20-40 ms); 1 recorded + 1 warm-up + 3 timed passes; the
    float32 log_softmax baseline needs ~70 GB (~1 s for two passes)."""
    device = state["device"]
    T, V = (512, 1024) if args.dry_run else (32768, VOCAB)
    dtype = torch.bfloat16
    fp32_tv = T * V * 4
    res.update(T=T, V=V, logits_dtype="bfloat16", logits_bytes=T * V * 2, fp32_TV_bytes=fp32_tv,
               chunk=1024, chunk_fp32_bytes=min(1024, T) * V * 4)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, V, device=device, dtype=dtype, generator=g).requires_grad_()  # [T, V]
    targets = torch.randint(0, V, (T,), device=device, generator=g)  # [T]

    def fwd_bwd():
        rlad.token_logprobs(logits, targets).sum().backward()

    # memory: peak above the logits, and the allocator's history of this one call
    logits.grad = None
    base = reset_peak(device)
    if is_cuda(device):
        res["history_api"] = start_history(100_000)
        try:
            fwd_bwd()
            sync(device)
            snapshot = torch.cuda.memory._snapshot()
        finally:
            stop_history()
        res.update(peaks(device, base))
        res.update(largest_allocs(snapshot, T * V * 2))
        del snapshot
        big = res.get("largest_alloc_bytes")
        other = res.get("largest_alloc_other_than_grad_bytes")
        res["largest_over_fp32_TV"] = round(big / fp32_tv, 4) if big else None
        res["largest_other_than_grad_over_fp32_TV"] = round(other / fp32_tv, 4) if other else None
        res["no_fp32_TV_allocation"] = bool(big is not None and big < fp32_tv)
    else:
        fwd_bwd()
        res["memory_history"] = "skipped: no CUDA"
    # time: one warm-up, then the median of 3 (forward alone, forward + backward)
    fwd_ms, both_ms = [], []
    for _ in range(4):
        logits.grad = None
        s, _ = timed(lambda: rlad.token_logprobs(logits.detach(), targets), device)
        fwd_ms.append(1e3 * s)
        s, _ = timed(fwd_bwd, device)
        both_ms.append(1e3 * s)
    res.update(forward_ms=round(statistics.median(fwd_ms[1:]), 3),
               forward_backward_ms=round(statistics.median(both_ms[1:]), 3))
    # the naive float32 log_softmax of the same logits (a float32 [T, V] copy, its output and its gradient)
    naive = res["naive_fp32"] = {}
    try:
        def naive_fwd_bwd():
            torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0].sum().backward()
        logits.grad = None
        base = reset_peak(device)
        naive_fwd_bwd()
        naive.update(peaks(device, base))
        logits.grad = None
        s, _ = timed(naive_fwd_bwd, device)
        naive["forward_backward_ms"] = round(1e3 * s, 3)
    except OOM as e:
        naive.update(error="OOM", message=str(e)[:300])
    logits.grad = None
    print(f"[logprobs] T={T} V={V}: peak above the logits {res.get('peak_alloc_gib')} GiB, largest single "
          f"allocation {res.get('largest_alloc_bytes')} B (other than the bf16 gradient "
          f"{res.get('largest_alloc_other_than_grad_bytes')} B) vs float32 [T, V] {fp32_tv} B: ratio "
          f"{res.get('largest_over_fp32_TV')} ({res.get('largest_other_than_grad_over_fp32_TV')}); "
          f"fwd+bwd {res['forward_backward_ms']} ms; naive float32 peak {naive.get('peak_alloc_gib')} GiB", flush=True)


# ----------------------------------------------------------------------------- memory_fit
def fit_rows(cfg, vocab: int, seed: int) -> list:
    """One micro-batch that fills micro_batch_tokens: the fewest rows of at most max_prompt_tokens (<= 512) +
    max_tokens, the first at the full width, the others up to 25% shorter (padding and an attention mask, as in
    training). Rows as train.update takes them after the teacher pass (teacher_logp is added by the caller)."""
    g = torch.Generator().manual_seed(seed)
    budget = cfg.micro_batch_tokens
    prompt = min(cfg.max_prompt_tokens, 512)
    n = max(1, math.ceil(budget / (prompt + cfg.max_tokens - 1)))
    width = budget // n
    prompt = min(prompt, width // 2)
    response = width - prompt + 1  # prompt + response - 1 forward positions
    rows = []
    for i in range(n):
        r = response if i == 0 else response - int(torch.randint(0, response // 4 + 1, (1,), generator=g))
        rows.append(policy.Row(prompt=random_ids(prompt, vocab, g), response=random_ids(r, vocab, g), uid=i,
                               group=i // 8, adv=float(torch.randn(1, generator=g)), correct=bool(i % 2)))
    return rows


def fit_one(args, state, cfg, key: str, teach_lm, out: dict):
    """One preset: the student as train.setup makes it; the teacher scores the rows; two train.update calls with
    a measured teacher pass between them (the first update allocates AdamW's state: the second teacher pass and
    update see what every later step sees). Peaks are absolute, as the plan's phases are."""
    device = state["device"]
    lm = build(key, torch.float32, device, args.dry_run)
    n_params, layers, d_attn = dims(lm)
    student = policy.load(lm, device, 1, chunk=cfg.logit_chunk, temperature=1.0,
                          grad_checkpointing=cfg.grad_checkpointing)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # as train.setup
    rows = fit_rows(cfg, lm.config.vocab_size, 0)
    lens = [len(r.prompt) + len(r.response) - 1 for r in rows]
    out.update(rows=len(rows), prompt=len(rows[0].prompt), response_max=len(rows[0].response),
               slots=len(rows) * max(lens), real=sum(lens))
    teach = teacher_lib.Teacher(teach_lm, device=device, token_budget=cfg.teacher_token_budget)
    seqs = [(r.prompt, r.response) for r in rows]
    for r, lp in zip(rows, teach.logprobs(seqs)):
        r.teacher_logp = lp
    ucfg = dataclasses.replace(cfg, mini_batches=1, ppo_epochs=1, warmup_steps=0)  # one micro-batch, one step
    out["updates"] = []
    for step in range(2):
        if step == 1:  # the teacher pass as in every step after the first: AdamW's state resident
            base = reset_peak(device)
            seconds, _ = timed(lambda: teach.logprobs(seqs), device)
            out["teacher_pass"] = dict(peaks(device), seconds=round(seconds, 3), resident_before_gib=gib(base),
                                       pad_fraction=round(teach.last_stats["pad_fraction"], 4))
        m = policy.Metrics()
        run = train.Run(cfg=ucfg, device=device, student=student, opt=opt)
        base = reset_peak(device)
        seconds, _ = timed(lambda: train.update(run, rows, step, m), device)
        red = m.reduce(device)
        out["updates"].append(dict(peaks(device), seconds=round(seconds, 3), skipped=run.skipped,
                                   resident_before_gib=gib(base), loss=red.get("loss"),
                                   grad_norm=red.get("grad_norm"), pad_frac=red.get("pad_frac")))
    last = out["updates"][-1]
    out.update(update_peak_alloc_gib=last.get("peak_alloc_gib"), update_peak_reserved_gib=last.get("peak_reserved_gib"),
               update_tokens_per_s=round(sum(lens) / last["seconds"]),
               update_mfu=mfu(model_flops(n_params, layers, d_attn, lens), last["seconds"], device))


def part_memory_fit(args, state, res):
    """Every GPU preset, one micro-batch of its micro_batch_tokens through train.update with the 8B teacher
    resident (16.4 GB). H200 estimate ~90 s: the teacher build ~10 s; per measured preset a student build
    (~5 s), two 32K-token teacher passes (~1.5 s each) and two updates (~1-3 s each at 16K-32K tokens); the two
    presets whose student, micro_batch_tokens and checkpointing repeat an earlier one are skipped; presets starting
    after --fit-seconds are skipped (5 measured: ~15 s each)."""
    device = state["device"]
    t0 = time.perf_counter()
    teach_lm = build("8b", torch.bfloat16 if is_cuda(device) else torch.float32, device, args.dry_run)
    teacher_shape = plan_shapes(teach_lm)
    total = torch.cuda.mem_get_info()[1] if is_cuda(device) else 140 * GIB
    res.update(gpu_bytes=total, teacher_params=teacher_shape["params"],
               teacher_build_s=round(time.perf_counter() - t0, 1))
    measured, presets = {}, {}
    res["presets"] = presets
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))):
        name = os.path.basename(path)[:-5]
        cfg = train.parse_config(["--config", path])
        if cfg.model.startswith("tiny"):
            continue
        out = presets[name] = {"model": cfg.model, "teacher": cfg.teacher}
        key = MODEL_SHAPE.get(cfg.model)
        if key is None or MODEL_SHAPE.get(cfg.teacher) != "8b":
            out["skipped"] = f"no shape here for {cfg.model} <- {cfg.teacher}"
            continue
        if args.dry_run:
            cfg = dataclasses.replace(cfg, **{k: max(getattr(cfg, k) // DRY, 4) for k in (
                "micro_batch_tokens", "max_tokens", "max_prompt_tokens", "teacher_token_budget", "logit_chunk")})
        out.update(shape=key, micro_batch_tokens=cfg.micro_batch_tokens, grad_checkpointing=cfg.grad_checkpointing,
                   max_tokens=cfg.max_tokens, logit_chunk=cfg.logit_chunk)
        meta_lm = build(key, torch.float32, "meta", args.dry_run)  # no memory: the module tree alone
        plan = preflight.memory_plan(cfg, 1, total, plan_shapes(meta_lm), teacher_shape)
        del meta_lm
        out["plan_gib"] = {k: gib(v) for k, v in plan["phases"].items()}
        out["plan_bytes"] = {k: int(v) for k, v in plan["phases"].items()}
        out["plan_parts_gib"] = {k: gib(v) for k, v in plan["parts"].items()}
        print(f"[memory_fit] {name}: preflight plan, world 1:\n{preflight.format_plan(plan, cfg)}", flush=True)
        sig = (key, cfg.micro_batch_tokens, cfg.grad_checkpointing)
        if sig in measured:
            out["skipped"] = f"same student shape, micro_batch_tokens, grad_checkpointing as {measured[sig]}"
            continue
        if time.perf_counter() - t0 > args.fit_seconds:
            out["skipped"] = f"part time budget ({args.fit_seconds} s) spent"
            continue
        measured[sig] = name
        try:
            fit_one(args, state, cfg, key, teach_lm, out)
        except OOM as e:
            traceback.print_exc()
            out.update(error="OOM", message=str(e)[:300])
        except Exception as e:
            traceback.print_exc()
            out["error"] = f"{type(e).__name__}: {e}"[:500]
        free(device)
        print(f"[memory_fit] {name}: {key} student, {cfg.micro_batch_tokens} tokens, checkpointing "
              f"{cfg.grad_checkpointing}: update peak alloc {out.get('update_peak_alloc_gib', out.get('error'))} / "
              f"reserved {out.get('update_peak_reserved_gib')} GiB vs plan {out['plan_gib']['update']} GiB; teacher "
              f"pass peak {out.get('teacher_pass', {}).get('peak_alloc_gib')} vs plan {out['plan_gib']['teacher pass']}"
              f" GiB; {out.get('update_tokens_per_s')} tokens/s, MFU {out.get('update_mfu')}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)


# ----------------------------------------------------------------------------- padding
def part_padding(args, state, res):
    """policy.forward + backward (grad checkpointing, as the 1.7B presets) over 64 sequences of mixed RL lengths
    (prompts 64-320, responses log-normal around 512 with 20% at 2048: ~70K tokens) in padded micro-batches of
    16384, against 64 equal rows of the same total. H200 estimate ~20 s: build ~5 s, per layout one warm-up
    micro-batch and one timed pass (~8 N FLOPs per token with recompute: ~3 s)."""
    device = state["device"]
    n, max_response, budget, chunk = (16, 32, 1024, 16) if args.dry_run else (64, 2048, 16384, 1024)
    lm = build("1.7b", torch.float32, device, args.dry_run)
    n_params, layers, d_attn = dims(lm)
    vocab = lm.config.vocab_size
    model = policy.load(lm, device, 1, chunk=chunk, grad_checkpointing=True)
    g = torch.Generator().manual_seed(0)
    p_lens, r_lens = make_lengths(n, max_response, 0)
    mixed = [policy.Row(prompt=random_ids(p, vocab, g), response=random_ids(r, vocab, g))
             for p, r in zip(p_lens, r_lens)]
    total = sum(p + r - 1 for p, r in zip(p_lens, r_lens))
    p_eq = round(sum(p_lens) / n)
    r_eq = total // n - p_eq + 1
    equal = [policy.Row(prompt=random_ids(p_eq, vocab, g), response=random_ids(r_eq, vocab, g)) for _ in range(n)]
    res.update(sequences=n, budget=budget, max_response=max_response, forward_tokens=total, equal_prompt=p_eq,
               equal_response=r_eq, n_params=n_params)

    def run(mbs):
        slots = real = 0
        for mb in mbs:
            b = policy.collate(mb, device)
            lp, _, _ = policy.forward(model, b)  # [B, R]
            ((lp * b["mask"]).sum() / max(b["tokens"], 1)).backward()
            slots, real = slots + b["slots"], real + b["unpadded"]
        model.zero_grad(set_to_none=True)
        return slots, real

    for name, rows in (("mixed", mixed), ("equal", equal)):
        mbs = policy.pack(rows, budget)
        out = res[name] = {"micro_batches": len(mbs)}
        run(mbs[:1])  # warm-up: the widest micro-batch
        base = reset_peak(device)
        seconds, (slots, real) = timed(lambda: run(mbs), device)
        lens = [len(r.prompt) + len(r.response) - 1 for r in rows]
        out.update(peaks(device, base), seconds=round(seconds, 3), slots=slots, real=real,
                   pad_fraction=round(1 - real / slots, 4), tokens_per_s=round(real / seconds),
                   mfu=mfu(model_flops(n_params, layers, d_attn, lens), seconds, device))
    res["mixed_over_equal_tokens_per_s"] = round(res["mixed"]["tokens_per_s"] / res["equal"]["tokens_per_s"], 3)


# ----------------------------------------------------------------------------- teacher
def part_teacher(args, state, res):
    """Teacher.logprobs (policy.logprobs) of the 8B shape in bf16, 64 sequences of a 512-token prompt and a
    512-2048-token response (~115K tokens) in micro-batches of 32768 (the presets' teacher_token_budget), against
    the model's own forward with full logits over the same micro-batches. H200 estimate ~20 s: build ~10 s,
    2 x 1.9e15 FLOPs (~3 s each), warm-ups."""
    device = state["device"]
    n, prompt, resp, budget = (8, 32, 64, 512) if args.dry_run else (64, 512, 2048, 32768)
    lm = build("8b", torch.bfloat16 if is_cuda(device) else torch.float32, device, args.dry_run)
    n_params, layers, d_attn = dims(lm)
    t = teacher_lib.Teacher(lm, device=device, token_budget=budget)
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    r_lens = [int(resp * (0.25 + 0.75 * float(torch.rand(1, generator=g)))) for _ in range(n)]
    seqs = [(random_ids(prompt, vocab, g), random_ids(r, vocab, g)) for r in r_lens]
    lens = [len(p) + len(r) - 1 for p, r in seqs]
    res.update(sequences=n, prompt=prompt, max_response=resp, budget=budget, forward_tokens=sum(lens),
               n_params=n_params)
    flops = model_flops(n_params, layers, d_attn, lens, passes=2)
    t.logprobs(seqs[:2])  # warm-up
    base = reset_peak(device)
    seconds, out = timed(lambda: t.logprobs(seqs), device)
    finite = all(bool(torch.isfinite(x).all()) for x in out)
    res["teacher_pass"] = dict(peaks(device, base), seconds=round(seconds, 3), tokens_per_s=round(sum(lens) / seconds),
                               mfu=mfu(flops, seconds, device), pad_fraction=round(t.last_stats["pad_fraction"], 4),
                               micro_batches=t.last_stats["micro_batches"], finite=finite)
    del out
    rows = [policy.Row(prompt=p, response=r) for p, r in seqs]
    mbs = [policy.collate(mb, device) for mb in policy.pack(rows, budget)]

    def plain(batches):
        with torch.inference_mode():
            for b in batches:
                lm(input_ids=b["ids"], attention_mask=b["attn"], use_cache=False).logits  # [B, L, V] all positions

    plain(mbs[:1])  # warm-up
    base = reset_peak(device)
    seconds, _ = timed(lambda: plain(mbs), device)
    res["plain_forward"] = dict(peaks(device, base), seconds=round(seconds, 3), tokens_per_s=round(sum(lens) / seconds),
                                mfu=mfu(flops, seconds, device))
    res["teacher_over_plain_tokens_per_s"] = round(res["teacher_pass"]["tokens_per_s"] /
                                                   res["plain_forward"]["tokens_per_s"], 3)


# ----------------------------------------------------------------------------- sync
def part_sync(args, state, res):
    """policy.full_params of the FSDP2 1.7B student (world 1): fp32 masters against a bf16 cast before the
    gather, the bytes an engine sync moves (at world 1 the gather itself moves nothing: this times the iteration
    and the cast). H200 estimate ~10 s: build ~5 s, 4 passes over 8.1 / 4.1 GB."""
    device = state["device"]
    lm = build("1.7b", torch.float32, device, args.dry_run)
    model = policy.load(lm, device, 1)

    def gather(dtype):
        n = nbytes = 0
        for _, t in policy.full_params(model, dtype) if dtype else policy.full_params(model):
            n, nbytes = n + 1, nbytes + t.numel() * t.element_size()
        return n, nbytes

    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        gather(dtype)  # warm-up
        seconds, (n, nbytes) = timed(lambda: gather(dtype), device)
        res[name] = dict(seconds=round(seconds, 4), tensors=n, bytes=nbytes, gb=round(nbytes / 1e9, 3),
                         gb_per_s=round(nbytes / 1e9 / seconds, 2))
    res["bf16_over_fp32_bytes"] = round(res["bf16"]["bytes"] / res["fp32"]["bytes"], 3)
    res["bf16_over_fp32_seconds"] = round(res["bf16"]["seconds"] / res["fp32"]["seconds"], 3)


# ----------------------------------------------------------------------------- adamw
def part_adamw(args, state, res):
    """AdamW foreach=True against fused=True on the 1.7B student's 2.0B fp32 parameters with random gradients:
    as train.py holds them (FSDP2 DTensors) and as plain tensors. H200 estimate ~15 s: build ~5 s, 4 optimizers
    x 13 steps of ~20-60 ms (each step streams ~50 GB), 16 GB of state at a time."""
    device = state["device"]
    lm = build("1.7b", torch.float32, device, args.dry_run)
    model = policy.load(lm, device, 1)
    params = list(model.parameters())
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
        fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        res["train_default"] = "fused" if fused else "foreach" if foreach else "for-loop"
    except Exception as e:  # a private helper: record, do not fail
        res["train_default"] = f"unknown ({type(e).__name__})"
    from torch.distributed.tensor import DTensor
    torch.manual_seed(0)
    plain = []
    with torch.no_grad():
        for p in params:
            shard = p.to_local() if isinstance(p, DTensor) else p  # a DTensor's own shard: all of it at world 1
            grad = 1e-3 * torch.randn(shard.shape, device=device)
            p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) \
                if isinstance(p, DTensor) else grad
            plain.append(torch.nn.Parameter(shard.detach()))  # the same storage as a plain tensor
            plain[-1].grad = grad
    res.update(n_params=sum(p.numel() for p in plain), tensors=len(plain))
    for layout, ps in (("dtensor", params), ("plain", plain)):
        for kind in ("foreach", "fused"):
            out = res[f"{layout}_{kind}"] = {}
            opt = None
            try:
                opt = torch.optim.AdamW(ps, lr=1e-6, weight_decay=0.01, **{kind: True})
                ms = []
                for _ in range(13):  # 3 warm-up steps (the first allocates the state), 10 timed
                    s, _ = timed(opt.step, device)
                    ms.append(1e3 * s)
                out.update(ms_per_step=round(statistics.median(ms[3:]), 3), ms_all=[round(x, 2) for x in ms])
            except OOM as e:
                out.update(error="OOM", message=str(e)[:300])
            except Exception as e:
                traceback.print_exc()
                out["error"] = f"{type(e).__name__}: {e}"[:300]
            del opt
            free(device)
        a, b = res[f"{layout}_foreach"].get("ms_per_step"), res[f"{layout}_fused"].get("ms_per_step")
        res[f"{layout}_fused_over_foreach"] = round(b / a, 3) if a and b else None


# ----------------------------------------------------------------------------- main
# ----------------------------------------------------------------------------- vllm
def part_vllm(args, state, res):
    """The engine cycle of train.py's steps 2-3 on the real vLLM, per model shape in a subprocess of its own (one
    process holds one engine: its shutdown tears down process-wide state). H200 estimate ~60 s: two engine starts
    (~20 s each: no CUDA graphs), 5 short greedy generations each."""
    import importlib.util
    import subprocess
    import tempfile
    if importlib.util.find_spec("vllm") is None:
        res["not_installed"] = "vLLM is not installed here: this part runs where it is (pip install vllm==0.32.0)"
        return
    work = tempfile.mkdtemp(prefix="gpu_check_vllm_")
    for family in ("qwen3", "qwen2"):
        out = os.path.join(work, f"{family}.json")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--engine-cycle", family, "--json", out]
                           + (["--dry-run"] if args.dry_run else []), capture_output=True, text=True, timeout=600)
        if p.returncode or not os.path.exists(out):
            res[family] = {"error": (p.stdout + p.stderr)[-1500:]}
            continue
        with open(out) as f:
            res[family] = json.load(f)
    res["ok"] = all(res[f].get("ok") for f in ("qwen3", "qwen2"))


def tiny_engine_model(family: str, out: str, dtype) -> str:
    """A tiny Qwen3- or Qwen2-shaped model from its config (random weights, tiny.py's tokenizer), written to out."""
    import tiny
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    tok = tiny.make_tokenizer()
    sizes = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    if family == "qwen3":
        config, cls = Qwen3Config(head_dim=32, **sizes), Qwen3ForCausalLM
    else:  # Qwen2: biases on q/k/v, no q/k norm, its own rotary base: buffers vLLM builds its own way
        config, cls = Qwen2Config(rope_theta=1e6, **sizes), Qwen2ForCausalLM
    torch.manual_seed(0)
    cls(config).to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def engine_buffers(worker) -> dict:
    """Every buffer of the engine's model (rotary caches, attention scales), copied to the CPU (collective_rpc)."""
    runner = getattr(worker, "model_runner", None)  # read from vLLM 0.32's source: V1 and V2 runners have get_model
    model = runner.get_model() if runner is not None and hasattr(runner, "get_model") else worker.get_model()
    return {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()}


def engine_cycle(family: str, dry: bool) -> dict:
    """One engine, asleep and awake four times; see part_vllm. Returns the measurements and ok."""
    import tempfile
    import rollout
    from transformers import AutoModelForCausalLM
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    path = tiny_engine_model(family, tempfile.mkdtemp(prefix=f"engine_{family}_"), dtype)
    train.setup_distributed()
    engine = rollout.VLLMEngine(path, dtype="bfloat16" if on_gpu else "float32", max_model_len=256, seed=0,
                                gpu_memory_utilization=0.3, max_num_seqs=8,
                                kv_cache_memory_bytes=None if on_gpu else 64 * 2**20)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    prompts = [[5 + i, 17, 42 + 3 * i, 99, 7] for i in range(4)]
    greedy = lambda: engine.generate(prompts, max_tokens=24, temperature=0.0)  # noqa: E731
    reference, snapshot = greedy(), engine.llm.collective_rpc(engine_buffers)[0]
    out = {"sleep_mode": engine.sleep_mode, "buffers": sorted(snapshot), "cycles": []}
    free_after_sleep = []
    for cycle in range(3):
        engine.sleep()
        free_after_sleep.append(torch.cuda.mem_get_info()[0] if on_gpu else 0)
        engine.load_weights(hf.named_parameters())
        engine.wake()
        got = greedy()
        buffers = engine.llm.collective_rpc(engine_buffers)[0]
        same_tokens = all(a["response_ids"] == b["response_ids"] for ga, gb in zip(reference, got)
                          for a, b in zip(ga, gb))
        gap = max(max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) for ga, gb in zip(reference, got)
                  for a, b in zip(ga, gb))
        same_buffers = buffers.keys() == snapshot.keys() and all(torch.equal(buffers[k], snapshot[k]) for k in buffers)
        out["cycles"].append({"same_tokens": same_tokens, "max_logprob_gap": gap, "same_buffers": same_buffers})
    out["free_after_sleep_gib"] = [round(f / GIB, 3) for f in free_after_sleep]
    drift = max(free_after_sleep) - min(free_after_sleep)
    with torch.no_grad():  # a fourth cycle with changed weights: the engine must sample from exactly those
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.dtype) * 0.05)
    engine.sleep()
    engine.load_weights(hf.named_parameters())
    engine.wake()
    changed = greedy()
    gaps = []
    for ids, group in zip(prompts, changed):
        response = group[0]["response_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ids + response])).logits[0, len(ids) - 1:-1].float()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        gaps.append((torch.tensor(group[0]["logprobs"]) - want).abs().mean().item())
    out.update(changed_weights_mean_logprob_gap=max(gaps), free_drift_mib=round(drift / 2**20, 1))
    engine.shutdown()
    out["ok"] = (all(c["same_tokens"] and c["max_logprob_gap"] < 1e-2 and c["same_buffers"] for c in out["cycles"])
                 and drift < 256 * 2**20 and max(gaps) < 0.05)
    return out


def versions(device) -> dict:
    import transformers
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if is_cuda(device) else None,
           "nccl": None, "driver": None, "device": "cpu", "env": {k: os.environ.get(k) for k in (
               "PYTORCH_CUDA_ALLOC_CONF", "TORCH_COMPILE_DISABLE", "CUDA_VISIBLE_DEVICES")}}
    if not is_cuda(device):
        out["cpu_threads"] = torch.get_num_threads()
        return out
    props = torch.cuda.get_device_properties(device)
    out.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
               total_memory=props.total_memory, sms=props.multi_processor_count, peak_bf16=peak_flops(device))
    try:
        v = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        pass
    out["driver"] = driver_version()
    return out


def driver_version():
    """The driver's version: torch's CUDA binding where it has one, else NVML, else nvidia-smi; None if none."""
    try:
        return torch._C._cuda_getDriverVersion()  # an int, e.g. 12080 (the CUDA version the driver supports)
    except Exception:
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        pass
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None


def save(results: dict, path: str):
    """Write the JSON atomically (a temporary file, then a rename): a kill mid-write leaves the previous version."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def mem_info(device):
    return list(torch.cuda.mem_get_info(device)) if is_cuda(device) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (checks every code path)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--json", default="gpu_check.json", help="write every number here (also printed at the end)")
    ap.add_argument("--max-seconds", type=float, default=210,
                    help="a part whose estimate (ESTIMATE_S; 0 with --dry-run) would end later is skipped")
    ap.add_argument("--fit-seconds", type=float, default=75, help="memory_fit presets starting later are skipped")
    ap.add_argument("--engine-cycle", default="", help=argparse.SUPPRESS)  # part_vllm's subprocess: qwen3 | qwen2
    args = ap.parse_args()
    if args.engine_cycle:
        save(engine_cycle(args.engine_cycle, args.dry_run), args.json)
        return
    t0 = time.perf_counter()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS + ("dist",)]
    if unknown:
        sys.exit(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("no GPU visible: run with --dry-run for the CPU check of the code paths")
    state = {"device": torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
             else torch.device("cpu"), "world": 1}
    results = {"argv": sys.argv[1:], "dry_run": args.dry_run, "versions": versions(state["device"]),
               "mem_get_info_before": mem_info(state["device"]), "finished": False, "parts": {}}
    results["device"] = results["versions"]["device"]
    print(f"[start] {summary(results['versions'])}; mem_get_info {results['mem_get_info_before']}", flush=True)
    save(results, args.json)
    for name, fn in [("dist", part_dist)] + [(p, globals()[f"part_{p}"]) for p in PARTS if p in parts]:
        res = results["parts"][name] = {}
        elapsed, estimate = time.perf_counter() - t0, 0 if args.dry_run else ESTIMATE_S[name]
        if name != "dist" and elapsed + estimate > args.max_seconds:
            res["skipped"] = f"time budget: {elapsed:.0f} s + ~{estimate} s > --max-seconds {args.max_seconds}"
        elif name != "dist" and state["world"] != 1:
            res["skipped"] = "run as one process (the parts measure one GPU)"
        else:
            start = time.perf_counter()
            try:
                fn(args, state, res)
            except OOM as e:
                traceback.print_exc()
                res.update(error="OOM", message=str(e)[:300])
            except Exception as e:
                traceback.print_exc()
                res["error"] = f"{type(e).__name__}: {e}"[:500]
            res["part_seconds"] = round(time.perf_counter() - start, 2)
            free(state["device"])
        results["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
        save(results, args.json)  # before the line, so whoever reads the line finds the part in the file
        print(f"[{name}] {summary(res)}", flush=True)
    results.update(mem_get_info_after=mem_info(state["device"]), total_seconds=round(time.perf_counter() - t0, 1),
                   finished=True)
    save(results, args.json)
    print(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.json}; total {results['total_seconds']} s", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
