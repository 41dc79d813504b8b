"""kernels.py: per-token log-probs and entropies of logits, chunked, without a float32 [T, V] tensor (20 GB at
T = 32768, V = 151936). Both save only the logits (in their own dtype) and one float per token, and backward
recomputes the softmax chunk by chunk: O(chunk x V) extra memory beyond the [.., V] gradient autograd needs anyway.
policy.py calls them on each chunk of the LM head's logits; rlad.py re-exports both. Why hand-written autograd rather
than log_softmax per chunk: `python benchmarks/bench_rlad.py` measures both (peak memory, time; numbers in README).
"""
import torch

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[targets] without a float32 [T, V] tensor, in forward or backward. logits [..., V] (any
    float dtype), targets [...] int in [0, V) -> float32 [...] (float64 for float64 logits). targets may also hold K
    ids per position, [..., K] -> [..., K] (a teacher's top-k ids: the student's log-probs of them, one pass)."""
    several = targets.shape[:-1] == logits.shape[:-1]  # [..., K] ids per position
    if (logits.shape[:-1] != targets.shape and not several) or chunk_size < 1:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + (V,) (or targets "
                         f"[..., K]: K ids per position), and chunk_size >= 1 (got {chunk_size})")
    x = _rows(logits)  # [R, T, V]
    ids = targets.reshape(*x.shape[:2], -1).long()  # [R, T, K]; K = 1 for one target per position
    return _TokenLogprobs.apply(x, ids, chunk_size).reshape(targets.shape)

def entropy(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) per position, chunked like token_logprobs (differentiable). [..., V] -> [...]."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    return _Entropy.apply(_rows(logits), chunk_size).reshape(logits.shape[:-1])

def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., T, V] -> [R, T, V], a view where the strides allow it (one long row when they do)."""
    try:
        return logits.view(1, -1, logits.shape[-1])  # [1, N, V]
    except RuntimeError:  # e.g. logits[:, :-1] of a [B, T, V] batch: keep the rows, no copy
        return logits.reshape(-1, logits.shape[-2], logits.shape[-1])  # [R, T, V]

def _chunks(x: torch.Tensor, chunk_size: int):
    """(row, positions) of each chunk of x [R, T, V], row by row."""
    return ((r, slice(s, s + chunk_size)) for r in range(x.shape[0]) for s in range(0, x.shape[1], chunk_size))

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, targets, chunk_size):  # x [R, T, V] any float dtype, targets [R, T, K] int64
        dt = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 upcast per chunk; float64 stays float64
        lse = torch.empty(targets.shape[:2], dtype=dt, device=x.device)  # [R, T]
        out = torch.empty(targets.shape, dtype=dt, device=x.device)  # [R, T, K]
        for r, s in _chunks(x, chunk_size):
            z = x[r, s].to(dt, copy=True)  # [c, V] private float32 copy, the one full-width temporary (in place below)
            m = z.amax(-1, keepdim=True).clamp_(min=torch.finfo(dt).min)  # [c, 1] row max, finite
            picked = z.sub_(m).gather(-1, targets[r, s])  # [c, K] z_y - m
            log_tot = z.exp_().sum(-1, keepdim=True).log()  # [c, 1] log sum exp(z - m)
            lse[r, s] = (m + log_tot).squeeze(-1)  # [c]
            out[r, s] = picked - log_tot  # [c, K] log softmax(z)_y
            del z  # before the next chunk's copy exists: one [c, V] temporary at a time, not two
        ctx.save_for_backward(x, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out [R, T, K]
        x, targets, lse = ctx.saved_tensors
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [R, T, V] in the logits' dtype
        for r, s in _chunks(x, ctx.chunk_size):
            g = grad_out[r, s]  # [c, K]
            p = x[r, s].to(lse.dtype, copy=True).sub_(lse[r, s, None]).exp_()  # [c, V] float32 softmax, recomputed
            # d logp_y / dz = onehot(y) - softmax, summed over the K ids with their upstream gradients
            grad[r, s] = p.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, targets[r, s], g)
            del p
        return grad, None, None

class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chunk_size):  # x [R, T, V]
        dt = torch.promote_types(x.dtype, torch.float32)
        lse, ent = (torch.empty(x.shape[:2], dtype=dt, device=x.device) for _ in range(2))  # [R, T] each
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
