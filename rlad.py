"""RLAD: the losses (GRPO, KDRL, TRRD). Work in progress: see issue 2 for the full file."""
import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[targets], chunked over the flattened tokens: peak extra memory O(chunk x V).

    logits [..., V] (any float dtype, upcast per chunk), targets [...] -> float32 [...].
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [N, V]
    flat_targets = targets.reshape(-1)  # [N]
    out = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        chunk = flat_logits[start:start + chunk_size].float()  # [c, V]
        picked = chunk.gather(-1, flat_targets[start:start + chunk_size, None]).squeeze(-1)  # [c]
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return flat_logits.new_zeros(targets.shape, dtype=torch.float32)
    return torch.cat(out).reshape(targets.shape)
