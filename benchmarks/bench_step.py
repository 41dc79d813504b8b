"""Seconds per phase of a train.py step, GRPO vs RLAD, and what the teacher pass costs.

Runs the real `train.py` (vLLM CPU engine, FSDP2, K&K prompts and rewards) for a few steps per method and reads
the per-phase times back from metrics.jsonl (the first step, which warms up, is dropped). Two model sizes:
  tiny   configs/tiny_cpu.toml: ~0.1M-parameter student, ~0.8M teacher
  0.6b   random models with Qwen3-0.6B's layer shapes (hidden 1024, 16 heads / 8 KV, head_dim 128, MLP 3072,
         tied) and a Qwen3-1.7B-shaped teacher (hidden 2048, MLP 6144); the tiny 512-token vocabulary (vLLM
         needs vocab == tokenizer), so the LM heads are small; --layers sets the depth (28 = the real one)
The paper's claim to check: RLAD's only extra work is the teacher pass, so
    step(RLAD) / step(GRPO)  ~=  1 + teacher / step(GRPO).

    python benchmarks/bench_step.py                      # tiny, 6 steps per method
    python benchmarks/bench_step.py --shape 0.6b --layers 4 --steps 3
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PHASES = ("rollout", "reward", "teacher", "old_logp", "update", "sync", "step")
SHAPES = {"0.6b": dict(hidden_size=1024, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
                       tie_word_embeddings=True),
          "1.7b": dict(hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=6144,
                       tie_word_embeddings=True)}


def run(method, args, work, models):
    run_dir = os.path.join(work, f"{args.shape}_{method}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"),
           "--run_dir", run_dir, "--method", method, "--max_steps", str(args.steps), "--eval_every", "0",
           "--save_every", "0", "--prompts_per_step", str(args.prompts), "--group_size", str(args.group_size),
           "--max_tokens", str(args.max_tokens), "--mini_batches", "1"]
    if models:
        cmd += ["--model", models[0], "--teacher", models[1], "--kv_cache_memory_mb", "512"]
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f][1:]  # drop the warm-up step
    return {k: sum(m[f"time/{k}"] for m in lines) / len(lines) for k in PHASES} | {
        "tokens_per_s": sum(m["tokens_per_s"] for m in lines) / len(lines)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("tiny", "0.6b"), default="tiny")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 0.6b-shaped models (real: 28)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: stable on a shared machine)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        models = None
        if args.shape == "0.6b":
            import tiny
            tok = tiny.make_tokenizer()
            models = [tiny.save_tiny(os.path.join(work, name), tok, num_layers=args.layers, seed=i, **SHAPES[shape])
                      for i, (name, shape) in enumerate([("student", "0.6b"), ("teacher", "1.7b")])]
        res = {m: run(m, args, work, models) for m in ("grpo", "rlad")}
    print(f"\nshape={args.shape} layers={args.layers if args.shape != 'tiny' else '-'} steps={args.steps} threads={args.threads} "
          f"prompts={args.prompts} x G={args.group_size}, max_tokens={args.max_tokens}; seconds per step (mean)")
    print("| method | " + " | ".join(PHASES) + " | tokens/s |")
    print("|---" * (len(PHASES) + 2) + "|")
    for m, r in res.items():
        print(f"| {m} | " + " | ".join(f"{r[k]:.3f}" for k in PHASES) + f" | {r['tokens_per_s']:.0f} |")
    g, r = res["grpo"], res["rlad"]
    print(f"RLAD / GRPO step time = {r['step'] / g['step']:.3f};  1 + teacher / GRPO step = "
          f"{1 + r['teacher'] / g['step']:.3f}")


if __name__ == "__main__":
    main()
