"""Evaluation: Mean@n, unbiased Pass@k and K&K accuracy per PPL, for any checkpoint; training curves.

For every problem we draw `n` samples (temperature 0.6, top-p 0.95, as in the paper's Evaluation
section), score each with rewards.py, and report per level (a K&K column PPL2..PPL8, or a math benchmark):

    Mean@n   = 1/(P n) sum_p c_p                 mean correctness over all samples (= average Pass@1)
    Pass@k   = 1/P sum_p [1 - C(n - c_p, k) / C(n, k)]   unbiased estimator (Chen et al. 2021), c_p of n correct

and, as the paper reports, the average over levels (each level weighs the same, however many problems it
has; the sample-weighted mean is kept beside it). K&K "accuracy" in the paper's tables is Mean@n.

The same `evaluate` serves train.py's periodic evaluation in-process (it takes the engine that is already
running, nothing is reloaded) and the command line:

    python eval.py --model PATH --task kk                        # 100 held-out puzzles per PPL2..PPL8
    python eval.py --model PATH --task kk --data people3_test.jsonl   # the public K&K test files
    python eval.py --model PATH --task math --data aime.jsonl amc.jsonl --n 32 --k 1,8,32 --max_tokens 30000
    python eval.py --model PATH --task arith --n 1 --temperature 0  # the miniature study's task, greedy
    python eval.py plot runs/grpo runs/kdrl runs/rlad --out curves.png   # reward / accuracy vs step
    python eval.py show runs/rlad --step 12      # logged responses token by token: what the teacher did (HTML)

It prints a Markdown table shaped like the paper's and writes a JSON file with the summary and every
sample (prompt, response, reward, correct) for inspection.
"""
import argparse
import html
import json
import operator
import os
import re
import sys

TASKS = ("kk", "math", "arith")  # arith: data.py's running sums mod 10, the CPU-sized stand-in for K&K
# The default evaluation sets without --data: data.kk_examples / data.arith_examples(split="eval"), fixed
# held-out streams (no seed) that the training split never overlaps.
# --max_tokens when not given (then capped to what fits the model's context): the paper's K&K runs allow 2K-8K
# response tokens, math 8K-30K; an arith answer is at most 7 digits (+ spaces, EOS).
DEFAULT_MAX_TOKENS = {"kk": 4096, "math": 8192, "arith": 32}


# ----------------------------------------------------------------------------- metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k for one problem with `c` correct among `n` samples (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i): the product form never builds the huge
    binomials (C(32, 16) is fine, C(1000, 500) is not as a float) and is exact at the edges:
    c = 0 -> 0, and any k-subset must contain a correct sample when n - c < k -> 1.
    """
    try:  # ints, numpy ints; not floats (a fractional count is a caller's bug)
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError:
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}") from None
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (cannot pick {k} of {n} samples): lower k or raise n")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _level_order(levels):
    """Numbered levels in numeric order (PPL2 .. PPL8, L2 .. L8; PPL10 after PPL9); names in first-seen order."""
    levels = list(dict.fromkeys(levels))
    numbered = [re.fullmatch(r"([A-Za-z]+)(\d+)", lv) for lv in levels]
    if levels and all(numbered) and len({m.group(1) for m in numbered}) == 1:
        return sorted(levels, key=lambda lv: int(re.search(r"\d+$", lv).group()))
    return levels


def summarize(levels, correct, rewards, n: int, ks=(1,)) -> dict:
    """Aggregate per-sample results into the summary. Samples are laid out problem by problem:
    `levels` has one entry per problem, `correct` / `rewards` have n entries per problem.

    Returns {level: {"count", "n", "mean_at_n", "pass_at_k": {k: v}, "mean_reward"}, ...,
             "average": same keys averaged over levels, plus "mean_at_n_weighted", "pass_at_k_weighted"}.
    """
    if not levels:
        raise ValueError("summarize: no problems to aggregate")
    if len(correct) != len(levels) * n or len(rewards) != len(correct):
        raise ValueError(f"expected {len(levels)} problems x n={n} samples, got {len(correct)} results")
    per_level = {}  # level -> list of (c, reward sum) per problem
    for p, level in enumerate(levels):
        block = slice(p * n, (p + 1) * n)
        per_level.setdefault(level, []).append((sum(bool(x) for x in correct[block]), sum(rewards[block])))
    summary = {}
    for level in _level_order(levels):
        probs = per_level[level]
        summary[level] = {
            "count": len(probs),
            "n": n,
            "mean_at_n": sum(c for c, _ in probs) / (len(probs) * n),
            "pass_at_k": {k: sum(pass_at_k(n, c, k) for c, _ in probs) / len(probs) for k in ks},
            "mean_reward": sum(r for _, r in probs) / (len(probs) * n),
        }
    rows = list(summary.values())
    counts = [r["count"] for r in rows]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    weighted = lambda xs: sum(x * c for x, c in zip(xs, counts)) / sum(counts)  # noqa: E731
    summary["average"] = {
        "count": sum(counts),
        "n": n,
        # The paper's "average": every level (PPL, benchmark) counts the same.
        "mean_at_n": mean([r["mean_at_n"] for r in rows]),
        "pass_at_k": {k: mean([r["pass_at_k"][k] for r in rows]) for k in ks},
        "mean_reward": mean([r["mean_reward"] for r in rows]),
        # Every problem counts the same (differs from the above when levels have different sizes).
        "mean_at_n_weighted": weighted([r["mean_at_n"] for r in rows]),
        "pass_at_k_weighted": {k: weighted([r["pass_at_k"][k] for r in rows]) for k in ks},
    }
    return summary


# ----------------------------------------------------------------------------- sampling + scoring

def evaluate(engine, tokenizer, examples, *, n: int, max_tokens: int, temperature: float = 0.6,
             top_p: float = 0.95, seed=0, ks=(1,), batch_size=None, progress: bool = False, score_fn=None) -> dict:
    """Sample `n` responses per example with `engine`, score them, aggregate. Returns
    {"summary": summarize(...), "samples": [one record per sample, problem by problem], "config": {...}}.

    `engine` is anything with the rollout.py interface (VLLMEngine, HFEngine): train.py passes its own,
    already-running engine. `batch_size` prompts go to each generate call (None: all in one call, the
    fastest with vLLM); `progress` shows a tqdm bar over those calls (the CLI uses it, train.py does not).
    score_fn(examples, responses) scores the samples (default rewards.score_batch; a task of your own has its own).
    """
    import data

    if not examples:
        raise ValueError("evaluate: no examples (empty evaluation set): check --data / --limit")
    _check_ks(n, ks)
    prompts = [data.build_prompt(ex, tokenizer) for ex in examples]  # (prompt_ids, prefill) per example
    batch_size = batch_size or len(examples)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(examples) * n, desc="sampling", unit="sample")
    outputs = []  # per prompt: list of n sample dicts
    for start in range(0, len(examples), batch_size):
        chunk = [ids for ids, _ in prompts[start:start + batch_size]]
        # rollout.py seeds prompt i of a call with seed + i * n (vLLM: its sample j with seed + i * n + j), so
        # this offset makes the chunks' streams those of one big call: batch_size changes no vLLM result.
        chunk_seed = None if seed is None else seed + start * n
        outputs.extend(engine.generate(chunk, n=n, max_tokens=max_tokens, temperature=temperature,
                                       top_p=top_p, seed=chunk_seed))
        if bar is not None:
            bar.update(len(chunk) * n)
    if bar is not None:
        bar.close()
    if len(outputs) != len(examples) or any(len(o) != n for o in outputs):
        raise RuntimeError(f"engine returned {len(outputs)} prompts with sample counts "
                           f"{sorted(set(len(o) for o in outputs))}, expected {len(examples)} x {n}")
    result = score_outputs(tokenizer, examples, prompts, outputs, ks=ks, score_fn=score_fn)
    result["config"] = {"n": n, "ks": sorted(set(int(k) for k in ks)), "max_tokens": max_tokens,
                        "temperature": temperature, "top_p": top_p, "seed": seed}
    return result


def evaluate_ranks(engine, tokenizer, examples, *, rank: int, world: int, device, seed: int, order_seed: int,
                   n: int, **sampling) -> dict:
    """evaluate() on this rank's share of `examples`, merged across ranks: {"eval/LEVEL": Mean@n, ...,
    "eval_accuracy": the average over levels}. A collective (one all_reduce): every rank calls it.

    Each rank takes a contiguous slice of one seeded shuffle of the problems (levels mixed: balanced work), seeded
    by the slice's global offset (seed + offset * n): problem k is sampled alike at any world size and every eval.
    """
    import torch
    import torch.distributed as dist
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(order_seed)).tolist()
    per_rank = -(-len(examples) // world)  # ceil: the last rank may get fewer (or none)
    mine = [examples[k] for k in order[rank * per_rank:(rank + 1) * per_rank]]
    summary = evaluate(engine, tokenizer, mine, n=n, seed=(seed + rank * per_rank * n) % (2**31 - 1),
                       **sampling)["summary"] if mine else {}
    levels = list(dict.fromkeys(ex["level"] for ex in examples))  # every rank reduces every level
    sums = torch.tensor([x for lv in levels for x in ((summary[lv]["count"] * summary[lv]["mean_at_n"],
                                                       summary[lv]["count"]) if lv in summary else (0.0, 0.0))],
                        dtype=torch.float64, device=device)  # [2 * levels]: correct fraction sums, problem counts
    dist.all_reduce(sums)
    sums = sums.tolist()
    out = {f"eval/{lv}": sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else 0.0 for i, lv in enumerate(levels)}
    out["eval_accuracy"] = sum(out.values()) / max(len(out), 1)  # the paper's average over levels
    return out


def _check_ks(n, ks):
    if n < 1 or not ks or max(ks) > n or min(ks) < 1:
        raise ValueError(f"need 1 <= k <= n for every k of Pass@k, got n={n}, ks={tuple(ks)}: raise n or lower k")


def score_outputs(tokenizer, examples, prompts, outputs, *, ks=(1,), score_fn=None) -> dict:
    """Score engine outputs and aggregate them: {"summary", "samples"}.

    prompts: data.build_prompt(ex, tokenizer) per example, i.e. (prompt_ids, prefill);
    outputs: engine.generate's return value for those prompts (n samples each, the same n for all).
    """
    import rewards

    n = len(outputs[0]) if outputs else 0
    if len(outputs) != len(examples) or len(prompts) != len(examples) or any(len(o) != n for o in outputs):
        raise ValueError(f"score_outputs: {len(examples)} examples, {len(prompts)} prompts, {len(outputs)} "
                         "outputs: expected one prompt and n samples per example")
    ks = tuple(sorted(set(int(k) for k in ks)))
    _check_ks(n, ks)
    # What is scored is the whole assistant turn: the pre-filled opening (e.g. "<think>") + the generated
    # text. Special tokens (the EOS that ends a finished sample) are dropped, as verl / Logic-RL do.
    responses = [prefill + tokenizer.decode(out["response_ids"], skip_special_tokens=True)
                 for (_, prefill), outs in zip(prompts, outputs) for out in outs]
    scores = (score_fn or rewards.score_batch)([ex for ex in examples for _ in range(n)], responses)

    samples = []
    for p, (ex, (prompt_ids, _), outs) in enumerate(zip(examples, prompts, outputs)):
        prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
        for i, out in enumerate(outs):
            s = scores[p * n + i]
            samples.append({
                "id": ex.get("id"), "level": ex["level"], "sample": i, "prompt": prompt_text,
                "response": responses[p * n + i], "answer": ex.get("answer"),
                "reward": float(s["reward"]), "correct": bool(s["correct"]), "format_ok": bool(s["format_ok"]),
                "finish_reason": out["finish_reason"], "response_tokens": len(out["response_ids"]),
            })
    summary = summarize([ex["level"] for ex in examples], [s["correct"] for s in samples],
                        [s["reward"] for s in samples], n, ks)
    return {"summary": summary, "samples": samples}


# ----------------------------------------------------------------------------- the paper's tables

def format_table(summary: dict, task: str, name: str = "model") -> str:
    """The paper's table for one model as Markdown (one row named `name`).

    K&K (and arith, its miniature): accuracy (Mean@n, as a fraction) per level column and the average.
    math: Mean@n and Pass@k (k > 1) per benchmark and their average over benchmarks, in percent.
    Accepts a summary straight from `evaluate` or re-read from the JSON file (string keys).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    levels = [lv for lv in summary if lv != "average"]
    if not levels or "average" not in summary:
        raise ValueError("format_table: summary has no levels or no 'average' (expected evaluate()['summary'])")
    cells = lambda row: "| " + " | ".join(row) + " |"  # noqa: E731
    name = name.replace("|", "\\|")  # a '|' in a run name would split the row
    if task in ("kk", "arith"):
        header = ["model"] + levels + ["Avg"]
        values = [name] + [f"{summary[lv]['mean_at_n']:.2f}" for lv in levels + ["average"]]
    else:
        n = summary["average"]["n"]
        ks = sorted(int(k) for k in summary["average"]["pass_at_k"] if int(k) > 1)
        header, values = ["model"], [name]
        for lv in levels + ["average"]:
            label = "Avg" if lv == "average" else lv
            pk = {int(k): v for k, v in summary[lv]["pass_at_k"].items()}
            header += [f"{label} Mean@{n}"] + [f"{label} Pass@{k}" for k in ks]
            values += [f"{100 * summary[lv]['mean_at_n']:.1f}"] + [f"{100 * pk[k]:.1f}" for k in ks]
    return "\n".join([cells(header), cells(["---"] * len(header)), cells(values)])


# ----------------------------------------------------------------------------- training curves

def read_metrics(run_dir: str) -> list:
    """RUN_DIR/metrics.jsonl as a list of dicts sorted by step; after a resume the last line of a step wins."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass run directories written by train.py")
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    by_step = {}
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line still being written by a live run
                continue
            raise ValueError(f"{path}, line {i + 1}: not JSON: {line[:80]!r}")
        if "step" not in rec:
            raise ValueError(f"{path}, line {i + 1}: no 'step' field")
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot(run_dirs, out: str = "curves.png") -> str:
    """Reward, accuracy (and eval accuracy when logged) vs step, one line per run, on one figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = {}
    for d in run_dirs:
        label = os.path.basename(os.path.normpath(d))
        runs[label if label not in runs else d] = read_metrics(d)
    keys = ["reward", "accuracy"]
    if any("eval_accuracy" in r for recs in runs.values() for r in recs):
        keys.append("eval_accuracy")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "eval_accuracy" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- sampled responses, token by token

# RLAD's selective imitation (rlad.py's table: TRRD, alpha 0.5, first PPO epoch): (sign of A, teacher) -> effect
IMITATION = {(1, "prefers"): "pushed up", (-1, "prefers"): "clipped: not pushed down",
             (1, "rejects"): "clipped: no credit", (-1, "rejects"): "pushed down"}
SHOW_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 .2em} h2{font-size:16px;margin:1.2em 0 .3em} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.legend{background:#fafafa;border:1px solid #ddd;padding:.2em 1em .6em;font-size:13px}
.scale{display:inline-block;width:240px;height:12px;vertical-align:middle;
background:linear-gradient(90deg,#6494c5,#fff,#c66b76)}
.prompt{white-space:pre-wrap;overflow-wrap:anywhere;max-height:9em;overflow:auto;background:#f3f3f3;
padding:.4em .6em;font:12px/1.4 ui-monospace,monospace} .resp{display:flex;gap:1em;border-top:1px solid #ddd}
.meta{flex:0 0 21em;font-size:12px;padding:.4em 0} .meta b{font-size:13px}
.body{flex:1;min-width:0;font:13px/2.1 ui-monospace,monospace;padding:.2em 0}
.t{white-space:pre-wrap;overflow-wrap:anywhere;border-bottom:1px solid #999} .pos{border-bottom-color:#1a9850}
.neg{border-bottom-color:#8e44ad} .prefers{border-bottom-width:3px}
.rejects{border-bottom-style:double;border-bottom-width:4px}
.t.nil{border-bottom:1px dotted #999} .clip{text-decoration:line-through;outline:1px dashed #333}"""
SHOW_LEGEND = """<div class=legend><h2>Legend</h2><p>Background: <b>gap = logp_S - logp_T</b> per token, clamped to
[-3, 3]: <span class=scale></span> blue = the teacher prefers the token (gives it more probability), white = near 0,
red = the teacher rejects it. Relation with the TRRD clamp c: prefers when gap &le; -c, rejects when gap &ge; c,
agrees otherwise. Hover a token for logp_S, logp_T, gap, regime and clip.</p><p>Underline: colour = the response's
advantage (<span class="t pos">green</span> A &gt; 0 rewarded, <span class="t neg">purple</span> A &lt; 0
penalised, <span class="t nil">dotted grey</span> A = 0 no signal); width = the teacher's relation
(<span class="t pos prefers">thick: prefers</span>, <span class="t pos rejects">double: rejects</span>,
<span class="t pos">thin: agrees</span>). <span class="t clip">struck through, dashed box</span> = clipped: the
PPO/TRRD clip removed this token's gradient.</p><table><tr><th>RLAD (TRRD, alpha 0.5, first PPO epoch)</th>
<th>A &gt; 0 (rewarded)</th><th>A &lt; 0 (penalised)</th></tr><tr><td>teacher prefers it</td><td><span
class="t pos prefers">pushed up</span></td><td><span class="t neg prefers clip">clipped: not pushed down</span></td>
</tr><tr><td>teacher rejects it</td><td><span class="t pos rejects clip">clipped: no credit</span></td><td><span
class="t neg rejects">pushed down</span></td></tr><tr><td>teacher agrees</td><td colspan=2>ordinary PPO step</td>
</tr><tr><td>A = 0</td><td colspan=2>no gradient: the teacher acts only through the advantage</td></tr></table>
<p>Methods without a teacher (teacher_logp null, e.g. grpo): no colour, the regime is rewarded / penalised only.
For other methods with a teacher (kdrl, distill) the colour shows where the KD term pulls; the table is RLAD's.</p>
</div>"""


def _gap_colour(gap):
    """Diverging background for gap = logp_S - logp_T clamped to [-3, 3]: blue < 0 < red, at most 70% strong."""
    t = max(-3.0, min(3.0, gap)) / 3 * 0.7
    hue = (33, 102, 172) if t < 0 else (178, 24, 43)
    return "#" + "".join(f"{round(255 - abs(t) * (255 - h)):02x}" for h in hue)


def _effect(method, sign, rel):
    """What the update does to a token: rlad.py's selective-imitation table for rlad, else just A's sign."""
    if method != "rlad":
        return "PPO step" if sign else "no policy gradient"
    return IMITATION.get((sign, rel), "ordinary PPO step") if sign else "no gradient"


def _response_html(s, method, c):
    """One response: its tokens coloured, marked and with tooltips; reward, advantage, counts beside them."""
    toks, lps, lts, n = s["tokens"], s["student_logp"], s.get("teacher_logp"), len(s["tokens"])
    rel = s.get("teacher") or (lts and ["prefers" if a - b <= -c else "rejects" if a - b >= c else "agrees"
                                        for a, b in zip(lps, lts)])
    clipped, ids = s.get("clipped") or [False] * n, s.get("token_ids") or [None] * n
    for name, v in (("student_logp", lps), ("teacher_logp", lts), ("teacher", rel), ("clipped", clipped)):
        if v is not None and len(v) != n:
            raise ValueError(f"a response has {n} tokens but {len(v)} {name} values")
    sign = (s["advantage"] > 0) - (s["advantage"] < 0)
    where, cls = {1: ("rewarded", "pos"), -1: ("penalised", "neg"), 0: ("no signal", "nil")}[sign]
    spans, counts = [], {r: 0 for r in ("prefers", "rejects", "agrees")} if rel else {}
    for i, tok in enumerate(toks):
        r = rel[i] if rel else None
        tip = f"{json.dumps(tok)} id {ids[i]}\nlogp_S {lps[i]:.3f}" + (
            f"  logp_T {lts[i]:.3f}  gap {lps[i] - lts[i]:+.3f}" if lts else "  (no teacher)")
        tip += f"\nregime: {where}" + (f" x teacher {r}" if r else "") + f" ({_effect(method, sign, r)})"
        tip += f"\nclipped: {'yes' if clipped[i] else 'no'}"
        text = html.escape(tok or "\u2205").replace("\n", "\u21b5\n").replace("\t", "\u21e5").replace("\r", "\u240d")
        style = f' style="background:{_gap_colour(lps[i] - lts[i])}"' if lts else ""
        spans.append(f'<span class="t {cls} {r or ""}{" clip" if clipped[i] else ""}" title="{html.escape(tip)}"'
                     f'{style}>{text}</span>')
        if r:
            counts[r] += 1
    tally = "".join(f"<br>{where} x {r}: {k} ({_effect(method, sign, r)})" for r, k in counts.items())
    meta = (f"<b>{'&#10003; correct' if s['correct'] else '&#10007; wrong'}</b><br>reward {s['reward']:g}, "
            f"advantage {s['advantage']:+.3f} ({where})<br>{n} tokens{tally}<br>clipped: {sum(map(bool, clipped))}"
            f" ({sum(map(bool, clipped)) / max(n, 1):.0%})")
    return f"<div class=resp><div class=meta>{meta}</div><div class=body>{''.join(spans)}</div></div>"


def samples_html(groups) -> str:
    """The page for one step's logged groups (RUN_DIR/samples/step_N.jsonl's lines): header, legend, groups."""
    opts = dict.fromkeys(json.dumps(g.get("options") or {}) for g in groups)
    methods = ", ".join(dict.fromkeys(html.escape(g["method"]) for g in groups))
    head = (f"<h1>step {groups[0]['step']} &middot; {methods} &middot; {len(groups)} groups</h1>"
            + "".join(f"<div>options: {html.escape(', '.join(f'{k} {v}' for k, v in json.loads(o).items()))}</div>"
                      for o in opts if o != "{}"))
    body = []
    for g in groups:
        c = (g.get("options") or {}).get("teacher_clamp") or 1.0
        body.append(f"<h2>group {g['group']} &middot; {html.escape(g['method'])} &middot; {len(g['samples'])} "
                    f"responses</h2><div class=prompt>{html.escape(g['prompt'])}</div>"
                    + "".join(_response_html(s, g["method"], c) for s in g["samples"]))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>samples, step {groups[0]['step']}</title>"
            f"<style>{SHOW_CSS}</style></head><body>{head}{SHOW_LEGEND}{''.join(body)}</body></html>")


def show(run_dir: str, step=None, out=None) -> str:
    """Write the HTML view of RUN_DIR/samples/step_NNNNNN.jsonl (default: the newest step); returns its path."""
    folder = os.path.join(run_dir, "samples")
    files = {int(m.group(1)): f for f in (os.listdir(folder) if os.path.isdir(folder) else ())
             if (m := re.fullmatch(r"step_(\d+)\.jsonl", f))}
    if not files or (step is not None and step not in files):
        raise FileNotFoundError(f"{folder}: no samples for step {step} (logged steps: {sorted(files)})" if files else
                                f"{folder}: no step_NNNNNN.jsonl files (the responses train.py logs)")
    path = os.path.join(folder, files[max(files) if step is None else step])
    with open(path) as f:
        groups = [json.loads(line) for line in f if line.strip()]
    if not groups:
        raise ValueError(f"{path}: no groups")
    out = out or path[:-len(".jsonl")] + ".html"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(samples_html(groups))
    return out


def write_samples(path: str, step: int, rows: list, tokenizer, cfg):
    """A sample log (RUN_DIR/samples/step_NNNNNN.jsonl), one line per logged group: its prompt and responses with
    reward, advantage and per token the student's and the teacher's log-probs, the teacher's relation (prefers /
    rejects / agrees: logp_S - logp_T against the TRRD clamp, docs/algorithm.md's table) and whether the clip
    removed the gradient (first PPO epoch): what train.py's step computed for the rows it marked "log"."""
    import rlad
    tok, clamp = tokenizer, cfg.teacher_clamp or 1.0
    groups = {}
    for r in rows:
        if r.get("log") and "student_logp" in r:
            groups.setdefault(r["group"], []).append(r)
    lines = []
    for g, group in groups.items():
        samples = []
        for r in group:
            student = r["student_logp"]
            teacher = r["teacher"].clamp(min=rlad.TEACHER_LOGP_FLOOR).tolist() if "teacher" in r else None
            relation = ["prefers" if s - t <= -clamp else "rejects" if s - t >= clamp else "agrees"
                        for s, t in zip(student, teacher)] if teacher else None
            samples.append({"response": r["text"], "tokens": tok.batch_decode([[t] for t in r["response"]]),
                            "token_ids": r["response"], "reward": r["reward"], "advantage": r.get("adv", 0.0),
                            "correct": r["correct"], "student_logp": student, "teacher_logp": teacher,
                            "teacher": relation, "clipped": r["clipped"]})
        lines.append({"step": step, "method": cfg.method, "group": g, "epoch": 1,
                      "prompt": tok.decode(group[0]["prompt"]), "samples": samples,
                      "options": {"alpha": cfg.alpha, "eps_low": cfg.eps_low, "eps_high": cfg.eps_high,
                                  "teacher_clamp": clamp}})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    """The command line (see the module docstring); every check that needs no model comes here."""
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0],
                                epilog="curves: python eval.py plot RUN_DIR... --out curves.png")
    p.add_argument("--model", required=True, help="model directory in Hugging Face format (a checkpoint)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", nargs="*", default=None, help="K&K or math files (jsonl/parquet)")
    p.add_argument("--n", type=int, default=32, help="samples per problem")
    p.add_argument("--k", default=None, help="comma-separated k for Pass@k, each <= n (default: 1,n)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--max_tokens", type=int, default=None,
                   help=f"response length cap (default per task {DEFAULT_MAX_TOKENS}, at most what fits the context)")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--dtype", default=None, help="model dtype (default: the engine's, bfloat16 for vLLM)")
    p.add_argument("--max_model_len", type=int, default=None, help="default: longest prompt + max_tokens")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    p.add_argument("--kv_cache_memory_bytes", type=int, default=None, help="vLLM KV cache size (CPU runs)")
    p.add_argument("--batch_size", type=int, default=64, help="prompts per generate call (progress bar steps)")
    p.add_argument("--limit", type=int, default=None, help="at most this many problems per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results.json")
    a = p.parse_args(argv)
    try:
        a.ks = [int(k) for k in a.k.split(",") if k.strip()] if a.k else sorted({1, a.n})
    except ValueError:
        p.error(f"--k {a.k!r}: expected comma-separated integers, e.g. 1,8,32")
    if a.n < 1 or not a.ks or min(a.ks) < 1 or max(a.ks) > a.n:
        p.error(f"--k {a.k} with --n {a.n}: every k must be in 1..n (raise --n or lower --k)")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be >= 1")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        p.error(f"--model {a.model}: no such model directory (no config.json): give a train.py checkpoint "
                "(RUN_DIR/checkpoints/step_...) or a downloaded model (huggingface-cli download NAME --local-dir DIR)")
    if a.task == "math" and not a.data:
        p.error("--task math needs --data FILE... (jsonl or parquet, e.g. aime_2021_2024.jsonl)")
    import data
    try:  # default sets: 100 held-out generated problems per level (K&K PPL2..PPL8, arith L2..L8)
        a.examples = data.load_examples(a.task, a.data or (), "eval", a.limit, levels=None)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    return p, a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["show"]:
        p = argparse.ArgumentParser(prog="eval.py show", description="a step's sampled responses, token by token")
        p.add_argument("run_dir", help="run directory holding samples/step_NNNNNN.jsonl")
        p.add_argument("--step", type=int, default=None, help="default: the newest logged step")
        p.add_argument("--out", default=None, help="default: RUN_DIR/samples/step_NNNNNN.html")
        a = p.parse_args(argv[1:])
        try:
            print(show(a.run_dir, a.step, a.out))
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            p.error(f"{type(e).__name__}: {e}")
        return
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="eval.py plot", description="reward / accuracy vs step for runs")
        p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
        p.add_argument("--out", default="curves.png")
        a = p.parse_args(argv[1:])
        try:
            print(plot(a.run_dirs, a.out))
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        return
    p, a = parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer
    import data
    import rollout
    try:
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        context = getattr(AutoConfig.from_pretrained(a.model), "max_position_embeddings", None)
    except (OSError, ValueError) as e:
        p.error(f"--model {a.model}: cannot load a tokenizer and config from it ({e})")
    longest = max(len(data.build_prompt(ex, tokenizer)[0]) for ex in a.examples)
    max_tokens = a.max_tokens or DEFAULT_MAX_TOKENS[a.task]
    if context:  # prompt + response must fit the model's positions
        room = context - longest
        if room < 1 or (a.max_tokens and a.max_tokens > room):
            p.error(f"the longest prompt ({longest} tokens) + --max_tokens {max_tokens} exceeds the model's context "
                    f"({context}): lower --max_tokens to at most {room}, or --limit / --data to shorter problems")
        max_tokens = min(max_tokens, room)
    if a.engine == "vllm":
        kw = {"dtype": a.dtype} if a.dtype else {}
        engine = rollout.VLLMEngine(a.model, max_model_len=a.max_model_len or longest + max_tokens, seed=a.seed,
                                    gpu_memory_utilization=a.gpu_memory_utilization,
                                    kv_cache_memory_bytes=a.kv_cache_memory_bytes, **kw)
    else:
        engine = rollout.HFEngine(a.model, dtype=a.dtype)
    print(f"eval: {len(a.examples)} problems x {a.n} samples, {a.engine} engine, model {a.model}", file=sys.stderr)
    result = evaluate(engine, tokenizer, a.examples, n=a.n, max_tokens=max_tokens, temperature=a.temperature,
                      top_p=a.top_p, seed=a.seed, ks=a.ks, batch_size=a.batch_size, progress=True)
    engine.shutdown()
    result["config"].update(model=a.model, task=a.task, data=a.data, engine=a.engine, limit=a.limit)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(format_table(result["summary"], a.task, name=os.path.basename(os.path.normpath(a.model))))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
