"""The miniature study end to end, shrunk to a few steps (experiments/mini_repro/mini_repro.py --quick, run from
the repository root the way its README says): real train.py subprocesses (SFT from ground truth for a GPT-2 teacher
and two smaller GPT-2 students, the study's and the plateau control, grpo / kdrl / rlad / topd / topk_kd / rlad_weak
/ rlad_self / distill with vLLM CPU rollouts from the first, grpo / rlad from the control, the per-difference runs
with one on the transformers engine), the students and the weak teacher chosen by their accuracy profile,
diagnose.py and eval.py subprocesses, the results files, the curves; then a rerun that must skip every job. Also
diagnose.py's gradient cosine on real tiny models, the arithmetic tokenizer and fixed-width prompt, the aggregation
arithmetic and the predictions' verdicts."""
import json
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_DIR = os.path.join(ROOT, "experiments", "mini_repro")  # mini_repro.py, diagnose.py and configs/
SCRIPT = os.path.join("experiments", "mini_repro", "mini_repro.py")  # relative to ROOT, as a user types it
METHODS = ["grpo", "kdrl", "rlad", "topd", "topk_kd", "rlad_weak", "rlad_self", "distill"]
PROFILES = ["crossing", "plateau"]
PROFILE_METHODS = {"crossing": METHODS, "plateau": ["grpo", "rlad"]}  # [quick.profiles.plateau] methods
LEVELS = ["L2", "L3"]  # [quick] report_levels


def study_module(name):
    if STUDY_DIR not in sys.path:
        sys.path.insert(0, STUDY_DIR)
    return __import__(name)


def test_arith_tokenizer_fixed_width_prompt_and_reward():
    """Every level's prompt is 17 tokens: operand j is token 2j - 1 and the answer starts at the same position."""
    import data
    import tasks
    import tiny
    tok = tiny.make_arith_tokenizer()
    assert len(tok) == 18 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ex = {"task": "arith", "question": "3 + 5 - 7 =", "answer": "8 1", "level": "L3", "id": "x"}
    arith = tasks.load("arith")
    ids, prefill = tasks.prompt_ids(arith, ex, tok)
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "3", "+", "5", "-", "7"] + ["_"] * 10 + ["="]
    assert prefill == ""
    for level in range(2, 9):
        ex2 = data.arith_examples([level], per_level=1, seed=level)[0]
        ids2 = tasks.prompt_ids(arith, ex2, tok)[0]
        digits = ex2["question"].split()[:-1][0::2]  # the operands
        assert len(ids2) == 17 and [tok.convert_ids_to_tokens(ids2[2 * j + 1]) for j in range(level)] == digits
    answer = tok("8 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(answer) == ["8", "1", "<|im_end|>"]
    assert tok.decode(answer, skip_special_tokens=True) == "8 1"
    assert arith.score([ex], [tok.decode(answer, skip_special_tokens=True)])[0]["correct"]
    assert not arith.score([ex], [tok.decode(answer[1:], skip_special_tokens=True)])[0]["correct"]
    plain = lambda text: tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert plain("12 +  3-4") == ["1", "2", "+", "3", "-", "4"]  # one token per character
    assert plain("x") == ["<|unk|>"]


def test_aggregate_paired_differences_and_prediction():
    mini_repro = study_module("mini_repro")
    acc = lambda a, b: {"L2": a, "L3": b, "average": (a + b) / 2}  # noqa: E731
    per_run = {("grpo", 1): acc(0.5, 0.1), ("grpo", 2): acc(0.6, 0.2),
               ("kdrl", 1): acc(0.5, 0.3), ("kdrl", 2): acc(0.6, 0.5),
               ("rlad", 1): acc(0.6, 0.4), ("rlad", 2): acc(0.5, 0.4)}
    out = mini_repro.aggregate(per_run, ["grpo", "kdrl", "rlad"], [1, 2])
    assert out["grpo"]["mean"]["L2"] == pytest.approx(0.55)
    assert out["grpo"]["std"]["L2"] == pytest.approx(0.0707107, rel=1e-5)  # sample std (ddof 1)
    d = out["rlad"]["diff_vs_grpo"]
    assert d["L2"]["per_seed"] == pytest.approx([0.1, -0.1]) and d["L2"]["wins"] == 1
    assert d["L3"]["mean"] == pytest.approx(0.25) and d["L3"]["wins"] == 2
    assert d["average"]["mean"] == pytest.approx(0.125)  # (0.5 - 0.3 + 0.45 - 0.4) / 2
    assert out["rlad"]["diff_vs_kdrl"]["L3"]["per_seed"] == pytest.approx([0.1, -0.1])
    assert "diff_vs_grpo" not in out["grpo"] and "diff_vs_kdrl" not in out["kdrl"]
    assert "diff_vs_topd" not in out["rlad"]  # a rival that did not run is skipped


def test_claim_verdicts():
    """Each kind of claim on the per-seed differences: every seed at least x (a mean gain with one seed short fails;
    exactly x holds, float rounding included), every seed above x (a tie is not "ahead"), the mean at most x or at
    most the seeds' noise."""
    mini_repro = study_module("mini_repro")
    gain = {"method": "rlad", "vs": "grpo", "every_seed_at_least": 0.04}
    assert mini_repro.claim_verdict([0.059, 0.061, 0.049], gain, 0.0) == "held"
    assert mini_repro.claim_verdict([0.2, 0.2, 0.039], gain, 0.0) == "failed"
    assert mini_repro.claim_verdict([0.35 - 0.31, 0.05, 0.06], gain, 0.0) == "held"  # 0.03999999999999998
    ahead = {"method": "rlad", "vs": "kdrl", "every_seed_above": 0.0}
    assert mini_repro.claim_verdict([0.001, 0.02, 0.3], ahead, 0.0) == "held"
    assert mini_repro.claim_verdict([0.01, 0.02, 0.3 - 0.1 - 0.2], ahead, 0.0) == "failed"  # a tie (-2.8e-17)
    assert mini_repro.claim_verdict([0.01, 0.02, -0.01], ahead, 0.0) == "failed"
    bound = {"method": "rlad_weak", "vs": "grpo", "mean_at_most": "noise"}
    assert mini_repro.claim_verdict([0.05, -0.01, 0.02], bound, 0.03) == "held"  # mean 0.02: one seed above is fine
    assert mini_repro.claim_verdict([0.05, 0.03, 0.04], bound, 0.03) == "failed"  # mean 0.04
    assert mini_repro.claim_verdict([0.05, 0.03, 0.04], {**bound, "mean_at_most": 0.05}, 0.0) == "held"
    assert mini_repro.claim_text(gain) == "rlad - grpo >= +0.040 on every seed"
    assert mini_repro.claim_text(ahead) == "rlad - kdrl > +0.000 on every seed"
    assert mini_repro.claim_text(bound) == "mean over seeds of rlad_weak - grpo <= the seeds' noise"
    with pytest.raises(SystemExit, match="exactly one of"):
        mini_repro.claim_verdict([0.1], {"method": "rlad", "vs": "grpo"}, 0.0)
    with pytest.raises(SystemExit, match="exactly one of"):
        mini_repro.claim_text({**gain, "mean_at_most": 0.1})


def test_noise_level_and_predictions():
    """The seeds' noise: noise_std_k x the sample std of GRPO's per-seed greedy averages, never below noise_floor;
    predictions() reads every claim on the per-seed differences of the greedy averages and marks a claim whose
    method did not run."""
    mini_repro = study_module("mini_repro")
    rule = {"noise_std_k": 2.0, "noise_floor": 0.027}
    assert mini_repro.noise_level([0.30, 0.34, 0.32], rule) == pytest.approx(0.04)  # 2 x std 0.02
    assert mini_repro.noise_level([0.320, 0.321, 0.322], rule) == 0.027  # the floor
    assert mini_repro.noise_level([0.3], rule) == 0.027  # one seed: no spread to measure
    avg = lambda *xs: {"seeds": {str(s): {"average": x} for s, x in zip((1, 2, 3), xs)}}  # noqa: E731
    greedy = {"grpo": avg(0.30, 0.34, 0.32), "rlad": avg(0.36, 0.39, 0.37), "kdrl": avg(0.31, 0.35, 0.38),
              "rlad_weak": avg(0.35, 0.37, 0.33)}
    rule["claims"] = {"gain": {"method": "rlad", "vs": "grpo", "every_seed_at_least": 0.04},
                      "kdrl": {"method": "rlad", "vs": "kdrl", "every_seed_above": 0.0},
                      "weak": {"method": "rlad_weak", "vs": "grpo", "mean_at_most": "noise"},
                      "self": {"method": "rlad_self", "vs": "grpo", "mean_at_most": "noise"}}
    out = mini_repro.predictions(greedy, [1, 2, 3], rule)
    assert out["noise"] == pytest.approx(0.04) and out["noise_baseline_per_seed"] == [0.30, 0.34, 0.32]
    c = out["claims"]
    assert c["gain"]["per_seed"] == pytest.approx([0.06, 0.05, 0.05]) and c["gain"]["verdict"] == "held"
    assert c["gain"]["threshold"] == 0.04 and c["gain"]["mean"] == pytest.approx(0.16 / 3)
    assert c["kdrl"]["per_seed"] == pytest.approx([0.05, 0.04, -0.01]) and c["kdrl"]["verdict"] == "failed"
    assert c["weak"]["mean"] == pytest.approx(0.03) and c["weak"]["threshold"] == pytest.approx(0.04)
    assert c["weak"]["verdict"] == "held"
    assert c["self"]["verdict"] == "not run" and "per_seed" not in c["self"]
    study = mini_repro.load_study(mini_repro.STUDY, quick=False)  # the study's own claims, as written
    claims = study["predict"]["claims"]
    assert [(x["method"], x["vs"]) for x in claims.values()] == [
        ("rlad", "grpo"), ("rlad", "kdrl"), ("rlad_weak", "grpo"), ("rlad_self", "grpo")]
    assert [mini_repro.claim_text(x) for x in claims.values()] == [
        "rlad - grpo >= +0.040 on every seed", "rlad - kdrl > +0.000 on every seed",
        "mean over seeds of rlad_weak - grpo <= the seeds' noise",
        "mean over seeds of rlad_self - grpo <= the seeds' noise"]
    assert study["predict"]["profile"] in study["profiles"] and study["seeds"] == [1, 2, 3]
    assert {m for x in claims.values() for m in (x["method"], x["vs"])} <= set(study["methods"])


def test_mechanism_row():
    """"Why the initialisation decides it", one profile: the SFT loss now and `horizon` steps later (means of
    `window` steps), the start batch's diagnostics averaged over the levels, and how far grpo and rlad moved the
    greedy average per seed."""
    mini_repro = study_module("mini_repro")
    losses = {t: 1.0 - 0.01 * t for t in range(1, 61)}
    diag = {"L2": {k: 0.2 for k in mini_repro.MECHANISM_DIAG}, "L3": {k: 0.4 for k in mini_repro.MECHANISM_DIAG}}
    seeds = lambda *xs: {"seeds": {str(s): {"average": x} for s, x in zip((1, 2), xs)}}  # noqa: E731
    prof = {"student_step": 10, "start_greedy": {"average": 0.30}, "diagnostics": {"start": diag},
            "greedy": {"grpo": seeds(0.32, 0.31), "rlad": {**seeds(0.40, 0.36),
                                                           "diff_vs_grpo": {"average": {"per_seed": [0.08, 0.05]}}}}}
    m = mini_repro.mechanism(prof, losses, horizon=20, window=5)
    assert m["sft_loss"] == pytest.approx(0.92) and m["sft_loss_later"] == pytest.approx(0.72)  # steps 6-10, 26-30
    assert m["sft_loss_ratio"] == pytest.approx(0.72 / 0.92) and m["start_greedy"] == 0.30
    assert m["start"] == {k: pytest.approx(0.3) for k in mini_repro.MECHANISM_DIAG}
    assert m["moved"]["grpo"]["per_seed"] == pytest.approx([0.02, 0.01])
    assert m["moved"]["rlad"]["mean"] == pytest.approx(0.08) and m["rlad_minus_grpo"] == [0.08, 0.05]
    late = mini_repro.mechanism({**prof, "student_step": 50}, losses, horizon=20, window=5)
    assert late["sft_loss_later"] is None and late["sft_loss_ratio"] is None  # past the run's end


def fake_sft_run(run_dir, losses: dict, evals: dict):
    """A train.py run directory as the profile rules read it: metrics.jsonl (every step's loss, evaluations on
    some) and a complete checkpoint per evaluated step."""
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, loss in sorted(losses.items()):
            rec = {"step": step, "loss": loss}
            if step in evals:
                rec.update({"eval_accuracy": sum(evals[step].values()) / len(evals[step])},
                           **{f"eval/{lv}": v for lv, v in evals[step].items()})
            f.write(json.dumps(rec) + "\n")
    for step in evals:
        ckpt = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
        os.makedirs(ckpt)
        open(os.path.join(ckpt, "trainer_state.pt"), "w").close()


def test_mid_descent_rule_skips_plateaus_and_the_run_end(tmp_path):
    """rule "mid_descent": among the evaluated checkpoints whose mean loss over loss_window steps falls to at most
    max_loss_ratio of itself `horizon` steps later, the one nearest to the target; a checkpoint matching the target
    on a plateau, or too close to the run's end to look ahead, is not chosen; "nearest" takes the plateau one."""
    mini_repro = study_module("mini_repro")
    # loss: 1.8 until step 100, halving every 20 steps until ~163, then 0.2 with a one-step dip at 235
    losses = {t: 1.8 if t <= 100 else max(0.2, 1.8 * 0.5 ** ((t - 100) / 20)) for t in range(1, 261)}
    losses[235] = 0.05
    target = {"L2": 0.6, "L3": 0.3}
    evals = {t: {"L2": 0.1, "L3": 0.1} for t in range(20, 261, 20)}
    evals[60] = dict(target)                       # on the first plateau: exactly the target
    evals[120] = {"L2": 0.5, "L3": 0.2}            # mid-descent: distance 0.2
    evals[140] = {"L2": 0.8, "L3": 0.6}            # mid-descent: distance 0.5
    evals[200] = dict(target)                      # on the last plateau
    evals[260] = dict(target)                      # the last step: nothing to look ahead to
    run = str(tmp_path / "student_sft")
    fake_sft_run(run, losses, evals)
    rule = {"rule": "mid_descent", "horizon": 50, "max_loss_ratio": 0.75, "loss_window": 5, **target}
    pick = mini_repro.choose_student(run, rule)
    assert pick["step"] == 120 and pick["distance"] == pytest.approx(0.2) and pick["target"] == target
    assert pick["checkpoint"] == os.path.join(run, "checkpoints", "step_000120")
    assert pick["rule"] == {"rule": "mid_descent", "horizon": 50, "max_loss_ratio": 0.75, "loss_window": 5}
    mean = lambda a: sum(losses[t] for t in range(a - 4, a + 1)) / 5  # noqa: E731
    assert pick["loss"] == pytest.approx(mean(120)) and pick["loss_after"] == pytest.approx(mean(170))
    assert pick["loss_ratio"] == pytest.approx(mean(170) / mean(120)) and pick["loss_ratio"] <= 0.75
    assert set(pick["eligible"]) == {"80", "100", "120", "140"}  # 80: its mean reaches into the fall by step 130
    assert mini_repro.choose_student(run, {**target, "rule": "nearest"})["step"] == 60
    assert mini_repro.choose_student(run, dict(target))["step"] == 60  # "nearest" is the default
    fast = mini_repro.falling_fast(losses, 50, 0.75, 1)  # one step's loss: the dip at 235 makes 185 look fast
    assert 185 in fast and 185 not in mini_repro.falling_fast(losses, 50, 0.75, 5)
    with pytest.raises(SystemExit, match="no kept, evaluated checkpoint is mid-descent"):
        mini_repro.choose_student(run, {**rule, "max_loss_ratio": 0.01})
    with pytest.raises(SystemExit, match="rule = 'steepest'"):
        mini_repro.choose_student(run, {**rule, "rule": "steepest"})


def test_control_is_the_third_design_student():
    """--control: the student at N(0, 0.1) (make_gpt2's default, bit for bit), 450 SFT steps with a checkpoint and
    an evaluation every 10, chosen by the nearest profile; the study's own student starts the PyTorch way."""
    import torch
    import tiny
    mini_repro = study_module("mini_repro")
    study, control = (mini_repro.load_study(mini_repro.STUDY, quick=False, control=c) for c in (False, True))
    assert study["student_model"]["init"] == "torch_default" and study["profiles"]["crossing"]["rule"] == "mid_descent"
    assert control["student_model"]["init"] == "normal" and control["student_model"]["init_std"] == 0.1
    assert {k: control["student_sft"][k] for k in ("max_steps", "save_every", "eval_every")} == {
        "max_steps": 450, "save_every": 10, "eval_every": 10}
    assert control["profiles"]["crossing"]["rule"] == "nearest"
    assert {k: v for k, v in control["profiles"]["crossing"].items() if k != "rule"} == {
        k: v for k, v in study["profiles"]["crossing"].items() if k not in mini_repro.RULE_KEYS}
    assert control["teacher_model"] == study["teacher_model"] and control["rl"] == study["rl"]
    tok = tiny.make_arith_tokenizer()
    kwargs = {k: v for k, v in control["student_model"].items() if k != "family"}
    made = tiny.make_gpt2(tok, **kwargs)
    third = tiny.make_gpt2(tok, hidden_size=64, num_layers=2, num_heads=2, init_std=0.1, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(made.parameters(), third.parameters()))


def test_diagnose_cosine_is_one_against_itself_and_not_against_another_teacher(tmp_path):
    """diagnose.py's batch statistics on real tiny models and a batch with right and wrong answers: with the student
    as its own teacher TRRD's ratio is GRPO's, so the two gradients are equal (cosine 1, nothing masked, no
    disagreement); a sharper, different teacher disagrees and turns the gradients apart."""
    import torch
    from transformers import AutoModelForCausalLM
    import data
    import tasks
    import tiny
    diagnose = study_module("diagnose")
    tok = tiny.make_arith_tokenizer()
    sizes = dict(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=32, intermediate_size=64,
                 max_position_embeddings=64)
    student = AutoModelForCausalLM.from_pretrained(tiny.save_tiny(str(tmp_path / "s"), tok, seed=0, **sizes))
    other = AutoModelForCausalLM.from_pretrained(tiny.save_tiny(str(tmp_path / "t"), tok, seed=1, **sizes))
    with torch.no_grad():
        other.lm_head.weight.mul_(30)  # a confident teacher: its log-probs are far from the near-uniform student's
    a = diagnose.parse_args(["--student", "-", "--teacher", "-", "--group", "4"])
    prompts, responses, reward = [], [], []
    for ex in data.arith_examples([3], per_level=3, seed=0):  # per problem: the right answer and three wrong ones
        right = tok(ex["answer"], add_special_tokens=False)["input_ids"]
        for k in range(4):
            prompts.append(tasks.prompt_ids(tasks.load("arith"), ex, tok)[0])
            responses.append((right if k == 0 else [right[0], tok.convert_tokens_to_ids(str(k))]) +
                             [tok.eos_token_id])
            reward.append(1.0 if k == 0 or str(k) == ex["answer"].split()[-1] else 0.0)
    reward = torch.tensor(reward)
    same = diagnose.batch_diagnostics(student, student, prompts, responses, reward, a)
    diff = diagnose.batch_diagnostics(student, other.requires_grad_(False), prompts, responses, reward, a)
    assert same["informative"] == 1.0 and same["accuracy"] == diff["accuracy"] == pytest.approx(reward.mean().item())
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["disagree"] == same["masked_pos"] == same["masked_neg"] == 0.0
    assert diff["disagree"] > 0.5 and diff["cosine"] < 0.99
    assert diff["masked_pos"] + diff["masked_neg"] > 0  # where it disagrees, TRRD's clip removes some gradients


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mini"))
    cmd = [sys.executable, SCRIPT, "--out", out, "--quick"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, cmd


def test_quick_study_results(quick_study):
    out, _ = quick_study
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["seeds"] == [1] and res["quick"] is True and res["levels"] == LEVELS
    assert list(res["profiles"]) == PROFILES and list(res["teacher"]) == LEVELS
    with open(os.path.join(STUDY_DIR, "configs", "mini_study.toml"), "rb") as f:
        flag = tomllib.load(f)["settings_tuned"]  # the config's flag, stated in results.md
    assert res["settings_tuned"] is flag
    for name, prof in res["profiles"].items():
        assert prof["student"] == {"crossing": "student", "plateau": "control"}[name]
        for kind in ("greedy", "sampled"):
            assert list(prof[kind]) == PROFILE_METHODS[name]
            for m, entry in prof[kind].items():
                acc = entry["seeds"]["1"]
                assert list(acc) == LEVELS + ["average"] and all(0.0 <= v <= 1.0 for v in acc.values()), (kind, m)
                assert acc["average"] == pytest.approx(sum(acc[lv] for lv in LEVELS) / len(LEVELS))
                assert entry["mean"] == acc and all(v == 0.0 for v in entry["std"].values())
            d = prof[kind]["rlad"]["diff_vs_grpo"]["average"]
            assert d["mean"] == pytest.approx(prof[kind]["rlad"]["mean"]["average"] -
                                              prof[kind]["grpo"]["mean"]["average"])
        assert set(prof["diagnostics"]) == {"start", "grpo", "rlad"}
        for per_level in prof["diagnostics"].values():
            assert list(per_level) == LEVELS
            assert all(0.0 <= per_level[lv][k] <= 1.0 for lv in LEVELS
                       for k in ("accuracy", "informative", "disagree", "masked_pos", "masked_neg", "masked_adv"))
            assert all(per_level[lv]["student_nll"] > 0 and per_level[lv]["teacher_nll"] > 0 for lv in LEVELS)
        assert list(prof["noise"]) == LEVELS and all(v["std"] >= 0 for v in prof["noise"].values())
        assert list(prof["start_greedy"]) == LEVELS + ["average"]  # eval.py greedy on the start
        mech = prof["mechanism"]
        assert mech["student_step"] == prof["student_step"] and mech["start_greedy"] == prof["start_greedy"]["average"]
        assert mech["init"] == {"crossing": "torch_default", "plateau": "N(0, 0.1)"}[name]
        assert set(mech["start"]) == set(study_module("mini_repro").MECHANISM_DIAG)
        for m in ("grpo", "rlad"):
            assert mech["moved"][m]["per_seed"] == pytest.approx(
                [prof["greedy"][m]["seeds"]["1"]["average"] - prof["start_greedy"]["average"]])
    prof = res["profiles"]["crossing"]
    for kind in ("greedy", "sampled"):
        for rival in ("kdrl", "topk_kd", "topd", "distill"):
            d = prof[kind]["rlad"]["diff_vs_" + rival]["average"]
            assert d["mean"] == pytest.approx(prof[kind]["rlad"]["mean"]["average"] -
                                              prof[kind][rival]["mean"]["average"])
    claims = prof["predictions"]["claims"]
    assert list(claims) == ["rlad_gain", "rlad_over_kdrl", "weak_teacher_no_gain", "clip_without_knowledge_no_gain"]
    assert all(c["verdict"] in ("held", "failed") and len(c["per_seed"]) == 1 for c in claims.values())
    assert prof["predictions"]["noise"] == 0.027  # one seed: the floor
    assert "predictions" not in res["profiles"]["plateau"]  # the claims are about the crossing regime
    assert set(prof["differences"]) == {"reference", "engine_hf"} and not res["profiles"]["plateau"]["differences"]
    for diff in prof["differences"].values():
        assert set(diff) == {"grpo", "rlad"} and all(0 <= v <= 1 for r in diff.values() for v in r.values())
    hf = json.load(open(os.path.join(out, "differences", "crossing", "engine_hf_rlad", "config.json")))
    assert hf["engine"] == "hf" and hf["method"] == "rlad" and hf["seed"] == 0
    table = open(os.path.join(out, "results.md")).read()
    assert "### Profile `crossing`" in table and "### Profile `plateau`" in table and "Predictions" in table
    assert "One difference at a time" in table and "### Why the initialisation decides it" in table
    assert ("the values tuned on seed 0" if flag else "NOT tuned") in table
    names = [r.split("|")[1].strip() for r in table.splitlines() if r.startswith("| ")]
    for m in METHODS:
        assert m in names and (m == "grpo" or f"{m} - grpo" in names), m
    assert all(f"rlad - {r}" in names for r in ("kdrl", "topk_kd", "topd", "distill")) and "engine_hf" in names
    assert "rlad - grpo >= +0.040 on every seed" in names
    assert "mean over seeds of rlad_self - grpo <= the seeds' noise" in names
    assert "crossing (student, torch_default)" in names and "plateau (control, N(0, 0.1))" in names
    assert len(res["curves"]) == 2
    for path in res["curves"]:
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"


def test_quick_study_chooses_student_and_weak_teacher_by_profile(quick_study):
    """The student is the kept SFT checkpoint nearest to the target among those its rule allows (mid_descent: the
    loss still falling fast; in --quick every step with a loss one step later); the weak teacher the teacher's
    checkpoint nearest to [weak_teacher]; the controls get the teachers they name."""
    out, _ = quick_study
    mini_repro = study_module("mini_repro")
    study = mini_repro.load_study(mini_repro.STUDY, quick=True)
    profiles = json.load(open(os.path.join(out, "profiles.json")))
    spec = study["profiles"]["crossing"]
    assert profiles["crossing"]["rule"] == {k: spec[k] for k in mini_repro.RULE_KEYS}
    assert profiles["plateau"]["rule"] == {"rule": "nearest"} and profiles["plateau"]["student"] == "control"
    target = lambda name: {k: v for k, v in study["profiles"][name].items()  # noqa: E731
                           if k not in mini_repro.RULE_KEYS + mini_repro.PROFILE_KEYS}
    for run, chosen, target in (("student_sft", profiles["crossing"], target("crossing")),
                                ("control_sft", profiles["plateau"], target("plateau")),
                                ("teacher_sft", json.load(open(os.path.join(out, "weak_teacher.json"))),
                                 study["weak_teacher"])):
        evals = mini_repro.evaluations(os.path.join(out, run))
        assert sorted(evals) == ([2, 4] if run == "teacher_sft" else [1, 2, 3])  # eval_every = save_every
        if run == "student_sft":  # step 3 has no loss one step later
            evals = {s: e for s, e in evals.items() if s in mini_repro.falling_fast(
                mini_repro.train_losses(os.path.join(out, run)), spec["horizon"], spec["max_loss_ratio"], 1)}
            assert sorted(evals) == [1, 2] and sorted(chosen["eligible"]) == ["1", "2"]
        dist = {s: sum(abs(evals[s][lv] - v) for lv, v in target.items()) for s in evals}
        assert chosen["distance"] == pytest.approx(min(dist.values())) and dist[chosen["step"]] == min(dist.values())
        assert chosen["checkpoint"] == os.path.join(out, run, "checkpoints", f"step_{chosen['step']:06d}")
    student, weak = profiles["crossing"]["checkpoint"], json.load(open(os.path.join(out, "weak_teacher.json")))
    teacher = os.path.join(out, "teacher_sft", "checkpoints", "step_000004")
    for m in METHODS:
        cfg = json.load(open(os.path.join(out, "runs", "crossing", f"{m}_seed1", "config.json")))
        assert cfg["model"] == student and cfg["seed"] == 1
        assert cfg["method"] == ("rlad" if m.startswith("rlad") else m)
        assert cfg["teacher"] == {"rlad_self": student, "rlad_weak": weak["checkpoint"]}.get(m, teacher)
    topk = json.load(open(os.path.join(out, "runs", "crossing", "topk_kd_seed1", "config.json")))
    assert topk["kd_topk"] == 4 and topk["kd_topk_tail"] is True  # k <= the arith tokenizer's 18 tokens
    assert topk["kd_coef"] == study["methods"]["topk_kd"]["kd_coef"]
    topd = json.load(open(os.path.join(out, "runs", "crossing", "topd_seed1", "config.json")))
    assert topd["topd_alpha"] == study["methods"]["topd"]["topd_alpha"]
    for m in ("grpo", "rlad"):  # the plateau control: the control student's checkpoint, the study's teacher
        cfg = json.load(open(os.path.join(out, "runs", "plateau", f"{m}_seed1", "config.json")))
        assert cfg["model"] == profiles["plateau"]["checkpoint"] and cfg["teacher"] == teacher
    assert profiles["plateau"]["checkpoint"].startswith(os.path.join(out, "control_sft", "checkpoints"))
    assert not os.path.exists(os.path.join(out, "runs", "plateau", "kdrl_seed1"))
    made = json.load(open(os.path.join(out, "models", "control_init", "config.json")))
    assert made["n_embd"] == 64 and made["initializer_range"] == 0.1


def test_quick_study_runs_logged_and_checkpointed(quick_study):
    out, _ = quick_study
    for m in METHODS:
        run = os.path.join(out, "runs", "crossing", f"{m}_seed1")
        lines = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl")) if ln.strip()]
        assert [r["step"] for r in lines] == [1, 2]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in lines)
        assert "eval_accuracy" in lines[-1] and "eval/L8" in lines[-1]  # eval_levels 2..8 (mini_rl.toml)
        assert os.path.isfile(os.path.join(run, "checkpoints", "step_000002", "model.safetensors"))
        sampled = json.load(open(os.path.join(run, "sampled_eval.json")))
        assert sampled["config"]["temperature"] == 1.0 and set(LEVELS) <= set(sampled["summary"])


def test_quick_study_rerun_skips_finished_jobs(quick_study):
    out, cmd = quick_study
    runs = [os.path.join(out, "runs", p, f"{m}_seed1", "metrics.jsonl") for p, ms in PROFILE_METHODS.items()
            for m in ms]
    before = {path: os.path.getmtime(path) for path in runs}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "] start " not in again.stdout and "jobs to do" not in again.stdout  # nothing launched
    assert {path: os.path.getmtime(path) for path in runs} == before
    seconds = json.load(open(os.path.join(out, "results.json")))["seconds"]["jobs"]
    assert {"teacher_sft", "student_sft", "control_sft", "crossing/difference_engine_hf_rlad",
            "crossing/diagnose_start", "plateau/diagnose_rlad", "plateau/start_greedy", "teacher/noise_seed101",
            "crossing/rlad_seed1/sampled", "plateau/grpo_seed1/sampled"} <= set(seconds)
    assert all(0 < s < 900 for s in seconds.values())  # the first invocation's wall times, read back


def test_study_config_errors_are_one_line(tmp_path):
    mini_repro = study_module("mini_repro")
    study = mini_repro.load_study(mini_repro.STUDY, quick=False)
    with pytest.raises(SystemExit, match="teacher = 'nobody': use 'teacher', 'weak' or 'student'"):
        mini_repro.rl_job(study, str(tmp_path), "crossing", "rlad", 1, {"method": "rlad", "teacher": "nobody"})
    partial = tmp_path / "study.toml"
    partial.write_text("seeds = [1]\n")
    with pytest.raises(SystemExit, match="missing .*'profiles'"):
        mini_repro.load_study(str(partial), quick=False)
    text = open(mini_repro.STUDY).read()  # [profiles.plateau] holds the first of each line replaced
    for line, typo, match in (('student = "control"', 'student = "nobody"', "plateau.* student = 'nobody'"),
                              ('methods = ["grpo", "rlad"]', 'methods = ["ppo"]', r"plateau.* methods: \['ppo'\]")):
        wrong = tmp_path / "wrong.toml"
        wrong.write_text(text.replace(line, typo, 1))
        with pytest.raises(SystemExit, match=match):
            mini_repro.load_study(str(wrong), quick=False)


def test_quick_demo_reuses_the_pair_and_prints_trrd_at_work(quick_study):
    """--demo on the study's directory: the pair and the start diagnostics are reused, grpo and rlad run on the tune
    seed, and the printed table has the diagnostics per level and the masked share of rlad's tokens."""
    out, _ = quick_study
    demo = subprocess.run([sys.executable, SCRIPT, "--out", out, "--quick", "--demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "start teacher_sft" not in demo.stdout and "start crossing/grpo_seed0" in demo.stdout
    text = open(os.path.join(out, "demo.md")).read()
    assert text in demo.stdout and "masked_adv" in text and "rlad masked" in text and "Wall time" in text
    rows = [ln.split() for ln in text.splitlines() if ln[:4].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [0, 2]  # the start (eval.py greedy) and the one evaluation
    assert rows[0][1] == rows[0][2] and float(rows[0][3]) == 0.0
    grpo, rlad, gap, masked = map(float, rows[1][1:])
    assert 0 <= grpo <= 1 and 0 <= rlad <= 1 and 0 <= masked <= 1 and gap == pytest.approx(rlad - grpo, abs=1e-3)
    assert open(os.path.join(out, "demo.png"), "rb").read(4) == b"\x89PNG"
    for m in ("grpo", "rlad"):
        cfg = json.load(open(os.path.join(out, "runs", "crossing", f"{m}_seed0", "config.json")))
        assert cfg["method"] == m and cfg["seed"] == 0 and cfg["max_steps"] == 2
