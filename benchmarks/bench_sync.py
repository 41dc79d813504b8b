"""The weight sync's gather on CPU ranks: policy.full_params of an FSDP2 student in its fp32 masters against a
cast to bf16 before the gather (what train.py streams into a bf16 engine on GPU): seconds and bytes per rank.

    python benchmarks/bench_sync.py                 # 2 gloo ranks, a Qwen3-0.6B shape (28 layers, vocab 151936)
    python benchmarks/bench_sync.py --layers 4      # quicker

Bytes moved per rank by an all-gather of a tensor of B bytes over W ranks: B (W - 1) / W received. Contenders
alternate, three rounds each; the minimum of each is printed (the machine is shared).
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(layers: int):
    sys.path.insert(0, ROOT)
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    import policy
    import train
    rank, world, device = train.setup_distributed()
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = policy.load(Qwen3ForCausalLM(config), device, world)
    times = {"fp32": [], "bf16": []}
    for _ in range(3):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            start, moved = time.perf_counter(), 0
            for _, t in policy.full_params(model, dtype):
                moved += t.numel() * t.element_size() * (world - 1) / world
            times[name].append((time.perf_counter() - start, moved))
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"RESULT {params / 1e6:.0f}M params, {world} ranks")
        for name, runs in times.items():
            seconds, moved = min(runs)
            print(f"RESULT {name}: {seconds:.2f} s, {moved / 2**30:.2f} GiB received per rank")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=28)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
           os.path.abspath(__file__), "--worker", str(args.layers)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln[7:] for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("RESULT")]
    print("\n".join(lines) if lines else (p.stdout + p.stderr)[-3000:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]))
    else:
        main()
