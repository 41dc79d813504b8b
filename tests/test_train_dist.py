"""train.py across ranks: real torchrun, gloo, FSDP2 on CPU.

- The update of 2 ranks equals the update of 1 rank on the same responses (SGD with lr 1, so weights = w - grad:
  gradients are compared to 1e-5), while the ranks keep different numbers of groups after the zero-advantage
  filter and so run different numbers of real micro-batches.
- A real 2-rank run of the tiny preset (a vLLM engine per rank, teacher, eval, checkpoint) finishes cleanly and
  samples exactly what a 1-rank run samples (rollout and eval seeds follow each prompt's global position).
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One torch thread per process: on a busy 2-core machine two OpenMP threads per process spin against the other
# processes and run ~10x slower (measured); torchrun sets the same for its workers.
ENV = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def test_collective_timeout_is_honoured_on_gloo():
    """Config.dist_timeout_min reaches the process group: with 0.1 min (6 s) a rank waiting 30 s for its peer
    fails after about 6 s instead of hanging (gloo honours the timeout like NCCL)."""
    helper = os.path.join(ROOT, "tests", "train_helper.py")
    p = subprocess.run(TORCHRUN + [helper, "timeout", "0.1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    out = p.stdout + p.stderr
    waited = re.search(r"rank 0: all_reduce failed after ([\d.]+) s", out)
    assert p.returncode != 0 and waited, out[-3000:]
    assert 5 <= float(waited.group(1)) < 25, out[-3000:]


@pytest.mark.parametrize("method", ["rlad", "grpo"])
def test_two_ranks_give_the_one_rank_gradient(tmp_path, tiny_model_dir, method):
    """The 2-rank update equals the 1-rank one, and so do the merged metrics. Rank 1 holds fewer rows, so it runs
    placeholder micro-batches: with grpo (rows without teacher log-probs) they once added teacher metrics on rank 1
    alone, and the merge failed."""
    helper = os.path.join(ROOT, "tests", "train_helper.py")
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    out1 = launch([sys.executable, helper, "update", one, tiny_model_dir, "0", method])
    out2 = launch(TORCHRUN + [helper, "update", two, tiny_model_dir, "0", method])
    kept = dict(re.findall(r"rank (\d): kept (\d+) rows", out2))
    assert kept == {"0": "8", "1": "4"}, out2[-2000:]  # group 3 (rank 1) filtered: uneven ranks
    assert "rank 0: kept 12 rows" in out1
    w1, w2 = torch.load(one)["weights"], torch.load(two)["weights"]
    import safetensors.torch
    w0 = safetensors.torch.load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-2  # the update is not trivially empty
    assert max((w1[k] - w2[k]).abs().max().item() for k in w0) < 1e-5
    m1, m2 = torch.load(one)["metrics"], torch.load(two)["metrics"]
    assert m1.keys() == m2.keys() and ("teacher_log_ratio" in m1) == (method == "rlad")
    m1.pop("pad_frac"), m2.pop("pad_frac")  # the padding depends on how rows are split into micro-batches
    assert m2 == pytest.approx(m1, rel=1e-4, abs=1e-6)


def test_ranks_with_different_metrics_stop_with_their_names():
    """A metric recorded on one rank only would misalign the one all-gather that merges a step's metrics (gloo
    raises a size error, NCCL may hang): Metrics.reduce compares the names first and stops every rank with them."""
    helper = os.path.join(ROOT, "tests", "train_helper.py")
    p = subprocess.run(TORCHRUN + [helper, "metrics"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "rank 0: the ranks recorded different metrics" in out and "rank 1: the ranks recorded" in out, out[-3000:]
    assert "teacher_log_ratio" in out, out[-3000:]


def test_hsdp_2x2_gives_the_one_rank_gradient(tmp_path, tiny_model_dir):
    """4 gloo ranks laid out as 2 replicas x 2 shards (shard_group 2, the layout of 2 nodes of 2 GPUs): the
    update equals the 1-rank update within 1e-5; ranks hold 1 group each, and rank 3's is filtered (dummies)."""
    helper = os.path.join(ROOT, "tests", "train_helper.py")
    one, four = str(tmp_path / "one.pt"), str(tmp_path / "four.pt")
    launch([sys.executable, helper, "update", one, tiny_model_dir])
    out = launch(TORCHRUN[:-1] + ["4", helper, "update", four, tiny_model_dir, "2"])
    assert dict(re.findall(r"rank (\d): kept (\d+) rows", out)) == {"0": "4", "1": "4", "2": "4", "3": "0"}, out
    assert out.count("mesh (2, 2)") == 4, out  # replicate x shard, not a flat mesh of 4
    w1, w4 = torch.load(one)["weights"], torch.load(four)["weights"]
    assert max((w1[k] - w4[k]).abs().max().item() for k in w1) < 1e-5


def test_two_rank_tiny_preset_run_samples_like_one_rank(tmp_path):
    """2 ranks and 1 rank draw the same rollouts and eval samples: seeds follow each prompt's global position."""
    flags = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--max_steps", "2", "--eval_every", "2",
             "--save_every", "2"]
    runs = {}
    for name, cmd in (("two", TORCHRUN), ("one", [sys.executable])):
        run_dir = str(tmp_path / name)
        launch(cmd + [os.path.join(ROOT, "train.py")] + flags + ["--run_dir", run_dir])
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f]
    metrics = runs["two"]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1]["logprob_mismatch_max"] < 1e-4  # both ranks' engines got the synced weights
    assert "eval_accuracy" in metrics[-1] and metrics[-1]["kept_rows"] == 16  # 4 prompts x 4 samples, all ranks
    ckpt = os.path.join(tmp_path, "two", "checkpoints", "step_000002")
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"} <= set(os.listdir(ckpt))
    # Step 1 samples from identical weights; step 2's eval from weights equal up to the gradient's reduction order.
    same = ["reward", "accuracy", "format_ok", "response_len", "response_len_max", "truncated", "tokens_generated"]
    assert {k: metrics[0][k] for k in same} == pytest.approx({k: runs["one"][0][k] for k in same}, rel=1e-9)
    evals = [k for k in metrics[-1] if k.startswith("eval")]
    assert {k: metrics[-1][k] for k in evals} == pytest.approx({k: runs["one"][-1][k] for k in evals}, rel=1e-9)


@pytest.mark.parametrize("ranks", [1, 2])
def test_default_config_with_hub_names_runs_offline(hub_cache, tmp_path, ranks):
    """`train.py` with its default config (Qwen/Qwen3-0.6B <- Qwen/Qwen3-8B, K&K, 2048-token responses), cut
    down only in steps and batch, from a hub cache on disk with HF_HUB_OFFLINE=1: names resolve to the cached
    snapshots for the engine, student, teacher and tokenizer, and the run reaches its last step and checkpoint."""
    cmd = ([sys.executable] if ranks == 1 else TORCHRUN) + [
        os.path.join(ROOT, "train.py"), "--max_steps", "1", "--prompts_per_step", "2", "--group_size", "2",
        "--eval_per_level", "1", "--run_dir", str(tmp_path)]
    env = dict(ENV, HF_HUB_CACHE=hub_cache, HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert re.search(r"student Qwen/Qwen3-0.6B \(.*models--Qwen--Qwen3-0.6B/snapshots/", out), out[-3000:]
    assert re.search(r"teacher Qwen/Qwen3-8B \(.*models--Qwen--Qwen3-8B/snapshots/", out), out[-3000:]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1] and "eval/PPL8" in metrics[0]
    assert metrics[0]["tokens_trained"] > 0 and metrics[0]["teacher_log_ratio_abs"] > 0  # the teacher pass ran
    assert os.path.isfile(tmp_path / "checkpoints" / "step_000001" / "model.safetensors")
    # A name that is not cached is a one-line error naming the fix, before any model loads.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--teacher", "Qwen/Qwen3-32B", "--run_dir",
                        str(tmp_path / "missing")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "--teacher Qwen/Qwen3-32B: not a local directory" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert "hf download Qwen/Qwen3-32B" in p.stderr


def test_ranks_that_find_different_checkpoints_stop_before_training(tmp_path):
    """--resume where run_dir is not one directory for every rank (here a relative path, each rank working in a
    directory of its own; on several nodes, a node's local disk): rank 0 finds the step-2 checkpoint, rank 1 none.
    Both stop at start-up with the cause instead of training from different steps."""
    flags = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--max_steps", "2", "--eval_every", "0",
             "--save_every", "2", "--log_samples_every", "0", "--run_dir", "run"]
    first, second = tmp_path / "node0", tmp_path / "node1"
    first.mkdir()
    second.mkdir()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + flags, cwd=first, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and os.listdir(first / "run" / "checkpoints") == ["step_000002"], p.stderr[-3000:]
    helper = os.path.join(ROOT, "tests", "train_helper.py")
    made = first / "run" / "models"  # absolute model paths, as hub names would be on every node
    models = ["--model", str(made / "tiny"), "--teacher", str(made / "tiny-teacher")]
    p = subprocess.run(TORCHRUN + [helper, "apart", str(first), str(second)] + flags + models +
                       ["--max_steps", "4", "--resume", "true"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert (f"--resume: rank 0 finds the step-2 checkpoint in {first / 'run'}, another rank no checkpoint: run_dir "
            "must be one directory every rank sees") in out, out[-3000:]
    assert f"--resume: rank 1 finds no checkpoint in {second / 'run'}, another rank the step-2 checkpoint" in out
    assert not (first / "run" / "checkpoints" / "step_000004").exists()


@pytest.mark.parametrize("method", ["sft", "topd", "topk_kd", "distill"])
def test_every_kind_of_method_trains_on_two_ranks(tmp_path, method):
    """Each method's own path (the SFT targets, TOP-D's step-level advantages, the teacher's top-k, no pi_old) at 2
    ranks, two PPO epochs, and as many mini-batches as the step has rows: each mini-batch holds one row, so one rank
    runs a placeholder micro-batch in every one. The step merges its metrics and trains (rlad and grpo: the update
    tests above)."""
    run_dir = str(tmp_path / method)
    rows = 4 if method == "sft" else 16  # 4 prompts x (1 target, or 4 samples)
    launch(TORCHRUN + [os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"),
                       "--method", method, "--task", "examples.lowercase:task", "--max_prompt_tokens", "256",
                       "--max_tokens", "16", "--kd_topk", "8", "--mini_batches", str(rows), "--ppo_epochs", "2",
                       "--max_steps", "1", "--eval_every", "0", "--save_every", "0", "--run_dir", run_dir])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["grad_norm"] > 0, metrics
    assert metrics[0]["kept_rows"] == rows, metrics
