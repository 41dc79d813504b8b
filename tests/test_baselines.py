"""The baselines RLAD is compared against, as rows of rlad.METHODS: TOP-D (`topd`) and the teacher's top-k forward
KL (`topk_kd`). Each loss against a hand-written float64 reference, the gradient's direction in the regimes the
papers state, the chunked kernel's log-probs of K ids per position, the local teacher's top-k against a full
log-softmax, and two training steps of each method through train.py (real vLLM rollouts, the teacher pass, FSDP2).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import rlad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")


class Row:  # the fields of policy.Row that TOP-D's hook reads and writes
    def __init__(self, group, teacher_logp, engine_logp):
        self.group, self.token_adv = group, None
        self.teacher_logp = torch.tensor(teacher_logp, dtype=torch.float32)
        self.engine_logp = torch.tensor(engine_logp, dtype=torch.float32)


# ----------------------------------------------------------------------------- TOP-D
def reference_topd(groups, alpha):
    """TOP-D's advantages, written out token by token in plain Python floats."""
    out = []
    for group in groups:
        returns = []
        for teacher, sampler in group:
            rewards = [math.log(alpha * math.exp(t - s) + 1 - alpha) for t, s in zip(teacher, sampler)]
            returns.append([r + (sum(rewards[k + 1:]) / len(rewards[k + 1:]) if rewards[k + 1:] else 0.0)
                            for k, r in enumerate(rewards)])
        flat = [x for ret in returns for x in ret]
        mean = sum(flat) / len(flat)
        std = max(math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)), 1e-6)
        out.append([[(x - mean) / std for x in ret] for ret in returns])
    return out


def test_topd_advantages_equal_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(3):  # 3 prompts x 4 responses of 1..7 tokens, teacher gaps of either sign
        group = []
        for _ in range(4):
            n = int(torch.randint(1, 8, (1,), generator=g))
            sampler = (-torch.rand(n, generator=g) * 3).tolist()
            teacher = [s + float(torch.randn(1, generator=g)) * 2 for s in sampler]
            group.append((teacher, sampler))
        groups.append(group)
    for alpha in (0.1, 0.2, 0.7):
        rows = {(p, i): Row(p, t, s) for p, group in enumerate(groups) for i, (t, s) in enumerate(group)}
        rlad.topd_advantages(list(rows.values())[::-1], topd_alpha=alpha)  # grouped by `group`, in any order
        want = reference_topd(groups, alpha)
        for (p, i), r in rows.items():
            assert r.token_adv.dtype == torch.float32 and r.token_adv.shape == r.teacher_logp.shape
            assert torch.allclose(r.token_adv.double(), torch.tensor(want[p][i], dtype=torch.float64), atol=1e-5)


def test_topd_reward_is_floored_where_the_teacher_rejects_and_zero_where_it_agrees():
    alpha = 0.2
    sampler = torch.tensor([-1.0, -1.0, -1.0])
    teacher = torch.tensor([-1e4, -1.0, 3.0])  # rejects (rho -> 0), agrees, prefers (rho = e^4)
    reward = rlad.topd_rewards(teacher, sampler, alpha)
    assert torch.allclose(reward, torch.tensor([math.log(1 - alpha), 0.0, math.log(alpha * math.e ** 4 + 1 - alpha)]))
    assert reward[2] < 4.0  # grows like log(alpha rho), below OPD's log rho


def test_topd_gradient_pushes_rejected_tokens_down_and_preferred_up():
    """One group, two responses, the student sampled every token at the same log-prob: the token the teacher rejects
    gets a negative advantage (its log-prob is pushed down), the token it prefers a positive one (pushed up)."""
    sampler = [-1.0] * 4
    teacher = [[-1.0, -9.0, -1.0, -1.0], [-1.0, -1.0, 1.5, -1.0]]  # rejects token 1 of row 0, prefers 2 of row 1
    rows = [Row(0, t, sampler) for t in teacher]
    rlad.topd_advantages(rows, topd_alpha=0.2)
    adv = torch.stack([r.token_adv for r in rows]).double()  # [2, 4]
    assert adv[0, 1] < 0 < adv[1, 2]
    logp = torch.full((2, 4), -1.0, dtype=torch.float64, requires_grad=True)  # first epoch: pi_S = pi_old
    loss, _ = rlad.policy_loss("topd", logp, logp.detach(), adv, torch.ones(2, 4, dtype=torch.bool),
                               teacher_logp=torch.tensor(teacher, dtype=torch.float64))
    loss.backward()
    assert logp.grad[0, 1] > 0 > logp.grad[1, 2]  # gradient descent lowers the rejected, raises the preferred
    assert torch.allclose(logp.grad, -adv / 8)  # d/dlogp of -mean_t(r_t A_t) at r = 1: the PPO gradient, unclipped


def test_topd_loss_is_the_clipped_surrogate_with_token_advantages():
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1])[:, None]
    loss, _ = rlad.policy_loss("topd", logp, old, adv, mask, teacher_logp=logp.detach(), eps_low=0.2, eps_high=0.2)
    ratio = (logp - old).exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    assert torch.allclose(loss, -(surrogate * mask).sum() / mask.sum())


# ----------------------------------------------------------------------------- top-k forward KL
def reference_topk_kl(teacher, student, tail):
    """KL(teacher || student) over the k ids (and a tail bucket), per position, in plain Python floats."""
    out = []
    for t_row, s_row in zip(teacher, student):
        if tail:
            t_p = [math.exp(x) for x in t_row] + [1 - sum(math.exp(x) for x in t_row)]
            s_p = [math.exp(x) for x in s_row] + [1 - sum(math.exp(x) for x in s_row)]
        else:
            t_p = [math.exp(x) / sum(math.exp(y) for y in t_row) for x in t_row]
            s_p = [math.exp(x) / sum(math.exp(y) for y in s_row) for x in s_row]
        out.append(sum(p * math.log(p / q) for p, q in zip(t_p, s_p)))
    return out


def full_vocab_case(V=11, T=6, k=4, seed=0):
    """Teacher and student log-probs over a whole (small) vocabulary, and the teacher's top-k of each position."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(T, V, generator=g, dtype=torch.float64) * 2, -1)  # [T, V]
    student = torch.log_softmax(torch.randn(T, V, generator=g, dtype=torch.float64) * 2, -1)  # [T, V]
    ids = teacher.topk(k, -1).indices  # [T, k]
    return teacher, student, ids


@pytest.mark.parametrize("tail", [True, False])
def test_topk_kl_equals_a_hand_written_reference(tail):
    teacher, student, ids = full_vocab_case()
    t, s = teacher.gather(-1, ids), student.gather(-1, ids)  # [T, k]
    got = rlad.topk_forward_kl(t[None], s[None], tail=tail)[0]  # [T]
    assert torch.allclose(got, torch.tensor(reference_topk_kl(t.tolist(), s.tolist(), tail), dtype=torch.float64))
    assert (got >= -1e-12).all()  # a true KL over k (+ 1) buckets


def test_topk_kl_with_the_whole_vocabulary_is_the_full_forward_kl():
    teacher, student, _ = full_vocab_case(V=7, k=7)
    ids = teacher.argsort(-1, descending=True)  # k = V: every token, the tail is empty
    got = rlad.topk_forward_kl(teacher.gather(-1, ids)[None], student.gather(-1, ids)[None], tail=True)[0]
    full = (teacher.exp() * (teacher - student)).sum(-1)
    assert torch.allclose(got, full, atol=1e-6)


def test_topk_kd_loss_is_grpo_plus_beta_times_the_token_mean_kl():
    teacher, student, ids = full_vocab_case(T=8)
    t_topk = teacher.gather(-1, ids).view(2, 4, -1)  # [B, T, k]
    s_topk = student.gather(-1, ids).view(2, 4, -1).requires_grad_()
    logp = student.gather(-1, ids[:, :1]).view(2, 4).detach().requires_grad_()
    old = logp.detach() - 0.1
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    loss, metrics = rlad.policy_loss("topk_kd", logp, old, adv, mask, teacher_topk_logp=t_topk, topk_logp=s_topk,
                                     kd_coef=0.3)
    grpo, _ = rlad.policy_loss("grpo", logp, old, adv, mask)
    kl = torch.tensor(reference_topk_kl(t_topk.reshape(-1, 4).tolist(), s_topk.detach().reshape(-1, 4).tolist(),
                                        True), dtype=torch.float64).view(2, 4)
    want = grpo + 0.3 * (kl * mask).sum() / mask.sum()
    assert torch.allclose(loss, want) and torch.allclose(metrics["loss/kd"], (kl * mask).sum() / mask.sum())
    with pytest.raises(ValueError, match="teacher_topk_logp and topk_logp"):
        rlad.policy_loss("topk_kd", logp, old, adv, mask)


def test_topk_kl_gradient_pulls_the_student_toward_the_teacher():
    """Forward KL on the top-k: an id the teacher gives more probability than the student is pushed up, one it
    gives less is pushed down; the tail bucket pulls back a student that put too much mass on the k ids."""
    teacher = torch.log(torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64))[None]  # [1, 1, 3], tail 0.2
    student = torch.log(torch.tensor([[0.2, 0.4, 0.1]], dtype=torch.float64))[None].requires_grad_()  # tail 0.3
    rlad.topk_forward_kl(teacher, student).sum().backward()
    grad = student.grad[0, 0]
    assert grad[0] < 0 < grad[1]  # under-weighted id up, over-weighted id down
    greedy = torch.log(torch.tensor([[0.6, 0.3, 0.09]], dtype=torch.float64))[None].requires_grad_()  # tail 0.01
    rlad.topk_forward_kl(teacher, greedy).sum().backward()
    assert greedy.grad[0, 0].sum() > 0  # the tail term: less mass on the top-k as a whole


# ----------------------------------------------------------------------------- the chunked pieces
def test_kernel_logprobs_of_k_ids_per_position():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 40, (2, 5, 3), generator=g)
    got = rlad.token_logprobs(logits, ids, chunk_size=3)  # [2, 5, 3]
    want = torch.log_softmax(logits, -1).gather(-1, ids)
    assert torch.allclose(got, want)
    weights = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    grad, = torch.autograd.grad((got * weights).sum(), logits)
    want_grad, = torch.autograd.grad((want * weights).sum(), logits)
    assert torch.allclose(grad, want_grad)


def test_local_teacher_topk_is_the_full_softmax_topk(tiny_model_dir):
    import policy
    import teacher
    from transformers import AutoModelForCausalLM
    g = torch.Generator().manual_seed(0)
    rows = [policy.Row(prompt=torch.randint(3, 500, (p,), generator=g).tolist(),
                       response=torch.randint(3, 500, (r,), generator=g).tolist(), uid=i)
            for i, (p, r) in enumerate([(4, 7), (9, 3), (2, 12)])]
    t = teacher.Teacher(tiny_model_dir, device="cpu", token_budget=24, chunk_size=5, topk=6)
    t.submit(rows)
    t.finish()
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    for r in rows:
        with torch.no_grad():
            logp = torch.log_softmax(lm(torch.tensor([r.prompt + r.response[:-1]])).logits[0, len(r.prompt) - 1:], -1)
        top = logp.topk(6, -1)
        assert r.teacher_topk_ids.shape == (len(r.response), 6) and r.teacher_topk_ids.dtype == torch.long
        assert torch.equal(r.teacher_topk_ids, top.indices)
        assert torch.allclose(r.teacher_topk_logp.double(), top.values, atol=1e-5)
        assert torch.allclose(r.teacher_logp.double(), logp.gather(-1, torch.tensor(r.response)[:, None])[:, 0],
                              atol=1e-5)


def padded_teacher(model_dir, out_dir, rows=640, loud_id=600):
    """The tiny model with its embeddings padded to `rows` ids (a same-family teacher with a larger embedding, like
    DeepSeek-R1-Distill-Qwen-7B's 152064 rows against its 1.5B's 151936): the padded LM-head row loud_id scores far
    above every real token, so an unrestricted top-k would pick it at every position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lm.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        lm.get_output_embeddings().weight[loud_id] = 50 * lm.get_output_embeddings().weight[:512].std() * \
            torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    lm.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def test_local_teacher_topk_is_chosen_among_the_students_ids(tiny_model_dir, tmp_path):
    """A teacher with more embedding rows than the student: its top-k comes from the student's ids only (the
    student could not score the others), with the teacher's full-vocabulary log-probs, so the teacher's mass on its
    extra ids counts in the tail bucket."""
    import policy
    import teacher
    from transformers import AutoModelForCausalLM
    teacher_dir = padded_teacher(tiny_model_dir, str(tmp_path / "teacher"))
    rows = {}
    for topk_vocab in (None, 512):
        t = teacher.Teacher(teacher_dir, device="cpu", token_budget=64, chunk_size=5, topk=6, topk_vocab=topk_vocab)
        rows[topk_vocab] = [policy.Row(prompt=[5, 6, 7, 8], response=[9, 10, 11, 12, 13], uid=0)]
        t.submit(rows[topk_vocab])
        t.finish()
    assert (rows[None][0].teacher_topk_ids == 600).any()  # unrestricted, the padded id is in the top-k
    r = rows[512][0]
    lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logp = torch.log_softmax(lm(torch.tensor([r.prompt + r.response[:-1]])).logits[0, len(r.prompt) - 1:], -1)
    top = logp[:, :512].topk(6, -1)  # [n, 6] among the student's ids, log-probs over all 640
    assert int(r.teacher_topk_ids.max()) < 512 and torch.equal(r.teacher_topk_ids, top.indices)
    assert torch.allclose(r.teacher_topk_logp.double(), top.values, atol=1e-5)


# ----------------------------------------------------------------------------- through train.py
@pytest.mark.parametrize("method", ["topd", "topk_kd"])
def test_two_training_steps_through_train_py(method, tmp_path):
    run_dir = str(tmp_path / method)
    cmd = [sys.executable, "train.py", "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--method", method,
           "--task", "examples.lowercase:task", "--max_prompt_tokens", "256", "--max_tokens", "16", "--max_steps", "2",
           "--eval_every", "0", "--save_every", "2", "--log_samples_every", "2", "--kd_topk", "8",
           "--run_dir", run_dir]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["grad_norm"] > 0 for m in metrics)
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples", "step_000002.jsonl"))]
    s = samples[0]["samples"][0]
    if method == "topd":
        assert len(s["token_reward"]) == len(s["token_advantage"]) == len(s["tokens"])
        assert min(s["token_reward"]) >= math.log(1 - 0.2) - 1e-6  # the floor at the default topd_alpha
    else:
        assert all(m["topk_kl"] > 0 and m["loss/kd"] > 0 for m in metrics)
        assert len(s["topk_kl"]) == len(s["tokens"])


def test_topk_kd_trains_with_a_teacher_of_a_larger_vocabulary(tmp_path, tiny_model_dir):
    """train.py's topk_kd with a teacher whose embedding has more rows than the student's (the student: the tiny
    model of 512 ids; the teacher: padded to 640, a padded id scoring highest): a step trains (a top-k id past the
    student's vocabulary used to stop the run with an index error in the student's forward)."""
    run_dir = str(tmp_path / "run")
    teacher_dir = padded_teacher(tiny_model_dir, str(tmp_path / "teacher"))
    cmd = [sys.executable, "train.py", "--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--method",
           "topk_kd", "--model", tiny_model_dir, "--teacher", teacher_dir, "--task", "examples.lowercase:task",
           "--max_prompt_tokens", "256", "--max_tokens", "16", "--max_steps", "1", "--eval_every", "0",
           "--save_every", "0", "--kd_topk", "8", "--run_dir", run_dir]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert metrics[0]["grad_norm"] > 0 and metrics[0]["topk_kl"] > 0
