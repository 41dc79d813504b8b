"""Benchmark and public-data check of data.py and rewards.py (a script, not a test).

With --data DIR (a folder holding kk/people{N}_test.jsonl and math/*.jsonl, the public K&K and AIME/AMC
files): the solver must reproduce every recorded solution of the
public K&K files, and every recorded answer (solution_text_format) wrapped in <think>...</think><answer>...
</answer> must score 3; the math files must load and score their own reference answers as correct. Always:
time to generate 10,000 eight-person puzzles on one core, and scoring throughput (responses per second) for
K&K and arithmetic (in-process) and math (math-verify worker pool, after start-up).

    python benchmarks/bench_tasks.py [--data DIR] [--workers N]

Exits non-zero when a public check fails.
"""
import argparse
import ast
import glob
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import rewards  # noqa: E402
import tasks  # noqa: E402
import verifier  # noqa: E402


def score(examples, responses):
    """Each example through its task's scorer (tasks.py), one batch per task (math in parallel), in order."""
    out = [None] * len(examples)
    for name in {ex["task"] for ex in examples}:
        idx = [i for i, ex in enumerate(examples) if ex["task"] == name]
        for i, s in zip(idx, tasks.load(name).score([examples[i] for i in idx], [responses[i] for i in idx])):
            out[i] = s
    return out


def check_public_kk(data_dir):
    failures = 0
    for path in sorted(glob.glob(os.path.join(data_dir, "kk", "people*_*.jsonl"))):
        rows = [json.loads(line) for line in open(path)]
        solved = sum(data.kk_solve(r["statements"], len(r["names"])) == [tuple(r["solution"])] for r in rows)
        examples = data.load_kk(path)
        responses = [f"<think>reasoning</think>\n<answer>\n{r['solution_text_format']}\n</answer>" for r in rows]
        scored = sum(s["reward"] == 3.0 for s in score(examples, responses))
        # The statements literal must round-trip through the same parser the generator's output uses.
        literal = sum(repr(ast.literal_eval(r["statements"])) == r["statements"] for r in rows)
        print(f"  {os.path.basename(path):24s} rows {len(rows):4d}  solver ok {solved:4d}  reward 3 {scored:4d}  "
              f"literal round-trip {literal:4d}")
        failures += (len(rows) - solved) + (len(rows) - scored)
    return failures


def check_public_math(data_dir):
    failures = 0
    for path in sorted(glob.glob(os.path.join(data_dir, "math", "*.jsonl"))):
        examples = data.load_math(path)
        # Written differently from the reference, so that math-verify (not string equality) decides.
        responses = [f"Thus the answer is $\\boxed{{{e['answer']}.0}}$." if e["answer"].isdigit()
                     else f"\\boxed{{{e['answer']}}}" for e in examples]
        scored = sum(s["correct"] for s in score(examples, responses))
        print(f"  {os.path.basename(path):24s} rows {len(examples):4d}  level {examples[0]['level']!r}  "
              f"own answer correct {scored:4d}")
        failures += len(examples) - scored
    return failures


def bench_generator(count=10_000, n=8):
    rng = random.Random(0)
    wall, cpu = time.perf_counter(), time.process_time()
    puzzles = [data.make_kk_puzzle(n, rng) for _ in range(count)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    knights = sum(sum(p["solution"]) for p in puzzles) / (count * n)
    print(f"  {count} PPL{n} puzzles: {wall:.2f} s wall, {cpu:.2f} s CPU (one process) -> {count / wall:,.0f}/s; "
          f"knight fraction {knights:.2f}")
    start = time.perf_counter()
    evals = data.kk_examples(per_level=100, split="eval")
    print(f"  eval split PPL2..PPL8 x 100: {time.perf_counter() - start:.2f} s ({len(evals)} examples)")


def bench_kk_scoring(count=20_000):
    examples = data.kk_examples(people=range(3, 9), per_level=count // 6 + 1, seed=1)[:count]
    rng = random.Random(0)
    responses = []
    for e in examples:  # a realistic turn: ~2,000 characters of reasoning, then an answer that is right or not
        answer = e["answer"] if rng.random() < 0.5 else e["answer"].replace("knight", "knave", 1)
        responses.append("<think>" + "Suppose the first person is a knight; then ... " * 40 + "</think>\n"
                         f"<answer>\n{answer}\n</answer>")
    start = time.perf_counter()
    results = score(examples, responses)
    seconds = time.perf_counter() - start
    print(f"  K&K: {count} responses in {seconds:.2f} s -> {count / seconds:,.0f} responses/s "
          f"(in-process; {sum(r['correct'] for r in results)} correct)")


def bench_arith_scoring(count=20_000):
    examples = data.arith_examples(per_level=count // 7 + 1, seed=1)[:count]
    responses = [e["answer"] + "<|im_end|>" if i % 2 else e["answer"][:-1] + "x" for i, e in enumerate(examples)]
    start = time.perf_counter()
    results = score(examples, responses)
    seconds = time.perf_counter() - start
    print(f"  arith: {count} responses in {seconds:.2f} s -> {count / seconds:,.0f} responses/s "
          f"({sum(r['correct'] for r in results)} correct of {count // 2} right answers)")


def bench_math_scoring(data_dir, count=2_000):
    golds = ["97", "\\frac{1}{2}", "3\\sqrt{2}", "(1, 2]", "\\{1, 2\\}", "-4", "12\\%", "0.25", "x^2+1", "\\pi/3"]
    if data_dir:
        golds = [e["answer"] for path in glob.glob(os.path.join(data_dir, "math", "*.jsonl"))
                 for e in data.load_math(path)] or golds
    rng = random.Random(0)
    examples, responses = [], []
    for i in range(count):
        gold = golds[i % len(golds)]
        kind = rng.random()
        pred = (gold if kind < 0.2 else f"{gold}.0" if gold.isdigit() and kind < 0.5 else
                f"\\dfrac{{2\\cdot({gold})}}{{2}}" if kind < 0.7 else f"{gold}+1")
        examples.append({"task": "math", "answer": gold})
        responses.append("Let us compute. " * 100 + f"So the final answer is $\\boxed{{{pred}}}$.")
    pool = verifier.start_pool()
    start = time.perf_counter()
    score(examples[:1], responses[:1])
    startup = time.perf_counter() - start
    start = time.perf_counter()
    results = score(examples, responses)
    seconds = time.perf_counter() - start
    print(f"  math: {count} responses in {seconds:.2f} s -> {count / seconds:,.0f} responses/s with "
          f"{len(pool.workers)} workers (first call {startup:.2f} s; {sum(r['correct'] for r in results)} correct; "
          f"{pool.killed} killed)")
    bad = ["9^{9^{9^{9}}}", "{" * 300 + "1" + "}" * 300, "10^{10^{10}}!", "\\left(" * 400 + "x" + "\\right)" * 400]
    start = time.perf_counter()
    results = score([{"task": "math", "answer": "1"}] * len(bad), [f"\\boxed{{{b}}}" for b in bad])
    print(f"  math, {len(bad)} pathological answers: {time.perf_counter() - start:.2f} s "
          f"(limit {rewards.MATH_TIMEOUT_S:.0f} s each; all zero: {not any(r['correct'] for r in results)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="folder with kk/ and math/ public files (optional)")
    parser.add_argument("--workers", type=int, default=None, help="math-verify worker processes")
    args = parser.parse_args()
    if args.workers:
        verifier.MATH_WORKERS = args.workers
    data_dir = args.data if args.data and os.path.isdir(args.data) else None
    failures = 0
    if data_dir:
        print(f"public K&K files ({os.path.abspath(data_dir)}):")
        failures += check_public_kk(data_dir)
        print("public math files:")
        failures += check_public_math(data_dir)
    else:
        print(f"no public data at {args.data}: skipping the public checks")
    print("generator:")
    bench_generator()
    print("scoring throughput:")
    bench_kk_scoring()
    bench_arith_scoring()
    bench_math_scoring(data_dir)
    verifier.close_pool()
    print("FAILURES:", failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
