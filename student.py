"""student.py: the student as train.py holds it: an FSDP2-sharded Hugging Face model that returns per-token
log-probs (never full logits), and the batching of sampled rows into padded micro-batches for it.

    import student
    policy = student.load("Qwen/Qwen3-0.6B", device, world)        # fp32 master weights, FSDP2 per layer + root
    for mb in student.pack(rows, budget=16384):                      # rows: {"prompt": ids, "response": ids, ...}
        b = student.collate(mb, device)                              # right-padded [B, L] inputs, [B, R] fields
        logp, entropy = student.forward(policy, b)                   # [B, R] each, laid out like b["mask"]
    engine.load_weights(student.full_params(policy))                 # full tensors, one at a time (a collective)

Why it is its own file: teacher.py scores tokens with a frozen model; this is the trainable side of the same
question, with the memory rule the trainer lives by: the LM head runs on response positions only, one chunk of
rows at a time under activation checkpointing, so no [T, V] logits tensor exists in forward or backward
(rlad.token_logprobs and rlad.entropy keep only the bf16/fp32 logits of one chunk and recompute in backward).
Padding: rows are sorted longest first and right-padded per micro-batch; collate reports the padded slots and
real tokens so train.py can log the waste (`pad_frac`). Sequence packing is left out (see README).
"""
import torch


class Policy(torch.nn.Module):
    """The student as FSDP2's root module: returns log-probs (and entropies) of given tokens, never full logits.

    The decoder's hidden states at the positions that predict response tokens go through the LM head one chunk
    at a time under activation checkpointing, so neither forward nor backward keeps a [T, V] tensor.
    """

    def __init__(self, lm, chunk: int, temperature: float):
        super().__init__()
        self.lm, self.chunk, self.temperature = lm, chunk, temperature

    def forward(self, input_ids, attention_mask, src, targets, entropy_grad: bool = False, with_entropy=True):
        from torch.utils.checkpoint import checkpoint as recompute  # activation checkpointing, not checkpoint.py
        import rlad
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state  # [B, L, H]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src)  # [n, H] response positions only
        head = self.lm.get_output_embeddings()

        def chunk_fn(h, t):
            logits = head(h) / self.temperature  # [c, V] in the compute dtype
            # entropy costs ~1.5x the log-prob pass over [c, V] (benchmarks/bench_rlad.py): only when it is used
            ent = torch.zeros_like(t, dtype=torch.float32)  # [c]
            if with_entropy:
                with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                    ent = rlad.entropy(logits, self.chunk)  # [c]
            return rlad.token_logprobs(logits, t, self.chunk), ent  # [c] float32

        parts = [recompute(chunk_fn, hidden[s:s + self.chunk], targets[s:s + self.chunk], use_reentrant=False)
                 for s in range(0, max(targets.shape[0], 1), self.chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # [n], [n]


def load(path, device, world: int, chunk: int = 1024, temperature: float = 1.0, grad_checkpointing: bool = False,
         trainable: bool = True) -> Policy:
    """The student (or a frozen reference) from a HF checkpoint dir or hub name (or a model object), fp32 master
    weights, FSDP2-sharded per decoder layer and at the root over all `world` ranks.

    chunk: LM-head rows at once; temperature: divides the logits (the rollout temperature, so that the trainer's
    log-probs are those of the distribution that sampled); grad_checkpointing: recompute decoder layers in backward.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM
    lm = path if isinstance(path, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if grad_checkpointing and trainable:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(lm, chunk, temperature)
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()  # bf16 compute, fp32 gradient reduction on GPU; fp32 throughout on CPU
    for layer in lm.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, LM head (tied or not)
    # train(): transformers checkpoints layers only in training mode (Qwen3 has no dropout: same numbers either way)
    return policy.train() if trainable else policy.eval().requires_grad_(False)


def full_params(policy: Policy):
    """(hf_name, full tensor) per parameter, gathered one at a time (a collective: every rank iterates)."""
    for name, p in policy.lm.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def pack(rows: list, budget: int) -> list:
    """Micro-batches (lists of rows) whose padded size B x L stays within `budget`; rows sorted longest first."""
    out = []
    for r in sorted(rows, key=lambda r: -(len(r["prompt"]) + len(r["response"]))):
        if out and (len(out[-1]) + 1) * (len(out[-1][0]["prompt"]) + len(out[-1][0]["response"]) - 1) <= budget:
            out[-1].append(r)  # the first row of a micro-batch is its longest: it sets the padded width
        else:
            out.append([r])
    return out


# One masked-out token with every per-token field: keeps a rank without data in step with the others' collectives.
DUMMY = {"prompt": [0], "response": [0], "dummy": True,
         **{k: torch.zeros(1) for k in ("teacher", "old", "ref", "engine")}}


def collate(rows: list, device) -> dict:
    """Right-padded inputs and [B, R] per-token tensors for one micro-batch (R = longest response).

    An empty list gives DUMMY's one masked token: a rank with no data still runs the forward/backward (and so the
    FSDP collectives) the others run. Per-row token vectors ("teacher", "old", "ref", "engine") become [B, R].
    """
    rows = rows or [DUMMY]
    lens = [len(r["prompt"]) + len(r["response"]) - 1 for r in rows]
    width, rmax = max(lens), max(len(r["response"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L]
    attn = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L]
    src, dst, targets = [], [], []
    for i, r in enumerate(rows):
        seq = r["prompt"] + r["response"][:-1]
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        n = len(r["response"])
        # response token t sits at position len(prompt) + t, predicted by the hidden state one before it
        src.append(torch.arange(n) + i * width + len(r["prompt"]) - 1)
        dst.append(torch.arange(n) + i * rmax)
        targets.extend(r["response"])
    mask = torch.zeros(len(rows) * rmax, dtype=torch.bool)
    dst = torch.cat(dst)
    mask[dst] = not rows[0].get("dummy", False)
    out = {"ids": ids, "attn": None if bool(attn.all()) else attn, "src": torch.cat(src), "dst": dst,
           "targets": torch.tensor(targets, dtype=torch.long), "mask": mask.view(len(rows), rmax),
           "adv": torch.tensor([r.get("adv", 0.0) for r in rows], dtype=torch.float32),
           "wrong": torch.tensor([not r.get("correct", True) for r in rows]),
           "tokens": sum(len(r["response"]) for r in rows if not r.get("dummy")), "slots": len(rows) * width,
           "real": sum(lens) if not rows[0].get("dummy") else 0}
    for key in ("teacher", "old", "ref", "engine"):  # per-row token vectors -> [B, R]
        if all(key in r for r in rows):
            flat = torch.zeros(len(rows) * rmax, dtype=torch.float32, device=rows[0][key].device)
            out[key] = flat.index_copy(0, dst.to(flat.device), torch.cat([r[key] for r in rows])).view(len(rows), rmax)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in out.items()}


def forward(policy: Policy, b: dict, entropy_grad=False):
    """Student log-probs and entropies laid out [B, R] like b["mask"]."""
    lp, ent = policy(b["ids"], b["attn"], b["src"], b["targets"], entropy_grad)  # [n], [n]
    B, R = b["mask"].shape
    return [torch.zeros(B * R, dtype=x.dtype, device=x.device).index_copy(0, b["dst"], x).view(B, R) for x in (lp, ent)]
