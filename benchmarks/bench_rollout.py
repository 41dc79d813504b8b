"""Benchmark rollout.py: what the VLLMEngine wrapper costs over bare vLLM, and how long a weight sync takes.

1. Generation tokens/s through VLLMEngine.generate vs a bare vllm.LLM.generate on the same engine, prompts
   and sampling parameters (logprobs of the sampled tokens included in both: the trainer needs them).
   Calls alternate and repeat; the best of the repeats is reported (the machine is shared: the minimum is
   the least disturbed run), as wall-clock tokens/s and as tokens per CPU-second of this process (less
   sensitive to other processes). The wrapper should cost under 5%. The bare calls run under the same
   torch thread count as VLLMEngine.generate (vLLM's serving count, see rollout.py).
2. Weight-sync seconds (VLLMEngine.load_weights from a model's named_parameters()) for the tiny test model
   and for a Qwen3-0.6B-shaped random model (28 layers, hidden 1024, 16/8 heads, head_dim 128,
   intermediate 3072, tied embeddings, bf16) with the tiny 512-token vocabulary instead of 151,936 (vLLM
   needs vocab_size == len(tokenizer) and no model hub is reachable; the embedding is 0.5M instead of 156M
   parameters, so the 0.6B-shaped model has 0.44B parameters). Also the process's peak-RSS growth during
   each sync: well under the model's size means no second full copy of the weights was built. With glibc's
   defaults the first sync grows RSS by about the model's size, later ones by ~0: glibc keeps the freed
   per-layer buffers. Run with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 to see the live peak:
   measured 24-26 MiB per sync of the 0.6B-shaped model, i.e. about one decoder layer.

    TORCH_COMPILE_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/bench_rollout.py [--skip-06b]
"""
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rollout  # noqa: E402
import tiny  # noqa: E402


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def bench_generate(model_dir: str, tok, repeats: int = 10) -> None:
    from vllm import SamplingParams
    engine = rollout.VLLMEngine(model_dir, dtype="float32", max_model_len=512, max_num_seqs=64,
                                kv_cache_memory_bytes=256 * 2**20)
    texts = ["Alice said that Bob is a knight.", "Solve: 2x + 1 = 2", "Who is a knave?", "Find the sum of 1 and 2"]
    prompts = [tok(t)["input_ids"] for t in texts] * 4  # 16 prompts
    n, max_tokens = 4, 64  # 64 samples per call, up to 4K tokens

    def ours():
        out = engine.generate(prompts, n=n, max_tokens=max_tokens, temperature=1.0, seed=0)
        return sum(len(s["response_ids"]) for o in out for s in o)

    def bare():
        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, seed=i * n, logprobs=0,
                                 flat_logprobs=True, detokenize=False) for i in range(len(prompts))]
        out = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in out for c in o.outputs)

    def bare_default():  # vLLM's default output format: per-token logprob dicts and detokenized text
        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, seed=i * n, logprobs=0)
                  for i in range(len(prompts))]
        out = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in out for c in o.outputs)

    with rollout.torch_threads(engine.engine_threads):
        ours(), bare()  # warm-up
    names = ["VLLMEngine.generate", "bare LLM.generate (same params)", "bare LLM.generate (defaults)"]
    wall, cpu = {k: [] for k in names}, {k: [] for k in names}
    for _ in range(repeats):
        for name, fn in zip(names, (ours, bare, bare_default)):
            start, start_cpu = time.perf_counter(), time.process_time()
            with rollout.torch_threads(engine.engine_threads):  # bare vLLM under the wrapper's thread count
                tokens = fn()
            wall[name].append(tokens / (time.perf_counter() - start))
            cpu[name].append(tokens / (time.process_time() - start_cpu))
    print(f"generation, {len(prompts)} prompts x n={n}, max_tokens={max_tokens}, {tokens} tokens per call "
          f"(best of {repeats}):")
    for k in names:
        print(f"  {k:34s} {max(wall[k]):8.0f} tokens/s wall   {max(cpu[k]):8.0f} tokens/CPU-s")
    ours_, bare_ = names[0], names[1]
    print(f"  wrapper / bare (same params): wall {max(wall[ours_]) / max(wall[bare_]):.3f}, "
          f"CPU {max(cpu[ours_]) / max(cpu[bare_]):.3f}  (1.0 = free, < 0.95 = over budget)")

    # The same question without the machine's noise: the share of VLLMEngine.generate's time spent outside
    # vLLM's own LLM.generate (argument checks, seeds, building the result dicts, thread switching).
    inside, real_generate = [], engine.llm.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = real_generate(*args, **kwargs)
        inside.append(time.perf_counter() - start)
        return out

    engine.llm.generate = timed_generate  # a timing shim on this benchmark's own engine instance
    total = []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        total.append(time.perf_counter() - start)
    engine.llm.generate = real_generate
    overhead = [(t - i) / t for t, i in zip(total, inside)]
    print(f"  wrapper's own share of VLLMEngine.generate time: median {100 * statistics.median(overhead):.2f}% "
          f"(max {100 * max(overhead):.2f}%)")
    engine.shutdown()


def bench_sync(name: str, model_dir: str, dtype: str, repeats: int = 3) -> None:
    from transformers import AutoModelForCausalLM
    engine = rollout.VLLMEngine(model_dir, dtype=dtype, max_model_len=256, max_num_seqs=8,
                                kv_cache_memory_bytes=64 * 2**20)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    bytes_ = sum(p.numel() * p.element_size() for p in model.parameters())
    times, growth = [], []
    for _ in range(repeats):
        reset_peak_rss()
        before = rss_mib("VmRSS")
        start = time.perf_counter()
        engine.load_weights(model.named_parameters())
        times.append(time.perf_counter() - start)
        growth.append(rss_mib("VmHWM") - before)
    print(f"weight sync, {name}: {params / 1e6:.1f}M params, {bytes_ / 2**20:.0f} MiB {dtype}: "
          f"median {statistics.median(times):.3f} s (runs {', '.join(f'{t:.3f}' for t in times)}), "
          f"peak RSS growth per sync {', '.join(f'{g:.0f}' for g in growth)} MiB")
    engine.shutdown()


def main():
    tok = tiny.make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
        small = tiny.save_tiny(os.path.join(tmp, "tiny"), tok)
        bench_generate(small, tok)
        bench_sync("tiny test model", small, "float32")
        if "--skip-06b" not in sys.argv:
            start = time.perf_counter()
            model = tiny.make_model(tok, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                                    head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
                                    max_position_embeddings=4096).to(torch.bfloat16)
            big = os.path.join(tmp, "qwen3_06b_shape")
            model.save_pretrained(big)
            tok.save_pretrained(big)
            del model
            print(f"(built the 0.6B-shaped model in {time.perf_counter() - start:.1f} s)")
            bench_sync("Qwen3-0.6B shape, vocab 512", big, "bfloat16")


if __name__ == "__main__":
    main()
