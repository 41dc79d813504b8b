"""One-shot GPU check of what only a GPU can show (torch + transformers only: no vLLM needed). Prints everything.

1. FSDP2 update (train.update: forward, backward, AdamW; bf16 compute, fp32 master weights and gradient
   reduction; activation checkpointing) of a random Qwen3-1.7B-shaped model (vocab 151936, tied) on sequences
   of 8K tokens: tokens/s, MFU (6 N + 6 L d T model FLOPs per token over the card's dense bf16 peak), peak memory.
2. Teacher pass (teacher.Teacher.logprobs) of a random Qwen3-8B-shaped model in bf16 on K&K-like sequences
   (512-token prompt + 2K response): tokens/s and padding.
3. token_logprobs memory: peak extra memory of rlad.token_logprobs (forward + backward) on [T, V] bf16 logits vs
   the naive float32 log_softmax, and of student.Policy's chunked LM head, at T = 8192, V = 151936.

    python benchmarks/gpu_check.py              # one H100 / H200, about 3-5 minutes
    python benchmarks/gpu_check.py --dry-run    # tiny sizes on CPU: checks the code paths in seconds
"""
import argparse
import math
import os
import sys
import time

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rlad  # noqa: E402
import student  # noqa: E402
import train  # noqa: E402

SHAPES = {  # Qwen3 configs (hidden, layers, heads, kv heads, head_dim, MLP, vocab, tied)
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)


def build(shape, dtype, device):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, dtype=str(dtype).split(".")[-1])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on the device: no float32 copy of an 8B model first
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return Qwen3ForCausalLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(default)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def mem_gb(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def check_update(args, device):
    shape = "tiny" if args.dry_run else "1.7b"
    seq, n_seq = (256, 4) if args.dry_run else (8192, args.sequences)
    prompt = seq // 16
    cfg = train.Config(method="grpo", mini_batches=1, micro_batch_tokens=2 * seq, grad_checkpointing=True,
                       max_tokens=seq, lr=1e-6, warmup_steps=0)
    lm = build(shape, torch.float32, device)
    n_params = sum(p.numel() for p in lm.parameters())
    layers, d_attn = lm.config.num_hidden_layers, lm.config.num_attention_heads * lm.config.head_dim
    policy = student.load(lm, device, 1, grad_checkpointing=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    rows = [{"prompt": torch.randint(0, vocab, (prompt,), generator=g).tolist(),
             "response": torch.randint(0, vocab, (seq - prompt,), generator=g).tolist(), "group": i // 2, "uid": i,
             "adv": float(torch.randn(1, generator=g)), "correct": True} for i in range(n_seq)]
    for r in rows:
        # a random model is near uniform: log-probs ~ -log V; some ratios clip, most carry gradient (as in training)
        r["old"] = -math.log(vocab) + 0.1 * torch.randn(len(r["response"]), generator=g)
    tokens = sum(len(r["prompt"]) + len(r["response"]) for r in rows)
    times = []
    for it in range(1 + args.iters):  # the first iteration warms up (allocator, kernels)
        sync(device)
        t = time.perf_counter()
        train.update(policy, opt, rows, cfg, device, 1, it, {"kd": 0.0, "ent": 0.0}, {}, {})
        sync(device)
        times.append(time.perf_counter() - t)
    sec = sum(times[1:]) / args.iters
    flops_tok = 6 * n_params + 6 * layers * d_attn * seq  # causal attention: half of 12 L d T
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = f"{flops_tok * tokens / sec / peak:.1%}" if peak else "n/a"
    print(f"[update] {shape}: {n_params / 1e9:.2f}B params, {n_seq} x {seq} tokens, grad ckpt {cfg.grad_checkpointing}: "
          f"{sec:.2f} s/update, {tokens / sec:,.0f} tokens/s, MFU {mfu} ({name}), peak mem {mem_gb(device):.1f} GB; "
          f"iters {[round(t, 2) for t in times]}", flush=True)
    del policy, opt, lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check_teacher(args, device):
    import teacher as teacher_lib
    shape = "tiny" if args.dry_run else "8b"
    prompt, resp, n_seq = (32, 128, 8) if args.dry_run else (512, 2048, args.teacher_sequences)
    lm = build(shape, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    t = teacher_lib.Teacher(lm, device=device, token_budget=32768 if not args.dry_run else 1024)
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    seqs = [(torch.randint(0, vocab, (prompt,), generator=g).tolist(),
             torch.randint(0, vocab, (int(resp * (0.25 + 0.75 * torch.rand(1, generator=g))),), generator=g).tolist())
            for _ in range(n_seq)]
    t.logprobs(seqs[:2])  # warm-up
    sync(device)
    start = time.perf_counter()
    out = t.logprobs(seqs)
    sync(device)
    sec = time.perf_counter() - start
    tokens = sum(len(p) + len(r) for p, r in seqs)
    assert all(torch.isfinite(x).all() for x in out)
    print(f"[teacher] {shape}: {n_seq} sequences, {tokens:,} tokens in {sec:.2f} s: {tokens / sec:,.0f} tokens/s, "
          f"pad {t.last_stats['pad_fraction']:.1%}, micro-batches {t.last_stats['micro_batches']}, "
          f"peak mem {mem_gb(device):.1f} GB", flush=True)
    del t, lm
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_logprob_memory(args, device):
    T, V = (512, 512) if args.dry_run else (8192, 151936)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    for name in ("naive float32", "rlad.token_logprobs"):
        logits = torch.randn(T, V, device=device, dtype=dtype, generator=g).requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if name == "naive float32":
            lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
        else:
            lp = rlad.token_logprobs(logits, targets)
        lp.sum().backward()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
        print(f"[logprobs] {name}: T={T}, V={V}, {str(dtype)[6:]} logits ({T * V * logits.element_size() / 2**30:.2f} GB):"
              f" peak extra (fwd+bwd, incl. the logits' gradient) {extra:.2f} GB", flush=True)
        del logits, lp
    # student.Policy: hidden states -> LM head per chunk under checkpointing: the [T, V] logits never exist at once
    shape = "tiny" if args.dry_run else "1.7b"
    lm = build(shape, torch.float32, device)
    policy = student.load(lm, device, 1, grad_checkpointing=True)
    ids = torch.randint(0, V, (1, T), device=device, generator=g)
    src = torch.arange(T - 1, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    lp, _ = policy(ids, None, src, ids[0, 1:])
    lp.sum().backward()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    print(f"[logprobs] student.Policy {shape} forward+backward, 1 x {T} tokens: peak extra {extra:.2f} GB "
          f"(weights excluded)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=4, help="8K-token sequences per update")
    ap.add_argument("--teacher-sequences", type=int, default=32)
    ap.add_argument("--only", default="update,teacher,logprobs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    _, _, device = train.setup_distributed()
    if device.type != "cuda" and not args.dry_run:
        sys.exit("no GPU visible: run with --dry-run for the CPU check of the code paths")
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for part, fn in (("update", check_update), ("teacher", check_teacher), ("logprobs", check_logprob_memory)):
        if part in args.only:
            try:
                fn(args, device)
            except torch.OutOfMemoryError as e:  # report and go on: the other numbers are still worth having
                print(f"[{part}] out of memory: {str(e)[:200]}", flush=True)
                torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t0:.0f} s")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
