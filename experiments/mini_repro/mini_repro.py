"""mini_repro.py: the miniature reproduction on CPU: GRPO vs KDRL vs RLAD, plus two controls.

The paper's claim (RLAD learns faster and ends higher than GRPO and KDRL, most on the hardest problems) at a
size a laptop runs in under an hour, with the project's own train.py and eval.py, run as subprocesses exactly
the way a user runs them. The task is data.py's "arith" (running sums mod 10, levels L2..L8 = operands per
problem, a stand-in for K&K's PPL2..PPL8; trained and reported on L2..L5, see configs/mini_study.toml for why),
the tokenizer tiny.make_arith_tokenizer (a BOS, one token per digit or signed operand).

    1. models    a random tiny Qwen3 (~0.37M params, head_dim 32 for vLLM's CPU attention)
    2. teacher   SFT on ground-truth solutions of L2..L5 (train.py --method sft --sft_source data), 6,500 steps:
                 L2..L4 0.86-1.00, L5 0.29
    3. student   the same SFT run stopped early (3,500 steps: L2 solved, L3 partly, L4 and L5 at chance), so the
                 teacher knows what the student has yet to learn (--student_steps picks another stopping point)
    4. RL        from that same student, for every seed: grpo, kdrl, rlad, and two controls that say *why*
                   rlad_self  RLAD with the student's own initial weights as the "teacher": the clipping
                              mechanism without the teacher's knowledge
                   distill    on-policy distillation: the KD term alone on the student's samples, no reward
    5. eval      train.py evaluates every run's final weights through eval.evaluate (held-out problems,
                 eval_n samples each, Mean@n per level; the same sampling seeds for every method of a seed)
    6. report    OUT/results.json, OUT/results.md (per level and average, mean +- std over seeds, paired
                 differences against GRPO), OUT/curves_seedS.png through `python eval.py plot`

From the repository root (this script lives in experiments/mini_repro/, its presets in configs/ next to it):

    python experiments/mini_repro/mini_repro.py --out runs/mini            # the study: configs/mini_study.toml
    python experiments/mini_repro/mini_repro.py --out runs/mini --seeds 5  # more seeds (1..5)
    python experiments/mini_repro/mini_repro.py --out /tmp/mini --quick    # a smoke version (the test suite's)
    python experiments/mini_repro/mini_repro.py --out runs/mini --tune     # lr / beta / alpha sweeps (OUT/tune/)
    # a stronger student (L3 solved, L4 partly):
    python experiments/mini_repro/mini_repro.py --out runs/mini_l4 --student_steps 5000
    # 5x longer RL runs:
    python experiments/mini_repro/mini_repro.py --out runs/mini_long --rl_steps 1000 --methods kdrl,rlad

Every setting lives in configs/ next to this script: mini_sft.toml and mini_rl.toml are plain train.py presets
(run one stage by hand from the repository root with
`python train.py --config experiments/mini_repro/configs/mini_rl.toml --model ... --teacher ...`); mini_study.toml
holds the model sizes and the per-stage and per-method train.py overrides, the seeds, and the tuning grids.
--tune sweeps lr / beta / alpha per method on `tune_seed`, which is never one of the reported seeds.

Resumable: a finished run (its final checkpoint exists) is skipped; an unfinished one is restarted with
`--resume true` and continues from its newest checkpoint. Each subprocess gets one torch thread
(OMP_NUM_THREADS=1): on a loaded 2-core machine two threads per process spin against each other and made a
step 20-80x slower (measured); `--jobs` runs that many train.py processes side by side instead.
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
BASELINE = "grpo"  # the paired differences are taken against this method


# ----------------------------------------------------------------------------- settings
def load_study(path: str, quick: bool) -> dict:
    """The study config (configs/mini_study.toml next to this script), with its [quick] overrides merged in when
    asked for."""
    with open(path, "rb") as f:
        study = tomllib.load(f)
    for key in ("teacher_model", "student_model", "teacher_sft", "student_sft", "rl", "methods", "seeds",
                "report_levels"):
        if key not in study:
            raise SystemExit(f"{path}: missing [{key}]; see the comments in {STUDY}")
    if BASELINE not in study["methods"]:
        raise SystemExit(f"{path}: [methods.{BASELINE}] is the baseline of the paired differences; keep it")
    if quick:
        q = study.get("quick", {})
        for section in ("teacher_model", "student_model", "teacher_sft", "student_sft", "rl"):
            study[section] = {**study[section], **q.get(section, {})}
        study["seeds"] = q.get("seeds", study["seeds"])
    return study


def train_args(overrides: dict) -> list:
    """train.py `--key value` flags (booleans as true/false, the way its parser reads them)."""
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


# ----------------------------------------------------------------------------- runs
def final_checkpoint(run_dir: str, max_steps: int) -> str:
    """Where train.py writes the last step's checkpoint: RUN_DIR/checkpoints/step_NNNNNN/ (six digits)."""
    return os.path.join(run_dir, "checkpoints", f"step_{max_steps:06d}")


def is_finished(run_dir: str, max_steps: int) -> bool:
    """Finished = the final checkpoint is complete (train.py renames it into place once fully written)."""
    return os.path.isfile(os.path.join(final_checkpoint(run_dir, max_steps), "trainer_state.pt"))


def wall_seconds(run_dir: str):
    """Wall-clock seconds of the invocation that finished the run (None if unknown, e.g. it was copied in)."""
    path = os.path.join(run_dir, "wall_seconds.json")
    return json.load(open(path))["seconds"] if os.path.isfile(path) else None


def run_jobs(jobs: list, parallel: int, log) -> dict:
    """Run train.py jobs, at most `parallel` at a time, each after the jobs it needs. Returns {name: seconds}.

    A job is {"name", "run_dir", "args" (train.py flags), "steps", "after" (names)}. Finished runs are skipped
    (their seconds read back from RUN_DIR/wall_seconds.json); unfinished ones continue from their newest
    checkpoint (--resume true). A failed run stops the study with its log's tail: everything after it would
    measure nothing.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false")
    pending, running, done, seconds = list(jobs), {}, set(), {}
    for job in jobs:
        if is_finished(job["run_dir"], job["steps"]):
            done.add(job["name"])
            seconds[job["name"]] = wall_seconds(job["run_dir"])
    pending = [j for j in pending if j["name"] not in done]
    if pending:
        log(f"{len(pending)} runs to do ({len(done)} already finished), {parallel} at a time")
    while pending or running:
        ready = [j for j in pending if all(a in done for a in j.get("after", ()))]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            pending.remove(job)
            os.makedirs(job["run_dir"], exist_ok=True)
            out = open(os.path.join(job["run_dir"], "train.log"), "a")
            cmd = [sys.executable, os.path.join(ROOT, "train.py")] + job["args"] + ["--resume", "true"]
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            running[job["name"]] = (proc, job, out, time.time())
            log(f"start {job['name']}")
        if not running:
            missing = sorted({a for j in pending for a in j.get("after", ())} - done)
            raise SystemExit(f"runs {[j['name'] for j in pending]} wait for {missing}, which no job makes")
        # Wait for any one of the running processes to end (os.wait reaps exactly one child).
        pid, status = os.wait()
        for name, (proc, job, out, t0) in list(running.items()):
            if proc.pid != pid:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.close()
            del running[name]
            seconds[name] = time.time() - t0
            if proc.returncode != 0 or not is_finished(job["run_dir"], job["steps"]):
                for p, _, o, _ in running.values():  # stop the others cleanly: they resume next time
                    p.terminate()
                    p.wait()
                    o.close()
                tail = open(os.path.join(job["run_dir"], "train.log")).read()[-3000:]
                raise SystemExit(f"{name} failed (exit {proc.returncode}); log {job['run_dir']}/train.log:\n{tail}")
            done.add(name)
            with open(os.path.join(job["run_dir"], "wall_seconds.json"), "w") as f:
                json.dump({"seconds": seconds[name], "parallel": parallel}, f)
            log(f"done  {name} in {seconds[name]:.0f} s")
    return seconds


def study_jobs(study: dict, out: str, seeds: list, methods: list) -> tuple:
    """(jobs, paths): the two SFT runs, then every (method, seed) RL run from the SFT student."""
    models = os.path.join(out, "models")
    teacher_run, student_run = os.path.join(out, "teacher_sft"), os.path.join(out, "student_sft")
    t_steps, s_steps, rl_steps = (study["teacher_sft"]["max_steps"], study["student_sft"]["max_steps"],
                                  study["rl"]["max_steps"])
    teacher = final_checkpoint(teacher_run, t_steps)
    student = final_checkpoint(student_run, s_steps)
    jobs = [
        {"name": "teacher_sft", "run_dir": teacher_run, "steps": t_steps, "after": (),
         "args": ["--config", SFT_PRESET, "--run_dir", teacher_run, "--model", os.path.join(models, "teacher_init")]
         + train_args(study["teacher_sft"])},
        {"name": "student_sft", "run_dir": student_run, "steps": s_steps, "after": (),
         "args": ["--config", SFT_PRESET, "--run_dir", student_run, "--model", os.path.join(models, "student_init")]
         + train_args(study["student_sft"])},
    ]
    for seed in seeds:
        for method in methods:
            settings = dict(study["methods"][method])
            # "student" as the teacher: the control that keeps RLAD's clipping and drops the teacher's knowledge
            who = settings.pop("teacher", "teacher")
            if who not in ("teacher", "student"):
                raise SystemExit(f"[methods.{method}] teacher = {who!r}: use 'teacher' or 'student'")
            run_dir = os.path.join(out, "runs", f"{method}_seed{seed}")
            args = ["--config", RL_PRESET, "--run_dir", run_dir, "--model", student,
                    "--teacher", teacher if who == "teacher" else student, "--seed", str(seed)]
            # A run waits only for the models it uses: grpo and rlad_self start while the teacher still trains.
            uses_teacher = who == "teacher" and settings.get("method", study["rl"].get("method")) != "grpo"
            jobs.append({"name": f"{method}_seed{seed}", "run_dir": run_dir, "steps": rl_steps,
                         "after": ("teacher_sft", "student_sft") if uses_teacher else ("student_sft",),
                         "method": method, "seed": seed,
                         "args": args + train_args({**study["rl"], **settings})})
    return jobs, {"teacher": teacher, "student": student, "teacher_run": teacher_run, "student_run": student_run}


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
    """{level: Mean@n} of the run's last step (train.py evaluates at the last step) for `levels`, plus their
    "average". train.py evaluates L2..L8; the study reports the levels it trains on (report_levels)."""
    final = None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("step") == max_steps and "eval_accuracy" in rec:
                    final = rec
    if final is None:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no evaluation at step {max_steps}: was eval_every 0? "
                         "delete the run directory and rerun")
    out = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("eval/")}
    missing = [lv for lv in levels if lv not in out]
    if missing:
        raise SystemExit(f"{run_dir}: no evaluation of {missing} (evaluated: {sorted(out)}); fix report_levels")
    out = {lv: out[lv] for lv in levels}
    out["average"] = statistics.fmean(out.values())  # every level counts the same, as in the paper's tables
    return out


def run_eval_settings(run_dir: str) -> dict:
    """The evaluation settings a run used, from the config.json train.py writes into its run directory."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    return {k: cfg[k] for k in ("eval_n", "eval_per_level", "eval_temperature", "eval_top_p")}


def mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(per_run: dict, methods: list, seeds: list) -> dict:
    """Per method: per-seed accuracies, mean/std per level, and paired differences against the baseline."""
    levels = list(next(iter(per_run.values())))
    out = {}
    for method in methods:
        runs = {seed: per_run[(method, seed)] for seed in seeds}
        entry = {"seeds": {str(s): r for s, r in runs.items()},
                 "mean": {}, "std": {}}
        for lv in levels:
            entry["mean"][lv], entry["std"][lv] = mean_std([r[lv] for r in runs.values()])
        if method != BASELINE:
            diffs = {lv: [runs[s][lv] - per_run[(BASELINE, s)][lv] for s in seeds] for lv in levels}
            entry["diff_vs_" + BASELINE] = {lv: {"mean": mean_std(d)[0], "std": mean_std(d)[1],
                                                 "wins": sum(x > 0 for x in d), "per_seed": d}
                                            for lv, d in diffs.items()}
        out[method] = entry
    return out


def format_tables(results: dict) -> str:
    """Markdown: accuracy per level (mean +- std over seeds), then the paired differences against GRPO."""
    methods, refs = results["methods"], results["reference"]
    levels = [lv for lv in next(iter(methods.values()))["mean"] if lv != "average"]
    n = len(results["seeds"])
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    header = ["model"] + levels + ["Avg"]
    ev, ref = results["eval"], results["eval_reference"]
    lines = [f"Accuracy (Mean@{ev['eval_n']} over {ev['eval_per_level']} held-out problems per level, temperature "
             f"{ev['eval_temperature']}, top-p {ev['eval_top_p']}; mean +- std over {n} seed{'s' * (n > 1)}; the "
             f"teacher and start rows: Mean@{ref['eval_n']} over {ref['eval_per_level']} problems, one run):", "",
             row(header), row(["---"] * len(header))]
    for name, acc in refs.items():
        lines.append(row([name] + [f"{acc[lv]:.3f}" for lv in levels + ["average"]]))
    for method, entry in methods.items():
        lines.append(row([method] + [f"{entry['mean'][lv]:.3f} +- {entry['std'][lv]:.3f}"
                                     for lv in levels + ["average"]]))
    lines += ["", f"Paired difference against {BASELINE} (same seed: same student, data order and eval samples; "
                  f"mean +- std over seeds, and on how many seeds the method was ahead):", "",
              row(header), row(["---"] * len(header))]
    for method, entry in methods.items():
        d = entry.get("diff_vs_" + BASELINE)
        if d:
            lines.append(row([f"{method} - {BASELINE}"] + [
                f"{d[lv]['mean']:+.3f} +- {d[lv]['std']:.3f} ({d[lv]['wins']}/{n})" for lv in levels + ["average"]]))
    return "\n".join(lines) + "\n"


def plot_curves(out: str, seeds: list, methods: list):
    """One figure per seed, every method on it, through `python eval.py plot` (reward, accuracy, eval accuracy)."""
    paths = []
    for seed in seeds:
        png = os.path.join(out, f"curves_seed{seed}.png")
        dirs = [os.path.join(out, "runs", f"{m}_seed{seed}") for m in methods]
        subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "plot", *dirs, "--out", png], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
        paths.append(png)
    return paths


# ----------------------------------------------------------------------------- the study
def main(argv=None):
    p = argparse.ArgumentParser(prog="mini_repro.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="study directory: models/, runs/, results.json, results.md")
    p.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default: configs/mini_study.toml's)")
    p.add_argument("--quick", action="store_true", help="smoke version: the [quick] overrides of the study config")
    p.add_argument("--tune", action="store_true", help="the [tune] sweeps on the tuning seed; prints their table")
    p.add_argument("--methods", default=None, help="comma-separated subset of the study's methods")
    p.add_argument("--jobs", type=int, default=2, help="train.py processes side by side (one core each)")
    p.add_argument("--config", default=STUDY,
                   help="the study config (default: configs/mini_study.toml next to this script)")
    p.add_argument("--student_steps", type=int, default=None,
                   help="stop the student's SFT at this step instead of [student_sft] max_steps (a stronger or "
                        "weaker starting student; use a fresh --out)")
    p.add_argument("--rl_steps", type=int, default=None,
                   help="RL steps per run instead of [rl] max_steps (longer runs; use a fresh --out)")
    a = p.parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    study = load_study(a.config, a.quick)
    if a.student_steps is not None:
        if a.student_steps < 1:
            raise SystemExit(f"--student_steps {a.student_steps}: use a positive number of SFT steps")
        study["student_sft"] = {**study["student_sft"], "max_steps": a.student_steps}
    if a.rl_steps is not None:
        if a.rl_steps < 1:
            raise SystemExit(f"--rl_steps {a.rl_steps}: use a positive number of RL steps")
        study["rl"] = {**study["rl"], "max_steps": a.rl_steps}
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
    if a.tune:
        return tune(study, out, a, log)
    seeds = list(range(1, a.seeds + 1)) if a.seeds else list(study["seeds"])
    if study.get("tune_seed") in seeds:
        raise SystemExit(f"seed {study['tune_seed']} is the tuning seed: report other seeds")
    if BASELINE not in methods:
        methods = [BASELINE] + methods
    make_models(study, out)
    jobs, paths = study_jobs(study, out, seeds, methods)
    seconds = run_jobs(jobs, a.jobs, log)

    rl_steps = study["rl"]["max_steps"]
    levels = study["report_levels"]
    per_run = {(j["method"], j["seed"]): final_eval(j["run_dir"], rl_steps, levels) for j in jobs if "method" in j}
    results = {
        "task": "arith", "seeds": seeds, "methods": aggregate(per_run, methods, seeds),
        "reference": {"teacher": final_eval(paths["teacher_run"], study["teacher_sft"]["max_steps"], levels),
                      "student (start)": final_eval(paths["student_run"], study["student_sft"]["max_steps"], levels)},
        # What train.py actually ran with (its config.json: preset + overrides), for the table's caption.
        "eval": run_eval_settings(next(j["run_dir"] for j in jobs if "method" in j)),
        "eval_reference": run_eval_settings(paths["teacher_run"]),
        "settings": {k: study[k] for k in ("teacher_model", "student_model", "teacher_sft", "student_sft", "rl",
                                           "methods")},
        "quick": a.quick,
        # Wall seconds per run (the invocation that ran it, `--jobs` side by side), and of this invocation.
        "seconds": {"runs": seconds, "this_invocation": time.time() - t_start},
    }
    results["curves"] = plot_curves(out, seeds, methods)
    results["seconds"]["this_invocation"] = time.time() - t_start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = format_tables(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    log(f"wrote {out}/results.json, results.md, {len(results['curves'])} curve figures "
        f"in {time.time() - t_start:.0f} s")
    return results


def tune(study: dict, out: str, a, log):
    """The sweeps of [tune]: every listed value of one train.py key per method, on the tuning seed only.

    Prints and writes OUT/tune.md (final Mean@n average and per level per setting); the chosen values go into
    [methods.*] of configs/mini_study.toml by hand, so the reported seeds never see the selection.
    """
    seed = study.get("tune_seed", 0)
    grids = study.get("tune", {})
    make_models(study, out)
    base_jobs, _ = study_jobs(study, out, [], [])
    jobs = list(base_jobs)
    for method, grid in grids.items():
        if method not in study["methods"]:
            raise SystemExit(f"[tune.{method}]: no [methods.{method}] to tune")
        for key, values in grid.items():
            for value in values:
                variant = dict(study["methods"])
                variant[method] = {**study["methods"][method], key: value}
                name = f"{method}_{key}{value}"
                sub, _ = study_jobs({**study, "methods": variant}, out, [seed], [method])
                job = sub[-1]
                job["run_dir"] = os.path.join(out, "tune", name)
                i = job["args"].index("--run_dir")
                job["args"][i + 1] = job["run_dir"]
                job.update(name=name, setting=f"{key}={value}")
                jobs.append(job)
    run_jobs(jobs, a.jobs, log)
    rl_steps = study["rl"]["max_steps"]
    lines = [f"Tuning on seed {seed} (not a reported seed): final Mean@n", ""]
    for job in jobs:
        if "setting" in job:
            acc = final_eval(job["run_dir"], rl_steps, study["report_levels"])
            lines.append(f"{job['method']:10s} {job['setting']:20s} avg {acc['average']:.3f}  " +
                         " ".join(f"{lv} {v:.2f}" for lv, v in acc.items() if lv != "average"))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "tune.md"), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
