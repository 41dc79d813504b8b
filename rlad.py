"""RLAD: the algorithm. Group advantages, the GRPO / KDRL / TRRD / distill / SFT objectives, aggregation.

Pure torch: no I/O, no distributed code. Read it next to docs/algorithm.md; equation numbers are the paper's.

    advantages  A_i = (r_i - mean r) / (std r + 1e-6)                     per group of G responses
    GRPO   (1)  loss = -agg( min(r A, clip(r, 1-eps_low, 1+eps_high) A) ),   log r = logp_S - logp_old
    KDRL   (2)  loss = GRPO + kd_coef * agg( k2(logp_S - logp_T) )
    TRRD (3)(4) log r = alpha (logp_S - logp_old) + (1 - alpha) clamp(logp_S - logp_T, -1, 1)   (App. B clamp)
    (5)         r = pi_S / (pi_old^alpha pi_T^(1-alpha)): PPO with its trust region centred on a mixture anchor

What TRRD does ("selective imitation"), with alpha = 0.5, teacher clamp 1, first PPO epoch (pi_S = pi_old):
once |logp_S - logp_T| >= 1 the teacher term alone puts log r at -+0.5, outside the clip range
[log 0.8, log 1.28] = [-0.22, +0.25], so the teacher decides which tokens keep their gradient:

    | token                    | log r | A > 0 (rewarded)              | A < 0 (penalised)                      |
    |--------------------------|-------|-------------------------------|----------------------------------------|
    | teacher prefers it       | -0.5  | unclipped: pushed up          | clipped: NOT pushed down               |
    | teacher rejects it       | +0.5  | clipped: no credit            | unclipped: pushed down, ratio 1.65     |
    | teacher agrees (gap < 1) | ~0    | ordinary PPO step             | ordinary PPO step                      |
    | any, A = 0               |       | no gradient: the teacher acts only through the advantage       |

alpha = 1 is GRPO exactly; alpha -> 0 anchors the trust region on the teacher. "distill" is on-policy distillation
(the KD term alone on the student's own samples); "sft" is the SFT baseline's cross-entropy. Your own objective: a
function below, a row in METHODS, a default in DEFAULTS and a train.py Config field per new knob (read as
knobs.<name>; docs/algorithm.md has an example). The chunked log-prob / entropy kernels are kernels.py's
(rlad.token_logprobs).
"""
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
    r = _groups(rewards, group_size)  # [P, G]
    return r.amax(-1) > r.amin(-1)  # [P]

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean r) / (std r + 1e-6), population std; scale=False is Dr. GRPO (no std). [N] -> [N]."""
    r = _groups(rewards, group_size)  # [P, G]
    adv = r - r.mean(-1, keepdim=True)  # [P, G]
    if scale:
        adv = adv / (r.std(-1, unbiased=False, keepdim=True) + 1e-6)  # [P, G]
    adv = torch.where((r.amax(-1) > r.amin(-1))[:, None], adv, 0.0)  # [P, G] equal rewards: exactly 0, never NaN
    return adv.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)  # [N]

# ----------------------------------------------------------------------------- the objectives, eqs (1)-(5)
# Each takes `batch` (per-token [B, T], masked positions zeroed: logp, old_logp, adv, teacher_log_ratio =
# logp - logp_T, mask, kd_mask), the hyperparameters `knobs` (DEFAULTS < Config < keywords) and a metrics dict to
# fill, and returns its loss terms as (name, coefficient, per-token loss [B, T]); policy_loss minimises the sum of
# coefficient x aggregate (logged as "loss/<name>").
def clipped_surrogate(log_ratio, batch, knobs, metrics):
    """min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, eqs (1) / (4), and what the clip removed."""
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
    clipped_ratio = ratio.clamp(1 - knobs.eps_low, 1 + knobs.eps_high)  # [B, T]
    surrogate = torch.minimum(ratio * batch.adv, clipped_ratio * batch.adv)  # [B, T]
    r = ratio.detach()  # [B, T]
    # Where the min picks the clipped branch its gradient is 0: A < 0 below the range, A > 0 above it.
    clipped_low = (batch.adv < 0) & (r < 1 - knobs.eps_low)  # [B, T]
    clipped_high = (batch.adv > 0) & (r > 1 + knobs.eps_high)  # [B, T]
    metrics["ratio_mean"] = masked_mean(r, batch.mask)
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

# One table of methods; train.py reads what each needs: the teacher's log-probs of every sampled token, pi_old's
# log-probs (recomputed when the policy moved since sampling), group advantages, and whose samples are trained on
# ("student": the engine's rollouts; "data": each example's target text, e.g. the teacher's correct samples that
# `eval.py --sft_out` wrote: the SFT baseline).
METHODS = {
    "grpo": dict(objective=grpo, teacher_logp=False, old_logp=True, advantages=True, samples="student"),
    "kdrl": dict(objective=kdrl, teacher_logp=True, old_logp=True, advantages=True, samples="student"),
    "rlad": dict(objective=rlad, teacher_logp=True, old_logp=True, advantages=True, samples="student"),
    "distill": dict(objective=distill, teacher_logp=True, old_logp=False, advantages=False, samples="student"),
    "sft": dict(objective=sft, teacher_logp=False, old_logp=False, advantages=False, samples="data"),
}

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
    loss_agg="token-mean",  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm, see aggregate()
    max_len=None,           # Dr. GRPO's normaliser (the generation budget; default: the mask's width)
)

def policy_loss(method, logp, old_logp, advantages, mask, *, teacher_logp=None, ref_logp=None, num_tokens=None,
                kd_mask=None, token_info=None, config=None, **options):
    """The loss to minimise (-J) and detached scalar metrics, for one (micro-)batch of responses.

    logp (with grad), old_logp, teacher_logp, ref_logp, mask: [B, T]; advantages [B] or [B, T] (None where the
    method's row does not need them). Hyperparameters: DEFAULTS < the attributes of `config` (train.Config) <
    keywords (alpha=0.3, ...). kd_mask: [B] / [B, T] bool restricting the KD term. num_tokens: see aggregate().
    Metrics (detached): loss and its terms (loss/pg, loss/kd, loss/nll, loss/kl_ref); token means ratio_mean,
    clip_frac_low / clip_frac_high (gradient removed by the clip, A < 0 / A > 0), teacher_log_ratio (+ _abs),
    teacher_clamp_frac. token_info, a dict, receives "clipped" [B, T] bool (methods with a clipped ratio).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {tuple(METHODS)}")
    knobs = SimpleNamespace(**{**DEFAULTS, **(vars(config) if config is not None else {}), **options},
                            token_info=token_info)
    needs = METHODS[method]
    mask = mask.bool()  # [B, T]
    _check_inputs(method, logp, old_logp, advantages, mask, teacher_logp=teacher_logp, ref_logp=ref_logp,
                  kl_coef=knobs.kl_coef)

    # Masked positions may hold anything (padding, -inf, NaN): replace them before any arithmetic.
    zero = lambda x: None if x is None else torch.where(mask, x, 0.0)  # noqa: E731  [B, T]
    logp = zero(logp)  # [B, T]
    metrics = {}
    batch = SimpleNamespace(logp=logp, old_logp=zero(old_logp), mask=mask, adv=None, teacher_log_ratio=None,
                            kd_mask=None)
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

def _check_inputs(method, logp, old_logp, advantages, mask, *, teacher_logp, ref_logp, kl_coef):
    """ValueError naming the input when the method's row needs it and it is missing, or a shape is wrong."""
    needs = METHODS[method]
    for name, given in (("teacher_logp", teacher_logp), ("old_logp", old_logp), ("advantages", advantages)):
        if needs[name] and given is None:
            raise ValueError(f"method {method!r} needs {name} (see rlad.METHODS)")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp [B, T] (log-probs of the frozen initial student)")
    shapes = {"mask": mask, "old_logp": old_logp, "teacher_logp": teacher_logp, "ref_logp": ref_logp}
    bad = [name for name, t in shapes.items() if t is not None and t.shape != logp.shape]
    if needs["advantages"] and advantages.shape not in (logp.shape, logp.shape[:1]):
        bad.append("advantages")
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
