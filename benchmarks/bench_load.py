"""Peak host memory per rank while loading a sharded model from a bf16 checkpoint into fp32 masters: policy.load (rank 0 reads, the other ranks build on
the meta device and receive their shards) against every rank reading the checkpoint before FSDP2 shards it.

    python benchmarks/bench_load.py                 # 2 gloo ranks, a ~125M-parameter Qwen3 (476 MiB in fp32)
    python benchmarks/bench_load.py --ranks 4 --hidden 1024

Each contender runs in fresh torchrun processes; a rank reports its peak RSS (VmHWM) after the load, and the
RSS of a rank that only imported torch and transformers is printed as the floor.
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(mode: str, model_dir: str):
    sys.path.insert(0, ROOT)
    import policy
    import train
    from transformers import AutoModelForCausalLM  # noqa: F401  (imported by both contenders)
    rank, world, device = train.setup_distributed()
    before = rss("VmRSS")
    if mode == "every-rank-reads":  # what policy.load did before: from_pretrained on each rank, then shard
        import torch
        model = policy.load(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), device, world)
    elif mode == "rank0-reads":
        model = policy.load(model_dir, device, world)
    local = sum(p.to_local().numel() * 4 for p in model.parameters()) if mode != "floor" else 0
    print(f"RESULT {mode} rank {rank}: rss before {before / 2**20:.0f} MiB, peak {rss('VmHWM') / 2**20:.0f} MiB, "
          f"shard {local / 2**20:.0f} MiB", flush=True)


def rss(key: str) -> int:
    return int([ln for ln in open("/proc/self/status") if ln.startswith(key)][0].split()[1]) * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32768)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import tiny
    out = tempfile.mkdtemp(prefix="bench_load_")
    tok = tiny.make_tokenizer()
    model = tiny.make_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                            num_kv_heads=max(args.hidden // 256, 1), head_dim=64, intermediate_size=args.hidden * 8 // 3)
    model.resize_token_embeddings(args.vocab)
    import torch
    model.to(torch.bfloat16).save_pretrained(out)  # hub checkpoints are bf16: fp32 masters need a private copy
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.0f}M parameters, a bf16 checkpoint loaded as fp32 masters ({params * 4 / 2**20:.0f} "
          f"MiB), {args.ranks} gloo ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    for mode in ("floor", "every-rank-reads", "rank0-reads"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
               os.path.abspath(__file__), "--worker", mode, out]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = sorted(ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("RESULT"))
        print("\n".join(lines) if lines else (p.stdout + p.stderr)[-2000:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
