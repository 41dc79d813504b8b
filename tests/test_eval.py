"""eval.py: unbiased Pass@k, Mean@n, the paper's tables, training curves, and evaluation end to end with the
real vLLM CPU engine and the transformers engine on a tiny model."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest

import eval as ev
import tasks
from tools import plot

KK = tasks.load("kk")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- Pass@k, Mean@n

def brute_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert ev.pass_at_k(32, 0, 32) == 0.0
    assert ev.pass_at_k(32, 1, 32) == 1.0  # n = k: "any of the 32 correct"
    assert ev.pass_at_k(32, 32, 1) == 1.0
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # Pass@1 = c / n
    assert ev.pass_at_k(10, 5, 6) == 1.0  # n - c < k: every 6-subset holds a correct sample
    # Large n, where C(n, k) overflows a float: the product form stays exact-ish.
    exact = 1 - math.comb(1000, 500) / math.comb(1100, 500)  # c = 100, k = 500, big ints
    assert ev.pass_at_k(1100, 100, 500) == pytest.approx(float(exact), rel=1e-12)
    assert 0.0 < ev.pass_at_k(2000, 1, 1) < 1e-3
    with pytest.raises(TypeError):
        ev.pass_at_k(4.0, 1, 1)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4, 1, 0)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        ev.pass_at_k(n, c, k)


def test_summarize_by_hand():
    # 3 problems x n = 4: PPL2 has [1,1,0,0] and [0,0,0,0]; PPL3 has [1,1,1,1].
    levels = ["PPL3", "PPL2", "PPL2"]
    correct = [1, 1, 1, 1] + [1, 1, 0, 0] + [0, 0, 0, 0]
    rewards = [3.0] * 4 + [3.0, 3.0, -1.0, -1.0] + [-3.0] * 4
    s = ev.summarize(levels, correct, rewards, n=4, ks=(1, 2, 4))
    assert list(s) == ["PPL2", "PPL3", "average"]  # numeric PPL order, average last
    assert s["PPL2"]["count"] == 2 and s["PPL3"]["count"] == 1
    assert s["PPL2"]["mean_at_n"] == pytest.approx(2 / 8)
    assert s["PPL3"]["mean_at_n"] == 1.0
    # Pass@2 for [1,1,0,0]: 1 - C(2,2)/C(4,2) = 5/6; for all-wrong 0 -> level mean 5/12.
    assert s["PPL2"]["pass_at_k"][2] == pytest.approx(5 / 12)
    assert s["PPL2"]["pass_at_k"][4] == pytest.approx(0.5)
    assert s["PPL2"]["pass_at_k"][1] == pytest.approx(s["PPL2"]["mean_at_n"])
    assert s["PPL2"]["mean_reward"] == pytest.approx((6 - 2 - 12) / 8)
    avg = s["average"]
    assert avg["count"] == 3
    assert avg["mean_at_n"] == pytest.approx((0.25 + 1.0) / 2)  # average of levels, as the paper
    assert avg["mean_at_n_weighted"] == pytest.approx(6 / 12)  # every problem counts the same
    assert avg["pass_at_k"][2] == pytest.approx((5 / 12 + 1.0) / 2)
    assert avg["pass_at_k_weighted"][2] == pytest.approx((5 / 6 + 0 + 1) / 3)
    with pytest.raises(ValueError):
        ev.summarize(levels, correct[:-1], rewards[:-1], n=4)


def test_level_order_math_keeps_first_seen():
    s = ev.summarize(["amc", "aime", "amc"], [1, 0, 0], [1.0, 0.0, 0.0], n=1)
    assert list(s) == ["amc", "aime", "average"]


# ----------------------------------------------------------------------------- tables

def _fixed_kk_summary():
    levels = [f"PPL{i}" for i in range(2, 9) for _ in range(2)]
    # per problem, n = 2: PPL2 all right ... PPL8 all wrong, one wrong sample per level in between
    correct = []
    for i in range(2, 9):
        correct += [1, 1, 1, 1] if i == 2 else [0, 0, 0, 0] if i == 8 else [1, 1, 1, 0]
    return ev.summarize(levels, correct, [0.0] * len(correct), n=2, ks=(1,))


def test_format_table_kk_exact():
    # (interface change: the table's shape follows what was measured, not the task: Mean@n alone, as a fraction)
    table = ev.format_table(_fixed_kk_summary(), name="rlad-0.6b")
    expected = (
        "| model | PPL2 | PPL3 | PPL4 | PPL5 | PPL6 | PPL7 | PPL8 | Avg |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        "| rlad-0.6b | 1.00 | 0.75 | 0.75 | 0.75 | 0.75 | 0.75 | 0.00 | 0.68 |"
    )
    assert table == expected


def test_format_table_math_exact_and_from_json():
    # aime: 2 problems, n = 4, c = 1 and 0; amc: 1 problem, c = 4.
    s = ev.summarize(["aime", "aime", "amc"], [1, 0, 0, 0] + [0] * 4 + [1] * 4, [0.0] * 12, n=4, ks=(1, 4))
    expected = (
        "| model | aime Mean@4 | aime Pass@4 | amc Mean@4 | amc Pass@4 | Avg Mean@4 | Avg Pass@4 |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        "| m | 12.5 | 50.0 | 100.0 | 100.0 | 56.2 | 75.0 |"
    )
    assert ev.format_table(s, name="m") == expected
    # the summary re-read from the results JSON (k keys become strings) gives the same table
    assert ev.format_table(json.loads(json.dumps(s)), name="m") == expected


def test_arith_levels_and_table():
    import tasks  # (interface change: examples come from the task, tasks.load("arith").examples, as train.py's)
    exs = tasks.load("arith").examples("eval", tasks.Source(per_level=2))
    assert [ex["level"] for ex in exs] == [f"L{i}" for i in range(2, 9) for _ in range(2)]
    s = ev.summarize([ex["level"] for ex in exs][::-1], [1] * 14, [1.0] * 14, n=1)
    assert list(s) == [f"L{i}" for i in range(2, 9)] + ["average"]  # numeric order, whatever came first
    assert ev.format_table(s).splitlines()[0] == "| model | L2 | L3 | L4 | L5 | L6 | L7 | L8 | Avg |"
    with pytest.raises(ValueError, match="no data files"):
        tasks.load("arith").examples("eval", tasks.Source(files=("x.jsonl",)))


# ----------------------------------------------------------------------------- curves

def _write_metrics(run_dir, rows):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_read_metrics_sorts_dedups_and_skips_partial_last_line(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, [{"step": 2, "reward": 0.5}, {"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.7}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')  # a live run mid-write
    recs = plot.read_metrics(str(run))
    assert [(r["step"], r["reward"]) for r in recs] == [(1, 0.1), (2, 0.7)]
    with pytest.raises(FileNotFoundError):
        plot.read_metrics(str(tmp_path / "nope"))


def test_plot_command_writes_png(tmp_path):
    for name, slope in [("grpo", 0.01), ("rlad", 0.02)]:
        rows = [{"step": s, "reward": -1 + slope * s, "accuracy": slope * s} for s in range(1, 21)]
        for r in rows[4::5]:
            r.update(eval_accuracy=r["accuracy"] / 2, **{"eval/PPL3": r["accuracy"]})
        _write_metrics(tmp_path / name, rows)
    out = tmp_path / "figs" / "curves.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot.py"), str(tmp_path / "grpo"),
                        str(tmp_path / "rlad"), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot.py"), str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "metrics.jsonl not found" in bad.stderr


# ----------------------------------------------------------------------------- end to end, real engines

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def kk_eval_examples():
    import data
    return data.kk_examples(people=(2, 3), per_level=2, split="eval")


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    import rollout
    engine = rollout.VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                                max_num_seqs=16, kv_cache_memory_bytes=64 * 2**20)
    yield engine
    engine.shutdown()


def _check_records(result, examples, tokenizer, n):
    """Every sample record is the scored text of its problem, problem by problem, and the summary is its
    aggregate."""
    import tasks
    samples = result["samples"]
    assert len(samples) == len(examples) * n
    for p, ex in enumerate(examples):
        prompt_ids, prefill = tasks.prompt_ids(KK, ex, tokenizer)
        for i in range(n):
            s = samples[p * n + i]
            assert (s["id"], s["level"], s["sample"]) == (ex["id"], ex["level"], i)
            assert s["prompt"] == tokenizer.decode(prompt_ids)
            assert s["response"].startswith(prefill)
            scored = KK.score([ex], [s["response"]])[0]
            assert (s["reward"], s["correct"], s["format_ok"]) == (scored["reward"], scored["correct"],
                                                                 scored["format_ok"])
            assert s["finish_reason"] in ("stop", "length")
    levels = list(dict.fromkeys(ex["level"] for ex in examples))
    assert list(result["summary"]) == levels + ["average"]
    for lv in levels:
        rows = [s for s in samples if s["level"] == lv]
        assert result["summary"][lv]["count"] * n == len(rows)
        assert result["summary"][lv]["mean_at_n"] == pytest.approx(sum(s["correct"] for s in rows) / len(rows))
        assert result["summary"][lv]["mean_reward"] == pytest.approx(sum(s["reward"] for s in rows) / len(rows))


def test_evaluate_greedy_vllm_and_hf_agree(vllm_engine, tiny_model_dir, tokenizer, kk_eval_examples):
    import rollout
    import torch
    kw = dict(n=2, max_tokens=24, temperature=0.0, ks=(1, 2))
    res_vllm = ev.evaluate(vllm_engine, tokenizer, kk_eval_examples, KK, **kw)
    hf = rollout.HFEngine(tiny_model_dir, dtype=torch.float32)
    res_hf = ev.evaluate(hf, tokenizer, kk_eval_examples, KK, batch_size=3, **kw)  # 2 calls: chunking is invisible
    for res in (res_vllm, res_hf):
        _check_records(res, kk_eval_examples, tokenizer, n=2)
    assert [s["response"] for s in res_vllm["samples"]] == [s["response"] for s in res_hf["samples"]]
    assert [s["reward"] for s in res_vllm["samples"]] == [s["reward"] for s in res_hf["samples"]]
    assert res_vllm["summary"] == res_hf["summary"]
    assert list(res_vllm["summary"]) == ["PPL2", "PPL3", "average"]
    # greedy: the n samples of a problem are the same text
    assert all(a["response"] == b["response"] for a, b in zip(res_vllm["samples"][::2], res_vllm["samples"][1::2]))


def test_evaluate_sampling_is_seeded(vllm_engine, tokenizer, kk_eval_examples):
    kw = dict(n=4, max_tokens=16, temperature=1.0, top_p=1.0, ks=(1, 4))
    a = ev.evaluate(vllm_engine, tokenizer, kk_eval_examples[:2], KK, seed=0, **kw)
    b = ev.evaluate(vllm_engine, tokenizer, kk_eval_examples[:2], KK, seed=0, **kw)
    c = ev.evaluate(vllm_engine, tokenizer, kk_eval_examples[:2], KK, seed=1, **kw)
    responses = lambda r: [s["response"] for s in r["samples"]]  # noqa: E731
    assert responses(a) == responses(b) and responses(a) != responses(c)
    assert len(set(responses(a)[:4])) > 1  # the n samples of one problem differ
    _check_records(a, kk_eval_examples[:2], tokenizer, n=4)


def _output(tokenizer, prefill, full_text):
    """An engine output (rollout.py's format) whose scored text is `full_text`: the generated part, + EOS."""
    assert full_text.startswith(prefill)
    ids = tokenizer(full_text[len(prefill):], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"response_ids": ids, "logprobs": [0.0] * len(ids), "finish_reason": "stop"}


def test_score_outputs_right_and_wrong_answers(tokenizer, kk_eval_examples):
    """A tiny random model is never right, so correct answers are written by hand in the engine's output
    format: they must be scored by the real rewards and aggregated into Mean@n / Pass@k."""
    import tasks

    def kk_text(ex, flip_first=False):
        roles = [not s if (flip_first and j == 0) else s for j, s in enumerate(ex["solution"])]
        lines = [f"({j + 1}) {name} is a {'knight' if r else 'knave'}" for j, (name, r) in enumerate(zip(ex["names"], roles))]
        return "<think> reasoning </think>\n<answer>\n" + "\n".join(lines) + "\n</answer>"

    exs = kk_eval_examples  # PPL2, PPL2, PPL3, PPL3
    prompts = [tasks.prompt_ids(KK, ex, tokenizer) for ex in exs]
    right = [kk_text(ex) for ex in exs]
    wrong = [kk_text(ex, flip_first=True) for ex in exs]
    assert all(s["correct"] for s in KK.score(exs, right))
    assert not any(s["correct"] for s in KK.score(exs, wrong))
    plan = [["r", "w", "w", "w"], ["w", "w", "w", "w"], ["r", "r", "r", "r"], ["r", "r", "w", "junk"]]
    texts = [[{"r": right[p], "w": wrong[p], "junk": prompts[p][1] + "no tags at all"}[x] for x in row]
             for p, row in enumerate(plan)]
    outputs = [[_output(tokenizer, prompts[p][1], t) for t in row] for p, row in enumerate(texts)]
    res = ev.score_outputs(tokenizer, exs, prompts, outputs, KK, ks=(1, 2, 4))
    assert [s["response"] for s in res["samples"]] == [t for row in texts for t in row]
    assert [s["correct"] for s in res["samples"]] == [x == "r" for row in plan for x in row]
    assert [s["reward"] for s in res["samples"]] == [KK.score([ex], [t])[0]["reward"] for ex, row in zip(exs, texts) for t in row]
    s = res["summary"]
    assert s["PPL2"]["mean_at_n"] == pytest.approx(1 / 8) and s["PPL3"]["mean_at_n"] == pytest.approx(6 / 8)
    assert s["PPL2"]["pass_at_k"][2] == pytest.approx((1 - 3 / 6) / 2)  # c = 1 and c = 0 of 4
    assert s["PPL3"]["pass_at_k"][2] == pytest.approx((1 + 5 / 6) / 2)  # c = 4 and c = 2 of 4
    assert s["PPL3"]["pass_at_k"][4] == 1.0
    assert s["average"]["mean_at_n"] == pytest.approx((1 / 8 + 6 / 8) / 2)


def test_score_outputs_math(tokenizer):
    import tasks
    math = tasks.load("math")
    exs = [{"task": "math", "question": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}", "level": "toy", "id": "t0"},
           {"task": "math", "question": "What is 6 * 7?", "answer": "42", "level": "toy", "id": "t1"}]
    prompts = [tasks.prompt_ids(math, ex, tokenizer) for ex in exs]
    texts = [["So the answer is \\boxed{0.75}.", "\\boxed{\\frac{1}{2}}"], ["\\boxed{41}", "The answer: 42"]]
    outputs = [[_output(tokenizer, pre, pre + t) for t in row] for (_, pre), row in zip(prompts, texts)]
    res = ev.score_outputs(tokenizer, exs, prompts, outputs, math, ks=(1, 2))
    assert [s["correct"] for s in res["samples"]] == [True, False, False, False]  # 0.75 == 3/4; unboxed 42 not
    assert res["summary"]["toy"]["pass_at_k"][2] == pytest.approx(0.5)
    table = ev.format_table(res["summary"], name="tiny")
    assert table.splitlines()[2] == "| tiny | 25.0 | 50.0 | 25.0 | 50.0 |"


# ----------------------------------------------------------------------------- command line

def _run_cli(args, tmp_path):
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py")] + args, capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))


def test_cli_vllm_default_kk_set(tiny_model_dir, tmp_path):
    out = tmp_path / "res" / "results.json"
    r = _run_cli(["--model", tiny_model_dir, "--task", "kk", "--limit", "1", "--n", "2", "--k", "1,2",
                  "--max_tokens", "8", "--engine", "vllm",
                  "--kv_cache_memory_bytes", str(64 * 2**20), "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out) as f:
        res = json.load(f)
    assert [s["level"] for s in res["samples"]] == [f"PPL{i}" for i in range(2, 9) for _ in range(2)]
    assert list(res["summary"]) == [f"PPL{i}" for i in range(2, 9)] + ["average"]
    assert res["config"]["n"] == 2 and res["config"]["engine"] == "vllm"
    # the printed table is the paper's table of the written summary
    table = ev.format_table(res["summary"], name=os.path.basename(tiny_model_dir))
    assert table in r.stdout


def test_cli_hf_engine_on_data_files(tiny_model_dir, tmp_path, capsys):
    """In-process main() (the subprocess test above covers the script itself): --data, --limit, greedy, HF."""
    import random
    import data
    rng = random.Random(0)
    path = tmp_path / "people3_test.jsonl"
    with open(path, "w") as f:
        for i in range(3):
            f.write(json.dumps(data.make_kk_puzzle(3, rng, index=i)) + "\n")
    out = tmp_path / "hf.json"
    ev.main(["--model", tiny_model_dir, "--task", "kk", "--data", str(path), "--limit", "2", "--n", "1",
             "--temperature", "0", "--max_tokens", "8", "--engine", "hf", "--out", str(out)])
    with open(out) as f:
        res = json.load(f)
    assert [s["id"] for s in res["samples"]] == ["people3_test-0", "people3_test-1"]
    assert list(res["summary"]) == ["PPL3", "average"] and res["summary"]["average"]["count"] == 2
    assert res["config"]["ks"] == [1] and res["config"]["engine"] == "hf"
    assert ev.format_table(res["summary"], name=os.path.basename(tiny_model_dir)) in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--task", "kk", "--n", "4", "--k", "1,8"], "every k must be in 1..n"),
    (["--task", "chess"], "--task 'chess': use kk, math, arith"),
    (["--task", "kk", "--limit", "1", "--max_tokens", "5000"], "exceeds the model's context (2048)"),
    (["--task", "math"], "task 'math' needs data files"),
    (["--task", "kk", "--data", "/nonexistent/kk.jsonl"], "no such file"),
    (["--task", "kk", "--n", "0"], "--n 0: must be >= 1"),  # used to blame the unset --k
    (["--task", "kk", "--levels", "x"], "--levels 'x': expected comma-separated integers"),
    (["--task", "kk", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),  # these used to be vLLM tracebacks
    (["--task", "kk", "--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--task", "kk", "--gpu_memory_utilization", "0"], "--gpu_memory_utilization 0.0: must be in (0, 1]"),
])
def test_cli_errors(tiny_model_dir, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", tiny_model_dir] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_missing_model(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--model", "/nonexistent/ckpt", "--task", "kk"])
    assert "no such model directory" in capsys.readouterr().err
