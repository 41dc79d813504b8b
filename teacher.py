"""The teacher pass: log pi_T(y_t | x, y_<t) for every sampled response token, and nothing more.

KDRL (eq 2) and TRRD (eqs 3-5) need the teacher only through `logp_T[t]`, the log-probability of the token
the student actually sampled (PAPER.md, Notation). So the teacher never materialises a distribution over the
vocabulary for a whole batch: it runs its decoder body, keeps the hidden states of the positions that
predict response tokens, and applies the LM head to those positions only, a chunk at a time, through
`rlad.token_logprobs` (no float32 [T, V] tensor ever exists).

    teacher = Teacher("Qwen/Qwen3-8B")                        # bf16 on GPU, fp32 on CPU, frozen
    check_tokenizers(student_tok, teacher_tok, "Qwen3-1.7B", "Qwen3-8B")   # once, at start-up
    logp_T = teacher.logprobs([(prompt_ids, response_ids), ...])        # list of float32 [len(response)]

Batching. A sequence enters the forward pass as prompt + response[:-1] (the last response token is only a
target). Sequences are sorted by length, longest first, and grouped into micro-batches whose forward
size never exceeds `token_budget` tokens; a single sequence longer than the budget runs alone (the budget
is a throughput knob, not a hard memory cap: lower `max_model_len` if one sequence does not fit). Two
layouts, chosen by the attention backend:
- packed (flash-attention backends): the micro-batch is ONE row, sequences concatenated, `position_ids`
  restarting at 0 for each. transformers turns such position_ids into flash-attention's varlen call, so
  sequences never attend to each other and no compute is spent on padding. (On sdpa/eager, transformers
  5 builds a block-diagonal [T, T] mask from the same position_ids: correct, tested on CPU, but the
  attention then costs O((sum of lengths)^2), which is why it is not the default there.)
- padded (sdpa, eager; the default on CPU): rows of similar length (sorted), right-padded, with an
  attention mask. Rows are sorted, so padding is small; `last_stats["pad_fraction"]` reports it.

Sharded teachers (`shard=True`, under torchrun): the model is wrapped with FSDP2 (`fully_shard` on every
decoder layer, then on the whole), so a 32B teacher's weights are split across ranks and every forward
all-gathers one layer at a time. FSDP forwards are collectives, hence THE RULE:
    every rank calls `logprobs` the same number of times, at the same point of the program, even a rank
    with no sequences (call it with an empty list).
Inside a call the ranks agree on the number of micro-batches (one all_reduce(MAX)) and a rank with fewer
runs 1-token dummy forwards, so different numbers or lengths of sequences per rank are fine. A rank that
skips a call leaves the others waiting in that all_reduce (a hang until the process group's timeout, not
an error message): call `logprobs` from code that every rank runs unconditionally (once per training step).

Offload (`offload=True`): unsharded, parameters live on CPU between calls and move to the device for the
duration of `logprobs`; sharded, FSDP2's CPUOffloadPolicy keeps each rank's shards in CPU memory and copies
one layer at a time to the device. No effect on a CPU device.

`VLLMTeacher` has the same `logprobs` for a teacher served by its own vLLM engine (vLLM's prompt log-probs).
"""
import os
import time

import torch
import torch.nn as nn

import rlad


class _Scorer(nn.Module):
    """Decoder body -> hidden states at the requested positions -> chunked LM head -> log-prob of the target.

    A module (not a function) so that, when sharded, FSDP2's root hooks wrap exactly this forward: the root
    parameters (embeddings, final norm, LM head, tied or not) are gathered once for the whole chunk loop.
    """

    def __init__(self, lm: nn.Module, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, position_ids, rows, cols, targets):
        body, head = self.lm.get_decoder(), self.lm.get_output_embeddings()
        # use_cache=False: with a cache, transformers would not detect the packed layout from position_ids.
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # [B, L, H]
        picked = hidden[rows, cols]  # [n, H]: only the positions that predict a response token
        out = [rlad.token_logprobs(head(picked[s:s + self.chunk_size]), targets[s:s + self.chunk_size],
                                   self.chunk_size)  # [c] float32; logits [c, V] live one chunk at a time
               for s in range(0, picked.shape[0], self.chunk_size)]
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)  # [n]


def _default_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _load(model, dtype, device):
    if isinstance(model, nn.Module):
        return model.to(dtype=dtype)
    import importlib.util
    from transformers import AutoModelForCausalLM
    # flash-attention, when installed, makes the packed layout free of cross-sequence and padding compute.
    attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    # Loaded to CPU first: with shard=True every rank holds the full weights in host memory once, before
    # fully_shard keeps its own 1/world share (8 x 64 GB of host RAM for a 32B bf16 teacher on one node).
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn)


def _ids(ids) -> list:
    """Token ids as a list of ints, from a list or a 1-D tensor."""
    return ids.tolist() if torch.is_tensor(ids) else list(ids)


class Teacher:
    """A frozen causal LM that returns the log-probability of given response tokens.

    Teacher(model, *, dtype=None, device=None, token_budget=16384, shard=False, offload=False,
            pack=None, chunk_size=1024)
    - model: a path / hub name, or an nn.Module (then modified in place: cast, moved, frozen).
    - dtype: default bfloat16 on GPU, float32 on CPU. device: default cuda:LOCAL_RANK if CUDA, else CPU.
    - token_budget: most tokens (padding included) in one forward pass.
    - shard: FSDP2 across the default process group (see the module docstring for the rule on ranks).
    - offload: parameters on CPU between calls.
    - pack: one packed row per micro-batch (True) or padded rows (False); default True exactly when the
      model uses a flash-attention backend.
    - chunk_size: rows of the LM head computed at once (peak extra memory ~ chunk_size x V floats).
    After each call, `last_stats` holds: sequences; tokens (real forward tokens: prompt + response - 1 per
    non-empty response); slots (forward tokens including padding) and max_slots (the largest forward);
    pad_fraction = 1 - tokens / slots; micro_batches; dummy_batches (shard=True padding); seconds.
    """

    def __init__(self, model, *, dtype=None, device=None, token_budget: int = 16384, shard: bool = False,
                 offload: bool = False, pack: bool | None = None, chunk_size: int = 1024):
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.token_budget, self.shard, self.chunk_size = token_budget, shard, chunk_size
        self.offload = offload and self.device.type != "cpu"
        lm = _load(model, self.dtype, self.device)
        if getattr(lm.config, "final_logit_softcapping", None) or getattr(lm.config, "logit_scale", None):
            raise ValueError(f"{type(lm).__name__} transforms its logits after the LM head; Teacher supports "
                             "models whose logits are lm_head(final hidden state) (Qwen, Llama, Mistral, ...)")
        lm.eval().requires_grad_(False)
        self.vocab_size = lm.get_output_embeddings().weight.shape[0]
        attn = str(getattr(lm.config, "_attn_implementation", ""))
        self.pack = ("flash" in attn) if pack is None else pack
        self.scorer = _Scorer(lm, chunk_size)
        self.last_stats = {}
        if shard:
            self._shard()
        elif not self.offload:
            self.scorer.to(self.device)

    def _shard(self):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
        if not dist.is_initialized():
            raise RuntimeError("Teacher(shard=True) needs torch.distributed initialised (run under torchrun and "
                               "call dist.init_process_group first), or use shard=False")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # fully_shard moves each group to the mesh's current device
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        # The model is still on CPU here: fully_shard moves and shards one decoder layer at a time, so a rank
        # never holds more than its shards plus one full layer on the device.
        kwargs = {"mesh": mesh, "offload_policy": CPUOffloadPolicy()} if self.offload else {"mesh": mesh}
        for layer in self.scorer.lm.get_decoder().layers:
            fully_shard(layer, **kwargs)
        fully_shard(self.scorer, **kwargs)  # root: embeddings, final norm, LM head

    # ---- batching ---------------------------------------------------------------------------------------
    def _micro_batches(self, lengths):
        """Indices of sequences per micro-batch: sorted longest first, each under the token budget."""
        order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
        batches, cur, cur_tokens = [], [], 0
        for i in order:
            # packed: tokens add up; padded: every row is as long as the batch's first (longest) one.
            cost = cur_tokens + lengths[i] if self.pack else (len(cur) + 1) * (lengths[cur[0]] if cur else lengths[i])
            if cur and cost > self.token_budget:
                batches.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += lengths[i]
        return batches + ([cur] if cur else [])

    def _inputs(self, seqs, batch):
        """Tensors for one micro-batch: input ids, mask, positions, and where each response token is scored."""
        rows, cols, targets = [], [], []
        if self.pack:
            ids, pos, offset = [], [], 0
            for i in batch:
                prompt, response = seqs[i]
                n = len(prompt) + len(response) - 1
                ids.extend(prompt)
                ids.extend(response[:-1])
                pos.append(torch.arange(n))
                # response token t sits at position len(prompt)+t, predicted by the hidden state one before.
                cols.append(torch.arange(len(response)) + offset + len(prompt) - 1)
                targets.extend(response)
                offset += n
            input_ids = torch.tensor([ids])  # [1, T]
            position_ids = torch.cat(pos)[None]  # [1, T], restarting at 0 per sequence
            attention_mask, rows = None, torch.zeros(len(targets), dtype=torch.long)
        else:
            width = max(len(seqs[i][0]) + len(seqs[i][1]) - 1 for i in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, L]; pad id 0 is never attended
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)  # [B, L]
            for r, i in enumerate(batch):
                prompt, response = seqs[i]
                n = len(prompt) + len(response) - 1
                input_ids[r, :n] = torch.tensor(prompt + response[:-1])
                attention_mask[r, :n] = 1
                rows.append(torch.full((len(response),), r))
                cols.append(torch.arange(len(response)) + len(prompt) - 1)
                targets.extend(response)
            rows, position_ids = torch.cat(rows), None
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: let sdpa take its plain causal path
        dev = self.device
        return (input_ids.to(dev), None if attention_mask is None else attention_mask.to(dev),
                None if position_ids is None else position_ids.to(dev), rows.to(dev), torch.cat(cols).to(dev),
                torch.tensor(targets, dtype=torch.long).to(dev))

    def _check(self, sequences):
        for k, (prompt, response) in enumerate(sequences):
            if len(response) and not len(prompt):
                raise ValueError(f"sequence {k}: empty prompt_ids, so its first response token has no context; "
                                 "score prompt + response with a non-empty prompt (e.g. the chat template)")
            for name, ids in (("prompt", prompt), ("response", response)):
                if len(ids) and not 0 <= min(ids) <= max(ids) < self.vocab_size:
                    raise ValueError(f"sequence {k}: {name} token id out of range for the teacher's vocabulary "
                                     f"(size {self.vocab_size}); do student and teacher share a tokenizer? "
                                     "(see check_tokenizers)")

    # ---- the pass -----------------------------------------------------------------------------------------
    def logprobs(self, sequences) -> list:
        """log pi_T(y_t | x, y_<t) for each (prompt_ids, response_ids): list of float32 CPU [len(response_ids)].

        Same order as `sequences`; an empty response gives an empty tensor. With shard=True this is a
        collective: every rank must call it, the same number of times (an empty list is fine).
        """
        start = time.perf_counter()
        seqs = [(_ids(p), _ids(r)) for p, r in sequences]
        self._check(seqs)
        lengths = [len(p) + len(r) - 1 if len(r) else 0 for p, r in seqs]
        batches = self._micro_batches(lengths)
        n_steps = len(batches)
        if self.shard:
            n_steps = self._agree(len(batches))
        if self.offload and not self.shard:
            self.scorer.to(self.device)
        try:
            out, slots, max_slots = self._run(seqs, batches, n_steps)
        finally:
            if self.offload and not self.shard:
                self.scorer.to("cpu")
        tokens = sum(lengths)
        self.last_stats = {"sequences": len(seqs), "tokens": tokens, "slots": slots, "max_slots": max_slots,
                           "pad_fraction": 1 - tokens / slots if slots else 0.0, "micro_batches": len(batches),
                           "dummy_batches": n_steps - len(batches), "seconds": time.perf_counter() - start}
        return out

    def _run(self, seqs, batches, n_steps):
        """Forward every micro-batch (then dummies up to n_steps); scatter the log-probs back to input order."""
        out = [torch.zeros(0) for _ in seqs]
        slots = max_slots = 0
        # Sharded: no_grad, the mode FSDP2 is built for (its all-gather buffers outlive a call and are refilled
        # in place by the next); inference_mode happens to pass the CPU test too, but is not relied on.
        with (torch.no_grad() if self.shard else torch.inference_mode()):
            for step in range(n_steps):
                if step >= len(batches):  # a rank with fewer micro-batches keeps the collectives in step
                    one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
                    empty = torch.zeros(0, dtype=torch.long, device=self.device)
                    self.scorer(one, None, None, empty, empty, empty)
                    continue
                batch = batches[step]
                inputs = self._inputs(seqs, batch)
                slots += inputs[0].numel()
                max_slots = max(max_slots, inputs[0].numel())
                flat = self.scorer(*inputs).cpu()  # [n] float32, one host sync per micro-batch
                for i, lp in zip(batch, flat.split([len(seqs[i][1]) for i in batch])):
                    out[i] = lp
        return out, slots, max_slots

    def _agree(self, n_local: int) -> int:
        """The number of micro-batches every rank runs: one all_reduce(MAX) across the process group."""
        import torch.distributed as dist
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        x = torch.tensor([n_local], device=dev)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return int(x[0])


# ---- a teacher served by vLLM -------------------------------------------------------------------------------
class VLLMTeacher:
    """The same `logprobs` interface, computed by a vLLM engine's prompt log-probs (`prompt_logprobs=0`).

    For a teacher that lives in its own vLLM engine (its own GPUs, tensor parallel): the engine scores
    prompt + response as one prompt and generates a single throw-away token. `model` is a path (then
    `llm_kwargs` go to `vllm.LLM`, e.g. dtype, max_model_len, tensor_parallel_size) or an `LLM` already built.
    Every sequence must fit the engine's max_model_len. vLLM's prompt log-probs equal transformers'
    log_softmax within ~5e-6 in float32 (../shared/VLLM_CPU.md; tests/test_teacher.py checks it).
    """

    def __init__(self, model, **llm_kwargs):
        from vllm import LLM
        self.llm = model if isinstance(model, LLM) else LLM(model=model, **llm_kwargs)
        self.last_stats = {}

    def logprobs(self, sequences) -> list:
        from vllm import SamplingParams
        start = time.perf_counter()
        seqs = [(_ids(p), _ids(r)) for p, r in sequences]
        if any(r and not p for p, r in seqs):
            raise ValueError("empty prompt_ids with a non-empty response: its first token has no context")
        todo = [i for i, (_, r) in enumerate(seqs) if r]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": seqs[i][0] + seqs[i][1]} for i in todo], params,
                                    use_tqdm=False) if todo else []
        out = [torch.zeros(0) for _ in seqs]
        for i, o in zip(todo, outputs):
            prompt, response = seqs[i]
            # prompt_logprobs[k] holds log p(token k | tokens < k) for the token actually at position k.
            per_pos = o.prompt_logprobs[len(prompt):len(prompt) + len(response)]
            out[i] = torch.tensor([lp[t].logprob for lp, t in zip(per_pos, response)], dtype=torch.float32)
        tokens = sum(len(p) + len(r) for p, r in seqs if r)
        self.last_stats = {"sequences": len(seqs), "tokens": tokens, "seconds": time.perf_counter() - start}
        return out

    def shutdown(self):
        """Stop the engine. In-process vLLM also destroys torch.distributed's default group: call it last."""
        self.llm.llm_engine.engine_core.shutdown()


# ---- tokenizer compatibility -------------------------------------------------------------------------------
_PROBES = [
    "Alice is a knight and Bob is a knave. So who is a knight?",
    "0 1 2 3 42 100 2026 3.14159 -7 1e-6 123456789",
    "Let x = \\frac{1}{2}; then \\boxed{\\sqrt{2}} and <think>reasoning</think> <answer>(1)</answer>",
    "Ünïcödé: café, naïve, 数学题, Ελληνικά, emoji \U0001F600, em-dash \u2014, tab\tand newline\n",
    "   leading spaces and trailing   ",
]


def check_tokenizers(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """Raise ValueError unless both tokenizers turn the same text into the same ids.

    Token-level distillation compares pi_S(y_t) and pi_T(y_t) for the same token id; across vocabularies
    that is meaningless. Probes: ASCII, digits, LaTeX, unicode, the student's chat template (its special
    tokens) and each special token on its own. Differently padded embedding matrices (Qwen3 sizes differ
    across the family) do not matter and are not compared.
    """
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    probes = list(_PROBES)
    if getattr(student_tokenizer, "chat_template", None):
        probes.append(student_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    probes.extend(student_tokenizer.all_special_tokens)
    for text in probes:
        s = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        t = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        if s != t:
            raise ValueError(f"tokenizer mismatch: student {student_name!r} and teacher {teacher_name!r} encode "
                             f"{text[:60]!r} differently ({s[:12]} vs {t[:12]}); token-level distillation needs "
                             "one shared tokenizer: pick a teacher from the student's model family")
    if student_tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        raise ValueError(f"tokenizer mismatch: student {student_name!r} eos id {student_tokenizer.eos_token_id} "
                         f"!= teacher {teacher_name!r} eos id {teacher_tokenizer.eos_token_id}")
