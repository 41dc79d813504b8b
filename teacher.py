"""The teacher pass that training calls (train.py, step 6): log pi_T(y_t | x, y_<t) for every sampled response
token, and nothing more, plus the start-up checks that student and teacher share one tokenizer.

KDRL (eq 2) and TRRD (eqs 3-5) need the teacher only through `logp_T[t]`, the log-probability of the token the
student actually sampled (docs/algorithm.md, notation). So the local teacher is a frozen `policy.Policy`, loaded
and scored by the same code as the KL reference: its decoder runs over prompt + response, the LM head only over the
positions that predict response tokens, a chunk at a time (no float32 [T, V] tensor), in micro-batches of at most
`token_budget` padded tokens, at the rollout temperature (the distribution family the student samples from).

    teacher = Teacher("Qwen/Qwen3-8B", device=device, world=world, shard=True)   # bf16 on GPU, frozen
    check_tokenizers(student_tok, teacher_tok, "Qwen3-1.7B", "Qwen3-8B")          # once, at start-up
    logp_T = teacher.logprobs([(prompt_ids, response_ids), ...])                  # float32 [len(response)] each

Sharded (`shard=True`, under torchrun): FSDP2 splits the weights across ranks and every forward all-gathers one
layer at a time. That makes `logprobs` a collective: every rank calls it the same number of times, at the same
point of the program, even with an empty list (the ranks then agree on a micro-batch count inside the call).
Offload (`offload=True`): the weights live in CPU memory between passes.
"""
import os

import torch
import torch.distributed as dist

import policy


class Teacher:
    """A frozen causal LM that returns the log-probability of given response tokens (see the module docstring).

    model: a path / hub name, or an nn.Module. token_budget: most padded tokens in one forward pass.
    temperature: divides the logits, as the student's do (the same distribution family the student samples from).
    After each call `last_stats` holds sequences, tokens (real forward tokens), slots and max_slots (padded),
    pad_fraction, micro_batches and dummy_batches (the sharded ranks' padding).
    """

    def __init__(self, model, *, device=None, world=None, token_budget: int = 16384, shard: bool = False,
                 offload: bool = False, chunk_size: int = 1024, temperature: float = 1.0, mesh=None):
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
        self.token_budget = token_budget
        if shard and not dist.is_initialized():
            raise RuntimeError("Teacher(shard=True) needs torch.distributed initialised (run under torchrun and call "
                               "dist.init_process_group first), or use shard=False")
        world = world or (dist.get_world_size() if dist.is_initialized() else 1)
        self.model = policy.load(model, self.device, world, chunk_size, temperature, trainable=False, shard=shard,
                                 offload=offload, mesh=mesh)
        self.vocab_size = self.model.lm.get_output_embeddings().weight.shape[0]
        self.last_stats = {}

    def logprobs(self, sequences) -> list:
        """log pi_T(y_t | x, y_<t) for each (prompt_ids, response_ids): a list of float32 [len(response_ids)]."""
        rows = [{"prompt": _ids(p), "response": _ids(r)} for p, r in sequences]
        for k, r in enumerate(rows):
            if r["response"] and not r["prompt"]:
                raise ValueError(f"sequence {k}: empty prompt_ids, so its first response token has no context; "
                                 "score prompt + response with a non-empty prompt (e.g. the chat template)")
            ids = r["prompt"] + r["response"]
            if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
                raise ValueError(f"sequence {k}: token id out of range for the teacher's vocabulary (size "
                                 f"{self.vocab_size}); do student and teacher share a tokenizer? (check_tokenizers)")
        todo = [r for r in rows if r["response"]]
        out, stats = policy.score(self.model, todo, self.token_budget, self.device)
        self.last_stats = dict(stats, sequences=len(rows), tokens=stats["real"])
        flat = torch.cat(out).float().cpu() if out else torch.zeros(0)  # one host copy per call, not one per row
        parts = iter(flat.split([len(r["response"]) for r in todo]))
        return [next(parts) if r["response"] else torch.zeros(0) for r in rows]


def _ids(ids) -> list:
    """Token ids as a list of ints, from a list or a 1-D tensor."""
    return ids.tolist() if torch.is_tensor(ids) else list(ids)


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
