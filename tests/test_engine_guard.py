"""The guard on the rollout engine's weights (train.check_engine, --max_logprob_mismatch), on the real vLLM CPU engine.

- The engine's weights corrupted at the second sync: the run stops at step 2, before its first optimizer step, with
  one line that gives the measured mismatch, the likely causes and the flag; the student's weights are step 1's.
- The engine's log-probs are those of the distribution it sampled from (processed_logprobs): at temperature 0.7 the
  mismatch against the trainer's (which divide the logits by 0.7) is float32 noise, where vLLM's raw log-probs
  would differ by a tenth of a nat.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
TOY = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--task", "examples.lowercase:task",
       "--max_prompt_tokens", "256", "--max_tokens", "16", "--eval_every", "0", "--method", "grpo"]

# train.main with the engine's load_weights wrapped: from the second sync on, every tensor reaches the engine with
# noise ten times its own spread added (what a garbled sync looks like to the sampler). The run's state is kept for
# the check.
CORRUPT = """
import sys, torch
sys.path.insert(0, {root!r})
import policy, rollout, train
real_load, calls, kept = rollout.VLLMEngine.load_weights, [], {{}}
def corrupt(self, named_tensors):
    calls.append(1)
    if len(calls) >= 2:
        named_tensors = ((name, tensor + torch.randn_like(tensor) * 10 * tensor.std()) for name, tensor in named_tensors)
    return real_load(self, named_tensors)
rollout.VLLMEngine.load_weights = corrupt
real_setup = train.setup
train.setup = lambda *a, **k: kept.setdefault("run", real_setup(*a, **k))
try:
    train.main(train.parse_config(sys.argv[1:]))
except SystemExit as e:
    torch.save({{n: t.clone() for n, t in policy.full_params(kept["run"].student)}}, {out!r})
    raise
"""


def test_a_corrupted_engine_stops_the_run_before_the_update(tmp_path):
    import safetensors.torch
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "weights.pt")
    script = tmp_path / "corrupt.py"
    script.write_text(CORRUPT.format(root=ROOT, out=out))
    p = subprocess.run([sys.executable, str(script)] + TOY + ["--max_steps", "3", "--save_every", "1",
                                                              "--run_dir", run_dir],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.startswith("logprob_mismatch ")]  # beside tqdm's bar
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-3000:]
    last = lines[0]
    assert "> --max_logprob_mismatch 0.5" in last and "not synced after sleep" in last and "turns the check off" in last
    assert float(last.split()[1]) > 0.5 and "Traceback" not in p.stderr
    steps = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert steps == [1]  # stopped at step 2: no line, no checkpoint for it
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_000001"]
    saved = safetensors.torch.load_file(os.path.join(run_dir, "checkpoints", "step_000001", "model.safetensors"))
    now = torch_load(out)
    assert now.keys() == saved.keys() and all(now[name].equal(saved[name]) for name in saved)  # no update applied


def torch_load(path):
    import torch
    return torch.load(path)


def test_an_intact_engine_at_temperature_0_7_matches_the_trainer(tmp_path):
    run_dir = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "train.py"] + TOY + ["--max_steps", "2", "--temperature", "0.7",
                                                             "--save_every", "0", "--run_dir", run_dir],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert all(m["logprob_mismatch"] < 1e-5 and m["logprob_mismatch_max"] < 1e-4 for m in metrics), metrics
