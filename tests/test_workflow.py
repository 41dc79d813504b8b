"""The researcher's workflow on real runs: sample logs and their page, a task of your own (docs/own_task.md's
example, and plugins that break their contract), and the CPU quick start that learns."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a user's shell has: no vLLM / inductor variables (train.py sets them on a CPU build), one thread per process
# only because the suite runs beside other jobs on 2 cores.
ENV = {k: v for k, v in os.environ.items() if k not in ("TORCH_COMPILE_DISABLE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
QUICK = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs",
                                                                                  "cpu_quickstart.toml")]


def train(args, run_dir, env=ENV, ok=True):
    p = subprocess.run(args + ["--run_dir", str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert (p.returncode == 0) == ok, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_cpu_quickstart_learns_and_logs_samples(tmp_path):
    """configs/cpu_quickstart.toml as a user runs it (no environment set up): the reward climbs; sample logs and
    their HTML page are written. (interface change: TensorBoard is gone; metrics.jsonl and wandb remain)"""
    train(QUICK + ["--max_steps", "12", "--log_samples_every", "6"], tmp_path)
    rewards = [m["reward"] for m in metrics(tmp_path)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    lines = [json.loads(ln) for ln in open(tmp_path / "samples" / "step_000012.jsonl")]
    assert 1 <= len(lines) <= 4 and all(len(g["samples"]) == 8 for g in lines)
    for s in (s for g in lines for s in g["samples"]):
        n = len(s["token_ids"])
        assert len(s["tokens"]) == len(s["student_logp"]) == len(s["clipped"]) == n > 0
        assert s["teacher_logp"] is None and s["teacher"] is None  # grpo: no teacher
        assert all(lp <= 0 for lp in s["student_logp"]) and "".join(s["tokens"]).startswith(s["response"][:4])
    from tools import show
    page = show.show(str(tmp_path))
    assert os.path.isfile(page) and lines[0]["samples"][0]["tokens"][0] in open(page).read()


def test_own_task_example_trains_with_rlad_and_logs_the_teacher(tmp_path):
    """docs/own_task.md shows examples/lowercase.py unchanged, and train.py trains and evaluates on it with a
    teacher: the sample log's per-token teacher relation follows logp_S - logp_T and the TRRD clamp."""
    doc = open(os.path.join(ROOT, "docs", "own_task.md")).read()
    assert open(os.path.join(ROOT, "examples", "lowercase.py")).read() in doc
    train(QUICK + ["--method", "rlad", "--max_steps", "3", "--log_samples_every", "3", "--eval_every", "3"], tmp_path)
    assert all(m["teacher_log_ratio_abs"] > 0 for m in metrics(tmp_path))
    assert 0 <= metrics(tmp_path)[-1]["eval/all"] <= 1  # evaluated on its own "eval" split, with its own scorer
    lines = [json.loads(ln) for ln in open(tmp_path / "samples" / "step_000003.jsonl")]
    clamp = lines[0]["options"]["teacher_clamp"]
    for s in (s for g in lines for s in g["samples"]):
        for lp_s, lp_t, rel in zip(s["student_logp"], s["teacher_logp"], s["teacher"]):
            gap = lp_s - lp_t
            assert rel == ("prefers" if gap <= -clamp else "rejects" if gap >= clamp else "agrees")


@pytest.mark.parametrize("body, message", [
    ("def score(examples, responses):\n    raise KeyError('reward')\n", "score() raised KeyError"),
    ("def score(examples, responses):\n    return [{'reward': 1.0, 'correct': True, 'format_ok': True}]\n",
     "score() must return one {reward, correct, format_ok} dict per response (8), got 1 items"),  # one group
])
def test_a_plugin_that_breaks_its_contract_is_named(tmp_path, body, message):
    (tmp_path / "bad_task.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom examples.lowercase import task as good\n\n\nclass task:\n"
        "    examples = good.examples\n\n    @staticmethod\n    %s" % (ROOT, body.replace("\n", "\n    ")))
    p = train(QUICK + ["--task", "bad_task:task", "--max_steps", "2"], tmp_path / "run",
              env=dict(ENV, PYTHONPATH=str(tmp_path)), ok=False)
    assert f"--task bad_task:task: {message}" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]


def test_a_task_that_cannot_be_imported_is_a_one_line_error(tmp_path):
    p = train(QUICK + ["--task", "no_such_module:task"], tmp_path, ok=False)
    assert p.stderr.strip().splitlines()[-1].startswith("--task no_such_module:task: cannot import task"), p.stderr
