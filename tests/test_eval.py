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
    return ev.summarize(levels, correct, [0.0] * len(correct), n=2, ks=(1, 2))


def test_format_table_kk_exact():
    table = ev.format_table(_fixed_kk_summary(), "kk", name="rlad-0.6b")
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
    assert ev.format_table(s, "math", name="m") == expected
    # the summary re-read from the results JSON (k keys become strings) gives the same table
    assert ev.format_table(json.loads(json.dumps(s)), "math", name="m") == expected
    with pytest.raises(ValueError, match="unknown task"):
        ev.format_table(s, "chess")


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
    recs = ev.read_metrics(str(run))
    assert [(r["step"], r["reward"]) for r in recs] == [(1, 0.1), (2, 0.7)]
    with pytest.raises(FileNotFoundError):
        ev.read_metrics(str(tmp_path / "nope"))


def test_plot_command_writes_png(tmp_path):
    for name, slope in [("grpo", 0.01), ("rlad", 0.02)]:
        rows = [{"step": s, "reward": -1 + slope * s, "accuracy": slope * s} for s in range(1, 21)]
        for r in rows[4::5]:
            r.update(eval_accuracy=r["accuracy"] / 2, **{"eval/PPL3": r["accuracy"]})
        _write_metrics(tmp_path / name, rows)
    out = tmp_path / "figs" / "curves.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "plot", str(tmp_path / "grpo"),
                        str(tmp_path / "rlad"), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "plot", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "metrics.jsonl not found" in bad.stderr
