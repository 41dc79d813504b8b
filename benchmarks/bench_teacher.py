"""Benchmark the teacher pass (teacher.py): tokens/s, padding fraction and peak memory on a Qwen3-0.6B-shaped
random model, for a realistic spread of RL response lengths, against plain forwards of the same tokens.

    python benchmarks/bench_teacher.py                      # CPU: 4 layers, vocab 16384 (CPU time), fp32
    python benchmarks/bench_teacher.py --device cuda        # GPU: full 0.6B shape (28 layers, vocab 151936), bf16
    python benchmarks/bench_teacher.py --device cuda --json out.json --naive

Model: hidden 1024, intermediate 3072, 16 heads, 8 KV heads, head_dim 128, tied embeddings (Qwen3-0.6B);
random weights (speed does not depend on them). Lengths: prompts uniform in [64, 320] tokens (a K&K or
math prompt), responses log-normal around max_response/4, 20% truncated at max_response (RL rollouts that
hit the length limit), at least 8 tokens.

Rows of the table:
- teacher: `Teacher.logprobs` (policy.logprobs: rows sorted by length, right-padded micro-batches under the budget,
  the LM head on response positions only). A packed one-row layout was measured here before it was removed:
  on CPU's sdpa it ran at 0.55-0.83x a plain forward's tokens/s against 1.08-1.10x for padded rows.
- plain forward: the same token stream (prompt + response[:-1] of every sequence, concatenated) cut into
  rows of `budget` tokens and pushed through `model(...)` with full logits, nothing selected, no
  log-softmax: roughly the cost floor of one forward over these tokens (its attention even crosses
  sequence boundaries, which is cheaper than correct).
- naive (--naive): one sequence at a time, full logits, float32 log_softmax over the vocabulary: what a
  teacher pass looks like written without care.
tokens/s counts forward tokens (prompt + response - 1 per sequence), the same number for every row.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import teacher  # noqa: E402


def make_lengths(n, max_response, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(64, 321, (n,), generator=g)
    median = max_response / 4
    responses = torch.exp(math.log(median) + 0.8 * torch.randn(n, generator=g)).long()
    truncated = torch.rand(n, generator=g) < 0.2
    responses = torch.where(truncated, torch.full_like(responses, max_response), responses.clamp(8, max_response))
    return prompts.tolist(), responses.tolist()


def make_model(layers, vocab, dtype, device, attn):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=40960, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen3ForCausalLM(config).to(dtype).eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, peak GPU memory in GiB or None) of one call, after a synchronise."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return seconds, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="default: 4 on CPU, 28 on GPU")
    ap.add_argument("--vocab", type=int, default=None, help="default: 16384 on CPU, 151936 on GPU")
    ap.add_argument("--sequences", type=int, default=None, help="default: 16 on CPU, 256 on GPU")
    ap.add_argument("--max-response", type=int, default=None, help="default: 768 on CPU, 4096 on GPU")
    ap.add_argument("--budget", type=int, default=None, help="token budget; default 4096 on CPU, 16384 on GPU")
    ap.add_argument("--naive", action="store_true", help="also time the one-sequence full-logits baseline")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--attn", default="sdpa", help="attention backend, e.g. flash_attention_2 if installed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    layers = args.layers or (28 if gpu else 4)
    vocab = args.vocab or (151936 if gpu else 16384)
    n = args.sequences or (256 if gpu else 16)
    max_response = args.max_response or (4096 if gpu else 768)
    budget = args.budget or (16384 if gpu else 4096)
    dtype = torch.bfloat16 if gpu else torch.float32

    model = make_model(layers, vocab, dtype, device, args.attn)
    p_lens, r_lens = make_lengths(n, max_response, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    seqs = [(torch.randint(0, vocab, (p,), generator=g).tolist(), torch.randint(0, vocab, (r,), generator=g).tolist())
            for p, r in zip(p_lens, r_lens)]
    tokens = sum(p + r - 1 for p, r in zip(p_lens, r_lens))
    print(f"device {device} ({torch.cuda.get_device_name() if gpu else f'{torch.get_num_threads()} threads'}), "
          f"{dtype}, {layers} layers, vocab {vocab}, {n} sequences, {tokens} forward tokens "
          f"(response {min(r_lens)}..{max(r_lens)}, mean {sum(r_lens) / n:.0f}; prompt mean {sum(p_lens) / n:.0f}), "
          f"budget {budget}, attention {args.attn}")

    t = teacher.Teacher(model, device=device, token_budget=budget)
    t.logprobs(seqs[:2])  # warm-up
    seconds, peak = timed(lambda: t.logprobs(seqs), device)
    rows = [{"name": "teacher (padded micro-batches)", "seconds": seconds, "peak_gib": peak,
             "pad_fraction": t.last_stats["pad_fraction"], "micro_batches": t.last_stats["micro_batches"]}]

    stream = torch.tensor([tok for p, r in seqs for tok in p + r[:-1]], device=device)  # [tokens]

    def plain():
        with torch.inference_mode():
            for start in range(0, stream.numel(), budget):
                model(stream[None, start:start + budget], use_cache=False)
    plain_seconds, plain_peak = timed(plain, device)
    rows.append({"name": "plain forward", "seconds": plain_seconds, "peak_gib": plain_peak, "pad_fraction": 0.0,
                 "micro_batches": math.ceil(stream.numel() / budget)})

    if args.naive:
        def naive():
            with torch.inference_mode():
                for p, r in seqs:
                    logits = model(torch.tensor([p + r], device=device), use_cache=False).logits[0]  # [T, V]
                    logp = torch.log_softmax(logits.float(), -1)[len(p) - 1:-1]  # [R, V] float32
                    logp.gather(-1, torch.tensor(r, device=device)[:, None]).cpu()
        seconds, peak = timed(naive, device)
        rows.append({"name": "naive (one seq, full logits)", "seconds": seconds, "peak_gib": peak,
                     "pad_fraction": 0.0, "micro_batches": n})

    print("\n| pass | seconds | tokens/s | vs plain forward | pad fraction | micro-batches | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["tokens_per_s"] = tokens / row["seconds"]
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        print(f"| {row['name']} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} | "
              f"{plain_seconds / row['seconds']:.2f}x | {row['pad_fraction']:.3f} | {row['micro_batches']} | {peak} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "layers": layers, "vocab": vocab, "sequences": n, "tokens": tokens,
                       "budget": budget, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
