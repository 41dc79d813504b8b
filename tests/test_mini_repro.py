"""The miniature reproduction end to end, shrunk to a few steps (experiments/mini_repro/mini_repro.py --quick,
run from the repository root the way its README says): real train.py
subprocesses (SFT from ground truth, grpo / kdrl / rlad / rlad_self / distill with vLLM CPU rollouts), real
eval through train.py's eval.evaluate, the results files, the curves; then a rerun that must skip every run.
The student's SFT and the RL runs take their lengths from --student_steps and --rl_steps.
Also the word-level arithmetic tokenizer (tiny.make_arith_tokenizer) and the aggregation arithmetic."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_DIR = os.path.join(ROOT, "experiments", "mini_repro")  # mini_repro.py and its configs/
SCRIPT = os.path.join("experiments", "mini_repro", "mini_repro.py")  # relative to ROOT, as a user types it
METHODS = ["grpo", "kdrl", "rlad", "rlad_self", "distill"]


def test_arith_tokenizer_round_trip_and_reward():
    import data
    import rewards
    import tiny
    tok = tiny.make_arith_tokenizer()
    assert len(tok) == 35 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ex = {"task": "arith", "question": "3 + 5 - 7 =", "answer": "8 1", "level": "L3", "id": "x"}
    ids, prefill = data.build_prompt(ex, tok)
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "3", "+5", "-7", "="] and prefill == ""
    answer = tok("8 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(answer) == ["8", "1", "<|im_end|>"]
    assert tok.decode(answer, skip_special_tokens=True) == "8 1"
    assert rewards.score(ex, tok.decode(answer, skip_special_tokens=True))["correct"]
    assert not rewards.score(ex, tok.decode(answer[1:], skip_special_tokens=True))["correct"]
    plain = lambda text: tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert plain("12 +  3-4") == ["1", "2", "+3", "-4"]  # digits one by one; a sign binds to its digit
    assert plain("x") == ["<|unk|>"]


def test_aggregate_paired_differences():
    if STUDY_DIR not in sys.path:
        sys.path.insert(0, STUDY_DIR)
    import mini_repro
    acc = lambda a, b: {"L2": a, "L3": b, "average": (a + b) / 2}  # noqa: E731
    per_run = {("grpo", 1): acc(0.5, 0.1), ("grpo", 2): acc(0.6, 0.2),
               ("rlad", 1): acc(0.6, 0.4), ("rlad", 2): acc(0.5, 0.4)}
    out = mini_repro.aggregate(per_run, ["grpo", "rlad"], [1, 2])
    assert out["grpo"]["mean"]["L2"] == pytest.approx(0.55)
    assert out["grpo"]["std"]["L2"] == pytest.approx(0.0707107, rel=1e-5)  # sample std (ddof 1)
    d = out["rlad"]["diff_vs_grpo"]
    assert d["L2"]["per_seed"] == pytest.approx([0.1, -0.1]) and d["L2"]["wins"] == 1
    assert d["L3"]["mean"] == pytest.approx(0.25) and d["L3"]["wins"] == 2
    assert d["average"]["mean"] == pytest.approx(0.125)  # (0.5 - 0.3 + 0.45 - 0.4) / 2
    assert "diff_vs_grpo" not in out["grpo"]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mini"))
    # --student_steps 3 / --rl_steps 3: 3 steps instead of the quick preset's 2 (the flags' path)
    cmd = [sys.executable, SCRIPT, "--out", out, "--quick", "--student_steps", "3", "--rl_steps", "3"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, cmd


def test_quick_study_results(quick_study):
    out, _ = quick_study
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    levels = [f"L{n}" for n in range(2, 6)]  # report_levels: the trained levels
    assert res["seeds"] == [1] and res["quick"] is True
    assert list(res["methods"]) == METHODS
    for name, acc in list(res["reference"].items()) + [(m, e["seeds"]["1"]) for m, e in res["methods"].items()]:
        assert list(acc) == levels + ["average"], name
        assert all(0.0 <= v <= 1.0 for v in acc.values()), (name, acc)
        assert acc["average"] == pytest.approx(sum(acc[lv] for lv in levels) / len(levels)), name
    for m in METHODS:
        entry = res["methods"][m]
        assert entry["mean"] == entry["seeds"]["1"] and all(v == 0.0 for v in entry["std"].values())
        if m != "grpo":
            diff = entry["diff_vs_grpo"]["average"]["mean"]
            assert diff == pytest.approx(entry["mean"]["average"] - res["methods"]["grpo"]["mean"]["average"])
    table = open(os.path.join(out, "results.md")).read()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    for m in METHODS:
        assert m in names, m
        assert f"{m} - grpo" in names or m == "grpo"
    assert "teacher" in names and "student (start)" in names
    assert all(len(r.split("|")) == len(levels) + 4 for r in rows)  # model + 4 levels + Avg, both ends
    for path in res["curves"]:
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"


def test_quick_study_runs_logged_and_checkpointed(quick_study):
    out, _ = quick_study
    for m in METHODS:
        run = os.path.join(out, "runs", f"{m}_seed1")
        lines = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl")) if ln.strip()]
        assert [r["step"] for r in lines] == [1, 2, 3]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in lines)
        assert "eval_accuracy" in lines[-1] and "eval/L8" in lines[-1]
        cfg = json.load(open(os.path.join(run, "config.json")))
        assert cfg["method"] == ("rlad" if m == "rlad_self" else m) and cfg["seed"] == 1
        student = os.path.join(out, "student_sft", "checkpoints", "step_000003")
        assert cfg["model"] == student
        assert cfg["teacher"] == (student if m == "rlad_self" else os.path.join(out, "teacher_sft", "checkpoints",
                                                                              "step_000004"))
        assert os.path.isfile(os.path.join(run, "checkpoints", "step_000003", "model.safetensors"))


def test_quick_study_rerun_skips_finished_runs(quick_study):
    out, cmd = quick_study
    before = {m: os.path.getmtime(os.path.join(out, "runs", f"{m}_seed1", "metrics.jsonl")) for m in METHODS}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "] start " not in again.stdout and "runs to do" not in again.stdout  # no train.py launched
    after = {m: os.path.getmtime(os.path.join(out, "runs", f"{m}_seed1", "metrics.jsonl")) for m in METHODS}
    assert after == before
    seconds = json.load(open(os.path.join(out, "results.json")))["seconds"]["runs"]
    names = ["teacher_sft", "student_sft"] + [f"{m}_seed1" for m in METHODS]
    assert sorted(seconds) == sorted(names)
    assert all(0 < seconds[n] < 900 for n in names)  # the first invocation's wall times, read back
