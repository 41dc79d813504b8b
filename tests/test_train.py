"""train.py end to end on CPU: real vLLM rollouts, real teacher, FSDP2 (gloo), real rewards, tiny models.

Runs (subprocesses, started once per module):
- toy task (tests/train_helper.py: reward = share of lowercase letters/spaces) with grpo and rlad: the mean
  reward must rise; with sft on the teacher's correct samples (written by eval.py --sft_out) and on data targets.
- K&K with configs/tiny_cpu.toml and kdrl through the command line: 4 steps uninterrupted, and the same run
  stopped by SIGTERM after step 2 then resumed: metrics and final weights must be equal.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# One torch thread per process: on a busy 2-core machine two OpenMP threads per process spin against the other
# processes and run ~10x slower (measured); torchrun sets the same for its workers.
ENV = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1")
TOY = [PY, os.path.join(ROOT, "tests", "train_helper.py"), "toy", "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"),
       "--prompts_per_step", "8", "--group_size", "8", "--max_tokens", "8", "--mini_batches", "1", "--lr", "1e-2",
       "--save_every", "0", "--keep_last", "1"]
KK = [PY, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--method", "kdrl",
      "--max_steps", "4", "--save_every", "2", "--eval_every", "2", "--kd_coef", "0.05", "--kd_anneal", "0"]
# Every optional part at once, on the transformers engine: reference KL, adaptive entropy control, group filter,
# 2 PPO epochs x 2 mini-batches (old log-probs recomputed), cosine LR, KDRL's reward-guided mask.
OPTIONS = ["--max_steps", "4", "--prompts_per_step", "4", "--group_size", "4", "--kl_coef", "0.01", "--ent_target", "9",
           "--ent_coef", "0.001", "--filter_groups", "true", "--ppo_epochs", "2", "--mini_batches", "2",
           "--lr_schedule", "cosine", "--warmup_steps", "1", "--kd_wrong_only", "true", "--engine", "hf"]
STEP_KEYS = {"step", "reward", "accuracy", "format_ok", "response_len", "response_len_max", "truncated", "entropy",
             "grad_norm", "lr", "loss", "pad_frac", "skipped_steps", "tokens_per_s", "logprob_mismatch",
             "time/rollout", "time/reward", "time/teacher", "time/old_logp", "time/update", "time/sync", "time/step"}


def run(cmd, run_dir, timeout=600):
    p = subprocess.run(cmd + ["--run_dir", run_dir], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return read_metrics(run_dir)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    import safetensors.torch
    return safetensors.torch.load_file(os.path.join(path, "model.safetensors"))


def final_checkpoint(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return os.path.join(root, sorted(os.listdir(root))[-1])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy-task runs: method -> (run_dir, metrics)."""
    out = {}
    samples = teacher_samples(tmp_path_factory.mktemp("teacher"))
    for method, extra in [("grpo", ["--max_steps", "15"]), ("rlad", ["--max_steps", "15"]),
                          ("sft", ["--max_steps", "3", "--sft_data", samples]), ("sft-data", ["--max_steps", "8"]),
                          ("kdrl-options", OPTIONS), ("distill", ["--max_steps", "2"])]:
        d = str(tmp_path_factory.mktemp(method))
        out[method] = (d, run(TOY + ["--method", method.split("-")[0]] + extra, d))
    out["samples"] = samples
    return out


def teacher_samples(folder):
    """The SFT baseline's data, drawn outside training as a user does: eval.py samples the training prompts with a
    tiny teacher and writes the correct samples (--sft_out). (interface change: no process holds two engines.)"""
    import preflight
    import tiny
    kwargs = dict(preflight.TINY["tiny-teacher"])
    teacher = tiny.save_tiny(str(folder / "teacher"), seed=1 + kwargs.pop("seed_offset"), **kwargs)
    out = str(folder / "samples.jsonl")
    p = subprocess.run([PY, os.path.join(ROOT, "eval.py"), "--model", teacher, "--task", "train_helper:ToyTask",
                        "--split", "train", "--n", "4", "--max_tokens", "8", "--temperature", "1", "--top_p", "1",
                        "--kv_cache_memory_bytes", str(64 << 20), "--out", str(folder / "eval.json"), "--sft_out", out],
                       cwd=ROOT, env=dict(ENV, PYTHONPATH=os.path.join(ROOT, "tests")), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def kk(tmp_path_factory):
    """K&K kdrl through the CLI: uninterrupted, and SIGTERM after step 2 then --resume."""
    full = str(tmp_path_factory.mktemp("kk_full"))
    run(KK, full)
    cut = str(tmp_path_factory.mktemp("kk_cut"))
    p = subprocess.Popen(KK + ["--run_dir", cut], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    while b" 2/4 [" not in seen:  # tqdm's bar after step 2 (blocking reads: no polling, no sleep)
        chunk = p.stdout.read1(4096)
        assert chunk, seen[-3000:].decode(errors="replace")
        seen += chunk
    p.send_signal(signal.SIGTERM)
    seen += p.stdout.read()
    assert p.wait(timeout=600) == 0, seen[-3000:].decode(errors="replace")
    assert b"SIGTERM: checkpoint written" in seen
    stopped_at = read_metrics(cut)[-1]["step"]
    run(KK + ["--resume", "true"], cut)
    return full, cut, stopped_at


def check_metrics(metrics, steps, keys=STEP_KEYS):
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert keys <= set(m), keys - set(m)
        assert all(isinstance(v, (int, float)) and v == v for v in m.values()), m  # numbers, no NaN
        assert m["skipped_steps"] == 0 and 0 <= m["accuracy"] <= 1 and 0 <= m["pad_frac"] < 1


@pytest.mark.parametrize("method", ["grpo", "rlad"])
def test_learns_toy_task(toy, method):
    run_dir, metrics = toy[method]
    check_metrics(metrics, 15)
    first, last = [sum(m["reward"] for m in ms) / 3 for ms in (metrics[:3], metrics[-3:])]
    assert last > first + 0.1, [round(m["reward"], 3) for m in metrics]
    if method == "rlad":
        assert all(m["teacher_log_ratio_abs"] > 0 for m in metrics)
    # After every sync the engine samples with the trainer's weights: its log-probs of the sampled tokens equal
    # the trainer's recomputation (a stale engine would be off by the per-step change, here > 1e-2).
    assert max(m["logprob_mismatch_max"] for m in metrics) < 1e-4
    assert max(m["grad_norm"] for m in metrics) > 0
    w0, w1 = weights(os.path.join(run_dir, "models", "tiny")), weights(final_checkpoint(run_dir))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-3


def test_options_run(toy):
    _, metrics = toy["kdrl-options"]
    check_metrics(metrics, 4)
    assert all(m["loss/kl_ref"] > 0 and m["loss/kd"] > 0 and 0 < m["groups_kept"] <= 1 for m in metrics)
    assert [m["ent_coef"] for m in metrics] == pytest.approx([0.001, 0.006, 0.011, 0.016])  # entropy < target: up
    assert metrics[0]["lr"] == 1e-2 and metrics[-1]["lr"] < metrics[1]["lr"]  # cosine decay after warm-up
    assert metrics[-1]["logprob_mismatch_max"] < 1e-4  # old log-probs recomputed; HFEngine synced


def test_distill_runs(toy):
    _, metrics = toy["distill"]
    check_metrics(metrics, 2)
    assert all(m["loss/kd"] > 0 for m in metrics) and "loss/pg" not in metrics[0]


def test_sft_from_teacher_samples(toy):
    from train_helper import ToyTask
    lines = [json.loads(line) for line in open(toy["samples"])]
    assert lines and all(s["correct"] for s in ToyTask.score(lines, [x["target"] for x in lines]))  # correct only
    run_dir, metrics = toy["sft"]
    check_metrics(metrics, 3, STEP_KEYS - {"logprob_mismatch"})
    assert all(m["kept_rows"] > 0 for m in metrics)  # some teacher samples were correct and trained on
    w0, w1 = weights(os.path.join(run_dir, "models", "tiny")), weights(final_checkpoint(run_dir))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-3


def test_sft_from_data_targets_fits_them(toy):
    _, metrics = toy["sft-data"]
    check_metrics(metrics, 8, STEP_KEYS - {"logprob_mismatch"})
    assert metrics[-1]["loss/nll"] < 0.5 * metrics[0]["loss/nll"], [m["loss/nll"] for m in metrics]


def test_kdrl_kk_run_and_resume_are_exact(kk):
    full, cut, stopped_at = kk
    a, b = read_metrics(full), read_metrics(cut)
    check_metrics(a, 4)
    check_metrics(b, 4)
    assert 2 <= stopped_at < 4
    assert all(m["loss/kd"] > 0 and 0 <= m["teacher_pad_frac"] < 1 for m in a)
    assert "eval_accuracy" in a[1] and "eval/PPL8" in a[3]
    # Wall-clock fields differ; so do the last bits of the *engine's* log-probs (a restarted vLLM engine, fresh
    # prefix cache): logprob_mismatch is a diagnostic and only has to stay tiny. Everything else is exact.
    volatile = lambda k: k.startswith(("time/", "logprob_mismatch")) or k.endswith("_per_s")  # noqa: E731
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not volatile(k)} == {k: v for k, v in y.items() if not volatile(k)}
        assert abs(x["logprob_mismatch_max"] - y["logprob_mismatch_max"]) < 1e-5
    wa, wb = weights(final_checkpoint(full)), weights(final_checkpoint(cut))
    w0 = weights(os.path.join(full, "models", "tiny"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert max((wa[k] - w0[k]).abs().max().item() for k in w0) > 1e-3  # the KD term moved the weights
    assert sorted(os.listdir(os.path.join(full, "checkpoints"))) == ["step_000002", "step_000004"]


def test_checkpoint_loads_in_transformers_and_vllm(kk):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    ckpt = final_checkpoint(kk[0])
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    saved = weights(ckpt)
    assert all(torch.equal(p.detach(), saved[n]) for n, p in model.named_parameters())
    prompt = tok("Alice is a knight.", add_special_tokens=False)["input_ids"]
    llm = LLM(model=ckpt, dtype="float32", max_model_len=256, enforce_eager=True, seed=0, max_num_seqs=4,
              kv_cache_memory_bytes=64 * 2**20)
    try:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=1.0, logprobs=0,
                                                                          seed=0, ignore_eos=True))[0].outputs[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    ids = torch.tensor([prompt + list(out.token_ids)])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)  # [8, V]
    ref = ref.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    got = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
    assert (ref - got).abs().max() < 1e-4


# ---------------------------------------------------------------------------- errors before any model is loaded
def test_config_parsing_and_errors(tmp_path):
    import preflight
    import train
    cfg = train.parse_config(["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--lr", "3e-4",
                              "--filter_groups", "true", "--group_size", "16"])
    assert cfg.lr == 3e-4 and cfg.filter_groups is True and cfg.group_size == 16 and cfg.model == "tiny"
    assert train.Config().method == "rlad" and train.Config().teacher == "Qwen/Qwen3-8B"
    with pytest.raises(SystemExit, match="unknown config key 'lrr'"):
        train.parse_config(["--lrr", "1"])
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "x"\n')
    with pytest.raises(SystemExit, match="unknown config key 'modle'"):
        train.parse_config(["--config", str(bad)])
    with pytest.raises(SystemExit, match="takes true or false"):
        train.parse_config(["--resume", "yes"])
    for flags, msg in [(["--group_size", "1"], "at least 2"), (["--prompts_per_step", "3"], "not divisible"),
                       (["--teacher", ""], "needs a teacher"), (["--model", "/nonexistent/model"], "no such directory"),
                       (["--method", "ppo"], "use one of grpo")]:
        with pytest.raises(SystemExit, match=msg):
            preflight.check_config(train.parse_config(flags), 2)

@pytest.mark.parametrize("flags, message", [
    (["--lr", "abc"], "--lr 'abc': expected float"),
    (["--max_steps", "-1"], "--max_steps -1: must be >= 1"),  # used to exit 0 having done nothing
    (["--prompts_per_step", "0"], "--prompts_per_step 0: must be >= 1"),
    (["--max_tokens", "0"], "--max_tokens 0: must be >= 1"),  # used to fail at the first generate
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--alpha", "2"], "--alpha 2.0: must be in [0, 1]"),
    (["--gpu_memory_utilization", "1.5"], "must be in (0, 1]"),
    (["--train_levels", "3,x"], "comma-separated integers"),
    (["--eval_levels", "1,2"], "--eval_levels '1,2': expected comma-separated integers >= 2"),
    (["--loss_agg", "mean"], "use one of token-mean"),
    (["--plan_gpus", "eight"], "--plan_gpus 'eight': expected GPUSxGIB"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),  # used to train with a NaN loss
    (["--shard_group", "3"], "--shard_group 3 does not divide the world size 1"),  # used to be a traceback
    (["--log_samples_every", "-1"], "--log_samples_every -1: must be >= 0"),  # used to log every step
])
def test_bad_settings_are_one_line_errors(flags, message):
    import train
    with pytest.raises(SystemExit) as e:
        cfg = train.parse_config(["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--plan", "true"] + flags)
        train.main(cfg)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_data_and_preset_types_are_one_line_errors(tmp_path):
    import train
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"question": "1 + 1?", "answer": "2"}\n{"question": oops}\n')
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "1 + 1?"}\n')
    preset = tmp_path / "typed.toml"
    preset.write_text('lr = "abc"\n')
    not_toml = tmp_path / "twice.toml"
    not_toml.write_text('lr = 1.0\nlr = 2.0\n')
    sft_not_json = tmp_path / "sft_not_json.jsonl"
    sft_not_json.write_text('{"question": "q", "target": "t"\n')
    sft_no_target = tmp_path / "sft_no_target.jsonl"
    sft_no_target.write_text('{"question": "q", "target": "t"}\n{"question": "q"}\n')
    sft_no_question = tmp_path / "sft_no_question.jsonl"
    sft_no_question.write_text('{"target": "t"}\n')
    sft = ["--method", "sft", "--sft_data"]
    cases = [(["--task", "math", "--train_data", str(bad_line)], f"{bad_line}, line 2: not a JSON object"),
             (["--task", "math", "--train_data", str(no_answer)], f"{no_answer}, line 1: missing answer field"),
             (["--task", "math", "--train_data", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
             (["--config", str(preset)], "--lr 'abc': expected float"),
             (["--config", str(not_toml)], f"--config {not_toml}: not valid TOML (Cannot overwrite a value"),
             (sft + [str(sft_not_json)], f"{sft_not_json}, line 1: not a JSON object"),
             (sft + [str(sft_no_target)], f"--sft_data {sft_no_target}, line 2: no \"target\" (or \"answer\") text"),
             (sft + [str(sft_no_question)], "example 0 has no field 'question', which the prompt of task 'kk' reads"),
             # Read from the student's config.json, before any weights load (both used to fail after them).
             (["--max_tokens", "100000"], "--max_prompt_tokens 1024 + --max_tokens 100000 exceeds tiny's context of "
                                          "2048 positions"),
             (["--method", "topk_kd", "--kd_topk", "100000"], "--kd_topk 100000 exceeds the student's vocabulary")]
    for flags, message in cases:
        base = [] if "--config" in flags else ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml")]
        with pytest.raises(SystemExit) as e:
            train.main(train.parse_config(base + flags + ["--run_dir", str(tmp_path / "run"), "--eval_every", "0"]))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_main_rejects_empty_data_and_foreign_teacher(tmp_path, tiny_model_dir):
    import tiny
    import train
    from train_helper import ToyTask
    # max_tokens: the default 1024 + 2048 positions would not fit the tiny model's 2048
    cfg = train.Config(model=tiny_model_dir, teacher=tiny_model_dir, run_dir=str(tmp_path / "a"), eval_every=0,
                       max_tokens=512)
    with pytest.raises(SystemExit, match="empty training set"):
        train.main(cfg, task=type("Empty", (ToyTask,), {"examples": staticmethod(lambda split, source: [])}))
    other = tiny.make_tokenizer(corpus="completely different words for another vocabulary " * 20, vocab_size=300)
    foreign = tiny.save_tiny(str(tmp_path / "foreign"), other)
    cfg = train.Config(model=tiny_model_dir, teacher=foreign, run_dir=str(tmp_path / "b"), eval_every=0,
                       max_tokens=512)
    with pytest.raises(SystemExit, match="tokenizer mismatch"):  # one line, before any model loads
        train.main(cfg, task=ToyTask)


def test_non_finite_gradient_skips_the_step(tiny_model_dir):
    import policy
    import train
    _, _, device = train.setup_distributed()
    cfg = train.Config(method="grpo", mini_batches=1, micro_batch_tokens=64, lr=1e-2, warmup_steps=0)
    student = policy.load(tiny_model_dir, device, 1)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    before = {n: t.clone() for n, t in policy.full_params(student)}
    rows = [policy.Row(prompt=[5, 6, 7], response=[8, 9], uid=i, adv=adv) for i, adv in enumerate([1.0, float("nan")])]
    run = train.Run(cfg=cfg, device=device, student=student, opt=opt)
    train.update(run, rows, 0, policy.Metrics())
    assert run.skipped == 1
    assert all(torch.equal(t, before[n]) for n, t in policy.full_params(student))  # no optimizer step taken
    rows[1].adv = -1.0
    train.update(run, rows, 1, policy.Metrics())
    assert run.skipped == 1
    assert any(not torch.equal(t, before[n]) for n, t in policy.full_params(student))


def test_evaluation_does_not_change_the_training_trajectory(tmp_path):
    """The same SFT run (arith, ground-truth targets) with an evaluation every 3 steps (engine built, weights synced
    into it, sampled, put to sleep) and with none: byte-identical final weights. Evaluation reads the weights only."""
    flags = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--task", "arith", "--train_levels", "2,3",
             "--method", "sft", "--max_steps", "9", "--save_every", "0",
             "--eval_per_level", "2", "--log_samples_every", "0"]
    for every in ("0", "3"):
        run([PY, os.path.join(ROOT, "train.py")] + flags + ["--eval_every", every], str(tmp_path / every))
    assert "eval_accuracy" in read_metrics(str(tmp_path / "3"))[2]
    a, b = (open(os.path.join(final_checkpoint(str(tmp_path / e)), "model.safetensors"), "rb").read() for e in "03")
    assert a == b


def test_a_step_with_every_group_filtered_keeps_the_entropy_coefficient(tmp_path):
    """With filter_groups, a random tiny model's K&K groups (reward -3 on every sample) are all dropped: no token is
    trained, so no entropy is measured, and the adaptive entropy control leaves its coefficient as it was (such a
    step used to stop the run with KeyError 'entropy')."""
    metrics = run([PY, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"),
                   "--method", "grpo", "--max_steps", "2", "--filter_groups", "true", "--ent_target", "9",
                   "--ent_coef", "0.001", "--eval_every", "0", "--save_every", "0"], str(tmp_path / "run"))
    assert [m["tokens_trained"] for m in metrics] == [0, 0] and [m["groups_kept"] for m in metrics] == [0, 0]
    assert [m["ent_coef"] for m in metrics] == [0.001, 0.001] and metrics[-1]["entropy"] == 0.0
