"""policy.py: a model as the trainer holds it. Student, frozen reference and frozen teacher are all a `Policy`: an
FSDP2-sharded (or plain) HF model returning per-token log-probs of given tokens (never full logits). Also: rows into
micro-batches (a Row is one response and what a step learns about it), and the loop's small collectives
(reduce_ints; Metrics, a step's metrics merged in one all-gather).

    student = policy.load("Qwen/Qwen3-0.6B", device, world)                     # fp32 masters, FSDP2, trainable
    teacher = policy.load("Qwen/Qwen3-8B", device, world, trainable=False, shard=True)   # bf16 on GPU, frozen
    logp, entropy, topk_logp = policy.forward(student, policy.collate(policy.pack(rows, 16384)[0], device))
                                                                 # [B, R], [B, R], None or [B, R, k]
    logps, stats = policy.logprobs(teacher, rows, 16384, device) # no_grad, one [len(response)] tensor per row
    engine.load_weights(policy.full_params(student))             # full tensors, one at a time (a collective)

The memory rule: the LM head runs on response positions only, one chunk of rows at a time under activation
checkpointing, so no [T, V] logits tensor exists in forward or backward. Rows are sorted longest first and
right-padded per micro-batch (collate counts the padding for train.py's `pad_frac`). Sequence packing (restarting
positions, flash-attention's varlen kernel) is left out: on CPU's sdpa it cost 1.3-2x the padded layout (measured).
"""
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

import kernels

class Policy(torch.nn.Module):
    """The model as FSDP2's root module: log-probs (and entropies) of given tokens, never full logits. Sharded,
    forward is a collective: every rank calls it the same number of times (logprobs() pads short ranks with dummy
    micro-batches)."""

    def __init__(self, lm, chunk: int, temperature: float):
        super().__init__()
        self.lm = lm  # the Hugging Face causal LM
        self.chunk = chunk  # LM-head rows at once
        self.temperature = temperature  # divides the logits

    def forward(self, input_ids, attention_mask, src, targets, *, entropy_grad: bool = False, with_entropy=True,
                topk: int = 0, topk_ids=None, topk_vocab=None):
        """Per response token (src: the flat positions that predict them, targets: the tokens): the target's log-prob
        [n], the entropy [n] (0 without with_entropy), and top-k log-probs: of the given ids, topk_ids [n, K] (a
        student scoring its teacher's top-k), or of this model's own `topk` most likely ids (a frozen teacher) among
        the first `topk_vocab` ids (a student's vocabulary, when the teacher's embedding has more rows; None: all).
        Returns (logp, entropy, topk) with topk None or (ids [n, K], log-probs [n, K]); all float32."""
        from torch.utils.checkpoint import checkpoint as recompute  # activation checkpointing, not checkpoint.py
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state  # [B, L, H]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src)  # [n, H] response positions only

        def chunk_fn(h, t, ids):
            logits = self.lm.get_output_embeddings()(h) / self.temperature  # [c, V] in the compute dtype
            # entropy costs ~1.5x the log-prob pass over [c, V] (benchmarks/bench_rlad.py): only when it is used
            ent = torch.zeros_like(t, dtype=torch.float32)  # [c]
            if with_entropy:
                with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                    ent = kernels.entropy(logits, self.chunk)  # [c]
            if topk:  # this model's own k most likely tokens, chosen in this chunk: no [T, V] is kept
                ids = logits[:, :topk_vocab].topk(topk, -1).indices  # [c, k] (the log-probs stay full-vocabulary)
            if ids is None:
                return kernels.token_logprobs(logits, t, self.chunk), ent  # [c] float32
            both = kernels.token_logprobs(logits, torch.cat([t[:, None], ids], -1), self.chunk)  # [c, 1 + K], one pass
            return both[:, 0], ent, ids, both[:, 1:]

        extra = topk_ids is not None or topk > 0
        parts = [recompute(chunk_fn, hidden[s:s + self.chunk], targets[s:s + self.chunk],
                           None if topk_ids is None else topk_ids[s:s + self.chunk], use_reentrant=False)
                 for s in range(0, max(targets.shape[0], 1), self.chunk)]
        logp = torch.cat([p[0] for p in parts])  # [n]
        ent = torch.cat([p[1] for p in parts])  # [n]
        if not extra:
            return logp, ent, None
        topk_ids = torch.cat([p[2] for p in parts])  # [n, K]
        topk_logp = torch.cat([p[3] for p in parts])  # [n, K]
        return logp, ent, (topk_ids, topk_logp)

def device_mesh(device, world: int, shard_group: int = 0):
    """FSDP2's mesh over `world` ranks: flat when shard_group is 0 or the world size, else 2-D (replicate x shard),
    i.e. HSDP: every layer's all-gather and reduce-scatter stay inside a group of shard_group ranks (a node) and
    only the gradient all-reduce crosses groups (train.py's shard_group: preflight.shard_group). A collective."""
    from torch.distributed.device_mesh import init_device_mesh
    shard = shard_group or world
    if world % shard:
        raise ValueError(f"shard_group={shard_group} does not divide the world size {world}")
    if shard == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))

def load(path, device, world: int, *, chunk: int = 1024, temperature: float = 1.0, grad_checkpointing: bool = False,
         trainable: bool = True, shard: bool = True, offload: bool = False, mesh=None) -> Policy:
    """A Policy from a HF checkpoint dir (or a model object, which every rank then holds already).

    trainable: fp32 masters (bf16 compute, fp32 gradient reduction on GPU), training mode; else frozen in the compute
    dtype (bf16 on GPU, fp32 on CPU), eval mode. shard: FSDP2 per decoder layer and at the root over `mesh` (default:
    flat over `world`), else a plain module on `device`. offload (frozen only): parameters in CPU memory between uses
    (sharded: FSDP2's CPUOffloadPolicy, a layer at a time; unsharded: logprobs() moves the model in). chunk: LM-head
    rows at once; temperature divides the logits (the rollout temperature: log-probs of the distribution that sampled).
    One disk read: rank 0 loads the checkpoint, the other ranks build the model on the meta device and receive rank 0's
    weights after sharding (broadcast_from_rank0): host memory holds one copy, not one per rank."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = torch.float32 if trainable or device.type != "cuda" else torch.bfloat16
    given = isinstance(path, torch.nn.Module)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if given:
        lm = path.to(dtype)
    elif rank0:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    if getattr(lm.config, "final_logit_softcapping", None) or getattr(lm.config, "logit_scale", None):
        raise ValueError(f"{type(lm).__name__} transforms its logits after the LM head; this trainer supports models "
                         "whose logits are lm_head(final hidden state) (Qwen, Llama, Mistral, ...)")
    if grad_checkpointing and trainable:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = Policy(lm, chunk, temperature)
    # Rank 0's CPU copy of the weights, which broadcast_from_rank0 sends to the others after sharding.
    full = {f"lm.{k}": v for k, v in lm.state_dict().items()} if rank0 and not given else {}
    offload = offload and not trainable  # on a CPU device the same code runs and moves nothing (tests take it)
    model.offload = offload and not shard
    if shard:
        if device.type == "cuda" and trainable:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()  # frozen: already in the compute dtype
        options = dict(mesh=mesh or device_mesh(device, world), mp_policy=mp)
        if offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        for layer in decoder_layers(lm):
            fully_shard(layer, **options)
        fully_shard(model, **options)  # root: embeddings, final norm, LM head (tied or not)
    elif rank0 or given:
        model.to(device)
    else:
        model.to_empty(device=device)
    if not given and dist.is_initialized() and dist.get_world_size() > 1:
        broadcast_from_rank0(model, full, device, shard)
    if not shard and model.offload:
        model.to("cpu")
    # train(): transformers checkpoints layers only in training mode (Qwen3 has no dropout: same numbers either way)
    return model.train() if trainable else model.eval().requires_grad_(False)

def broadcast_from_rank0(model: Policy, full: dict, device, shard: bool):
    """Ranks 1.. receive rank 0's weights (`full`, its CPU state dict; {} elsewhere) and buffers. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if any(p.is_meta for p in model.parameters()):
        # Materialise on the compute device, where rank 0's buffers are. Under an offload policy FSDP2 then moves
        # the parameter shards to pinned CPU memory.
        model.to_empty(device=device)
    if shard:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    for buffer in model.buffers():  # non-persistent buffers (rotary frequencies) are in no state dict
        dist.broadcast(buffer, src=0)

def decoder_layers(lm):  # the decoder's blocks: `layers` (Qwen, Llama, Mistral, ...) or `h` (GPT-2)
    return lm.get_decoder().layers if hasattr(lm.get_decoder(), "layers") else lm.get_decoder().h

@torch.no_grad()
def full_params(model: Policy, dtype=None):
    """(hf_name, full tensor) per parameter, gathered one at a time (a collective: every rank iterates), no autograd.
    dtype casts each rank's shard BEFORE the all-gather: a bf16 sync moves half the bytes of the fp32 masters."""
    for name, p in model.lm.named_parameters():
        p = p.detach() if dtype is None else p.detach().to(dtype)  # a DTensor stays sharded through the cast
        yield name, p.full_tensor() if hasattr(p, "full_tensor") else p

# ----------------------------------------------------------------------------- rows -> micro-batches
@dataclass
class Row:
    """One response and everything a training step learns about it. train.py fills the fields in step order (the
    numbers are its steps); collate() lays rows out as a micro-batch. Per-token tensors are float32 [n] (the top-k
    fields [n, k], the ids int64), n = len(response), position t scoring response token t: engine_logp, the
    teacher's fields and token_adv on the CPU, old_logp and ref_logp on the trainer's device."""
    prompt: list                                # prompt token ids (chat template and any prefill included)
    response: list                              # response token ids; ends with EOS unless truncated
    group: int = 0                              # 3. its prompt's index on this rank: the G responses of a prompt
    uid: int = 0                                # 3. its id in the step, the same at any world size (mini-batch deal)
    truncated: bool = False                     # 3. stopped by max_tokens before EOS
    engine_logp: torch.Tensor | None = None     # 3. [n] the rollout engine's log-probs (logprob_mismatch)
    text: str = ""                              # 4. the assistant's whole turn as scored: prefill + decoded response
    reward: float = 0.0                         # 4. the task's reward
    correct: bool = False                       # 4. the task's verdict
    format_ok: bool = False                     # 4. the task could read an answer
    adv: float = 0.0                            # 5. group advantage A_i (every token of the response shares it)
    teacher_logp: torch.Tensor | None = None    # 6. [n] log pi_T of each response token
    old_logp: torch.Tensor | None = None        # 6. [n] log pi_old, when the policy moves within the step
    ref_logp: torch.Tensor | None = None        # 6. [n] log pi_ref of the frozen reference (kl_coef > 0)
    teacher_topk_ids: torch.Tensor | None = None   # 6. [n, k] the teacher's k most likely ids per position (topk_kd)
    teacher_topk_logp: torch.Tensor | None = None  # 6. [n, k] their teacher log-probs
    token_adv: torch.Tensor | None = None       # 6. [n] per-token advantages from a step-level hook (TOP-D)
    dummy: bool = False                         # collate's placeholder on a rank without rows: fully masked

# The per-token fields collate() lays out as [B, R] (or [B, R, k]) when every row of a micro-batch has them.
TOKEN_FIELDS = ("teacher_logp", "old_logp", "ref_logp", "engine_logp", "token_adv", "teacher_topk_ids",
                "teacher_topk_logp")

def pack(rows: list, budget: int) -> list:
    """Micro-batches (lists of rows) whose padded size B x L stays within `budget`; rows sorted longest first."""
    out = []
    for r in sorted(rows, key=lambda r: -(len(r.prompt) + len(r.response))):
        if out and (len(out[-1]) + 1) * (len(out[-1][0].prompt) + len(out[-1][0].response) - 1) <= budget:
            out[-1].append(r)  # the first row of a micro-batch is its longest: it sets the padded width
        else:
            out.append([r])
    return out

def even_out(plans: list) -> list:
    """Each plan (a list of micro-batches, from pack) padded with empty micro-batches to the most that any rank has
    for it: every rank then runs the same number of forward and backward passes, which FSDP's collectives need, an
    empty one on collate's placeholder row. One all_reduce for all the plans."""
    most = reduce_ints([len(plan) for plan in plans], "max")
    return [plan + [[] for _ in range(n - len(plan))] for plan, n in zip(plans, most)]

def dummy_row() -> Row:
    """One masked-out token with every per-token field: a rank without data runs the same forward (a collective)."""
    row = Row(prompt=[0], response=[0], dummy=True, **{field: torch.zeros(1) for field in TOKEN_FIELDS})
    row.teacher_topk_ids = torch.zeros(1, 1, dtype=torch.long)  # [n, k] with k = 1
    row.teacher_topk_logp = torch.zeros(1, 1)
    return row

def collate(rows: list, device) -> dict:
    """One micro-batch as tensors: the model's inputs and every per-token value laid out [B, R].

    B = len(rows); L = the longest prompt + response - 1 (the model reads every token but the last); R = the
    longest response. Inputs: ids [B, L] right-padded with 0, attn [B, L] (None when nothing is padded), src (the
    flat [B * L] position whose hidden state predicts each response token, in row order) and targets (those tokens).
    Outputs go back through dst (each response token's flat [B * R] slot). mask [B, R] is True on real response
    tokens. Per-row values: adv [B], wrong [B]; per-token TOKEN_FIELDS [B, R] where every row has them. Counts:
    tokens (real response tokens), slots (B x L) and unpadded (input positions that are not padding), for pad_frac.
    An empty list becomes one dummy row whose mask is all False, so that a rank without rows still runs the same
    forward and backward."""
    rows = rows or [dummy_row()]
    lens = [len(r.prompt) + len(r.response) - 1 for r in rows]  # the model's input length per row
    width = max(lens)  # L
    rmax = max(len(r.response) for r in rows)  # R
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L]
    attn = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L]
    src = []  # per row: the flat [B * L] positions that predict its response tokens
    dst = []  # per row: its response tokens' slots in the flat [B * R] output
    targets = []  # the response tokens, row after row
    for i, r in enumerate(rows):
        seq = r.prompt + r.response[:-1]
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        # response token t sits at position len(prompt) + t, predicted by the hidden state one before it
        src.append(torch.arange(len(r.response)) + i * width + len(r.prompt) - 1)
        dst.append(torch.arange(len(r.response)) + i * rmax)
        targets.extend(r.response)
    dst = torch.cat(dst)
    has_rows = not rows[0].dummy  # False: the placeholder, whose mask stays all False
    mask = torch.zeros(len(rows) * rmax, dtype=torch.bool).index_fill(0, dst, has_rows)  # [B * R]
    batch = {"ids": ids, "attn": None if bool(attn.all()) else attn, "src": torch.cat(src), "dst": dst,
             "targets": torch.tensor(targets, dtype=torch.long), "mask": mask.view(len(rows), rmax),
             "adv": torch.tensor([r.adv for r in rows], dtype=torch.float32),
             "wrong": torch.tensor([not r.correct for r in rows]), "rows": rows, "slots": len(rows) * width,
             "tokens": sum(len(r.response) for r in rows if not r.dummy), "unpadded": sum(lens) if has_rows else 0}
    for field in TOKEN_FIELDS:  # per-row token values [n] (or [n, k]) -> [B, R] (or [B, R, k])
        if all(getattr(r, field) is not None for r in rows):
            values = [getattr(r, field) for r in rows]
            flat = values[0].new_zeros((len(rows) * rmax, *values[0].shape[1:]))  # [B * R] (or [B * R, k])
            batch[field] = flat.index_copy(0, dst.to(flat.device), torch.cat(values)).view(len(rows), rmax,
                                                                                           *flat.shape[1:])
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

def forward(model: Policy, batch: dict, *, entropy_grad=False, with_entropy=True):
    """Log-probs and entropies laid out [B, R] like batch["mask"] (entropies 0 when with_entropy is False), and the
    log-probs of the teacher's top-k ids [B, R, k] when the batch has them (else None)."""
    B, R = batch["mask"].shape
    topk_ids = batch.get("teacher_topk_ids")  # [B, R, k]
    if topk_ids is not None:
        topk_ids = topk_ids.view(B * R, -1).index_select(0, batch["dst"])  # [n, k] in the targets' order
    logp, ent, topk = model(batch["ids"], batch["attn"], batch["src"], batch["targets"], entropy_grad=entropy_grad,
                            with_entropy=with_entropy, topk_ids=topk_ids)  # [n], [n], None or ([n, k], [n, k])

    def lay_out(x):  # [n] (or [n, k]) in the targets' order -> [B, R] (or [B, R, k]), 0 where nothing was scored
        flat = torch.zeros((B * R, *x.shape[1:]), dtype=x.dtype, device=x.device)  # [B * R] (or [B * R, k])
        return flat.index_copy(0, batch["dst"], x).view(B, R, *x.shape[1:])

    topk_logp = None if topk is None else lay_out(topk[1])  # [B, R, k]
    return lay_out(logp), lay_out(ent), topk_logp

# ----------------------------------------------------------------------------- the loop's collectives
def reduce_ints(values: list, op: str = "max") -> list:
    """The elementwise max (or "sum") of a short list of ints across ranks: one all_reduce, one host sync."""
    if not dist.is_initialized():  # a single process outside a trainer (tests, benchmarks, eval)
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)  # NCCL reduces device tensors only
    return [int(x) for x in t.tolist()]

class Metrics:
    """A step's metrics, kept as device tensors while they accumulate (no host sync) and merged across ranks by ONE
    collective in reduce(). Three kinds:

        mean(name, total, count)        sum of `total` / sum of `count`, over every call on every rank: a mean over
                                        every rank's items (rows, tokens), each rank adding its own sums
        total(name, value, over=1)      the sum of `value` over ranks (tokens trained, rows kept), divided by `over`,
                                        the same count on every rank: the loss is each optimizer step's total over
                                        ranks, averaged over the step's optimizer steps
        max(name, value)                the largest value of any call on any rank (the slowest rank's seconds)
    """

    def __init__(self):
        self.sums = {}  # name -> (total, count) for mean and total
        self.maxes = {}  # name -> value
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def mean(self, name: str, total, count):
        old_total, old_count = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (old_total + total, old_count + count)

    def total(self, name: str, value, over: int = 1):
        self.mean(name, value, over / self.world)  # every rank's count adds up to `over`: the sum over ranks / over

    def max(self, name: str, value):
        old = self.maxes.get(name, value)
        self.maxes[name] = torch.maximum(torch.as_tensor(old), torch.as_tensor(value))

    def reduce(self, device) -> dict:
        """{name: value} merged over every rank (a collective: every rank calls it once per step)."""
        names = sorted(self.sums)
        max_names = sorted(self.maxes)
        # Every rank must hold the same names, or the gather below mixes up values (gloo raises, NCCL may hang): one
        # small all_reduce compares a checksum of them first.
        checksum = zlib.crc32(" ".join(names + ["|"] + max_names).encode())
        most, minus_least = reduce_ints([checksum, -checksum])
        if most != -minus_least:
            raise RuntimeError(f"the ranks recorded different metrics this step (rank {dist.get_rank()}: {names} "
                               f"{max_names}): a metric added on some ranks only is a bug; record every name on "
                               "every rank (with count 0 where a rank has no items)")
        scalar = lambda x: torch.as_tensor(x, dtype=torch.float64, device=device).reshape(())  # noqa: E731
        local = [scalar(x) for name in names for x in self.sums[name]]
        local += [scalar(self.maxes[name]) for name in max_names]
        local = torch.stack(local + [scalar(0.0)])  # [K] (one spare entry: never an empty stack)
        every = local.new_empty(dist.get_world_size() * local.numel())  # [world * K]
        # all_gather_single is torch 2.13's name; 2.11 (and older) has all_gather_into_tensor, same collective
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(every, local)
        every = every.view(dist.get_world_size(), -1)  # [world, K]
        sums = every[:, :2 * len(names)].sum(0).tolist()
        maxes = every[:, 2 * len(names):-1].amax(0).tolist()
        out = {name: sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else 0.0 for i, name in enumerate(names)}
        out.update(zip(max_names, maxes))
        return out

@torch.no_grad()
def logprobs(model: Policy, rows: list, budget: int, device, *, topk: int = 0, topk_vocab=None):
    """Log-probs of each row's response under a frozen `model` (the teacher, the reference, or pi_old): float32
    [len(response)] per row, in order, and stats: slots / max_slots (padded tokens), unpadded, pad_fraction,
    micro_batches / dummy_batches. topk > 0 (a teacher for topk_kd): each row's entry is (log-probs [n], its
    `topk` most likely ids at each position [n, k], their log-probs [n, k]) instead, chosen among ids below
    topk_vocab (None: every id). Sharded, a collective: every rank calls it with its own rows (even none)."""
    batches = pack(rows, budget)
    padded = even_out([batches])[0]  # as many forwards as the busiest rank (a sharded forward is a collective)
    if getattr(model, "offload", False):
        model.to(device)
    out = {}
    stats = dict(slots=0, max_slots=0, unpadded=0, micro_batches=len(batches),
                 dummy_batches=len(padded) - len(batches))
    try:
        for micro in padded:
            batch = collate([Row(prompt=r.prompt, response=r.response) for r in micro], device)
            logp, _, top = model(batch["ids"], batch["attn"], batch["src"], batch["targets"], with_entropy=False,
                                 topk=topk, topk_vocab=topk_vocab)  # [n]; None or ([n, k], [n, k])
            if micro:
                sizes = [len(r.response) for r in micro]
                if topk:  # (log-probs [n], top-k ids [n, k], their log-probs [n, k]) per row
                    per_row = zip(logp.split(sizes), top[0].split(sizes), top[1].split(sizes))
                else:  # log-probs [n] per row
                    per_row = logp.split(sizes)
                out.update(zip(map(id, micro), per_row))
                stats["slots"] += batch["slots"]
                stats["max_slots"] = max(stats["max_slots"], batch["slots"])
                stats["unpadded"] += batch["unpadded"]
    finally:
        if getattr(model, "offload", False):
            model.to("cpu")
    if hasattr(model, "reshard"):  # FSDP2 keeps the root's gathered weights after a no-grad forward: free them
        model.reshard()
    stats["pad_fraction"] = 1 - stats["unpadded"] / stats["slots"] if stats["slots"] else 0.0
    return [out[id(r)] for r in rows], stats
