"""RLAD: the algorithm. Group advantages, per-token log-probs, KL estimators, and the GRPO / KDRL / TRRD losses.

Pure torch: no I/O, no distributed code. Read it next to PAPER.md; equation numbers are the paper's.

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

alpha = 1 is GRPO exactly; alpha -> 0 anchors the trust region on the teacher. method="distill" is pure on-policy
distillation (the KD term alone on the student's own samples); sft_loss is the SFT baseline's cross-entropy.

Run the tests: `.venv/bin/python -m pytest -q tests/test_rlad.py`; benchmark: `python benchmarks/bench_rlad.py`.
"""
import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
METHODS = ("grpo", "kdrl", "rlad", "distill")
KL_KINDS = ("k1", "k2", "k3")
MAX_LOG_RATIO = 20.0  # log-ratios are clamped to +-20 before exp(): float32 never overflows (e^20 ~ 5e8)
TEACHER_LOGP_FLOOR = -100.0  # a teacher log-prob of -inf (token impossible for it) counts as e^-100: finite KD


# ----------------------------------------------------------------------------- advantages (PAPER "Group-relative ...")
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
    """A_i = (r_i - mean r) / (std r + 1e-6), population std; scale=False is Dr. GRPO (no std). [N] -> [N].

    A group of equal rewards gets exactly 0 (never NaN, never a rounding residue / 1e-6).
    """
    r = _groups(rewards, group_size)  # [P, G]
    adv = r - r.mean(-1, keepdim=True)  # [P, G]
    if scale:
        adv = adv / (r.std(-1, unbiased=False, keepdim=True) + 1e-6)  # [P, G]
    adv = torch.where((r.amax(-1) > r.amin(-1))[:, None], adv, 0.0)  # [P, G]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.reshape(-1).to(out_dtype)  # [N]


# ----------------------------------------------------------------------------- per-token log-probs and entropy, chunked
# A [T, V] float32 tensor is 20 GB at T = 32768, V = 151936. Both functions below keep only the logits (in their own
# dtype) and one float per token for backward, and recompute the softmax chunk by chunk there: forward and backward
# need O(chunk x V) extra memory, plus the [.., V] gradient itself, which autograd needs in the logits' dtype anyway.
def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., T, V] -> [R, T, V], a view where the strides allow it (one long row when they do)."""
    try:
        return logits.view(1, -1, logits.shape[-1])  # [1, N, V]
    except RuntimeError:  # e.g. logits[:, :-1] of a [B, T, V] batch: keep the rows, no copy
        return logits.reshape(-1, logits.shape[-2], logits.shape[-1])  # [R, T, V]


def _chunks(x: torch.Tensor, chunk_size: int):
    for r in range(x.shape[0]):
        for s in range(0, x.shape[1], chunk_size):
            yield r, slice(s, s + chunk_size)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, targets, chunk_size):  # x [R, T, V] any float dtype, targets [R, T] int64
        dt = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 upcast per chunk; float64 stays float64
        lse = torch.empty(targets.shape, dtype=dt, device=x.device)  # [R, T]
        out = torch.empty(targets.shape, dtype=dt, device=x.device)  # [R, T]
        for r, s in _chunks(x, chunk_size):
            z = x[r, s].to(dt, copy=True)  # [c, V] private float32 copy, the one full-width temporary (in place below)
            m = z.amax(-1, keepdim=True).clamp_(min=torch.finfo(dt).min)  # [c, 1] row max, finite
            picked = z.sub_(m).gather(-1, targets[r, s, None]).squeeze(-1)  # [c] z_y - m
            log_tot = z.exp_().sum(-1).log()  # [c] log sum exp(z - m)
            lse[r, s] = m.squeeze(-1) + log_tot  # [c]
            out[r, s] = picked - log_tot  # [c] log softmax(z)_y
            del z  # before the next chunk's copy exists: one [c, V] temporary at a time, not two
        ctx.save_for_backward(x, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out [R, T]
        x, targets, lse = ctx.saved_tensors
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [R, T, V] in the logits' dtype
        for r, s in _chunks(x, ctx.chunk_size):
            g = grad_out[r, s, None]  # [c, 1]
            p = x[r, s].to(lse.dtype, copy=True).sub_(lse[r, s, None]).exp_()  # [c, V] float32 softmax, recomputed
            p.mul_(-g).scatter_add_(-1, targets[r, s, None], g)  # d logp_y / dz = onehot(y) - softmax
            grad[r, s] = p
            del p
        return grad, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chunk_size):  # x [R, T, V]
        dt = torch.promote_types(x.dtype, torch.float32)
        lse = torch.empty(x.shape[:2], dtype=dt, device=x.device)  # [R, T]
        ent = torch.empty(x.shape[:2], dtype=dt, device=x.device)  # [R, T]
        for r, s in _chunks(x, chunk_size):
            z = x[r, s].to(dt, copy=True)  # [c, V] private float32 copy
            m = z.amax(-1, keepdim=True).clamp_(min=torch.finfo(dt).min)  # [c, 1]
            z.sub_(m).clamp_(min=torch.finfo(dt).min)  # [c, V] shifted; -inf logits -> 0 * finite below, not NaN
            e = z.exp()  # [c, V] one exp pass: H = log sum e - sum(e z) / sum e
            tot = e.sum(-1)  # [c]
            lse[r, s] = m.squeeze(-1) + tot.log()  # [c]
            ent[r, s] = tot.log() - e.mul_(z).sum(-1) / tot  # [c] H = -sum p log p
            del z, e
        ctx.save_for_backward(x, lse, ent)
        ctx.chunk_size = chunk_size
        return ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out [R, T]
        x, lse, ent = ctx.saved_tensors
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [R, T, V]
        for r, s in _chunks(x, ctx.chunk_size):
            logp = x[r, s].to(lse.dtype, copy=True).sub_(lse[r, s, None])  # [c, V] float32
            p = logp.clamp_(min=torch.finfo(lse.dtype).min).exp()  # [c, V]
            grad[r, s] = logp.add_(ent[r, s, None]).mul_(p).mul_(-grad_out[r, s, None])  # dH/dz = -p (log p + H)
            del logp, p
        return grad, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[targets] without a float32 [T, V] tensor, in forward or backward.

    logits [..., V] (any float dtype), targets [...] int in [0, V) -> float32 [...] (float64 for float64 logits).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + (V,)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    x = _rows(logits)  # [R, T, V]
    out = _TokenLogprobs.apply(x, targets.reshape(x.shape[:2]).long(), chunk_size)  # [R, T]
    return out.reshape(targets.shape)


def entropy(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) per position, chunked like token_logprobs (differentiable). [..., V] -> [...]."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    x = _rows(logits)  # [R, T, V]
    return _Entropy.apply(x, chunk_size).reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------- KL estimators and aggregation
def kl(logp: torch.Tensor, other_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimator of KL(pi || pi_other) from samples of pi, d = logp - other_logp (PAPER "GRPO, eq (1)").

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


def aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean", num_tokens=None, max_len=None):
    """Reduce per-token values x [B, T] over mask [B, T] to a scalar (PAPER "aggregate").

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


def _range(rng):
    """None: no clamp; c: (-c, c); (lo, hi) as is."""
    return (-rng, rng) if isinstance(rng, (int, float)) else rng


def _clamp(x: torch.Tensor, rng) -> torch.Tensor:
    return x if rng is None else x.clamp(*_range(rng))


# ----------------------------------------------------------------------------- the objectives, eqs (1)-(5)
def policy_loss(method, logp, old_logp, advantages, mask, *, teacher_logp=None, ref_logp=None, alpha=0.5,
                eps_low=0.2, eps_high=0.28, teacher_clamp=1.0, kd_coef=0.0, kd_kl="k2", kd_clamp=None, kl_coef=0.0,
                loss_agg="token-mean", num_tokens=None, max_len=None, kd_mask=None, ref_kl="k3"):
    """The loss to minimise (-J) and detached scalar metrics, for one (micro-)batch of responses.

    method: "grpo" eq (1) | "kdrl" eq (2) | "rlad" eqs (3)-(5) | "distill" (agg of kd_kl(logp - logp_T) alone; no
    reward, advantages/old_logp may be None, kd_coef unused). logp (with grad), old_logp, teacher_logp, ref_logp,
    mask: [B, T]; advantages [B] or [B, T]. teacher_clamp / kd_clamp: None, c for [-c, c], or (lo, hi).
    kd_mask: optional [B] / [B, T] bool restricting KDRL's KD term (e.g. to wrong responses). kl_coef > 0 adds
    kl_coef * agg(ref_kl(logp - ref_logp)). loss_agg, num_tokens, max_len: see aggregate().
    Metrics (detached 0-d tensors; means over this batch's unmasked tokens, the caller averages micro-batches):
    loss, pg_loss, ratio_mean (r_TRRD for rlad), clip_frac_low / clip_frac_high (tokens whose gradient the clip
    removed, A < 0 / A > 0), teacher_log_ratio (+ _abs) and teacher_clamp_frac (rlad), kd, kl_ref.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    for name, kind in (("kd_kl", kd_kl), ("ref_kl", ref_kl)):
        if kind not in KL_KINDS:
            raise ValueError(f"unknown KL estimator {name}={kind!r}: use one of {KL_KINDS}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}: use one of {LOSS_AGGS}")
    if logp.ndim != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp and mask must both be [B, T]; got {tuple(logp.shape)} and {tuple(mask.shape)}")
    if method in ("kdrl", "rlad", "distill") and teacher_logp is None:
        raise ValueError(f"method {method!r} needs teacher_logp [B, T] (the teacher's log-prob of each sampled token)")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp [B, T] (log-probs of the frozen initial student)")
    named = {"old_logp": old_logp, "teacher_logp": teacher_logp, "ref_logp": ref_logp}
    if method != "distill":
        if old_logp is None or advantages is None:
            raise ValueError(f"method {method!r} needs old_logp [B, T] and advantages [B] or [B, T]")
        if advantages.shape not in (logp.shape, logp.shape[:1]):
            raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp.shape)}; got {tuple(advantages.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}; got {tuple(t.shape)}")

    mask = mask.bool()  # [B, T]
    # Masked positions may hold anything (padding, -inf, NaN): replace them before any arithmetic.
    logp = torch.where(mask, logp, 0.0)  # [B, T]
    agg = dict(loss_agg=loss_agg, num_tokens=num_tokens, max_len=max_len)
    metrics = {}
    loss = 0.0
    if teacher_logp is not None:
        teacher_logp = torch.where(mask, teacher_logp, 0.0).clamp(min=TEACHER_LOGP_FLOOR)  # [B, T]
        t_ratio = logp - teacher_logp  # [B, T] log pi_S / pi_T
        metrics["teacher_log_ratio"] = masked_mean(t_ratio.detach(), mask)
        metrics["teacher_log_ratio_abs"] = masked_mean(t_ratio.detach().abs(), mask)

    if method != "distill":
        adv = advantages[:, None] if advantages.ndim == 1 else advantages  # [B, 1] or [B, T]
        adv = torch.where(mask, adv, 0.0)  # [B, T]
        log_ratio = logp - torch.where(mask, old_logp, 0.0)  # [B, T] log pi_S / pi_old, eq (1)
        if method == "rlad":
            # eq (3) with the Appendix-B clamp; alpha = 1 multiplies the teacher term by exactly 0: GRPO bit for bit
            log_ratio = alpha * log_ratio + (1 - alpha) * _clamp(t_ratio, teacher_clamp)  # [B, T]
            if teacher_clamp is not None:
                lo, hi = _range(teacher_clamp)
                metrics["teacher_clamp_frac"] = masked_mean(((t_ratio < lo) | (t_ratio > hi)).float(), mask)
        ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T] r (GRPO) or r_TRRD (eq 3)
        surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)  # [B, T] eqs (1) / (4)
        pg_loss = -aggregate(surr, mask, **agg)
        loss = loss + pg_loss
        r = ratio.detach()
        metrics["pg_loss"] = pg_loss.detach()
        metrics["ratio_mean"] = masked_mean(r, mask)
        metrics["clip_frac_low"] = masked_mean(((adv < 0) & (r < 1 - eps_low)).float(), mask)
        metrics["clip_frac_high"] = masked_mean(((adv > 0) & (r > 1 + eps_high)).float(), mask)

    if method in ("kdrl", "distill"):
        # eq (2): reverse KL to the teacher on the student's own samples (k2 by default), optional clamp and mask
        kd_tok = kl(_clamp(t_ratio, kd_clamp), 0.0, kd_kl)  # [B, T]
        if kd_mask is not None:  # tokens outside kd_mask count 0 but still count in the normaliser, like the PG term
            kd_tok = torch.where((kd_mask[:, None] if kd_mask.ndim == 1 else kd_mask).bool(), kd_tok, 0.0)  # [B, T]
        kd = aggregate(kd_tok, mask, **agg)
        loss = loss + (kd if method == "distill" else kd_coef * kd)
        metrics["kd"] = kd.detach()

    if kl_coef:
        kl_tok = kl(logp, torch.where(mask, ref_logp, 0.0), ref_kl)  # [B, T]
        kl_ref = aggregate(kl_tok, mask, **agg)
        loss = loss + kl_coef * kl_ref
        metrics["kl_ref"] = kl_ref.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def sft_loss(logp, mask, *, loss_agg="token-mean", num_tokens=None, max_len=None):
    """SFT baseline: negative log-likelihood of the response tokens, aggregated (and normalised) like policy_loss."""
    if logp.ndim != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp and mask must both be [B, T]; got {tuple(logp.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    loss = aggregate(-torch.where(mask, logp, 0.0), mask, loss_agg, num_tokens, max_len)
    return loss, {"loss": loss.detach(), "nll": masked_mean(-logp.detach(), mask)}
