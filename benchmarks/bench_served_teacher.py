"""Benchmark the teacher pass, local against served: tokens/s of teacher.Teacher (the frozen model in this
process) and teacher.ServedTeacher (the same checkpoint behind vLLM's OpenAI server) on the same rows, the
contenders alternating round by round so that machine noise hits both alike.

    python benchmarks/bench_served_teacher.py                    # starts a server on 127.0.0.1 itself (CPU)
    python benchmarks/bench_served_teacher.py --url http://HOST:8000/v1 --model-dir DIR   # a server of yours

Model: bench_teacher.py's CPU shape (Qwen3-0.6B's hidden 1024, intermediate 3072, 16 heads, 8 KV heads, head_dim
128, tied embeddings; 4 layers, vocab 16384), float32 on both sides, random weights, tiny.py's tokenizer (ids are
drawn below its size, so the server can detokenize them). Lengths: bench_teacher.make_lengths. tokens/s counts
prompt + response tokens per sequence. The parse row times the regex that turns vLLM's answer into floats.
On a CPU both contenders share the same cores (server and trainer would not on GPUs): the numbers compare the
code paths, not a deployment.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_teacher  # noqa: E402
import teacher  # noqa: E402
import tiny  # noqa: E402


def write_model(out, layers, vocab):
    tok = tiny.make_tokenizer()
    model = bench_teacher.make_model(layers, vocab, torch.float32, "cpu", "sdpa")
    model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return len(tok)


def start_server(model_dir, threads, log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                             "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--dtype",
                             "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(512 * 2**20)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (log: {log.name})")
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no server after 300 s (log: {log.name})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="", help="a running server's /v1 URL (default: start one here)")
    ap.add_argument("--model-dir", default="", help="the checkpoint that server serves (with --url)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--max-response", type=int, default=768)
    ap.add_argument("--budget", type=int, default=4096, help="token budget of a forward / of a request")
    ap.add_argument("--in-flight", type=int, default=8, help="ServedTeacher's concurrent requests")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and OMP threads of the server")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_served_")
    model_dir, proc = args.model_dir or os.path.join(work, "model"), None
    id_range = args.vocab if args.model_dir else write_model(model_dir, args.layers, args.vocab)
    log = open(os.path.join(work, "server.log"), "w")
    url = args.url or None
    try:
        if url is None:
            proc, url = start_server(model_dir, args.threads, log)
        p_lens, r_lens = bench_teacher.make_lengths(args.sequences, args.max_response, args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        seqs = [(torch.randint(0, id_range, (p,), generator=g).tolist(),
                 torch.randint(0, id_range, (r,), generator=g).tolist()) for p, r in zip(p_lens, r_lens)]
        tokens = sum(p + r for p, r in zip(p_lens, r_lens))
        contenders = {"local (teacher.Teacher)": teacher.Teacher(model_dir, device="cpu", token_budget=args.budget),
                      f"served (ServedTeacher, {args.in_flight} in flight)":
                          teacher.ServedTeacher(url, token_budget=args.budget, max_in_flight=args.in_flight)}
        print(f"{args.sequences} sequences, {tokens} tokens (response {min(r_lens)}..{max(r_lens)}), {args.layers} "
              f"layers, vocab {args.vocab}, float32, budget {args.budget}, {args.threads} thread(s) each, {url}")
        results, outs = {name: [] for name in contenders}, {}
        for t in contenders.values():
            t.logprobs(seqs[:2])  # warm-up
        for _ in range(args.rounds):  # alternate: local, served, local, served, ...
            for name, t in contenders.items():
                start = time.perf_counter()
                outs[name] = t.logprobs(seqs)
                results[name].append(tokens / (time.perf_counter() - start))
        local = next(iter(outs.values()))
        print("\n| teacher pass | tokens/s (median) | min | max | max gap to local |")
        print("|---|---|---|---|---|")
        for name, rates in results.items():
            gap = max((a - b).abs().max().item() for a, b in zip(outs[name], local))
            print(f"| {name} | {statistics.median(rates):.0f} | {min(rates):.0f} | {max(rates):.0f} | {gap:.1e} |")
        served = list(contenders.values())[1]
        raw = served._request(served.urls, "/completions", {"prompt": [p + r for p, r in seqs], "max_tokens": 1,
                                                            "prompt_logprobs": 0})
        parsers = {"regex + float (teacher.py)": lambda: list(map(float, teacher._LOGPROB.findall(raw))),
                   "json.loads + comprehension": lambda: [next(iter(e.values()))["logprob"] for c in
                                                          json.loads(raw)["choices"] for e in c["prompt_logprobs"][1:]]}
        assert parsers["regex + float (teacher.py)"]() == parsers["json.loads + comprehension"]()
        for name, parse in parsers.items():
            start = time.perf_counter()
            for _ in range(10):
                parse()
            print(f"parse {len(raw) / 1e6:.1f} MB answer, {name}: {(time.perf_counter() - start) / 10 * 1e3:.1f} ms")
    finally:
        if proc is not None:
            os.killpg(proc.pid, 9)
            proc.wait()


if __name__ == "__main__":
    main()
