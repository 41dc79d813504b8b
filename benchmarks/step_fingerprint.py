"""Fingerprints of two training steps per method, to check that a refactor changed no number.

Runs train.py (configs/tiny_cpu.toml, real vLLM CPU rollouts, teacher pass, FSDP2 update) for 2 steps of grpo, kdrl,
rlad and distill on examples/lowercase.py (informative advantages from the first step) and of sft on K&K targets,
and prints a SHA-256 of each final checkpoint's weights and of its metrics (wall-clock fields left out). Run it on
two commits and compare the lines: equal hashes mean bit-for-bit equal steps.

    python benchmarks/step_fingerprint.py [OUT_DIR]      # ~2 minutes on 2 cores
"""
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_TASK = ["--task", "examples.lowercase:task", "--max_prompt_tokens", "256", "--max_tokens", "16"]


def fingerprint(run_dir: str) -> tuple:
    from safetensors.torch import load_file
    ckpt = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))[-1]
    weights = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        tensors = load_file(path)
        for name in sorted(tensors):
            weights.update(name.encode() + tensors[name].float().numpy().tobytes())
    keep = lambda k: not k.startswith(("time/", "mem/")) and not k.endswith("_per_s")  # noqa: E731
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    metrics = json.dumps([{k: v for k, v in m.items() if keep(k)} for m in lines], sort_keys=True)
    return weights.hexdigest()[:16], hashlib.sha256(metrics.encode()).hexdigest()[:16]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="fingerprint_")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for method in ("grpo", "kdrl", "rlad", "distill", "sft"):
        run_dir = os.path.join(out, method)
        cmd = [sys.executable, "train.py", "--config", "configs/tiny_cpu.toml", "--method", method, "--max_steps", "2",
               "--eval_every", "0", "--save_every", "2", "--log_samples_every", "0", "--run_dir", run_dir]
        p = subprocess.run(cmd + ([] if method == "sft" else OWN_TASK), cwd=ROOT, env=env, capture_output=True,
                           text=True)
        if p.returncode:
            print(f"{method:8s} FAILED: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            continue
        weights, metrics = fingerprint(run_dir)
        print(f"{method:8s} weights {weights}  metrics {metrics}", flush=True)


if __name__ == "__main__":
    main()
