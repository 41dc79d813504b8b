"""RLAD: the algorithm. Group advantages, the GRPO / KDRL / TRRD / TOP-D / top-k KD / distill / SFT objectives,
aggregation.

Pure torch: no I/O, no distributed code. Read it next to docs/algorithm.md; equation numbers are the paper's.

    advantages  A_i = (r_i - mean r) / (std r + 1e-6)                     per group of G responses
    GRPO   (1)  loss = -agg( min(r A, clip(r, 1-eps_low, 1+eps_high) A) ),   log r = logp_S - logp_old
    KDRL   (2)  loss = GRPO + kd_coef * agg( k2(logp_S - logp_T) )
    TRRD (3)(4) log r = alpha (logp_S - logp_old) + (1 - alpha) clamp(logp_S - logp_T, -1, 1)   (App. B clamp)
    (5)         r = pi_S / (pi_old^alpha pi_T^(1-alpha)): PPO with its trust region centred on a mixture anchor
    TOP-D       GRPO's loss with per-token advantages: the z-scored returns of log(a rho + 1 - a),
                a = topd_alpha (the teacher's weight), rho = pi_T / pi_old
    top-k KD    loss = GRPO + kd_coef * agg( KL(teacher top-k || student) per position, with a tail bucket )

What TRRD does ("selective imitation"), with alpha = 0.5, teacher clamp 1, first PPO epoch (pi_S = pi_old):
once |logp_S - logp_T| >= 1 the teacher term alone puts log r at +0.5 (the student above the teacher) or -0.5
(below it), outside the clip range [log 0.8, log 1.28] = [-0.22, +0.25], so the teacher decides which tokens keep
their gradient:

    | token                    | log r | A > 0 (rewarded)              | A < 0 (penalised)                      |
    |--------------------------|-------|-------------------------------|----------------------------------------|
    | teacher prefers it       | -0.5  | unclipped: pushed up          | clipped: NOT pushed down               |
    | teacher rejects it       | +0.5  | clipped: no credit            | unclipped: pushed down, ratio 1.65     |
    | teacher agrees (gap < 1) | ~0    | ordinary PPO step             | ordinary PPO step                      |
    | any, A = 0               |       | no gradient: the teacher acts only through the advantage       |

alpha = 1 is GRPO exactly; alpha -> 0 anchors the trust region on the teacher. "distill" is on-policy distillation
(the KD term alone on the student's own samples); "sft" is the SFT baseline's cross-entropy. "topd" and "topk_kd"
are the objectives RLAD is compared with (docs/algorithm.md has their equations and a comparison table). Your own
objective: a function below, a row in METHODS, a default in DEFAULTS and a train.py Config field per new knob (read
as knobs.<name>; docs/algorithm.md has an example). The chunked log-prob / entropy kernels are kernels.py's
(rlad.token_logprobs).
"""
import math
from types import SimpleNamespace

import torch

from kernels import entropy, token_logprobs  # noqa: F401  (part of this module's API)

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
MAX_LOG_RATIO = 20.0  # log-ratios are clamped to +-20 before exp(): float32 never overflows (e^20 ~ 5e8)
TEACHER_LOGP_FLOOR = -100.0  # a teacher log-prob of -inf (token impossible for it) counts as e^-100: finite KD

# ----------------------------------------------------------------------------- advantages (docs/algorithm.md)
def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, laid out group by "
                         f"group (N = prompts x G); got shape {tuple(rewards.shape)}")
    return rewards.double().view(-1, group_size)  # [P, G] float64: exact zero spread for equal rewards

def group_is_informative(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [P]: groups whose rewards are not all equal (DAPO dynamic sampling keeps only these)."""
    by_group = _groups(rewards, group_size)  # [P, G]
    return by_group.amax(-1) > by_group.amin(-1)  # [P]

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean r) / (std r + 1e-6), population std; scale=False is Dr. GRPO (no std). [N] -> [N]."""
    by_group = _groups(rewards, group_size)  # [P, G]
    adv = by_group - by_group.mean(-1, keepdim=True)  # [P, G]
    if scale:
        adv = adv / (by_group.std(-1, unbiased=False, keepdim=True) + 1e-6)  # [P, G]
    informative = by_group.amax(-1) > by_group.amin(-1)  # [P]
    adv = torch.where(informative[:, None], adv, 0.0)  # [P, G] equal rewards: exactly 0, never NaN
    return adv.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)  # [N]

# ----------------------------------------------------------------------------- the objectives, eqs (1)-(5)
# Each takes `batch` (per-token [B, T] with masked positions zeroed: logp, old_logp, adv, teacher_log_ratio =
# logp - logp_T; [B, T, k], zeroed too: teacher_topk_logp, topk_logp; as given: mask, and kd_mask [B, 1] or [B, T]),
# the hyperparameters `knobs` (DEFAULTS < Config < keywords) and a metrics dict to fill, and returns its loss terms
# as (name, coefficient, per-token loss [B, T]); policy_loss minimises the sum of coefficient x aggregate (logged as
# "loss/<name>").
def clipped_surrogate(log_ratio, batch, knobs, metrics):
    """min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, eqs (1) / (4), and what the clip removed."""
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
    clipped_ratio = ratio.clamp(1 - knobs.eps_low, 1 + knobs.eps_high)  # [B, T]
    surrogate = torch.minimum(ratio * batch.adv, clipped_ratio * batch.adv)  # [B, T]
    ratio_value = ratio.detach()  # [B, T]
    # Where the min picks the clipped branch its gradient is 0: A < 0 below the range, A > 0 above it.
    clipped_low = (batch.adv < 0) & (ratio_value < 1 - knobs.eps_low)  # [B, T]
    clipped_high = (batch.adv > 0) & (ratio_value > 1 + knobs.eps_high)  # [B, T]
    metrics["ratio_mean"] = masked_mean(ratio_value, batch.mask)
    metrics["clip_frac_low"] = masked_mean(clipped_low.float(), batch.mask)
    metrics["clip_frac_high"] = masked_mean(clipped_high.float(), batch.mask)
    if knobs.token_info is not None:  # the caller asked for the per-token view (train.py's sample logs)
        knobs.token_info["clipped"] = (clipped_low | clipped_high) & batch.mask  # [B, T]
    return surrogate

def kd_term(batch, knobs):
    """eq (2)'s per-token reverse KL to the teacher on the student's own samples (k2 by default), clamp, mask."""
    kd_per_token = kl(_clamp(batch.teacher_log_ratio, knobs.kd_clamp), 0.0, knobs.kd_kl)  # [B, T]
    if batch.kd_mask is not None:  # tokens outside kd_mask count 0 but still count in the normaliser, like the PG term
        kd_per_token = torch.where(batch.kd_mask.bool(), kd_per_token, 0.0)  # [B, T]
    return kd_per_token

def grpo(batch, knobs, metrics):
    """eq (1): the PPO-clipped ratio against the policy that sampled."""
    return [("pg", 1.0, -clipped_surrogate(batch.logp - batch.old_logp, batch, knobs, metrics))]

def kdrl(batch, knobs, metrics):
    """eq (2): GRPO plus kd_coef x the reverse KL to the teacher."""
    return grpo(batch, knobs, metrics) + [("kd", knobs.kd_coef, kd_term(batch, knobs))]

def rlad(batch, knobs, metrics):
    """eqs (3)-(4): TRRD, the ratio against the mixture anchor pi_old^alpha pi_T^(1 - alpha)."""
    teacher_term = _clamp(batch.teacher_log_ratio, knobs.teacher_clamp)  # [B, T] Appendix B
    # eq (3); alpha = 1 multiplies the teacher term by exactly 0: GRPO bit for bit
    log_ratio = knobs.alpha * (batch.logp - batch.old_logp) + (1 - knobs.alpha) * teacher_term  # [B, T]
    if knobs.teacher_clamp:
        outside = teacher_term != batch.teacher_log_ratio  # [B, T] moved by the clamp
        metrics["teacher_clamp_frac"] = masked_mean(outside.float(), batch.mask)
    return [("pg", 1.0, -clipped_surrogate(log_ratio, batch, knobs, metrics))]

def distill(batch, knobs, metrics):
    """On-policy distillation: the KD term alone on the student's own samples, no reward."""
    return [("kd", 1.0, kd_term(batch, knobs))]

def sft(batch, knobs, metrics):
    """The SFT baseline: negative log-likelihood of the (teacher's or the data's) response tokens."""
    return [("nll", 1.0, -batch.logp)]

def topk_kd(batch, knobs, metrics):
    """GRPO plus kd_coef x the forward KL from the teacher's top-k distribution to the student's, at every position
    of the student's own samples (verl's and NeMo-RL's on-policy distillation loss, with a tail bucket)."""
    kl_per_token = topk_forward_kl(batch.teacher_topk_logp, batch.topk_logp, tail=knobs.kd_topk_tail)  # [B, T]
    metrics["topk_kl"] = masked_mean(kl_per_token.detach(), batch.mask)
    if knobs.token_info is not None:
        knobs.token_info["topk_kl"] = kl_per_token.detach()  # [B, T] (tools/show.py)
    return grpo(batch, knobs, metrics) + [("kd", knobs.kd_coef, kl_per_token)]

def topk_forward_kl(teacher_topk_logp, student_topk_logp, tail: bool = True):
    """KL(p_T || p_S) over the teacher's k most likely tokens, per position: [B, T, k] log-probs (full-vocabulary,
    not renormalised) of the same ids under each model -> [B, T].

    tail: a (k+1)-th bucket holds each side's remaining mass, 1 - sum of its k probabilities, so the sum is a true KL
    between two (k+1)-category distributions: >= 0, and 0 only when they agree on every top-k token and on the rest.
    A student that piles mass onto the k tokens beyond the teacher's is then pulled back by the tail term. Without
    it, both sides are renormalised over the k tokens (the KL of the two conditionals on the top-k set)."""
    if tail:
        # log(1 - sum_k p) from log sum_k p; a sum at 1 (or a zeroed, masked position) is held just below it
        teacher_tail = _log1mexp(teacher_topk_logp.logsumexp(-1).clamp(max=-1e-6))  # [B, T]
        student_tail = _log1mexp(student_topk_logp.logsumexp(-1).clamp(max=-1e-6))  # [B, T]
        teacher = torch.cat([teacher_topk_logp, teacher_tail[..., None]], -1)  # [B, T, k + 1]
        student = torch.cat([student_topk_logp, student_tail[..., None]], -1)  # [B, T, k + 1]
    else:
        teacher = teacher_topk_logp.log_softmax(-1)  # [B, T, k] renormalised over the top-k
        student = student_topk_logp.log_softmax(-1)  # [B, T, k]
    return (teacher.exp() * (teacher - student)).sum(-1)  # [B, T]

def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler's switch at -log 2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

# ----------------------------------------------------------------------------- TOP-D: per-token advantages
# TOP-D (Trust Region Policy Distillation) distils toward the *arithmetic* mixture
# topd_alpha pi_T + (1 - topd_alpha) pi_old (topd_alpha is the TEACHER's weight; TRRD's alpha weighs pi_old),
# where TRRD anchors at the geometric one. Its reward needs only the two log-probs of each sampled token; its
# advantages need the whole group's tokens, so they are a step-level hook (METHODS' "advantages"), run once the
# teacher's log-probs are in. Its loss is GRPO's clipped ratio pi / pi_old with these per-token advantages.
def topd_rewards(teacher_logp, sampler_logp, topd_alpha: float):
    """Per sampled token, log(topd_alpha rho + 1 - topd_alpha) with rho = pi_T / pi_old: the log-ratio of the
    proximal teacher to the sampler (TOP-D, Sec. 3.1). Floored at log(1 - topd_alpha) for a token the teacher
    rejects (rho -> 0), growing like log(topd_alpha rho) for one it prefers, 0 where they agree. [n] x 2 -> [n], no
    gradient (a reward)."""
    log_rho = teacher_logp.clamp(min=TEACHER_LOGP_FLOOR) - sampler_logp  # [n]
    return torch.logaddexp(log_rho + math.log(topd_alpha), torch.full_like(log_rho, math.log1p(-topd_alpha)))  # [n]

def topd_advantages(rows: list, config=None, **options) -> None:
    """Sets each row's token_adv [n]: TOP-D's per-token advantages for a step's rows (policy.Row: teacher_logp and
    the sampler's engine_logp of each response token), computed group by group (rows of one prompt).

    return    R_t = r_t + mean(r_{t+1}, ..., r_n)       (TOP-D eq (8): no discount; the last token's R is its r)
    advantage A_t = (R_t - mean R) / std R              over every token of the group's G responses
    The std is the sample std, floored at 1e-6 (a group whose returns are all equal gets advantages 0)."""
    knobs = _knobs(config, options)
    groups = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    for group in groups.values():
        returns = []
        for r in group:
            reward = topd_rewards(r.teacher_logp.double(), r.engine_logp.double(), knobs.topd_alpha)  # [n]
            later = reward.flip(0).cumsum(0).flip(0) - reward  # [n] sum of the rewards after t
            count = torch.arange(len(reward) - 1, -1, -1).clamp(min=1)  # [n] how many follow t (none: mean 0)
            returns.append(reward + later / count)  # [n]
        flat = torch.cat(returns)  # [group tokens]
        std = flat.std().clamp(min=1e-6) if flat.numel() > 1 else torch.tensor(1e-6, dtype=flat.dtype)
        for r, ret in zip(group, returns):
            r.token_adv = ((ret - flat.mean()) / std).float()  # [n]

# One table of methods; train.py reads what each needs:
#   teacher_logp  the teacher's log-prob of every sampled token
#   teacher_topk  the teacher's k most likely tokens and their log-probs at every position (kd_topk of them)
#   old_logp      pi_old's log-probs (recomputed when the policy moved since sampling)
#   advantages    "group": GRPO's group advantages of the task reward, computed as each group finishes; a function:
#                 a step-level hook setting per-token advantages once the frozen log-probs are in; None: no advantages
#   samples       whose samples are trained on: "student" (the engine's rollouts) or "data" (each example's target
#                 text, e.g. the teacher's correct samples that `eval.py --sft_out` wrote: the SFT baseline)
METHODS = {
    "grpo": dict(objective=grpo, teacher_logp=False, teacher_topk=False, old_logp=True, advantages="group",
                 samples="student"),
    "kdrl": dict(objective=kdrl, teacher_logp=True, teacher_topk=False, old_logp=True, advantages="group",
                 samples="student"),
    "rlad": dict(objective=rlad, teacher_logp=True, teacher_topk=False, old_logp=True, advantages="group",
                 samples="student"),
    "topd": dict(objective=grpo, teacher_logp=True, teacher_topk=False, old_logp=True, advantages=topd_advantages,
                 samples="student"),
    "topk_kd": dict(objective=topk_kd, teacher_logp=False, teacher_topk=True, old_logp=True, advantages="group",
                    samples="student"),
    "distill": dict(objective=distill, teacher_logp=True, teacher_topk=False, old_logp=False, advantages=None,
                    samples="student"),
    "sft": dict(objective=sft, teacher_logp=False, teacher_topk=False, old_logp=False, advantages=None,
                samples="data"),
}

def uses_teacher(method: str) -> bool:
    """The method's loss reads the teacher: its log-probs of the sampled tokens, or its top-k."""
    return bool(METHODS[method]["teacher_logp"] or METHODS[method].get("teacher_topk"))

# The hyperparameters the objectives read (as knobs.<name>), and their one default: train.py's Config fields of the
# same names take these defaults (and override them when set).
DEFAULTS = dict(
    alpha=0.5,              # TRRD: weight of the old policy in the mixture anchor, eq (3); 1 = GRPO exactly
    eps_low=0.2,            # lower clip: ratios may fall to 1 - eps_low, eqs (1) / (4)
    eps_high=0.28,          # upper clip (DAPO's clip-higher): rewarded tokens' ratios may rise to 1 + eps_high
    teacher_clamp=1.0,      # Appendix B: clamp logp_S - logp_T to [-c, c] in TRRD (0 / None: no clamp; or (lo, hi))
    kd_coef=5e-3,           # KDRL beta, eq (2) (train.py anneals it from here per step)
    kd_kl="k2",             # KD estimator k1 | k2 | k3 (KDRL found k2 best)
    kd_clamp=0.0,           # optional clamp of KDRL's log-ratio to [-c, c] (0 / None: none, KDRL's own formulation)
    kl_coef=0.0,            # > 0 adds kl_coef * agg(ref_kl(logp - ref_logp)), the KL to the frozen reference
    ref_kl="k3",            # its estimator (DeepSeekMath's low-variance k3)
    topd_alpha=0.2,         # TOP-D: the teacher's weight in the proximal teacher alpha pi_T + (1 - alpha) pi_old
    kd_topk=32,             # topk_kd: the teacher's k most likely tokens per position (verl's default)
    kd_topk_tail=True,      # topk_kd: a tail bucket for the mass outside the top-k (a true KL; see topk_forward_kl)
    loss_agg="token-mean",  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm, see aggregate()
    max_len=None,           # Dr. GRPO's normaliser (the generation budget; default: the mask's width)
)

def policy_loss(method, logp, old_logp, advantages, mask, *, teacher_logp=None, ref_logp=None, teacher_topk_logp=None,
                topk_logp=None, num_tokens=None, kd_mask=None, token_info=None, config=None, **options):
    """The loss to minimise (-J) and detached scalar metrics, for one (micro-)batch of responses.

    logp (with grad), old_logp, teacher_logp, ref_logp, mask: [B, T]; advantages [B] or [B, T] (None where the
    method's row does not need them); teacher_topk_logp, topk_logp (with grad): [B, T, k], the teacher's and the
    student's log-probs of the teacher's k most likely tokens (topk_kd). Hyperparameters: DEFAULTS < the attributes of
    `config` (train.Config) < keywords (alpha=0.3, ...). kd_mask: [B] / [B, T] bool restricting the KD term.
    num_tokens: see aggregate(). Metrics (detached): loss and its terms (loss/pg, loss/kd, loss/nll, loss/kl_ref);
    token means ratio_mean, clip_frac_low / clip_frac_high (gradient removed by the clip, A < 0 / A > 0),
    teacher_log_ratio (+ _abs), teacher_clamp_frac, topk_kl. token_info, a dict, receives "clipped" [B, T] bool
    (methods with a clipped ratio) and "topk_kl" [B, T] (topk_kd).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {tuple(METHODS)}")
    knobs = _knobs(config, options, token_info=token_info)
    needs = METHODS[method]
    mask = mask.bool()  # [B, T]
    _check_inputs(method, logp, old_logp, advantages, mask, teacher_logp=teacher_logp, ref_logp=ref_logp,
                  kl_coef=knobs.kl_coef, topk=(teacher_topk_logp, topk_logp))

    # Masked positions may hold anything (padding, -inf, NaN): replace them before any arithmetic.
    def zero(x):  # [B, T] (or [B, T, k]: every id of a masked position) -> the same, masked positions 0
        return None if x is None else torch.where(mask.view(*mask.shape, *[1] * (x.ndim - 2)), x, 0.0)

    logp = zero(logp)  # [B, T]
    metrics = {}
    batch = SimpleNamespace(logp=logp, old_logp=zero(old_logp), mask=mask, adv=None, teacher_log_ratio=None,
                            kd_mask=None, teacher_topk_logp=zero(teacher_topk_logp), topk_logp=zero(topk_logp))
    if needs["advantages"]:
        batch.adv = zero(advantages[:, None] if advantages.ndim == 1 else advantages)  # [B, 1] -> [B, T]
    if teacher_logp is not None:
        batch.teacher_log_ratio = logp - zero(teacher_logp).clamp(min=TEACHER_LOGP_FLOOR)  # [B, T] log pi_S / pi_T
        metrics["teacher_log_ratio"] = masked_mean(batch.teacher_log_ratio.detach(), mask)
        metrics["teacher_log_ratio_abs"] = masked_mean(batch.teacher_log_ratio.detach().abs(), mask)
    if kd_mask is not None:
        batch.kd_mask = kd_mask[:, None] if kd_mask.ndim == 1 else kd_mask  # [B, 1] or [B, T]
    terms = needs["objective"](batch, knobs, metrics)  # [(name, coefficient, per-token loss [B, T])]
    if knobs.kl_coef:
        terms.append(("kl_ref", knobs.kl_coef, kl(logp, zero(ref_logp), knobs.ref_kl)))
    loss = 0.0
    for name, coef, per_token in terms:
        value = aggregate(per_token, mask, knobs.loss_agg, num_tokens, knobs.max_len)
        loss = loss + (value if coef == 1.0 else coef * value)
        metrics[f"loss/{name}"] = value.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics

def _knobs(config, options: dict, token_info=None) -> SimpleNamespace:
    """The objectives' hyperparameters: DEFAULTS < the attributes of `config` (train.Config) < keywords."""
    return SimpleNamespace(**{**DEFAULTS, **(vars(config) if config is not None else {}), **options},
                           token_info=token_info)

def _check_inputs(method, logp, old_logp, advantages, mask, *, teacher_logp, ref_logp, kl_coef, topk):
    """ValueError naming the input when the method's row needs it and it is missing, or a shape is wrong."""
    needs = METHODS[method]
    for name, given in (("teacher_logp", teacher_logp), ("old_logp", old_logp), ("advantages", advantages)):
        if needs[name] and given is None:
            raise ValueError(f"method {method!r} needs {name} (see rlad.METHODS)")
    if needs.get("teacher_topk") and any(x is None for x in topk):
        raise ValueError(f"method {method!r} needs teacher_topk_logp and topk_logp [B, T, k] (see rlad.METHODS)")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp [B, T] (log-probs of the frozen initial student)")
    shapes = {"mask": mask, "old_logp": old_logp, "teacher_logp": teacher_logp, "ref_logp": ref_logp}
    bad = [name for name, t in shapes.items() if t is not None and t.shape != logp.shape]
    if needs["advantages"] and advantages.shape not in (logp.shape, logp.shape[:1]):
        bad.append("advantages")
    if any(x is not None and (x.ndim != 3 or x.shape[:2] != logp.shape) for x in topk):
        bad.append("teacher_topk_logp / topk_logp ([B, T, k])")
    if bad or logp.ndim != 2:
        raise ValueError(f"{', '.join(bad) or 'logp'}: logp and the other per-token inputs must be [B, T] "
                         f"(logp is {tuple(logp.shape)}), advantages [B] or [B, T]")

# ----------------------------------------------------------------------------- aggregation and KL estimators
def aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean", num_tokens=None, max_len=None):
    """Reduce per-token values x [B, T] over mask [B, T] to a scalar (docs/algorithm.md, "aggregate").

    token-mean:              sum_i sum_t x / num_tokens        (default num_tokens: unmasked tokens here)
    seq-mean-token-mean:     sum_i mean_t x / num_tokens       (default: rows with at least one token)
    seq-mean-token-sum-norm: sum_i sum_t x / (num_tokens * max_len)   Dr. GRPO; max_len default: mask width.
    With gradient accumulation / several ranks pass the *global* num_tokens (and, for Dr. GRPO, the generation
    budget as max_len): the micro-batch losses then add up to the mini-batch loss, gradients included.
    """
    mask = mask.bool()  # [B, T]
    x = torch.where(mask, x, 0)  # [B, T] where, not x * mask: masked inf/NaN must not leak (0 * inf = NaN)
    lengths = mask.sum(-1)  # [B]
    if num_tokens is None:
        num_tokens = lengths.sum() if loss_agg == "token-mean" else (lengths > 0).sum()
    denom = num_tokens.clamp(min=1) if torch.is_tensor(num_tokens) else max(num_tokens, 1)  # empty: 0, not NaN
    if loss_agg == "token-mean":
        return x.sum() / denom
    if loss_agg == "seq-mean-token-mean":
        return (x.sum(-1) / lengths.clamp(min=1)).sum() / denom
    if loss_agg == "seq-mean-token-sum-norm":
        return x.sum() / (denom * (mask.shape[-1] if max_len is None else max_len))
    raise ValueError(f"unknown loss_agg {loss_agg!r}: use one of {LOSS_AGGS}")

def kl(logp: torch.Tensor, other_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimator of KL(pi || pi_other) from samples of pi, d = logp - other_logp (docs/algorithm.md).

    k1 = d; k2 = d^2 / 2 (gradient = the unbiased reverse-KL gradient, KDRL's choice); k3 = e^-d - 1 + d
    (DeepSeekMath's low-variance one; its exponent is capped at MAX_LOG_RATIO so float32 never overflows).
    """
    d = logp - other_logp  # [B, T]
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp((-d).clamp(max=MAX_LOG_RATIO)) - 1 + d
    raise ValueError(f"unknown KL estimator {kind!r}: use one of {KL_KINDS}")

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 for an empty mask); for logging, no host sync."""
    mask = mask.bool()
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)

def _clamp(x: torch.Tensor, rng) -> torch.Tensor:
    """rng None or 0: no clamp; c: [-c, c]; (lo, hi) as is."""
    return x if not rng else x.clamp(*((-rng, rng) if isinstance(rng, (int, float)) else rng))
