"""mini_repro.py: the miniature study on CPU: where does RLAD beat GRPO and KDRL, where not, and why.

Hypothesis, stated before the runs (configs/mini_study.toml, [predict]): RLAD beats GRPO and KDRL on a level
where the student has partial skill (clearly above chance, not solved) and a stronger, different teacher
disagrees with it on many of its sampled tokens; it does not where the student is at chance or solves the level.

The task is data.py's "arith" (running sums mod 10; level Ln = n operands; "3 + 5 - 7 =" -> "8 1"; the reward
checks the length and the last value), the tokenizer tiny.make_arith_tokenizer. Everything runs through the
project's own train.py, eval.py and rlad.py, as subprocesses, the way a user runs them:

    1. models      a random teacher (~0.37M params) and a smaller random student (~0.22M), other seeds
    2. SFT         each trained separately on ground-truth solutions (train.py --method sft);
                   the student's run keeps a checkpoint and an evaluation every few hundred steps
    3. profiles    starting students chosen by their accuracy profile, not by a step number: for each target
                   profile ([profiles.*]) the student checkpoint whose evaluation is nearest to it (OUT/profiles.json)
    4. diagnose    per profile and level, on one batch sampled like an RL step (diagnose.py): rollout accuracy,
                   informative groups, share of tokens with |logp_S - logp_T| >= 1, TRRD's masked shares, and the
                   cosine between the GRPO and RLAD gradients; again after RL, on the seed-1 GRPO and RLAD weights
    5. noise       each starting student evaluated by eval.py under several sampling seeds: the noise of one
                   evaluation, per level
    6. RL          from each profile's student, per seed: grpo, kdrl, rlad and two controls
                     rlad_self  RLAD with the student's own starting weights as the "teacher" (clipping, no knowledge)
                     distill    on-policy distillation, the KD term alone, no reward
                   plus one run with `--engine hf` next to its vLLM twin (engine mismatch ruled out by a number)
    7. report      OUT/results.json, OUT/results.md (per profile: accuracy, paired differences, diagnostics, the
                   prediction against the outcome; the noise; the engine control), OUT/curves_PROFILE.png
                   (accuracy per level vs RL step)

From the repository root (this script lives in experiments/mini_repro/, its presets in configs/ next to it):

    python experiments/mini_repro/mini_repro.py --out runs/mini          # the study (46 min on 2 cores)
    python experiments/mini_repro/mini_repro.py --out runs/mini_tune --tune  # per-method sweeps, tuning seed only
    python experiments/mini_repro/mini_repro.py --out /tmp/mini --quick  # a smoke version (the test suite's)

Resumable: a finished run (its final checkpoint or output exists) is skipped; an unfinished train.py run continues
from its newest checkpoint (--resume true). Each subprocess gets one torch thread (OMP_NUM_THREADS=1); `--jobs`
(default 2, one per core) run side by side.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/mini_repro/: this script and its presets
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository root: train.py, eval.py, tiny.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `import tiny` below, whatever the working directory
STUDY = os.path.join(HERE, "configs", "mini_study.toml")
SFT_PRESET = os.path.join(HERE, "configs", "mini_sft.toml")
RL_PRESET = os.path.join(HERE, "configs", "mini_rl.toml")
DIAGNOSE = os.path.join(HERE, "diagnose.py")
BASELINE = "grpo"  # the paired differences are taken against this method (and rlad against kdrl)
SECTIONS = ("teacher_model", "student_model", "teacher_sft", "student_sft", "profiles", "rl", "methods", "seeds",
            "report_levels", "predict", "noise_seeds", "engine_control")


# ----------------------------------------------------------------------------- settings
def load_study(path: str, quick: bool) -> dict:
    """The study config (configs/mini_study.toml), with its [quick] overrides merged in when asked for."""
    with open(path, "rb") as f:
        study = tomllib.load(f)
    missing = [key for key in SECTIONS if key not in study]
    if missing:
        raise SystemExit(f"{path}: missing {missing}; see the comments in {STUDY}")
    if BASELINE not in study["methods"]:
        raise SystemExit(f"{path}: [methods.{BASELINE}] is the baseline of the paired differences; keep it")
    if quick:
        q = study.get("quick", {})
        for section in ("teacher_model", "student_model", "teacher_sft", "student_sft", "rl", "engine_control"):
            study[section] = {**study[section], **q.get(section, {})}
        for key in ("seeds", "noise_seeds", "profiles", "diagnose"):
            study[key] = q.get(key, study.get(key))
    return study


def rl_settings(study: dict) -> dict:
    """What every RL run uses: the RL preset (mini_rl.toml) with the study's [rl] overrides on top."""
    with open(RL_PRESET, "rb") as f:
        return {**tomllib.load(f), **study["rl"]}


def train_args(overrides: dict) -> list:
    """train.py `--key value` flags (booleans as true/false, the way its parser reads them)."""
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


# ----------------------------------------------------------------------------- jobs
def final_checkpoint(run_dir: str, max_steps: int) -> str:
    """Where train.py writes the last step's checkpoint: RUN_DIR/checkpoints/step_NNNNNN/ (six digits)."""
    return os.path.join(run_dir, "checkpoints", f"step_{max_steps:06d}")


def is_finished(run_dir: str, max_steps: int) -> bool:
    """Finished = the final checkpoint is complete (train.py renames it into place once fully written)."""
    return os.path.isfile(os.path.join(final_checkpoint(run_dir, max_steps), "trainer_state.pt"))


def train_job(name: str, run_dir: str, steps: int, args, after=(), **extra) -> dict:
    """A train.py run; `args` (flags, or a function returning them when the job starts) get --resume true."""
    return {"name": name, "run_dir": run_dir, "steps": steps, "after": tuple(after), "args": args,
            "done": lambda: is_finished(run_dir, steps), "script": os.path.join(ROOT, "train.py"),
            "resume": True, **extra}


def output_job(name: str, script: str, output: str, args, after=(), **extra) -> dict:
    """A script that writes one JSON file (`--out`): it writes OUTPUT.tmp, renamed into place once it succeeds."""
    return {"name": name, "run_dir": os.path.dirname(output), "output": output, "after": tuple(after),
            "args": args, "done": lambda: os.path.isfile(output), "script": script, "resume": False, **extra}


def run_jobs(jobs: list, parallel: int, log) -> dict:
    """Run the jobs, at most `parallel` at a time, each after the jobs it needs. Returns {name: seconds}.

    Finished jobs are skipped (a train.py run's seconds read back from RUN_DIR/wall_seconds.json); unfinished
    train.py runs continue from their newest checkpoint. A failed job stops the study with its log's tail:
    everything after it would measure nothing.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false")
    done, seconds = set(), {}
    for job in jobs:
        if job["done"]():
            done.add(job["name"])
            seconds[job["name"]] = wall_seconds(job)
    pending, running = [j for j in jobs if j["name"] not in done], {}
    if pending:
        log(f"{len(pending)} jobs to do ({len(done)} already finished), {parallel} at a time")
    while pending or running:
        ready = [j for j in pending if all(a in done for a in j["after"])]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            pending.remove(job)
            os.makedirs(job["run_dir"], exist_ok=True)
            args = job["args"]() if callable(job["args"]) else job["args"]  # may read what earlier jobs wrote
            cmd = [sys.executable, job["script"]] + args
            cmd += ["--resume", "true"] if job["resume"] else ["--out", job["output"] + ".tmp"]
            log_path = job_log(job)
            out = open(log_path, "a")
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            running[job["name"]] = (proc, job, out, time.time())
            log(f"start {job['name']}")
        if not running:
            missing = sorted({a for j in pending for a in j["after"]} - done)
            raise SystemExit(f"jobs {[j['name'] for j in pending]} wait for {missing}, which no job makes")
        pid, status = os.wait()  # any one child: os.wait reaps exactly one
        for name, (proc, job, out, t0) in list(running.items()):
            if proc.pid != pid:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.close()
            del running[name]
            seconds[name] = time.time() - t0
            if proc.returncode == 0 and "output" in job:
                os.replace(job["output"] + ".tmp", job["output"])
            if proc.returncode != 0 or not job["done"]():
                for p, _, o, _ in running.values():  # stop the others cleanly: they resume next time
                    p.terminate()
                    p.wait()
                    o.close()
                tail = open(job_log(job)).read()[-3000:]
                raise SystemExit(f"{name} failed (exit {proc.returncode}); log {job_log(job)}:\n{tail}")
            done.add(name)
            with open(seconds_path(job), "w") as f:
                json.dump({"seconds": seconds[name], "parallel": parallel}, f)
            log(f"done  {name} in {seconds[name]:.0f} s")
    return seconds


def job_log(job: dict) -> str:
    return os.path.join(job["run_dir"], "train.log") if job["resume"] else job["output"][:-5] + ".log"


def seconds_path(job: dict) -> str:
    return os.path.join(job["run_dir"], "wall_seconds.json") if job["resume"] else job["output"][:-5] + ".seconds"


def wall_seconds(job: dict):
    """Wall-clock seconds of the invocation that finished the job (None if unknown)."""
    path = seconds_path(job)
    return json.load(open(path))["seconds"] if os.path.isfile(path) else None


# ----------------------------------------------------------------------------- the study's jobs
def paths_of(study: dict, out: str) -> dict:
    t_steps, s_steps = study["teacher_sft"]["max_steps"], study["student_sft"]["max_steps"]
    teacher_run, student_run = os.path.join(out, "teacher_sft"), os.path.join(out, "student_sft")
    return {"teacher_run": teacher_run, "student_run": student_run, "models": os.path.join(out, "models"),
            "teacher": final_checkpoint(teacher_run, t_steps), "profiles": os.path.join(out, "profiles.json")}


def sft_jobs(study: dict, out: str) -> list:
    """The two SFT runs: the teacher, and the student whose kept checkpoints the profiles choose from."""
    p = paths_of(study, out)
    return [train_job(who + "_sft", p[who + "_run"], study[who + "_sft"]["max_steps"],
                      ["--config", SFT_PRESET, "--run_dir", p[who + "_run"], "--model",
                       os.path.join(p["models"], who + "_init")] + train_args(study[who + "_sft"]))
            for who in ("teacher", "student")]


def evaluations(run_dir: str) -> dict:
    """{step: {level: Mean@n}} of every evaluation in RUN_DIR/metrics.jsonl."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line) if line.strip() else {}
            if "eval_accuracy" in rec:
                out[rec["step"]] = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("eval/")}
    return out


def select_profiles(study: dict, out: str) -> dict:
    """For each [profiles.NAME] target, the kept student checkpoint whose evaluation is nearest to it (sum of
    absolute differences over the target's levels; the earliest on a tie). Chosen once, kept in
    OUT/profiles.json, so every later job and rerun starts from the same students."""
    p = paths_of(study, out)
    if os.path.isfile(p["profiles"]):
        return json.load(open(p["profiles"]))
    ckpt_dir = os.path.join(p["student_run"], "checkpoints")
    kept = {int(d.split("_")[1]) for d in os.listdir(ckpt_dir)
            if os.path.isfile(os.path.join(ckpt_dir, d, "trainer_state.pt"))}
    evals = {s: acc for s, acc in evaluations(p["student_run"]).items() if s in kept}
    if not evals:
        raise SystemExit(f"{p['student_run']}: no kept checkpoint has an evaluation; set [student_sft] eval_every "
                         "equal to save_every and keep_last high enough to keep them all")
    chosen = {}
    for name, target in study["profiles"].items():
        dist = lambda s: sum(abs(evals[s][lv] - v) for lv, v in target.items())  # noqa: E731
        step = min(sorted(evals), key=dist)
        chosen[name] = {"step": step, "checkpoint": os.path.join(ckpt_dir, f"step_{step:06d}"), "target": target,
                        "sft_eval": {lv: evals[step][lv] for lv in study["report_levels"]},
                        "distance": dist(step)}
    with open(p["profiles"] + ".tmp", "w") as f:
        json.dump(chosen, f, indent=1)
    os.replace(p["profiles"] + ".tmp", p["profiles"])
    return chosen


def rl_run_dir(out: str, profile: str, method: str, seed: int, suffix: str = "") -> str:
    return os.path.join(out, "runs", profile, f"{method}_seed{seed}{suffix}")


def rl_job(study: dict, out: str, profile: str, method: str, seed: int, settings: dict, name=None, run_dir=None):
    """One RL run from a profile's student; its flags are made when it starts (after the profiles are chosen)."""
    p = paths_of(study, out)
    settings = dict(settings)
    who = settings.pop("teacher", "teacher")  # "student": the control with the student's own weights as teacher
    if who not in ("teacher", "student"):
        raise SystemExit(f"[methods.{method}] teacher = {who!r}: use 'teacher' or 'student'")
    run_dir = run_dir or rl_run_dir(out, profile, method, seed)

    def args():
        student = select_profiles(study, out)[profile]["checkpoint"]
        return (["--config", RL_PRESET, "--run_dir", run_dir, "--model", student,
                 "--teacher", p["teacher"] if who == "teacher" else student, "--seed", str(seed)]
                + train_args({**study["rl"], **settings}))
    uses_teacher = who == "teacher" and settings.get("method", study["rl"].get("method")) != "grpo"
    return train_job(name or f"{profile}/{method}_seed{seed}", run_dir, study["rl"]["max_steps"], args,
                     after=("teacher_sft", "student_sft") if uses_teacher else ("student_sft",),
                     profile=profile, method=method, seed=seed)


def diagnose_job(study: dict, out: str, profile: str, which: str, after=()) -> dict:
    """diagnose.py on a profile's starting student ("start") or on a seed-1 run's final weights ("grpo", ...)."""
    p, rl = paths_of(study, out), rl_settings(study)
    rlad_settings = {**rl, **study["methods"].get("rlad", {})}
    output = os.path.join(out, "diagnostics", f"{profile}_{which}.json")

    def args():
        student = (select_profiles(study, out)[profile]["checkpoint"] if which == "start" else
                   final_checkpoint(rl_run_dir(out, profile, which, study["seeds"][0]), rl["max_steps"]))
        d = study.get("diagnose", {})
        return ["--student", student, "--teacher", p["teacher"], "--levels",
                ",".join(lv[1:] for lv in study["report_levels"]), "--prompts", str(d.get("prompts", 64)),
                "--group", str(rl.get("group_size", 8)), "--max_tokens", str(rl.get("max_tokens", 10)),
                "--seed", str(study.get("tune_seed", 0))] + train_args(
            {k: rlad_settings[k] for k in ("alpha", "eps_low", "eps_high", "teacher_clamp") if k in rlad_settings})
    return output_job(f"{profile}/diagnose_{which}", DIAGNOSE, output, args,
                      after=("teacher_sft", "student_sft") + tuple(after))


def noise_job(study: dict, out: str, who: str, seed: int) -> dict:
    """eval.py on a profile's starting student (or on the teacher, who = "teacher") with the RL runs' evaluation
    settings, under one sampling seed: the same weights under several seeds give the noise of one evaluation."""
    rl = rl_settings(study)
    output = os.path.join(out, "noise", f"{who}_seed{seed}.json")

    def args():
        model = paths_of(study, out)["teacher"] if who == "teacher" else select_profiles(study, out)[who]["checkpoint"]
        return ["--model", model, "--task", "arith", "--n", str(rl["eval_n"]), "--limit", str(rl["eval_per_level"]),
                "--temperature", str(rl["eval_temperature"]), "--top_p", str(rl["eval_top_p"]), "--max_tokens",
                str(rl.get("max_tokens", 10)), "--kv_cache_memory_bytes", str(16 << 20), "--seed", str(seed)]
    return output_job(f"{who}/noise_seed{seed}", os.path.join(ROOT, "eval.py"), output, args,
                      after=("teacher_sft",) if who == "teacher" else ("student_sft",))


def study_jobs(study: dict, out: str, seeds: list, methods: list) -> list:
    """SFT, then per profile: the RL runs of every (method, seed), diagnostics, noise, and the engine control."""
    jobs = sft_jobs(study, out) + [noise_job(study, out, "teacher", s) for s in study["noise_seeds"]]
    for profile in study["profiles"]:
        jobs += [noise_job(study, out, profile, s) for s in study["noise_seeds"]]
        jobs.append(diagnose_job(study, out, profile, "start"))
        for seed in seeds:
            jobs += [rl_job(study, out, profile, m, seed, study["methods"][m]) for m in methods]
        jobs += [diagnose_job(study, out, profile, m, after=(f"{profile}/{m}_seed{seeds[0]}",))
                 for m in ("grpo", "rlad") if m in methods]
    control = study["engine_control"]
    if control["profile"] in study["profiles"] and control["method"] in methods and control["seed"] in seeds:
        jobs.append(rl_job(study, out, control["profile"], control["method"], control["seed"],
                           {**study["methods"][control["method"]], "engine": "hf"},
                           name="engine_control_hf",
                           run_dir=rl_run_dir(out, control["profile"], control["method"], control["seed"], "_hf")))
    return jobs


def make_models(study: dict, out: str):
    """The tokenizer and the two random initial models (written once; a rerun keeps them)."""
    import tiny
    tokenizer = tiny.make_arith_tokenizer()
    for name in ("teacher", "student"):
        path = os.path.join(out, "models", f"{name}_init")
        if not os.path.isfile(os.path.join(path, "config.json")):
            tiny.save_tiny(path, tokenizer, **study[f"{name}_model"])


# ----------------------------------------------------------------------------- results
def final_eval(run_dir: str, max_steps: int, levels: list) -> dict:
    """{level: Mean@n} of the run's last step for `levels`, plus their "average" (each level counts the same)."""
    final = evaluations(run_dir).get(max_steps)
    if final is None:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no evaluation at step {max_steps}: was eval_every 0? "
                         "delete the run directory and rerun")
    missing = [lv for lv in levels if lv not in final]
    if missing:
        raise SystemExit(f"{run_dir}: no evaluation of {missing} (evaluated: {sorted(final)}); fix report_levels")
    out = {lv: final[lv] for lv in levels}
    out["average"] = statistics.fmean(out.values())
    return out


def run_means(run_dir: str, keys: list) -> dict:
    """Mean over a run's steps of each metric in `keys` (and the max of logprob_mismatch_max)."""
    recs = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl")) if ln.strip()]
    out = {k: statistics.fmean(r[k] for r in recs if k in r) for k in keys if any(k in r for r in recs)}
    if any("logprob_mismatch_max" in r for r in recs):
        out["logprob_mismatch_max"] = max(r["logprob_mismatch_max"] for r in recs if "logprob_mismatch_max" in r)
    return out


def mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(runs: dict, other: dict, seeds: list, levels: list) -> dict:
    """Per level: mean / std over seeds of runs[s] - other[s], the per-seed values and how many are > 0."""
    diffs = {lv: [runs[s][lv] - other[s][lv] for s in seeds] for lv in levels}
    return {lv: {"mean": mean_std(d)[0], "std": mean_std(d)[1], "wins": sum(x > 0 for x in d), "per_seed": d}
            for lv, d in diffs.items()}


def aggregate(per_run: dict, methods: list, seeds: list) -> dict:
    """Per method: per-seed accuracies, mean/std per level, and paired differences against the baseline (and,
    for rlad, against kdrl)."""
    levels = list(next(iter(per_run.values())))
    out = {}
    for method in methods:
        runs = {seed: per_run[(method, seed)] for seed in seeds}
        entry = {"seeds": {str(s): r for s, r in runs.items()}, "mean": {}, "std": {}}
        for lv in levels:
            entry["mean"][lv], entry["std"][lv] = mean_std([r[lv] for r in runs.values()])
        for other in ([BASELINE] if method != BASELINE else []) + (["kdrl"] if method == "rlad" else []):
            if all((other, s) in per_run for s in seeds):
                entry["diff_vs_" + other] = paired(runs, {s: per_run[(other, s)] for s in seeds}, seeds, levels)
        out[method] = entry
    return out


def noise_summary(outputs: list, levels: list) -> dict:
    """Per level: mean and std over the noise evaluations (the same weights, other sampling seeds)."""
    accs = []
    for path in outputs:
        summary = json.load(open(path))["summary"]
        accs.append({lv: summary[lv]["mean_at_n"] for lv in levels})
    return {lv: {"mean": mean_std([a[lv] for a in accs])[0], "std": mean_std([a[lv] for a in accs])[1]}
            for lv in levels}


def predict(diag_start: dict, start_acc: dict, rule: dict) -> dict:
    """The hypothesis per level, from what is known before RL: 'gain' where the student is partial (start
    accuracy in [min_accuracy, max_accuracy]) and the teacher disagrees (share >= min_disagree), else 'none'."""
    out = {}
    for lv, d in diag_start.items():
        partial = rule["min_accuracy"] <= start_acc[lv] <= rule["max_accuracy"]
        out[lv] = "gain" if partial and d["disagree"] >= rule["min_disagree"] else "none"
    return out


def collect(study: dict, out: str, seeds: list, methods: list, jobs: list) -> dict:
    """Everything the report needs, from what the jobs wrote."""
    levels, steps = study["report_levels"], study["rl"]["max_steps"]
    p, profiles = paths_of(study, out), select_profiles(study, out)
    noise_of = lambda who: noise_summary([os.path.join(out, "noise", f"{who}_seed{s}.json")  # noqa: E731
                                          for s in study["noise_seeds"]], levels)
    result = {"task": "arith", "seeds": seeds, "levels": levels, "profiles": {}, "teacher": noise_of("teacher")}
    for name, prof in profiles.items():
        per_run = {(j["method"], j["seed"]): final_eval(j["run_dir"], steps, levels) for j in jobs
                   if j.get("profile") == name and j["name"] != "engine_control_hf"}
        noise = noise_of(name)
        start = {lv: noise[lv]["mean"] for lv in levels}
        diag = {which: json.load(open(os.path.join(out, "diagnostics", f"{name}_{which}.json")))
                for which in ("start", "grpo", "rlad") if os.path.isfile(os.path.join(out, "diagnostics",
                                                                                     f"{name}_{which}.json"))}
        result["profiles"][name] = {
            "student_step": prof["step"], "target": prof["target"], "start": start, "noise": noise,
            "methods": aggregate(per_run, methods, seeds), "diagnostics": diag,
            "prediction": predict(diag["start"], start, study["predict"])}
    control = study["engine_control"]
    hf_dir = rl_run_dir(out, control["profile"], control["method"], control["seed"], "_hf")
    if os.path.isdir(hf_dir):
        vllm_dir = rl_run_dir(out, control["profile"], control["method"], control["seed"])
        keys = ["logprob_mismatch", "grad_norm", "reward", "time/step"]
        result["engine_control"] = {
            **control, **{engine: {**run_means(d, keys), "final": final_eval(d, steps, levels)}
                          for engine, d in (("vllm", vllm_dir), ("hf", hf_dir))}}
    return result


def fmt_diff(d: dict, n: int) -> str:
    return f"{d['mean']:+.3f} +- {d['std']:.3f} ({d['wins']}/{n})"


def format_tables(results: dict, study: dict) -> str:
    """Markdown: per profile the accuracy table, the paired differences, the diagnostics and the prediction;
    then the engine control."""
    levels, n = results["levels"], len(results["seeds"])
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    header = ["model"] + levels + ["Avg"]
    rl = rl_settings(study)
    lines = [f"Accuracy: Mean@{rl['eval_n']} over {rl['eval_per_level']} held-out problems per level (temperature "
             f"{rl['eval_temperature']}, top-p {rl['eval_top_p']}), the final step; mean +- std over {n} seed"
             f"{'s' * (n > 1)}. Paired differences: same seed = same student, data order and evaluation samples; "
             "(k/n) = on how many seeds the first method was ahead.", ""]
    for name, prof in results["profiles"].items():
        noise = prof["noise"]
        lines += [f"### Profile `{name}` (student SFT step {prof['student_step']})", "", row(header),
                  row(["---"] * len(header)),
                  row([f"teacher ({len(study['noise_seeds'])} evals)"] + [
                      f"{results['teacher'][lv]['mean']:.3f} +- {results['teacher'][lv]['std']:.3f}" for lv in levels]
                      + [f"{statistics.fmean(results['teacher'][lv]['mean'] for lv in levels):.3f}"]),
                  row([f"student (start, {len(study['noise_seeds'])} evals)"] +
                      [f"{prof['start'][lv]:.3f} +- {noise[lv]['std']:.3f}" for lv in levels] +
                      [f"{statistics.fmean(prof['start'].values()):.3f}"])]
        for method, entry in prof["methods"].items():
            lines.append(row([method] + [f"{entry['mean'][lv]:.3f} +- {entry['std'][lv]:.3f}"
                                         for lv in levels + ["average"]]))
        lines += ["", row(["paired"] + levels + ["Avg"]), row(["---"] * len(header))]
        for method, entry in prof["methods"].items():
            for other in (BASELINE, "kdrl"):
                d = entry.get("diff_vs_" + other)
                if d:
                    lines.append(row([f"{method} - {other}"] + [fmt_diff(d[lv], n) for lv in levels + ["average"]]))
        diag = prof["diagnostics"]
        cols = ["accuracy", "informative", "disagree", "masked_pos", "masked_neg", "cosine"]
        lines += ["", row(["diagnostics", "level"] + cols + ["predicted"]), row(["---"] * (len(cols) + 3))]
        for which, per_level in diag.items():
            for lv in levels:
                label = "start" if which == "start" else f"after {which} (seed {results['seeds'][0]})"
                lines.append(row([label, lv] + [f"{per_level[lv][c]:.3f}" for c in cols] +
                                 [prof["prediction"][lv] if which == "start" else ""]))
        lines.append("")
    ec = results.get("engine_control")
    if ec:
        lines += [f"### Engine control: `{ec['method']}`, profile `{ec['profile']}`, seed {ec['seed']}", "",
                  row(["engine", "logprob_mismatch (mean)", "logprob_mismatch (max)", "grad_norm (mean)",
                       "reward (mean)", "s/step"] + [f"final {lv}" for lv in levels] + ["final Avg"]),
                  row(["---"] * (7 + len(levels)))]
        for engine in ("vllm", "hf"):
            e = ec[engine]
            lines.append(row([engine, f"{e.get('logprob_mismatch', float('nan')):.2e}",
                              f"{e.get('logprob_mismatch_max', float('nan')):.2e}", f"{e['grad_norm']:.3f}",
                              f"{e['reward']:.3f}", f"{e['time/step']:.2f}"] +
                             [f"{e['final'][lv]:.3f}" for lv in levels + ["average"]]))
    return "\n".join(lines) + "\n"


def plot_curves(out: str, study: dict, seeds: list, methods: list, results: dict) -> list:
    """One figure per profile: held-out accuracy per level vs RL step, each method's mean over the seeds, from
    the starting student's accuracy, with the teacher's as a dotted line (OUT/curves_PROFILE.png)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    levels, paths = study["report_levels"], []
    for profile, prof in results["profiles"].items():
        fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.6), squeeze=False)
        for ax, lv in zip(axes[0], levels):
            for method in methods:
                per_seed = [evaluations(rl_run_dir(out, profile, method, s)) for s in seeds]
                steps = sorted(set.intersection(*(set(e) for e in per_seed)))
                ax.plot([0] + steps, [prof["start"][lv]] + [statistics.fmean(e[t][lv] for e in per_seed)
                                                            for t in steps], label=method, marker="o", markersize=3)
            ax.axhline(results["teacher"][lv]["mean"], color="k", linestyle=":", linewidth=1, label="teacher")
            ax.set_title(f"{profile}: {lv}")
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"Mean@n, mean of {len(seeds)} seeds")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        png = os.path.join(out, f"curves_{profile}.png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        paths.append(png)
    return paths


# ----------------------------------------------------------------------------- the study
def main(argv=None):
    p = argparse.ArgumentParser(prog="mini_repro.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="study directory: models/, runs/, results.json, results.md")
    p.add_argument("--quick", action="store_true", help="smoke version: the [quick] overrides of the study config")
    p.add_argument("--tune", action="store_true", help="the [tune] sweeps on the tuning seed; prints their table")
    p.add_argument("--methods", default=None, help="comma-separated subset of the study's methods")
    p.add_argument("--jobs", type=int, default=2, help="processes side by side (one core each)")
    p.add_argument("--config", default=STUDY, help="the study config (default: configs/mini_study.toml)")
    a = p.parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    study = load_study(a.config, a.quick)
    log_path = os.path.join(out, "study.log")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    methods = list(study["methods"]) if a.methods is None else [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in study["methods"]]
    if unknown:
        raise SystemExit(f"--methods: {unknown} not in {a.config} (there: {list(study['methods'])})")
    if BASELINE not in methods:
        methods = [BASELINE] + methods
    make_models(study, out)
    if a.tune:
        return tune(study, out, a, log)
    seeds = list(study["seeds"])
    if study.get("tune_seed") in seeds:
        raise SystemExit(f"seed {study['tune_seed']} is the tuning seed: report other seeds")
    jobs = study_jobs(study, out, seeds, methods)
    seconds = run_jobs(jobs, a.jobs, log)
    results = collect(study, out, seeds, methods, jobs)
    results["curves"] = plot_curves(out, study, seeds, methods, results)
    results.update(quick=a.quick, settings={k: study[k] for k in SECTIONS if k not in ("seeds", "report_levels")},
                   seconds={"jobs": seconds, "this_invocation": time.time() - t_start})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = format_tables(results, study)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    log(f"wrote {out}/results.json, results.md, {len(results['curves'])} curve figures "
        f"in {time.time() - t_start:.0f} s")
    return results


def tune(study: dict, out: str, a, log):
    """The sweeps of [tune]: every listed value of one train.py key per method, from the [tune] profile's
    student, on the tuning seed only. Writes OUT/tune.md; the chosen values go into [methods.*] by hand, so
    the reported seeds never see the selection."""
    seed, grids = study.get("tune_seed", 0), study.get("tune", {})
    profile = grids.get("profile", next(iter(study["profiles"])))
    jobs = sft_jobs(study, out)
    for method, grid in grids.items():
        if method == "profile":
            continue
        if method not in study["methods"]:
            raise SystemExit(f"[tune.{method}]: no [methods.{method}] to tune")
        for key, values in grid.items():
            for value in values:
                name = f"{method}_{key}{value}"
                job = rl_job(study, out, profile, method, seed, {**study["methods"][method], key: value},
                             name=name, run_dir=os.path.join(out, "tune", name))
                jobs.append({**job, "setting": f"{key}={value}"})
    run_jobs(jobs, a.jobs, log)
    steps = study["rl"]["max_steps"]
    lines = [f"Tuning on seed {seed} (not a reported seed), profile {profile}: final Mean@n", ""]
    for job in jobs:
        if "setting" in job:
            acc = final_eval(job["run_dir"], steps, study["report_levels"])
            lines.append(f"{job['method']:10s} {job['setting']:20s} avg {acc['average']:.3f}  " +
                         " ".join(f"{lv} {v:.3f}" for lv, v in acc.items() if lv != "average"))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "tune.md"), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
