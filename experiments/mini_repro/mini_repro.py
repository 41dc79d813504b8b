"""mini_repro.py: the miniature study on CPU: does RLAD beat GRPO through train.py where TRRD should act?

Predictions, stated before the reported runs (configs/mini_study.toml, [predict]; each read as held or failed in
OUT/results.md): with a student in the middle of its SFT crossing from chance to solved (confidently wrong) and a
teacher that solves every level, in the greedy average over the levels, on the paired seeds,
    1. RLAD - GRPO >= +0.04 on every seed;
    2. RLAD ahead of KDRL on every seed;
    3. RLAD with the weak teacher (rlad_weak) not ahead of GRPO by more than the seeds' noise (mean over seeds);
    4. RLAD with the student's own start as the teacher (rlad_self) not ahead of GRPO by more than that noise;
the noise being max(2 x the sample std of GRPO's per-seed averages, 2 x one greedy evaluation's binomial error).

The task is the project's "arith" (running sums mod 10; level Ln = n operands; "3 + 5 - 7 =" -> "8 1"; the prompt
filled to a fixed width; the reward checks the length and the last value), the tokenizer tiny.make_arith_tokenizer.
Everything runs through the project's own train.py, eval.py and rlad.py, as subprocesses, the way a user runs them:

    1. models      a random GPT-2 teacher (~0.35M params) and a smaller random GPT-2 student (~0.11M, PyTorch's
                   default initialisation), other seeds; and the control student: the same student at N(0, 0.1)
                   ([control], the third design's), whose SFT climbs onto a stable plateau instead
    2. SFT         each trained separately on ground-truth solutions of L2..L8 (train.py --method sft); the runs
                   keep a checkpoint and an evaluation every few steps
    3. profile     each starting student chosen by a stated rule, not by a step number ([profiles.*],
                   OUT/profiles.json): "mid_descent", among the kept checkpoints where the SFT training loss is still
                   falling fast (loss `horizon` steps later <= max_loss_ratio x loss now, each a mean over
                   loss_window steps), the one whose evaluation is nearest to the target profile; "nearest", the
                   nearest over all kept checkpoints. A profile names its student (`student`: the study's, or
                   "control") and may run a subset of the methods (`methods`). The weak teacher of a control is the
                   teacher's checkpoint nearest to [weak_teacher] (OUT/weak_teacher.json)
    4. diagnose    per level, on one batch sampled like an RL step (diagnose.py): rollout accuracy, informative
                   groups, share of tokens with |logp_S - logp_T| >= 1, TRRD's masked shares (of the rewarded, the
                   penalised and all advantage-bearing tokens), the cosine between the GRPO and RLAD gradients, the
                   student's and the teacher's NLL of the samples; again after RL, on the first seed's GRPO and RLAD
                   weights; for every profile (both students)
    5. start       each starting student evaluated greedy by eval.py on the RL runs' held-out problems (how far RL
                   moves it); the starting students and the teacher evaluated with sampling under several seeds
                   (the noise of one sampled evaluation)
    6. RL          from each profile's student, per seed: grpo, kdrl, rlad, topd, topk_kd and three controls
                     rlad_weak  RLAD with the weak teacher (a teacher checkpoint as good as the student)
                     rlad_self  RLAD with the student's own starting weights as the "teacher" (clipping, no knowledge)
                     distill    on-policy distillation, the KD term alone, no reward
                   each evaluated greedy (train.py) and sampled (eval.py on the final weights)
    7. differences grpo and rlad on the tuning seed, as configured and with one pipeline difference at a time
                   ([differences.*]: the transformers rollout engine, AdamW's defaults, several mini-batches), for
                   the first profile
    8. report      OUT/results.json, OUT/results.md (accuracy greedy and sampled, paired per-seed differences, the
                   predictions' readings, why the initialisation decides it (both students side by side),
                   diagnostics, the per-difference table), OUT/curves_PROFILE.png

From the repository root (this script lives in experiments/mini_repro/, its presets in configs/ next to it):

    python experiments/mini_repro/mini_repro.py --out runs/mini          # the study (~40 min on 2 idle cores)
    python experiments/mini_repro/mini_repro.py --out runs/demo --demo   # under 10 minutes: grpo vs rlad, plotted
    python experiments/mini_repro/mini_repro.py --out runs/mini_tune --tune  # per-method sweeps, tuning seed only
    python experiments/mini_repro/mini_repro.py --out /tmp/mini --quick  # a smoke version (the test suite's)
    python experiments/mini_repro/mini_repro.py --out runs/mini_control --control  # every method on the control

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
BASELINE = "grpo"  # the paired differences are taken against this method
RIVALS = ("kdrl", "topk_kd", "topd", "distill")  # ... and rlad's also against these teacher-guided objectives
SECTIONS = ("teacher_model", "student_model", "teacher_sft", "student_sft", "profiles", "weak_teacher", "rl", "methods",
            "seeds", "report_levels", "predict", "noise_seeds", "sampled_eval", "differences")
# A profile's `student`: whose SFT run its starting checkpoint comes from (OUT/student_sft, OUT/control_sft)
STUDENTS = {"student": "student_sft", "control": "control_sft"}


# ----------------------------------------------------------------------------- settings
def load_study(path: str, quick: bool, control: bool = False) -> dict:
    """The study config (configs/mini_study.toml), with its [quick] overrides merged in when asked for.

    The control student (study["control_student"]: "student_model" and "student_sft") is the study's student with
    the [control] overrides on top: the student of every profile with student = "control". --control (`control`)
    makes it the study's only student, with [control.profiles] as its profiles (the third design's study)."""
    with open(path, "rb") as f:
        study = tomllib.load(f)
    missing = [key for key in SECTIONS if key not in study]
    if missing:
        raise SystemExit(f"{path}: missing {missing}; see the comments in {STUDY}")
    if BASELINE not in study["methods"]:
        raise SystemExit(f"{path}: [methods.{BASELINE}] is the baseline of the paired differences; keep it")
    c = study.get("control", {})
    study["control_student"] = {s: {**study[s], **c.get(s, {})} for s in ("student_model", "student_sft")}
    if control:
        study.update(study["control_student"])
        study["profiles"] = c.get("profiles", study["profiles"])
    if quick:
        q = study.get("quick", {})
        for section in ("teacher_model", "student_model", "teacher_sft", "student_sft", "rl", "sampled_eval", "demo"):
            study[section] = {**study.get(section, {}), **q.get(section, {})}
        study["control_student"]["student_sft"] = {**study["control_student"]["student_sft"],
                                                   **q.get("student_sft", {})}
        for key in ("seeds", "noise_seeds", "profiles", "diagnose", "differences", "report_levels"):
            study[key] = q.get(key, study.get(key))
        study["weak_teacher"] = {lv: v for lv, v in study["weak_teacher"].items() if lv in study["report_levels"]}
    if control:  # the control is already the study's student: no profile of its own
        study["profiles"] = {n: p for n, p in study["profiles"].items() if p.get("student", "student") == "student"}
    for name, spec in study["profiles"].items():
        if spec.get("student", "student") not in STUDENTS:
            raise SystemExit(f"[profiles.{name}] student = {spec['student']!r}: use one of {list(STUDENTS)}")
        unknown = [m for m in spec.get("methods", []) if m not in study["methods"]]
        if unknown:
            raise SystemExit(f"[profiles.{name}] methods: {unknown} have no [methods.*] row")
    return study


def student_of(study: dict, profile: str) -> str:
    """Whose SFT run a profile's starting checkpoint comes from: "student" (the study's) or "control"."""
    return study["profiles"][profile].get("student", "student")


def students_used(study: dict) -> list:
    """The students whose models and SFT runs the study's profiles need ("student" always: --tune, --demo)."""
    return ["student"] + (["control"] if any(student_of(study, p) == "control" for p in study["profiles"]) else [])


def student_settings(study: dict, who: str) -> tuple:
    """(the tiny.save_tiny model settings, the SFT overrides) of a student."""
    spec = study if who == "student" else study["control_student"]
    return spec["student_model"], spec["student_sft"]


def profile_methods(study: dict, profile: str, methods: list) -> list:
    """The methods a profile runs: `methods` (the study's, or --methods'), restricted to its own list if it has one;
    the baseline always."""
    own = study["profiles"][profile].get("methods")
    keep = [m for m in methods if own is None or m in own]
    return keep if BASELINE in keep else [BASELINE] + keep


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
    """teacher_run, student_run, control_run (OUT/NAME_sft: train.py run directories), models (OUT/models: the
    *_init models), teacher (its final checkpoint), profiles (OUT/profiles.json)."""
    teacher_run = os.path.join(out, "teacher_sft")
    return {"teacher_run": teacher_run, "models": os.path.join(out, "models"),
            **{f"{who}_run": os.path.join(out, run) for who, run in STUDENTS.items()},
            "teacher": final_checkpoint(teacher_run, study["teacher_sft"]["max_steps"]),
            "profiles": os.path.join(out, "profiles.json")}


def sft_jobs(study: dict, out: str, students=None) -> list:
    """The SFT runs: the teacher, and each student whose kept checkpoints the profiles choose from (`students`, by
    default students_used: the control's only if a profile uses it)."""
    p = paths_of(study, out)
    settings = {"teacher": study["teacher_sft"],
                **{w: student_settings(study, w)[1] for w in (students or students_used(study))}}
    return [train_job(f"{who}_sft", p[f"{who}_run"], sft["max_steps"],
                      ["--config", SFT_PRESET, "--run_dir", p[f"{who}_run"], "--model",
                       os.path.join(p["models"], f"{who}_init")] + train_args(sft))
            for who, sft in settings.items()]


def evaluations(run_dir: str) -> dict:
    """{step: {level: Mean@n}} of every evaluation in RUN_DIR/metrics.jsonl."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line) if line.strip() else {}
            if "eval_accuracy" in rec:
                out[rec["step"]] = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("eval/")}
    return out


def train_losses(run_dir: str) -> dict:
    """{step: training loss} of every step in RUN_DIR/metrics.jsonl (train.py's "loss"; for SFT the NLL of the
    step's batch of ground-truth answers, aggregated by loss_agg, token-mean by default)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {rec["step"]: rec["loss"] for rec in map(json.loads, filter(str.strip, f))}


def nearest_checkpoint(run_dir: str, target: dict, eligible=None, rule: str = "") -> dict:
    """The kept checkpoint of a train.py run (among the steps `eligible`, if given: those `rule` allows) whose
    evaluation is nearest to `target` ({level: accuracy}; sum of absolute differences, the earliest on a tie):
    {"step", "checkpoint", "target", "sft_eval", "distance"}."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    kept = {int(d.split("_")[1]) for d in os.listdir(ckpt_dir)
            if os.path.isfile(os.path.join(ckpt_dir, d, "trainer_state.pt"))}
    evals = {s: acc for s, acc in evaluations(run_dir).items() if s in kept}
    if not evals:
        raise SystemExit(f"{run_dir}: no kept checkpoint has an evaluation; set eval_every equal to save_every and "
                         "keep_last high enough to keep them all")
    if eligible is not None:
        evals = {s: acc for s, acc in evals.items() if s in eligible}
        if not evals:
            raise SystemExit(f"{run_dir}: no kept, evaluated checkpoint is {rule} ({len(eligible)} logged steps "
                             "are): run the SFT past its crossing (more max_steps), save and evaluate more often, "
                             "or check the rule's numbers")
    dist = lambda s: sum(abs(evals[s][lv] - v) for lv, v in target.items())  # noqa: E731
    step = min(sorted(evals), key=dist)
    return {"step": step, "checkpoint": os.path.join(ckpt_dir, f"step_{step:06d}"), "target": target,
            "sft_eval": evals[step], "distance": dist(step)}


RULE_KEYS = ("rule", "horizon", "max_loss_ratio", "loss_window")  # a [profiles.NAME]'s keys of its rule
PROFILE_KEYS = ("student", "methods")  # ... and of what it runs; every other key is a level of the target


def smoothed_loss(losses: dict, step: int, window: int):
    """The mean training loss of steps step - window + 1 .. step; None unless all of them are logged."""
    steps = range(step - window + 1, step + 1)
    return statistics.fmean(losses[t] for t in steps) if all(t in losses for t in steps) else None


def falling_fast(losses: dict, horizon: int, max_ratio: float, window: int) -> dict:
    """{step: ratio} for every step whose smoothed training loss `horizon` steps later is at most max_ratio times
    its own: smoothed(s) = the mean loss of steps s - window + 1 .. s (all logged), ratio = smoothed(s + horizon) /
    smoothed(s). A step too close to the run's end (or start) to have both means is not eligible."""
    out = {}
    for step in sorted(losses):
        now, later = smoothed_loss(losses, step, window), smoothed_loss(losses, step + horizon, window)
        if now is not None and later is not None and later <= max_ratio * now:
            out[step] = later / now
    return out


def choose_student(run_dir: str, spec: dict) -> dict:
    """A [profiles.NAME] applied to the student's SFT run. rule "nearest" (the default): the kept checkpoint nearest
    to the target profile (its L* keys). rule "mid_descent": the same among the checkpoints whose training loss is
    still falling fast (falling_fast: horizon, max_loss_ratio, loss_window). The entry of OUT/profiles.json:
    nearest_checkpoint's, plus the rule, its numbers and, for mid_descent, the chosen step's smoothed losses and
    every eligible checkpoint's ratio and distance."""
    rule = spec.get("rule", "nearest")
    target = {k: v for k, v in spec.items() if k not in RULE_KEYS + PROFILE_KEYS}
    if rule == "nearest":
        return {**nearest_checkpoint(run_dir, target), "rule": {"rule": "nearest"}}
    if rule != "mid_descent":
        raise SystemExit(f"[profiles] rule = {rule!r}: use 'nearest' or 'mid_descent'")
    numbers = {"horizon": int(spec["horizon"]), "max_loss_ratio": float(spec["max_loss_ratio"]),
               "loss_window": int(spec.get("loss_window", 1))}
    losses, (h, ratio, window) = train_losses(run_dir), numbers.values()
    fast = falling_fast(losses, h, ratio, window)
    pick = nearest_checkpoint(run_dir, target, eligible=set(fast),
                              rule=f"mid-descent (mean loss of {window} steps, {h} steps later <= {ratio} x)")
    evals, step = evaluations(run_dir), pick["step"]
    return {**pick, "rule": {"rule": "mid_descent", **numbers}, "loss": smoothed_loss(losses, step, window),
            "loss_after": smoothed_loss(losses, step + h, window), "loss_ratio": fast[step],
            "eligible": {str(s): {"loss_ratio": fast[s],
                                  "distance": sum(abs(evals[s][lv] - v) for lv, v in target.items())}
                         for s in sorted(set(fast) & set(evals))}}


def chosen(path: str, choose):
    """choose() once, kept in the JSON file `path`, so every later job and rerun uses the same checkpoints."""
    if os.path.isfile(path):
        return json.load(open(path))
    value = choose()
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)
    return value


def select_profiles(study: dict, out: str, names=None) -> dict:
    """For each [profiles.NAME] of `names` (default: all), its student's kept checkpoint its rule chooses
    (choose_student), chosen once per profile and kept in OUT/profiles.json, so every later job and rerun uses the
    same checkpoints (a profile is chosen when first asked for: --demo chooses only the one it runs)."""
    p = paths_of(study, out)
    names = list(study["profiles"]) if names is None else list(names)
    have = json.load(open(p["profiles"])) if os.path.isfile(p["profiles"]) else {}
    missing = [name for name in names if name not in have]
    if missing:
        for name in missing:
            have[name] = {**choose_student(p[student_of(study, name) + "_run"], study["profiles"][name]),
                          "student": student_of(study, name)}
        with open(p["profiles"] + ".tmp", "w") as f:
            json.dump(have, f, indent=1)
        os.replace(p["profiles"] + ".tmp", p["profiles"])
    return {name: have[name] for name in names}


def start_of(study: dict, out: str, profile: str) -> dict:
    """One profile's entry of OUT/profiles.json (select_profiles): its starting checkpoint, step, evaluation."""
    return select_profiles(study, out, [profile])[profile]


def weak_teacher(study: dict, out: str) -> dict:
    """The teacher's kept SFT checkpoint nearest to [weak_teacher] (OUT/weak_teacher.json)."""
    p = paths_of(study, out)
    return chosen(os.path.join(out, "weak_teacher.json"),
                  lambda: nearest_checkpoint(p["teacher_run"], study["weak_teacher"]))


def rl_run_dir(out: str, profile: str, method: str, seed: int, suffix: str = "") -> str:
    return os.path.join(out, "runs", profile, f"{method}_seed{seed}{suffix}")


def rl_job(study: dict, out: str, profile: str, method: str, seed: int, settings: dict, name=None, run_dir=None):
    """One RL run from a profile's student; its flags are made when it starts (after the profiles are chosen)."""
    p = paths_of(study, out)
    settings = dict(settings)
    who = settings.pop("teacher", "teacher")  # "student" / "weak": the controls' teachers
    if who not in ("teacher", "student", "weak"):
        raise SystemExit(f"[methods.{method}] teacher = {who!r}: use 'teacher', 'weak' or 'student'")
    run_dir = run_dir or rl_run_dir(out, profile, method, seed)

    def args():
        student = start_of(study, out, profile)["checkpoint"]
        teacher = {"teacher": p["teacher"], "student": student}.get(who) or weak_teacher(study, out)["checkpoint"]
        return (["--config", RL_PRESET, "--run_dir", run_dir, "--model", student, "--teacher", teacher,
                 "--seed", str(seed)] + train_args({**study["rl"], **settings}))
    uses_teacher = who == "teacher" and settings.get("method", study["rl"].get("method")) != "grpo"
    sft = STUDENTS[student_of(study, profile)]
    return train_job(name or f"{profile}/{method}_seed{seed}", run_dir, study["rl"]["max_steps"], args,
                     after=("teacher_sft", sft) if uses_teacher else (sft,), profile=profile, method=method, seed=seed)


def diagnose_job(study: dict, out: str, profile: str, which: str, after=()) -> dict:
    """diagnose.py on a profile's starting student ("start") or on a seed-1 run's final weights ("grpo", ...)."""
    p, rl = paths_of(study, out), rl_settings(study)
    rlad_settings = {**rl, **study["methods"].get("rlad", {})}
    output = os.path.join(out, "diagnostics", f"{profile}_{which}.json")

    def args():
        student = (start_of(study, out, profile)["checkpoint"] if which == "start" else
                   final_checkpoint(rl_run_dir(out, profile, which, study["seeds"][0]), rl["max_steps"]))
        d = study.get("diagnose", {})
        return ["--student", student, "--teacher", p["teacher"], "--levels",
                ",".join(lv[1:] for lv in study["report_levels"]), "--prompts", str(d.get("prompts", 64)),
                "--group", str(rl.get("group_size", 8)), "--max_tokens", str(rl.get("max_tokens", 10)),
                "--seed", str(study.get("tune_seed", 0))] + train_args(
            {k: rlad_settings[k] for k in ("alpha", "eps_low", "eps_high", "teacher_clamp") if k in rlad_settings})
    return output_job(f"{profile}/diagnose_{which}", DIAGNOSE, output, args,
                      after=("teacher_sft", STUDENTS[student_of(study, profile)]) + tuple(after))


def eval_args(study: dict, model: str, seed: int, greedy: bool = False) -> list:
    """eval.py flags: the [sampled_eval] settings on the report levels' held-out problems; greedy: train.py's own
    evaluation instead (one sample at temperature 0 on its eval_per_level held-out problems per level)."""
    e, rl = study["sampled_eval"], rl_settings(study)
    n, per_level, temperature = (1, rl["eval_per_level"], 0.0) if greedy else (e["n"], e["per_level"],
                                                                              e["temperature"])
    return ["--model", model, "--task", "arith", "--levels", ",".join(lv[1:] for lv in study["report_levels"]),
            "--n", str(n), "--limit", str(per_level), "--temperature", str(temperature),
            "--top_p", "1.0", "--max_tokens", str(rl.get("max_tokens", 10)),
            "--kv_cache_memory_bytes", str(16 << 20), "--seed", str(seed)]


def noise_job(study: dict, out: str, who: str, seed: int) -> dict:
    """eval.py on a profile's starting student (or on the teacher, who = "teacher") at the sampled evaluation's
    settings, under one sampling seed: the same weights under several seeds give the noise of one evaluation."""
    output = os.path.join(out, "noise", f"{who}_seed{seed}.json")

    def args():
        model = paths_of(study, out)["teacher"] if who == "teacher" else start_of(study, out, who)["checkpoint"]
        return eval_args(study, model, seed)
    return output_job(f"{who}/noise_seed{seed}", os.path.join(ROOT, "eval.py"), output, args,
                      after=("teacher_sft",) if who == "teacher" else (STUDENTS[student_of(study, who)],))


def start_job(study: dict, out: str, profile: str) -> dict:
    """eval.py on a profile's starting student, greedy, on the problems train.py's evaluation of every RL run
    scores: the start from which the RL runs' moves are measured (OUT/start/PROFILE_greedy.json)."""
    output = os.path.join(out, "start", f"{profile}_greedy.json")

    def args():
        return eval_args(study, start_of(study, out, profile)["checkpoint"], 0, greedy=True)
    return output_job(f"{profile}/start_greedy", os.path.join(ROOT, "eval.py"), output, args,
                      after=(STUDENTS[student_of(study, profile)],))


def sampled_job(study: dict, out: str, run: dict) -> dict:
    """eval.py on an RL run's final weights with sampling; the evaluation seed is the run's seed, so the methods of
    a seed are scored on the same problems with the same sampling stream."""
    output = os.path.join(run["run_dir"], "sampled_eval.json")
    model = final_checkpoint(run["run_dir"], study["rl"]["max_steps"])
    return output_job(run["name"] + "/sampled", os.path.join(ROOT, "eval.py"), output,
                      eval_args(study, model, 500 + run["seed"]), after=(run["name"],))


def study_jobs(study: dict, out: str, seeds: list, methods: list) -> list:
    """SFT, then per profile: the RL runs of its (method, seed) pairs and their sampled evaluations, the start's
    greedy evaluation, diagnostics, noise; then, for the first profile, the per-difference runs (grpo and rlad on
    the tune seed, one difference each, and their twins)."""
    jobs = sft_jobs(study, out) + [noise_job(study, out, "teacher", s) for s in study["noise_seeds"]]
    for i, profile in enumerate(study["profiles"]):
        own = profile_methods(study, profile, methods)
        jobs += [noise_job(study, out, profile, s) for s in study["noise_seeds"]]
        jobs += [start_job(study, out, profile), diagnose_job(study, out, profile, "start")]
        for seed in seeds:
            runs = [rl_job(study, out, profile, m, seed, study["methods"][m]) for m in own]
            jobs += runs + [sampled_job(study, out, r) for r in runs]
        jobs += [diagnose_job(study, out, profile, m, after=(f"{profile}/{m}_seed{seeds[0]}",))
                 for m in ("grpo", "rlad") if m in own]
        if i == 0:
            jobs += difference_jobs(study, out, profile)
    return jobs


def difference_jobs(study: dict, out: str, profile: str) -> list:
    """grpo and rlad on the tune seed, as configured ("reference") and with each [differences.NAME] applied."""
    jobs, seed = [], study.get("tune_seed", 0)
    for name, overrides in {"reference": {}, **study.get("differences", {})}.items():
        for method in ("grpo", "rlad"):
            run = rl_job(study, out, profile, method, seed, {**study["methods"][method], **overrides},
                         name=f"{profile}/difference_{name}_{method}",
                         run_dir=os.path.join(out, "differences", profile, f"{name}_{method}"))
            jobs += [{**run, "difference": name}, sampled_job(study, out, run)]
    return jobs


def make_models(study: dict, out: str):
    """The tokenizer and the random initial models: the teacher and each student the profiles use (written once; a
    rerun keeps them)."""
    import tiny
    tokenizer = tiny.make_arith_tokenizer()
    models = {"teacher": study["teacher_model"], **{w: student_settings(study, w)[0] for w in students_used(study)}}
    for name, settings in models.items():
        path = os.path.join(out, "models", f"{name}_init")
        if not os.path.isfile(os.path.join(path, "config.json")):
            tiny.save_tiny(path, tokenizer, **settings)


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
    for rlad, against each of RIVALS that ran)."""
    levels = list(next(iter(per_run.values())))
    out = {}
    for method in methods:
        runs = {seed: per_run[(method, seed)] for seed in seeds}
        entry = {"seeds": {str(s): r for s, r in runs.items()}, "mean": {}, "std": {}}
        for lv in levels:
            entry["mean"][lv], entry["std"][lv] = mean_std([r[lv] for r in runs.values()])
        for other in ([BASELINE] if method != BASELINE else []) + (list(RIVALS) if method == "rlad" else []):
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


def sampled_eval(run_dir: str, levels: list) -> dict:
    """{level: Mean@n, "average"} of eval.py's sampled evaluation of a run's final weights."""
    return eval_summary(os.path.join(run_dir, "sampled_eval.json"), levels)


def eval_summary(path: str, levels: list) -> dict:
    """{level: Mean@n, "average"} of an eval.py output."""
    summary = json.load(open(path))["summary"]
    out = {lv: summary[lv]["mean_at_n"] for lv in levels}
    out["average"] = statistics.fmean(out.values())
    return out


# ----------------------------------------------------------------------------- the predictions
# A claim of [predict.claims.NAME] compares `method` with `vs` through their paired per-seed differences of the
# greedy average (method - vs, seed by seed) in one of three ways:
#   every_seed_at_least = x   held if every seed's difference is >= x
#   every_seed_above = x      held if every seed's difference is > x ("ahead": x = 0)
#   mean_at_most = x          held if the mean difference over the seeds is <= x; x = "noise": the seeds' noise
# TOLERANCE absorbs float rounding only: accuracies are multiples of 1 / (levels x problems), 1/1400 here.
CLAIM_KINDS = ("every_seed_at_least", "every_seed_above", "mean_at_most")
TOLERANCE = 1e-9


def noise_level(baseline_per_seed: list, rule: dict) -> float:
    """The seeds' noise of a greedy average: max(noise_std_k x the sample std (ddof 1) of the baseline's per-seed
    greedy averages, noise_floor). The floor keeps three seeds that happen to agree from making the noise ~0."""
    std = statistics.stdev(baseline_per_seed) if len(baseline_per_seed) > 1 else 0.0
    return max(rule["noise_std_k"] * std, rule["noise_floor"])


def claim_kind(claim: dict) -> str:
    kinds = [k for k in CLAIM_KINDS if k in claim]
    if len(kinds) != 1:
        raise SystemExit(f"[predict.claims] {claim}: give exactly one of {CLAIM_KINDS}")
    return kinds[0]


def claim_text(claim: dict) -> str:
    """The claim in words, e.g. "rlad - grpo >= +0.040 on every seed"."""
    kind, pair = claim_kind(claim), f"{claim['method']} - {claim['vs']}"
    x = claim[kind]
    if kind == "every_seed_at_least":
        return f"{pair} >= {x:+.3f} on every seed"
    if kind == "every_seed_above":
        return f"{pair} > {x:+.3f} on every seed"
    return f"mean over seeds of {pair} <= " + ("the seeds' noise" if x == "noise" else f"{x:+.3f}")


def claim_verdict(per_seed: list, claim: dict, noise: float) -> str:
    """"held" or "failed": a claim (see CLAIM_KINDS) read against the per-seed differences method - vs."""
    kind = claim_kind(claim)
    x = noise if claim[kind] == "noise" else float(claim[kind])
    if kind == "every_seed_at_least":
        held = min(per_seed) >= x - TOLERANCE
    elif kind == "every_seed_above":
        held = min(per_seed) > x + TOLERANCE
    else:
        held = statistics.fmean(per_seed) <= x + TOLERANCE
    return "held" if held else "failed"


def predictions(greedy: dict, seeds: list, rule: dict) -> dict:
    """Every claim of [predict.claims] read against the greedy averages (aggregate()'s entries): {"noise": the
    seeds' noise, "claims": {name: {"text", "per_seed", "mean", "threshold", "verdict"}}}. A claim whose methods
    did not run reads "not run"."""
    avg = lambda m: [greedy[m]["seeds"][str(s)]["average"] for s in seeds]  # noqa: E731
    noise = noise_level(avg(BASELINE), rule)
    out = {}
    for name, claim in rule.get("claims", {}).items():
        kind = claim_kind(claim)
        entry = {"text": claim_text(claim), "method": claim["method"], "vs": claim["vs"],
                 "threshold": noise if claim[kind] == "noise" else float(claim[kind])}
        if claim["method"] in greedy and claim["vs"] in greedy:
            d = [a - b for a, b in zip(avg(claim["method"]), avg(claim["vs"]))]
            entry.update(per_seed=d, mean=statistics.fmean(d), verdict=claim_verdict(d, claim, noise))
        else:
            entry["verdict"] = "not run"
        out[name] = entry
    return {"noise": noise, "noise_baseline_per_seed": avg(BASELINE), "claims": out}


# ----------------------------------------------------------------------------- why the initialisation decides it
MECHANISM_DIAG = ("student_nll", "teacher_nll", "masked_adv", "masked_pos", "cosine")


def mechanism(prof: dict, losses: dict, horizon: int, window: int, methods=("grpo", "rlad")) -> dict:
    """One profile's row of "why the initialisation decides it": its SFT loss now and `horizon` steps later (each
    the mean of `window` steps: mid-descent or on a plateau), from diagnose.py's start batch the mean over the
    levels of MECHANISM_DIAG (how confidently wrong, how much of the advantage TRRD removes), and how far each of
    `methods` moved the greedy average from the start, per seed (prof: collect()'s entry)."""
    step, start = prof["student_step"], prof["start_greedy"]["average"]
    now, later = smoothed_loss(losses, step, window), smoothed_loss(losses, step + horizon, window)
    diag = prof["diagnostics"].get("start", {})
    out = {"student_step": step, "sft_loss": now, "sft_loss_later": later,
           "sft_loss_ratio": later / now if now and later is not None else None, "horizon": horizon,
           "start_greedy": start,
           "start": {k: statistics.fmean(d[k] for d in diag.values()) for k in MECHANISM_DIAG} if diag else {},
           "moved": {}}
    for m in methods:
        if m in prof["greedy"]:
            per_seed = [acc["average"] - start for acc in prof["greedy"][m]["seeds"].values()]
            out["moved"][m] = {"per_seed": per_seed, "mean": statistics.fmean(per_seed)}
    if "rlad" in prof["greedy"] and "diff_vs_grpo" in prof["greedy"]["rlad"]:
        out["rlad_minus_grpo"] = prof["greedy"]["rlad"]["diff_vs_grpo"]["average"]["per_seed"]
    return out


def init_label(model: dict) -> str:
    """How a tiny.make_gpt2 model's weights start, in words: "torch_default" or "N(0, std)"."""
    return model["init"] if model.get("init") == "torch_default" else f"N(0, {model.get('init_std', 0.1):g})"


def collect(study: dict, out: str, seeds: list, methods: list, jobs: list) -> dict:
    """Everything the report needs, from what the jobs wrote."""
    levels, steps = study["report_levels"], study["rl"]["max_steps"]
    noise_of = lambda who: noise_summary([os.path.join(out, "noise", f"{who}_seed{s}.json")  # noqa: E731
                                          for s in study["noise_seeds"]], levels)
    result = {"task": "arith", "seeds": seeds, "levels": levels, "profiles": {}, "teacher": noise_of("teacher"),
              "weak_teacher": weak_teacher(study, out) if any(
                  study["methods"][m].get("teacher") == "weak" for m in methods) else None,
              "settings_tuned": bool(study.get("settings_tuned", False))}
    predict_profile = study["predict"].get("profile", next(iter(study["profiles"])))
    for name, prof in select_profiles(study, out).items():
        own = profile_methods(study, name, methods)
        runs = [j for j in jobs if j.get("profile") == name and j.get("resume") and "difference" not in j]
        greedy = {(j["method"], j["seed"]): final_eval(j["run_dir"], steps, levels) for j in runs}
        sampled = {(j["method"], j["seed"]): sampled_eval(j["run_dir"], levels) for j in runs}
        noise = noise_of(name)
        diag = {which: json.load(open(os.path.join(out, "diagnostics", f"{name}_{which}.json")))
                for which in ("start", "grpo", "rlad") if os.path.isfile(os.path.join(out, "diagnostics",
                                                                                     f"{name}_{which}.json"))}
        start_sft = {lv: prof["sft_eval"][lv] for lv in levels}
        start_sft["average"] = statistics.fmean(start_sft.values())
        entry = {"student": prof.get("student", "student"), "student_step": prof["step"], "target": prof["target"],
                 "start_greedy": eval_summary(os.path.join(out, "start", f"{name}_greedy.json"), levels),
                 "start_sft_eval": start_sft, "start_sampled": {lv: noise[lv]["mean"] for lv in levels},
                 "noise": noise, "greedy": aggregate(greedy, own, seeds), "sampled": aggregate(sampled, own, seeds),
                 "diagnostics": diag, "differences": {}}
        if name == predict_profile:
            entry["predictions"] = predictions(entry["greedy"], seeds, study["predict"])
        spec = study["profiles"][name]
        student_run = paths_of(study, out)[entry["student"] + "_run"]
        entry["mechanism"] = mechanism(entry, train_losses(student_run), int(spec.get("horizon", 50)),
                                       int(spec.get("loss_window", 5)))
        entry["mechanism"]["init"] = init_label(student_settings(study, entry["student"])[0])
        for j in jobs:
            if j.get("profile") == name and "difference" in j:
                d = entry["differences"].setdefault(j["difference"], {})
                d[j["method"]] = {"greedy": final_eval(j["run_dir"], steps, levels)["average"],
                                  "sampled": sampled_eval(j["run_dir"], levels)["average"]}
        result["profiles"][name] = entry
    return result


def fmt_diff(d: dict, n: int) -> str:
    return f"{d['mean']:+.3f} +- {d['std']:.3f} ({d['wins']}/{n})"


def fmt_seeds(values) -> str:
    return ", ".join(f"{x:+.3f}" for x in values)


def format_tables(results: dict, study: dict) -> str:
    """Markdown: the settings' status; per profile the greedy and sampled accuracy, the paired per-seed differences,
    the predictions' readings, the diagnostics; why the initialisation decides it (every profile side by side);
    the per-difference table."""
    levels, n, seeds = results["levels"], len(results["seeds"]), results["seeds"]
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    header = ["model"] + levels + ["Avg"]
    rl, e = rl_settings(study), study["sampled_eval"]
    tuned = ("the values tuned on seed " if results.get("settings_tuned") else
             "the regime's reference values, NOT tuned (settings_tuned = false) on seed ")
    lines = [f"Greedy: {rl['eval_per_level']} held-out problems per level (train.py's evaluation at the last step). "
             f"Sampled: Mean@{e['n']} over {e['per_level']} held-out problems per level at temperature "
             f"{e['temperature']} (eval.py on the final weights). Mean +- std over {n} seed{'s' * (n > 1)}. Paired: "
             "same seed = same student, data order and evaluation samples; (k/n) = on how many seeds the first "
             f"method was ahead. Per-method settings ([methods.*]): {tuned}{study.get('tune_seed', 0)}.", ""]
    for name, prof in results["profiles"].items():
        lines += [f"### Profile `{name}` ({prof.get('student', 'student')}, SFT step {prof['student_step']})", ""]
        for kind in ("greedy", "sampled"):
            if kind == "greedy":
                start = [f"{prof['start_greedy'][lv]:.3f}" for lv in levels + ["average"]]
                label = "student (start, eval.py greedy)"
            else:
                start = [f"{prof['start_sampled'][lv]:.3f} +- {prof['noise'][lv]['std']:.3f}" for lv in levels] + [
                    f"{statistics.fmean(prof['start_sampled'].values()):.3f}"]
                label = f"student (start, {len(study['noise_seeds'])} evals)"
            lines += [f"{kind.capitalize()} accuracy:", "", row(header), row(["---"] * len(header))]
            if kind == "sampled":
                lines.append(row([f"teacher ({len(study['noise_seeds'])} evals)"] + [
                    f"{results['teacher'][lv]['mean']:.3f} +- {results['teacher'][lv]['std']:.3f}" for lv in levels]
                    + [f"{statistics.fmean(results['teacher'][lv]['mean'] for lv in levels):.3f}"]))
            lines.append(row([label] + start))
            for method, entry in prof[kind].items():
                lines.append(row([method] + [f"{entry['mean'][lv]:.3f} +- {entry['std'][lv]:.3f}"
                                             for lv in levels + ["average"]]))
            lines.append("")
        lines += ["Paired differences of the average over levels, per seed (" + ", ".join(map(str, seeds)) + "):", "",
                  row(["paired", "greedy per seed", "greedy mean", "sampled per seed", "sampled mean"]),
                  row(["---"] * 5)]
        for method, entry in prof["greedy"].items():
            for other in (BASELINE,) + RIVALS:
                d, ds = entry.get("diff_vs_" + other), prof["sampled"][method].get("diff_vs_" + other)
                if d:
                    lines.append(row([f"{method} - {other}", fmt_seeds(d["average"]["per_seed"]),
                                      fmt_diff(d["average"], n), fmt_seeds(ds["average"]["per_seed"]),
                                      fmt_diff(ds["average"], n)]))
        if "predictions" in prof:
            pr = prof["predictions"]
            lines += ["", f"Predictions (greedy average over {', '.join(levels)}; the seeds' noise = max("
                      f"{study['predict']['noise_std_k']:g} x the std of {BASELINE}'s per-seed averages "
                      f"{', '.join(f'{x:.3f}' for x in pr['noise_baseline_per_seed'])}, "
                      f"{study['predict']['noise_floor']:g})"
                      f" = {pr['noise']:.3f}):", "", row(["prediction", "per seed", "mean", "threshold", "verdict"]),
                      row(["---"] * 5)]
            for claim in pr["claims"].values():
                lines.append(row([claim["text"], fmt_seeds(claim.get("per_seed", [])),
                                  f"{claim['mean']:+.3f}" if "mean" in claim else "",
                                  f"{claim['threshold']:+.3f}", f"**{claim['verdict']}**"]))
        diag = prof["diagnostics"]
        cols = ["accuracy", "informative", "disagree", "masked_pos", "masked_neg", "masked_adv", "cosine",
                "student_nll", "teacher_nll"]
        lines += ["", row(["diagnostics", "level"] + cols), row(["---"] * (len(cols) + 2))]
        for which, per_level in diag.items():
            for lv in levels:
                label = "start" if which == "start" else f"after {which} (seed {seeds[0]})"
                lines.append(row([label, lv] + [f"{per_level[lv].get(c, float('nan')):.3f}" for c in cols]))
        if prof["differences"]:
            lines += ["", f"One difference at a time (seed {study.get('tune_seed', 0)}, average over levels):", "",
                      row(["difference", "grpo greedy", "rlad greedy", "rlad - grpo greedy", "grpo sampled",
                           "rlad sampled", "rlad - grpo sampled"]), row(["---"] * 7)]
            for diff, r in prof["differences"].items():
                g, a = r["grpo"], r["rlad"]
                lines.append(row([diff, f"{g['greedy']:.3f}", f"{a['greedy']:.3f}", f"{a['greedy'] - g['greedy']:+.3f}",
                                  f"{g['sampled']:.3f}", f"{a['sampled']:.3f}",
                                  f"{a['sampled'] - g['sampled']:+.3f}"]))
        lines.append("")
    lines += mechanism_table(results)
    return "\n".join(lines) + "\n"


def mechanism_table(results: dict) -> list:
    """Markdown lines: "why the initialisation decides it", one row per profile (its student), from mechanism()."""
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    num = lambda x, f=".3f": "n/a" if x is None else format(x, f)  # noqa: E731
    lines = ["### Why the initialisation decides it", "",
             "SFT loss: the mean of its loss_window steps at the starting checkpoint and `horizon` steps later "
             "(mid-descent or on a plateau). NLLs, masked and cosine: diagnose.py's start batch, mean over the "
             "levels; masked_adv = the share of the advantage-bearing tokens (A != 0) whose gradient TRRD's clip "
             "removes. Moved: final greedy average - the start's, per seed.", "",
             row(["profile (student, init)", "SFT step", "SFT loss -> later (ratio)", "start greedy",
                  "student NLL", "teacher NLL", "masked_adv", "masked_pos", "cosine", "grpo moved", "rlad moved",
                  "rlad - grpo"]), row(["---"] * 12)]
    for name, prof in results["profiles"].items():
        m = prof.get("mechanism")
        if not m:
            continue
        st = m["start"]
        moved = lambda k: (fmt_seeds(m["moved"][k]["per_seed"]) + f" (mean {m['moved'][k]['mean']:+.3f})"  # noqa
                           if k in m["moved"] else "")
        lines.append(row([f"{name} ({prof.get('student', 'student')}, {m.get('init', '')})", str(m["student_step"]),
                          f"{num(m['sft_loss'])} -> {num(m['sft_loss_later'])} ({num(m['sft_loss_ratio'], '.2f')})",
                          f"{m['start_greedy']:.3f}"] + [num(st.get(k)) for k in
                                                         ("student_nll", "teacher_nll", "masked_adv", "masked_pos",
                                                          "cosine")] +
                         [moved("grpo"), moved("rlad"), fmt_seeds(m.get("rlad_minus_grpo", []))]))
    return lines + [""]


def plot_curves(out: str, study: dict, seeds: list, methods: list, results: dict) -> list:
    """One figure per profile: held-out greedy accuracy, the average over the levels and each level, vs RL step,
    each method's mean over the seeds, from the starting student's accuracy, with the teacher's (sampled) as a
    dotted line (OUT/curves_PROFILE.png)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    levels, paths = study["report_levels"], []
    for profile, prof in results["profiles"].items():
        panels = ["average"] + levels
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, lv in zip(axes[0], panels):
            for method in prof["greedy"]:
                per_seed = [evaluations(rl_run_dir(out, profile, method, s)) for s in seeds]
                steps = sorted(set.intersection(*(set(e) for e in per_seed)))
                value = lambda e, t: (statistics.fmean(e[t][x] for x in levels) if lv == "average"  # noqa: E731
                                      else e[t][lv])
                ax.plot([0] + steps, [prof["start_greedy"][lv]] + [statistics.fmean(value(e, t) for e in per_seed)
                                                                  for t in steps],
                        label=method, marker="o", markersize=3, linewidth=2.2 if method in ("grpo", "rlad") else 1)
            teacher = (statistics.fmean(results["teacher"][x]["mean"] for x in levels) if lv == "average"
                       else results["teacher"][lv]["mean"])
            ax.axhline(teacher, color="k", linestyle=":", linewidth=1, label="teacher")
            ax.set_title(f"{profile}: {'average over levels' if lv == 'average' else lv}")
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"greedy accuracy, mean of {len(seeds)} seeds")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        png = os.path.join(out, f"curves_{profile}.png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        paths.append(png)
    return paths


# ----------------------------------------------------------------------------- the study
def main(argv=None):
    p = argparse.ArgumentParser(prog="mini_repro.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="study directory: models/, runs/, results.json, results.md")
    p.add_argument("--quick", action="store_true", help="smoke version: the [quick] overrides of the study config")
    p.add_argument("--control", action="store_true",
                   help="every method on the control student (N(0, 0.1) init, its plateau): the third design")
    p.add_argument("--tune", action="store_true", help="the [tune] sweeps on the tuning seed; prints their table")
    p.add_argument("--demo", action="store_true", help="under 10 minutes: the pair, TRRD's masking, grpo vs rlad")
    p.add_argument("--methods", default=None, help="comma-separated subset of the study's methods")
    p.add_argument("--jobs", type=int, default=2, help="processes side by side (one core each)")
    p.add_argument("--config", default=STUDY, help="the study config (default: configs/mini_study.toml)")
    a = p.parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    study = load_study(a.config, a.quick, a.control)
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
    if a.demo:
        return demo(study, out, a, log)
    seeds = list(study["seeds"])
    if study.get("tune_seed") in seeds:
        raise SystemExit(f"seed {study['tune_seed']} is the tuning seed: report other seeds")
    jobs = study_jobs(study, out, seeds, methods)
    seconds = run_jobs(jobs, a.jobs, log)
    results = collect(study, out, seeds, methods, jobs)
    results["curves"] = plot_curves(out, study, seeds, methods, results)
    results.update(quick=a.quick, settings={k: study.get(k) for k in SECTIONS + ("control_student", "settings_tuned")
                                             if k not in ("seeds", "report_levels")},
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


def demo(study: dict, out: str, a, log):
    """The one-command demo (under 10 minutes on 2 cores): the pair made by SFT, what TRRD does to the starting
    student's first batch (diagnose.py), then grpo and rlad side by side for [demo] steps on the tune seed: their
    greedy averages at every evaluation, the share of rlad's tokens whose gradient TRRD's clip removed, and the
    curves (OUT/demo.png). Writes OUT/demo.md."""
    t0 = time.time()
    study = {**study, "rl": {**study["rl"], **study.get("demo", {})}}
    profile, seed = next(iter(study["profiles"])), study.get("tune_seed", 0)
    overrides = study.get("demo_methods", {})  # the demo's own settings over the study's (mini_study.toml)
    runs = [rl_job(study, out, profile, m, seed, {**study["methods"][m], **overrides.get(m, {})})
            for m in ("grpo", "rlad")]
    jobs = sft_jobs(study, out, [student_of(study, profile)]) + [diagnose_job(study, out, profile, "start"),
                                                                 start_job(study, out, profile)] + runs
    run_jobs(jobs, a.jobs, log)
    levels = study["report_levels"]
    diag = json.load(open(os.path.join(out, "diagnostics", f"{profile}_start.json")))
    cols = ["accuracy", "disagree", "masked_pos", "masked_neg", "masked_adv", "cosine", "student_nll", "teacher_nll"]
    lines = [f"The starting student (SFT step {start_of(study, out, profile)['step']}), one batch per level "
             "(diagnose.py): masked_pos / masked_neg / masked_adv = the share of tokens with A > 0 / A < 0 / A != 0 "
             "whose gradient TRRD removes; cosine = cos(GRPO gradient, RLAD gradient).", "",
             "level  " + " ".join(f"{c:>11s}" for c in cols)]
    lines += [f"{lv:6s} " + " ".join(f"{diag[lv][c]:11.3f}" for c in cols) for lv in levels]
    recs = {r["method"]: [json.loads(ln) for ln in open(os.path.join(r["run_dir"], "metrics.jsonl")) if ln.strip()]
            for r in runs}
    start = eval_summary(os.path.join(out, "start", f"{profile}_greedy.json"), levels)["average"]
    lines += ["", f"RL from it, seed {seed}: greedy accuracy (average over {', '.join(levels)}, "
              f"{rl_settings(study)['eval_per_level']} held-out problems per level; step 0: eval.py on the start); for "
              "rlad, the share of its tokens whose gradient TRRD's clip removed (mean over the steps since the last "
              "row)", "", "step   grpo acc   rlad acc   rlad - grpo   rlad masked",
              f"{0:4d}   {start:8.3f}   {start:8.3f}   {0.0:+11.3f}   {'':>11s}"]
    evals = {m: evaluations(r["run_dir"]) for m, r in zip(("grpo", "rlad"), runs)}
    steps, curve, last = [0], {"grpo": [start], "rlad": [start]}, 0
    for step in sorted(set(evals["grpo"]) & set(evals["rlad"])):
        acc = {m: statistics.fmean(evals[m][step][lv] for lv in levels) for m in evals}
        masked = statistics.fmean(r["clip_frac_high"] + r["clip_frac_low"] for r in recs["rlad"]
                                  if last < r["step"] <= step)
        lines.append(f"{step:4d}   {acc['grpo']:8.3f}   {acc['rlad']:8.3f}   {acc['rlad'] - acc['grpo']:+11.3f}   "
                     f"{masked:11.3f}")
        steps.append(step)
        for m in curve:
            curve[m].append(acc[m])
        last = step
    gap = [r - g for r, g in zip(curve["rlad"][1:], curve["grpo"][1:])]
    lines += ["", f"rlad ahead of grpo at {sum(d > 0 for d in gap)} of {len(gap)} evaluations; at the last step "
              f"(step {steps[-1]}) rlad - grpo = {gap[-1]:+.3f}. One seed (the tuning seed): an illustration, not "
              "a result (the study's paired seeds are).", "",
              f"Wall time of this invocation: {time.time() - t0:.0f} s ({a.jobs} jobs at a time; a job finished by an "
              "earlier invocation is skipped); curves: demo.png"]
    lines.append("")
    plot_demo(os.path.join(out, "demo.png"), steps, curve, recs["rlad"], profile, seed)
    text = "\n".join(lines)
    with open(os.path.join(out, "demo.md"), "w") as f:
        f.write(text)
    print(text)
    log(f"demo done in {time.time() - t0:.0f} s: {out}/demo.md, demo.png")
    return text


def plot_demo(png: str, steps: list, curve: dict, rlad_records: list, profile: str, seed: int):
    """The demo's figure: the greedy average of grpo and rlad vs RL step, and the share of rlad's tokens whose
    gradient TRRD's clip removed, step by step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for m, values in curve.items():
        left.plot(steps, values, marker="o", markersize=3, label=m)
    left.set_title(f"{profile}, seed {seed}: greedy accuracy, average over levels", fontsize=9)
    right.plot([r["step"] for r in rlad_records], [r["clip_frac_high"] + r["clip_frac_low"] for r in rlad_records],
               color="C1")
    right.set_title("rlad: share of tokens whose gradient TRRD's clip removes", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def tune(study: dict, out: str, a, log):
    """The sweeps of [tune]: every listed value of one train.py key per method, from the [tune] profile's
    student, on the tuning seed only. Writes OUT/tune.md with, per method and key, the best value: those go into
    [methods.*] by hand (and settings_tuned = true), so the reported seeds never see the selection."""
    seed, grids = study.get("tune_seed", 0), study.get("tune", {})
    profile = grids.get("profile", next(iter(study["profiles"])))
    jobs = sft_jobs(study, out, [student_of(study, profile)])
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
                jobs.append({**job, "setting": (key, value)})
    run_jobs(jobs, a.jobs, log)
    steps = study["rl"]["max_steps"]
    lines = [f"Tuning on seed {seed} (not a reported seed), profile {profile}: final greedy Mean@1", ""]
    best = {}
    for job in jobs:
        if "setting" in job:
            acc = final_eval(job["run_dir"], steps, study["report_levels"])
            key, value = job["setting"]
            lines.append(f"{job['method']:10s} {f'{key}={value}':20s} avg {acc['average']:.3f}  " +
                         " ".join(f"{lv} {v:.3f}" for lv, v in acc.items() if lv != "average"))
            if acc["average"] > best.get((job["method"], key), (None, -1.0))[1]:  # the first on a tie
                best[(job["method"], key)] = (value, acc["average"])
    lines += ["", "Best per method (into configs/mini_study.toml's [methods.*] by hand, then settings_tuned = true):",
              ""] + [f"[methods.{m}] {key} = {value!r}    # greedy avg {avg:.3f} on seed {seed}"
                     for (m, key), (value, avg) in best.items()]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "tune.md"), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
