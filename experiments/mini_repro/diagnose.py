"""diagnose.py: per level, why RLAD does or does not differ from GRPO for one student and one teacher.

For each arith level it samples one batch the way an RL step of the study does (`--prompts` training problems x
`--group` samples at temperature 1 from the student, transformers' generate, seeded), scores it, and reports:

    accuracy       mean reward of the samples (the student's rollout accuracy on that level)
    informative    fraction of groups whose rewards differ (only these carry an advantage, hence a gradient)
    disagree       share of sampled tokens with |logp_S - logp_T| >= 1 (where the TRRD teacher term saturates)
    masked_pos     share of tokens with A > 0 whose gradient TRRD's clip removes (the teacher rejects them)
    masked_neg     share of tokens with A < 0 whose gradient TRRD's clip removes (the teacher prefers them)
    masked_adv     share of the advantage-bearing tokens (A != 0, either sign) whose gradient TRRD's clip removes:
                   how much of the advantage's signal TRRD takes away from GRPO's
    cosine         cosine between the GRPO and the RLAD gradients of this level's batch (all parameters), on
                   the first PPO epoch (pi_S = pi_old), through rlad.policy_loss: 1 means TRRD changes nothing
    student_nll    the student's mean per-token NLL of its own samples (low: it is confident in them)
    teacher_nll    the teacher's mean per-token NLL of the same samples (high: the teacher rejects them)

The losses are the project's own (`rlad.policy_loss` with the study's alpha, clip range and teacher clamp), the
log-probs `rlad.token_logprobs` of one forward pass over prompt + response, as train.py computes them.

    python experiments/mini_repro/diagnose.py --student STUDENT_DIR --teacher TEACHER_DIR --out diag.json
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data  # noqa: E402
import tasks  # noqa: E402
import rlad  # noqa: E402
from rollout import HFEngine  # noqa: E402


def sequence_logprobs(model, prompts: list, responses: list) -> tuple:
    """(logp [B, R] of each response token under `model`, mask [B, R]); right-padded rows, one forward."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    longest = max(len(r) for r in responses)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, L]
    targets = torch.zeros(len(prompts), longest, dtype=torch.long)  # [B, R]
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)  # [B, R]
    starts = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        targets[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
        starts.append(len(p) - 1)  # the logits at position len(p) - 1 predict the first response token
    logits = model(input_ids=ids).logits  # [B, L, V] (V = 18 here)
    index = torch.tensor(starts)[:, None] + torch.arange(longest)[None]  # [B, R]
    index = index.clamp(max=width - 1)
    picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))  # [B, R, V]
    return rlad.token_logprobs(picked, targets), mask  # [B, R], [B, R]


def flat_grad(model, loss) -> torch.Tensor:
    """All parameters' gradients of `loss`, as one vector (zeros where a parameter gets none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def diagnose_level(student, teacher, engine, tokenizer, level: int, a) -> dict:
    """The quantities above for one level: a batch sampled from the student, then batch_diagnostics."""
    examples = data.arith_examples([level], per_level=a.prompts, seed=a.seed, split="train")
    prompts = [tasks.prompt_ids(tasks.load("arith"), ex, tokenizer)[0] for ex in examples]
    outputs = engine.generate(prompts, n=a.group, max_tokens=a.max_tokens, temperature=1.0, seed=a.seed * 1000 + level)
    rows = [(ex, p, o["response_ids"]) for ex, p, group in zip(examples, prompts, outputs) for o in group]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for _, _, r in rows]
    reward = torch.tensor([s["reward"] for s in tasks.load("arith").score([ex for ex, _, _ in rows], texts)])  # [N]
    return batch_diagnostics(student, teacher, [p for _, p, _ in rows], [r for _, _, r in rows], reward, a)


def batch_diagnostics(student, teacher, prompt_ids: list, response_ids: list, reward, a) -> dict:
    """The quantities above for one batch: N = prompts x a.group rows (a group's samples adjacent), reward [N]."""
    adv = rlad.group_advantages(reward, a.group)  # [N]
    logp, mask = sequence_logprobs(student, prompt_ids, response_ids)  # [N, R] with grad
    with torch.no_grad():
        teacher_logp, _ = sequence_logprobs(teacher, prompt_ids, response_ids)  # [N, R]
    options = dict(alpha=a.alpha, eps_low=a.eps_low, eps_high=a.eps_high, teacher_clamp=a.teacher_clamp)
    grpo_loss, _ = rlad.policy_loss("grpo", logp, logp.detach(), adv, mask, **options)
    rlad_loss, m = rlad.policy_loss("rlad", logp, logp.detach(), adv, mask, teacher_logp=teacher_logp, **options)
    g_grpo, g_rlad = flat_grad(student, grpo_loss), flat_grad(student, rlad_loss)
    norm = g_grpo.norm() * g_rlad.norm()
    gap = (logp.detach() - teacher_logp).abs()  # [N, R]
    adv_tok = adv[:, None].expand_as(mask)  # [N, R]
    n_tok = mask.sum().clamp(min=1).item()
    pos, neg = (mask & (adv_tok > 0)).sum().item(), (mask & (adv_tok < 0)).sum().item()
    return {
        "accuracy": reward.float().mean().item(),
        "informative": rlad.group_is_informative(reward, a.group).float().mean().item(),
        "disagree": ((gap >= 1) & mask).sum().item() / n_tok,
        # clip_frac_high / _low are shares of all tokens: renormalised to the tokens of that advantage's sign
        "masked_pos": m["clip_frac_high"].item() * n_tok / max(pos, 1),
        "masked_neg": m["clip_frac_low"].item() * n_tok / max(neg, 1),
        "masked_adv": (m["clip_frac_high"] + m["clip_frac_low"]).item() * n_tok / max(pos + neg, 1),
        "cosine": (g_grpo @ g_rlad / norm).item() if norm > 0 else float("nan"),
        # per-token NLL of the student's own samples: low for the student and high for the teacher = confidently wrong
        "student_nll": -(logp.detach() * mask).sum().item() / n_tok,
        "teacher_nll": -(teacher_logp * mask).sum().item() / n_tok,
    }


def diagnose(student_dir: str, teacher_dir: str, a) -> dict:
    """{"L2": {...}, ...} for the levels of `a.levels`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).requires_grad_(False)
    engine = HFEngine(student, batch_size=512)
    return {f"L{n}": diagnose_level(student, teacher, engine, tokenizer, n, a) for n in a.levels}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="diagnose.py", description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="student model directory (a checkpoint)")
    p.add_argument("--teacher", required=True, help="teacher model directory (same tokenizer)")
    p.add_argument("--levels", default="2,3,4,5,6,7,8", help="comma-separated arith levels (operands per problem)")
    p.add_argument("--prompts", type=int, default=64, help="training problems per level")
    p.add_argument("--group", type=int, default=8, help="samples per problem (the study's group size)")
    p.add_argument("--max_tokens", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--eps_low", type=float, default=0.2)
    p.add_argument("--eps_high", type=float, default=0.28)
    p.add_argument("--teacher_clamp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="problems and sampling (the study passes its tuning seed)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    a.levels = [int(x) for x in a.levels.split(",") if x.strip()]
    return a


def main(argv=None):
    a = parse_args(argv)
    result = diagnose(a.student, a.teacher, a)
    for level, row in result.items():
        print(level, " ".join(f"{k} {v:.3f}" for k, v in row.items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
