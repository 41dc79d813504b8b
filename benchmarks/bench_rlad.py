"""Benchmark rlad.py: chunked vs naive per-token log-probs (time, peak extra memory), the objectives' cost per token.

    python benchmarks/bench_rlad.py                      # CUDA if available, else CPU
    python benchmarks/bench_rlad.py --max-gib 20 --sizes 4096x151936,32768x151936 --chunk-size 1024
    python benchmarks/bench_rlad.py --threads 1 --sizes ""   # objectives only, stable timings on a busy CPU

"naive" is log_softmax(logits.float()).gather(): it builds float32 [T, V] tensors (20 GB at T = 32768, V = 151936).
"plain per chunk" is the same per chunk under activation checkpointing: bounded memory without the hand-written
autograd of kernels.py, whose row says what those Functions save.
Peak memory is the extra memory above what was live before the call: torch's allocator statistics on CUDA; on CPU the
process's peak RSS (Linux VmHWM, reset through /proc/self/clear_refs), with glibc told to return every freed block of
1 MiB or more to the OS at once (MALLOC_MMAP_THRESHOLD_, the script re-executes itself with it), so that RSS follows
live memory. A size whose estimated need exceeds --max-gib is skipped and said so (forward only, no_grad, when
only the backward's [T, V] gradient does not fit).
"""
import argparse
import os
import sys
import time

if sys.platform == "linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # before torch allocates anything
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576"))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlad  # noqa: E402

GIB, MIB = 2**30, 2**20


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return int([line for line in open("/proc/meminfo") if line.startswith("MemAvailable")][0].split()[1]) * 1024


def measure(fn, device):
    """(result, seconds, peak extra bytes) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark to the current RSS
        base = rss("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = rss("VmHWM")
    return out, time.perf_counter() - t0, peak - base


def rss(key):
    return int([line for line in open("/proc/self/status") if line.startswith(key)][0].split()[1]) * 1024


def bench_logprobs(T, V, chunk, device, max_bytes):
    elems, temps = T * V, 3 * chunk * V * 4  # a few float32 [chunk, V] temporaries
    fp32 = 4 * elems
    # estimated need: bf16 logits + (backward) their bf16 gradient + temporaries; naive: + 3 float32 [T, V]
    fwd_only, chunked, naive = 2 * elems + temps, 4 * elems + temps, 4 * elems + 3 * fp32
    row = f"| {T} | {V} |"
    if fwd_only > max_bytes:
        print(f"{row} all | skipped: needs ~{fwd_only / GIB:.1f} GiB > --max-gib {max_bytes / GIB:.1f} | | | | |")
        return
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, V, generator=g, device=device, dtype=torch.bfloat16)  # [T, V] bf16
    logits.requires_grad_(chunked <= max_bytes)
    targets = torch.randint(0, V, (T,), generator=g, device=device)  # [T]
    impls = {"chunked": (chunked, lambda: rlad.token_logprobs(logits, targets, chunk)),
             "plain per chunk": (chunked + temps, lambda: plain_per_chunk(logits, targets, chunk)),
             "entropy": (chunked, lambda: rlad.entropy(logits, chunk)),
             "naive": (naive, lambda: torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]))}
    for name, (need, fn) in impls.items():
        if name == "naive" and need > max_bytes:
            print(f"{row} {name} | skipped: needs ~{need / GIB:.1f} GiB > --max-gib {max_bytes / GIB:.1f} | | | | |")
            continue
        y = None
        try:
            y, t_f, m_f = measure(fn, device)
            if logits.requires_grad:
                _, t_b, m_b = measure(lambda: y.sum().backward(), device)
                bwd = f"{t_b:.3f} | {m_b / MIB:.0f}"
            else:
                bwd = f"skipped: needs ~{need / GIB:.1f} GiB | "
            print(f"{row} {name} | {t_f:.3f} | {m_f / MIB:.0f} | {bwd} | {fp32 / MIB:.0f} |", flush=True)
        except torch.OutOfMemoryError:
            print(f"{row} {name} | out of memory | | | | |")
        del y
        logits.grad = None
    del logits


def plain_per_chunk(logits, targets, chunk):
    """The alternative to kernels.py: log_softmax(float32) of one chunk at a time, recomputed in backward by
    activation checkpointing (what policy.py's chunked LM head would do without the custom autograd Functions)."""
    from torch.utils.checkpoint import checkpoint

    def one(z, t):
        return torch.log_softmax(z.float(), -1).gather(-1, t[:, None]).squeeze(-1)  # [c]
    return torch.cat([checkpoint(one, logits[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
                      for s in range(0, logits.shape[0], chunk)])


def bench_objectives(B, T, device, reps):
    g = torch.Generator(device=device).manual_seed(0)
    logp = -torch.rand(B, T, generator=g, device=device) * 3  # [B, T]
    old = logp + 0.1 * torch.randn(B, T, generator=g, device=device)  # [B, T]
    teacher = logp + torch.randn(B, T, generator=g, device=device)  # [B, T]
    adv = torch.randn(B, generator=g, device=device)  # [B]
    mask = torch.rand(B, T, generator=g, device=device) < 0.9  # [B, T]
    for method, kw in (("grpo", {}), ("kdrl", {"kd_coef": 1e-3}), ("rlad", {}), ("distill", {}),
                       ("rlad", {"kl_coef": 1e-3, "loss_agg": "seq-mean-token-mean"})):
        def step():
            x = logp.detach().requires_grad_()
            loss, metrics = rlad.policy_loss(method, x, old, adv, mask, teacher_logp=teacher, ref_logp=old, **kw)
            loss.backward()
        step()  # warm-up
        times = [measure(step, device)[1] for _ in range(reps)]
        extra = ", ".join(f"{k}={v}" for k, v in kw.items())
        print(f"| {method} {extra} | {B}x{T} | {min(times) * 1e3:.2f} | {min(times) / (B * T) * 1e9:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4096x32768,4096x151936,8192x151936,16384x151936,32768x151936",
                   help="comma-separated TxV logits sizes (bf16)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip sizes needing more (default: half the free memory, at most 8 GiB on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--objective-shape", default="64x2048", help="BxT of the policy_loss benchmark")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (1 gives stable timings on a shared, oversubscribed machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    free = available_bytes(device)
    max_bytes = args.max_gib * GIB if args.max_gib else min(free / 2, 8 * GIB if device.type == "cpu" else free)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    print(f"device {device} ({name}), torch {torch.__version__}, {free / GIB:.1f} GiB free, "
          f"using at most {max_bytes / GIB:.1f} GiB, chunk {args.chunk_size}, logits bf16\n")
    print("| T | V | impl | fwd s | fwd peak extra MiB | bwd s | bwd peak extra MiB | fp32 [T,V] MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size in filter(None, args.sizes.split(",")):  # --sizes "" runs the objectives only
        T, V = map(int, size.lower().split("x"))
        bench_logprobs(T, V, args.chunk_size, device, max_bytes)
    B, T = map(int, args.objective_shape.split("x"))
    print("\n| objective (fwd+bwd of policy_loss) | BxT | ms | ns / token |\n|---|---|---|---|")
    bench_objectives(B, T, device, args.reps)


if __name__ == "__main__":
    main()
