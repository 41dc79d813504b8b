"""Evaluation: Mean@n and unbiased Pass@k per level, for any checkpoint and task; the SFT baseline's teacher samples.

For every problem we draw `n` samples (temperature 0.6, top-p 0.95, the paper's evaluation), score each with
the task's scorer, and report per level

    Mean@n   = 1/(P n) sum_p c_p                 mean correctness over all samples (= average Pass@1)
    Pass@k   = 1/P sum_p [1 - C(n - c_p, k) / C(n, k)]   unbiased estimator (Chen et al. 2021), c_p of n correct

and their average over levels as the paper does (sample-weighted beside it). Tasks: tasks.py's or module:name.
train.py calls evaluate_ranks with its running engine; the command line prints the paper's table (Markdown) and
writes the summary and every sample as JSON (curves: tools/plot.py):

    python eval.py --model PATH --task kk                        # 100 held-out puzzles per PPL2..PPL8
    python eval.py --model PATH --task kk --data people3_test.jsonl   # the public K&K test files
    python eval.py --model PATH --task math --data aime.jsonl amc.jsonl --n 32 --k 1,8,32 --max_tokens 30000
    python eval.py --model TEACHER --task kk --split train --n 4 --sft_out kk.jsonl  # SFT data (train.py --sft_data)
"""
import argparse
import json
import math
import operator
import os
import re
import sys

# ----------------------------------------------------------------------------- metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k for one problem with `c` correct among `n` samples (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)
    = 1 - prod_{i=n-c+1}^{n} (1 - k/i). The product never builds the huge binomials (C(1000, 500) overflows a float)
    and is exact at the edges: c = 0 -> 0, and n - c < k -> 1 (every k-subset then holds a correct sample)."""
    n, c, k = map(operator.index, (n, c, k))  # ints, numpy ints; a float count is a caller's bug: TypeError
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

def summarize(levels, correct, rewards, n: int, ks=(1,)) -> dict:
    """Aggregate per-sample results, laid out problem by problem (`levels`: one per problem; `correct`, `rewards`:
    n per problem) into {level: {"count", "n", "mean_at_n", "pass_at_k": {k: v}, "mean_reward"}, ...,
    "average": the same keys averaged over levels, plus "mean_at_n_weighted", "pass_at_k_weighted"}."""
    if not levels:
        raise ValueError("summarize: no problems to aggregate")
    if len(correct) != len(levels) * n or len(rewards) != len(correct):
        raise ValueError(f"expected {len(levels)} problems x n={n} samples, got {len(correct)} results")
    per_level = {}  # level (first-seen order) -> list of (c, reward sum) per problem
    for p, level in enumerate(levels):
        block = slice(p * n, (p + 1) * n)
        per_level.setdefault(level, []).append((sum(bool(x) for x in correct[block]), sum(rewards[block])))
    order = list(per_level)  # numbered levels in numeric order (PPL10 after PPL9), other names as first seen
    numbered = {lv: re.fullmatch(r"([A-Za-z]+)(\d+)", lv) for lv in order}
    if all(numbered.values()) and len({m.group(1) for m in numbered.values()}) == 1:
        order.sort(key=lambda lv: int(numbered[lv].group(2)))
    summary = {}
    for level in order:
        cs, rs = zip(*per_level[level])
        summary[level] = {"count": len(cs), "n": n, "mean_at_n": sum(cs) / (len(cs) * n),
                          "pass_at_k": {k: sum(pass_at_k(n, c, k) for c in cs) / len(cs) for k in ks},
                          "mean_reward": sum(rs) / (len(cs) * n)}
    rows = list(summary.values())
    counts = [r["count"] for r in rows]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731  (the paper's average: every level counts the same)
    weighted = lambda xs: sum(x * c for x, c in zip(xs, counts)) / sum(counts)  # noqa: E731  (every problem does)
    at_n, at_k = [r["mean_at_n"] for r in rows], {k: [r["pass_at_k"][k] for r in rows] for k in ks}
    summary["average"] = {"count": sum(counts), "n": n, "mean_at_n": mean(at_n),
                          "pass_at_k": {k: mean(v) for k, v in at_k.items()},
                          "mean_reward": mean([r["mean_reward"] for r in rows]), "mean_at_n_weighted": weighted(at_n),
                          "pass_at_k_weighted": {k: weighted(v) for k, v in at_k.items()}}
    return summary

# ----------------------------------------------------------------------------- sampling + scoring
def evaluate(engine, tokenizer, examples, task, *, n: int, max_tokens: int, temperature: float = 0.6,
             top_p: float = 0.95, seed=0, ks=(1,), batch_size=None, progress: bool = False) -> dict:
    """Sample `n` responses per example with `engine` (rollout.py's interface; train.py passes its running one),
    score them with `task` (tasks.load's), aggregate: {"summary", "samples" (problem by problem), "config"}.
    `batch_size` prompts go to each generate call (None: all in one, vLLM's fastest); `progress`: a tqdm bar."""
    import tasks
    from tqdm import tqdm
    if not examples:
        raise ValueError("evaluate: no examples (empty evaluation set): check --data / --limit")
    _check_ks(n, ks)
    prompts = [tasks.prompt_ids(task, ex, tokenizer) for ex in examples]  # (prompt_ids, prefill) per example
    batch_size = batch_size or len(examples)
    outputs = []  # per prompt: list of n sample dicts
    with tqdm(total=len(examples) * n, desc="sampling", unit="sample", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = [ids for ids, _ in prompts[start:start + batch_size]]
            # rollout.py seeds prompt i of a call with seed + i * n (vLLM: its sample j with seed + i * n + j), so
            # this offset makes the chunks' streams those of one big call: batch_size changes no vLLM result.
            outputs.extend(engine.generate(chunk, n=n, max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, seed=None if seed is None else seed + start * n))
            bar.update(len(chunk) * n)
    if len(outputs) != len(examples) or any(len(o) != n for o in outputs):
        raise RuntimeError(f"engine returned {len(outputs)} prompts with sample counts "
                           f"{sorted(set(len(o) for o in outputs))}, expected {len(examples)} x {n}")
    result = score_outputs(tokenizer, examples, prompts, outputs, task, ks=ks)
    result["config"] = {"n": n, "ks": sorted(set(int(k) for k in ks)), "max_tokens": max_tokens,
                        "temperature": temperature, "top_p": top_p, "seed": seed}
    return result

def evaluate_ranks(engine, tokenizer, examples, task, *, rank: int, world: int, device, seed: int, order_seed: int,
                   n: int, **sampling) -> dict:
    """evaluate() on this rank's share of `examples`, merged across ranks (a collective: one all_reduce): {"eval/LEVEL":
    Mean@n, ..., "eval_accuracy": the average over levels}. A rank's share, a contiguous slice of one seeded shuffle
    (levels mixed: balanced work), is seeded by its global offset: problem k is sampled alike at any world size."""
    import torch
    import torch.distributed as dist
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(order_seed)).tolist()
    per_rank = -(-len(examples) // world)  # ceil: the last rank may get fewer (or none)
    mine = [examples[k] for k in order[rank * per_rank:(rank + 1) * per_rank]]
    summary = evaluate(engine, tokenizer, mine, task, n=n, seed=(seed + rank * per_rank * n) % (2**31 - 1),
                       **sampling)["summary"] if mine else {}
    levels = list(dict.fromkeys(ex["level"] for ex in examples))  # every rank reduces every level
    got = [summary.get(lv, {"count": 0, "mean_at_n": 0.0}) for lv in levels]
    sums = torch.tensor([[s["count"] * s["mean_at_n"], s["count"]] for s in got], dtype=torch.float64, device=device)
    dist.all_reduce(sums)  # [levels, 2]: per level, its problems' summed Mean@n and their count
    out = {f"eval/{lv}": c / m if m else 0.0 for lv, (c, m) in zip(levels, sums.tolist())}
    out["eval_accuracy"] = sum(out.values()) / max(len(out), 1)  # the paper's average over levels
    return out

def evaluate_run(run, seed: int) -> dict:
    """train.py's evaluation: the held-out examples on the run's engine (synced and awake; put back to sleep after),
    Mean@n per level at the eval sampling settings, merged across ranks (a collective)."""
    cfg = run.cfg
    result = evaluate_ranks(run.engine, run.tokenizer, run.eval_examples, run.task, rank=run.rank, world=run.world,
                            device=run.device, seed=seed, order_seed=cfg.seed, n=cfg.eval_n, max_tokens=cfg.max_tokens,
                            temperature=cfg.eval_temperature, top_p=cfg.eval_top_p)
    run.engine.sleep()
    return result

def _check_ks(n, ks):
    if n < 1 or not ks or max(ks) > n or min(ks) < 1:
        raise ValueError(f"need 1 <= k <= n for every k of Pass@k, got n={n}, ks={tuple(ks)}: raise n or lower k")

def score_outputs(tokenizer, examples, prompts, outputs, task, *, ks=(1,)) -> dict:
    """Score engine outputs and aggregate them: {"summary", "samples"}. prompts: tasks.prompt_ids's (prompt_ids,
    prefill) per example; outputs: engine.generate's return value for them (n samples each, the same n for all)."""
    n = len(outputs[0]) if outputs else 0
    if len(outputs) != len(examples) or len(prompts) != len(examples) or any(len(o) != n for o in outputs):
        raise ValueError(f"score_outputs: {len(examples)} examples, {len(prompts)} prompts, {len(outputs)} "
                         "outputs: expected one prompt and n samples per example")
    ks = tuple(sorted(set(int(k) for k in ks)))
    _check_ks(n, ks)
    # Scored: the whole assistant turn, prefill (e.g. "<think>") + the text, special tokens (EOS) dropped as verl does.
    responses = [prefill + tokenizer.decode(out["response_ids"], skip_special_tokens=True)
                 for (_, prefill), outs in zip(prompts, outputs) for out in outs]
    scores = task.score([ex for ex in examples for _ in range(n)], responses)

    samples = []
    for p, (ex, (prompt_ids, _), outs) in enumerate(zip(examples, prompts, outputs)):
        prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
        for i, out in enumerate(outs):
            s = scores[p * n + i]
            samples.append({"id": ex.get("id"), "level": ex["level"], "sample": i, "prompt": prompt_text,
                            "response": responses[p * n + i], "answer": ex.get("answer"), "reward": float(s["reward"]),
                            "correct": bool(s["correct"]), "format_ok": bool(s["format_ok"]),
                            "finish_reason": out["finish_reason"], "response_tokens": len(out["response_ids"])})
    return {"summary": summarize([ex["level"] for ex in examples], [s["correct"] for s in samples],
                                 [s["reward"] for s in samples], n, ks), "samples": samples}

# ----------------------------------------------------------------------------- the paper's tables
def format_table(summary: dict, name: str = "model") -> str:
    """The paper's table, one row named `name`, as Markdown: Mean@n per level and Avg as a fraction (K&K), or with
    Pass@k (k > 1) both in percent (math). Takes evaluate()'s summary or its JSON re-read (string keys)."""
    levels = [lv for lv in summary if lv != "average"]
    if not levels or "average" not in summary:
        raise ValueError("format_table: summary has no levels or no 'average' (expected evaluate()['summary'])")
    cells = lambda row: "| " + " | ".join(row) + " |"  # noqa: E731
    n, name = summary["average"]["n"], name.replace("|", "\\|")  # a '|' in a run name would split the row
    ks = sorted(int(k) for k in summary["average"]["pass_at_k"] if int(k) > 1)
    header, values = ["model"], [name]
    for lv in levels + ["average"]:
        label, pk = "Avg" if lv == "average" else lv, {int(k): v for k, v in summary[lv]["pass_at_k"].items()}
        if not ks:
            header, values = header + [label], values + [f"{summary[lv]['mean_at_n']:.2f}"]
            continue
        header += [f"{label} Mean@{n}"] + [f"{label} Pass@{k}" for k in ks]
        values += [f"{100 * summary[lv]['mean_at_n']:.1f}"] + [f"{100 * pk[k]:.1f}" for k in ks]
    return "\n".join([cells(header), cells(["---"] * len(header)), cells(values)])

def write_samples(run, step: int, rows: list):
    """A sample log (RUN_DIR/samples/step_NNNNNN.jsonl; tools/show.py): a line for each of rank 0's first
    log_samples_groups groups of the step's kept rows: prompt, responses, reward, advantage, per token both
    log-probs, the teacher's relation (prefers / rejects / agrees: logp_S - logp_T against the TRRD clamp,
    docs/algorithm.md), whether the clip removes the token's gradient, and what the objective made of the token where
    it has a per-token quantity (TOP-D: its reward and advantage; topk_kd: the top-k KL). The student's side is the
    update's at its start (first epoch, before any optimizer step, where pi_S = pi_old): one more no-grad forward
    through the update's own code, over the logged rows. A collective: every rank calls it (the others with no rows);
    rank 0 writes the file."""
    import torch

    import policy
    import rlad
    cfg = run.cfg
    tok = run.tokenizer
    clamp = cfg.teacher_clamp or 1.0
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    first_groups = sorted({r.group for r in rows})[:cfg.log_samples_groups]
    logged = [r for r in rows if r.group in first_groups] if rank0 else []
    batches = policy.pack(logged, cfg.micro_batch_tokens)
    samples = {}  # id(row) -> its sample dict
    with torch.no_grad():
        for j in range(policy.reduce_ints([len(batches)])[0]):  # the same number of forwards on every rank
            micro = batches[j] if j < len(batches) else []
            batch = policy.collate(micro, run.device)
            logp, _, topk_logp = policy.forward(run.student, batch, with_entropy=False)  # [B, R], [B, R, k]
            token_info = {}  # "clipped" [B, R] for a clipped ratio, "topk_kl" [B, R] for topk_kd
            rlad.policy_loss(cfg.method, logp, batch.get("old_logp", logp), batch.get("token_adv", batch["adv"]),
                             batch["mask"], teacher_logp=batch.get("teacher_logp"), ref_logp=batch.get("ref_logp"),
                             teacher_topk_logp=batch.get("teacher_topk_logp"), topk_logp=topk_logp, config=cfg,
                             max_len=cfg.max_tokens, token_info=token_info)
            for i, r in enumerate(micro):
                samples[id(r)] = _sample(r, logp[i], token_info=token_info, i=i, tokenizer=tok, cfg=cfg)
    if hasattr(run.student, "reshard"):  # FSDP2 keeps the root's gathered weights after a no-grad forward
        run.student.reshard()
    if not logged:
        return
    lines = []
    for g in first_groups:
        group = [r for r in logged if r.group == g]
        lines.append({"step": step, "method": cfg.method, "group": g, "epoch": 1,
                      "prompt": tok.decode(group[0].prompt), "samples": [samples[id(r)] for r in group],
                      "options": {"alpha": cfg.alpha, "eps_low": cfg.eps_low, "eps_high": cfg.eps_high,
                                  "teacher_clamp": clamp}})
    path = os.path.join(cfg.run_dir, "samples", f"step_{step:06d}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)

def _sample(r, logp, *, token_info: dict, i: int, tokenizer, cfg) -> dict:
    """One logged response (row i of its micro-batch) as the sample log holds it; logp: that row of the [B, R]."""
    import rlad
    clamp = cfg.teacher_clamp or 1.0
    n = len(r.response)
    student = logp[:n].float().cpu().tolist()
    teacher = relation = None
    if r.teacher_logp is not None:
        teacher = r.teacher_logp.clamp(min=rlad.TEACHER_LOGP_FLOOR).tolist()
        relation = ["prefers" if s - t <= -clamp else "rejects" if s - t >= clamp else "agrees"
                    for s, t in zip(student, teacher)]
    sample = {"response": r.text, "tokens": tokenizer.batch_decode([[t] for t in r.response]), "token_ids": r.response,
              "reward": r.reward, "advantage": r.adv, "correct": r.correct, "student_logp": student,
              "teacher_logp": teacher, "teacher": relation,
              "clipped": token_info["clipped"][i, :n].tolist() if "clipped" in token_info else None}
    if r.token_adv is not None:  # TOP-D: each token's reward log(alpha rho + 1 - alpha) and its advantage
        sample["token_reward"] = rlad.topd_rewards(r.teacher_logp, r.engine_logp, cfg.topd_alpha).tolist()
        sample["token_advantage"] = r.token_adv.tolist()
    if "topk_kl" in token_info:  # topk_kd: KL(teacher top-k || student) at each position
        sample["topk_kl"] = token_info["topk_kl"][i, :n].float().cpu().tolist()
    return sample

# ----------------------------------------------------------------------------- command line
def parse_args(argv):
    """The command line (see the module docstring); every check that needs no model comes here."""
    import tasks
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory in Hugging Face format (a checkpoint)")
    p.add_argument("--task", required=True, help="kk | math | arith | module:name (a task of your own)")
    p.add_argument("--data", nargs="*", default=(), help="data files (jsonl/parquet) or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--split", choices=["eval", "train"], default="eval", help="the task's held-out or training set")
    p.add_argument("--levels", default="", help="generated levels, e.g. 3,4,5 (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="at most this many problems per level")
    p.add_argument("--n", type=int, default=32, help="samples per problem")
    p.add_argument("--k", default=None, help="comma-separated k for Pass@k, each <= n (default: 1,n)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--max_tokens", type=int, default=None, help="response cap (default 4096, or what fits the context)")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    p.add_argument("--kv_cache_memory_bytes", type=int, default=None, help="vLLM KV cache size (CPU runs)")
    p.add_argument("--batch_size", type=int, default=64, help="prompts per generate call (progress bar steps)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and, with --split train, the data's)")
    p.add_argument("--out", default="results.json")
    p.add_argument("--sft_out", default=None, help="also write the correct samples as examples with a \"target\": "
                   "the SFT baseline's data (train.py --sft_data)")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n {a.n}: must be >= 1")
    try:
        a.ks = [int(k) for k in a.k.split(",") if k.strip()] if a.k else sorted({1, a.n})
    except ValueError:
        p.error(f"--k {a.k!r}: expected comma-separated integers, e.g. 1,8,32")
    try:
        levels = tuple(int(x) for x in a.levels.split(",") if x)
    except ValueError:
        p.error(f"--levels {a.levels!r}: expected comma-separated integers, e.g. 3,4,5")
    if not a.ks or min(a.ks) < 1 or max(a.ks) > a.n:
        p.error(f"--k {a.k} with --n {a.n}: every k must be in 1..n (raise --n or lower --k)")
    for name, ok, text in (("temperature", a.temperature >= 0, ">= 0 (0: greedy)"),
                           ("top_p", 0 < a.top_p <= 1, "in (0, 1]"),
                           ("gpu_memory_utilization", 0 < a.gpu_memory_utilization <= 1, "in (0, 1]")):
        if not ok:
            p.error(f"--{name} {getattr(a, name)}: must be {text}")
    if (a.limit is not None and a.limit < 1) or (a.max_tokens is not None and a.max_tokens < 1):
        p.error("--limit and --max_tokens must be >= 1")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        import preflight
        p.error(f"--model {a.model}: no such model directory (no config.json): give a train.py checkpoint "
                f"(RUN_DIR/checkpoints/step_...) or a downloaded model ({preflight.DOWNLOAD} NAME --local-dir DIR)")
    try:
        a.task_obj = tasks.load(a.task)
        a.examples = a.task_obj.examples(a.split, tasks.Source(tuple(a.data), levels, a.limit, a.seed))
    except (OSError, ValueError, ImportError) as e:
        p.error(str(e))
    if not a.examples:
        p.error(f"no {a.task} examples (--data {list(a.data)}, --split {a.split})")
    return p, a

def main(argv=None):
    p, a = parse_args(sys.argv[1:] if argv is None else argv)
    from transformers import AutoConfig, AutoTokenizer
    import rollout
    import tasks
    try:
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        context = getattr(AutoConfig.from_pretrained(a.model), "max_position_embeddings", None)
    except (OSError, ValueError) as e:
        p.error(f"--model {a.model}: cannot load a tokenizer and config from it ({e})")
    longest = max(len(tasks.prompt_ids(a.task_obj, ex, tokenizer)[0]) for ex in a.examples)
    max_tokens = a.max_tokens or 4096
    if context:  # prompt + response must fit the model's positions
        room = context - longest
        if room < 1 or (a.max_tokens and a.max_tokens > room):
            p.error(f"the longest prompt ({longest} tokens) + --max_tokens {max_tokens} exceeds the model's context "
                    f"({context}): lower --max_tokens to at most {room}, or --limit / --data to shorter problems")
        max_tokens = min(max_tokens, room)
    engine = rollout.make_engine(a.model, a.engine, seed=a.seed, max_model_len=longest + max_tokens,
                                 gpu_memory_utilization=a.gpu_memory_utilization,
                                 kv_cache_memory_bytes=a.kv_cache_memory_bytes)
    print(f"eval: {len(a.examples)} problems x {a.n} samples, {a.engine} engine, model {a.model}", file=sys.stderr)
    result = evaluate(engine, tokenizer, a.examples, a.task_obj, n=a.n, max_tokens=max_tokens, ks=a.ks, seed=a.seed,
                      temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size, progress=True)
    engine.shutdown()
    result["config"].update(model=a.model, task=a.task, data=list(a.data), split=a.split, engine=a.engine,
                            limit=a.limit)
    per_sample = (ex for ex in a.examples for _ in range(a.n))  # laid out as result["samples"]
    sft = [json.dumps(dict(ex, target=s["response"])) for ex, s in zip(per_sample, result["samples"]) if s["correct"]]
    for path, lines in ((a.out, [json.dumps(result, indent=1)]), (a.sft_out, sft)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.writelines(line + "\n" for line in lines)
            print(f"wrote {path} ({len(lines)} lines)" if path == a.sft_out else f"wrote {path}", file=sys.stderr)
    print(format_table(result["summary"], name=os.path.basename(os.path.normpath(a.model))))

if __name__ == "__main__":
    main()
