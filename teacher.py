"""The teacher pass that training calls (train.py, step 6): log pi_T(y_t | x, y_<t) for every sampled response
token (with topk_kd also the teacher's k most likely tokens and their log-probs at each position), plus the start-up
checks that student and teacher share one tokenizer. In training, `submit(rows)` hands over each group as it finishes
(a served teacher sends it at once) and `finish()` sets every submitted row's teacher_logp (and top-k) at step 6;
`logprobs(...)` below is the standalone call (evaluation, tests).

KDRL (eq 2) and TRRD (eqs 3-5) need the teacher only through `logp_T[t]`, the log-probability of the token the
student sampled (docs/algorithm.md). So the local teacher is a frozen `policy.Policy`, scored by the same code as the
KL reference at the rollout temperature; ServedTeacher asks vLLM OpenAI servers for the same numbers. Both:
`teacher.logprobs([(prompt_ids, response_ids), ...])` -> one float32 [len(response_ids)] tensor per row.

Sharded (`shard=True`, under torchrun), `logprobs` is a collective: every rank calls it the same number of times,
even with an empty list. Offload (`offload=True`): the weights live in CPU memory between passes.
"""
import http.client
import itertools
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

import policy

class Teacher:
    """A frozen causal LM (a path / hub name, or an nn.Module) scoring given response tokens. token_budget: most
    padded tokens in one forward pass; temperature divides the logits, as the student's do. After each call
    `last_stats` holds sequences, tokens (real forward tokens) and policy.logprobs's stats (padding, micro-batches)."""

    def __init__(self, model, *, device=None, world=None, token_budget: int = 16384, shard: bool = False,
                 offload: bool = False, chunk_size: int = 1024, temperature: float = 1.0, mesh=None, topk: int = 0,
                 topk_vocab=None):
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        local = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(device or (local if torch.cuda.is_available() else "cpu"))
        self.token_budget = token_budget  # most padded tokens in one forward
        self.topk = topk  # > 0: finish() also sets each row's teacher_topk_ids / teacher_topk_logp
        # The top-k is chosen among ids below this, the student's vocabulary size (None: every id). A teacher of the
        # same family may have more embedding rows (DeepSeek-R1-Distill-Qwen-7B: 152064, its 1.5B: 151936); the
        # student could not score an id past its own, and the teacher's mass there counts in the tail bucket.
        self.topk_vocab = topk_vocab
        self.last_stats = {}  # what the last call did (sequences, tokens, padding, seconds)
        self.submitted = []  # rows waiting for finish()
        if shard and not dist.is_initialized():
            raise RuntimeError("Teacher(shard=True) needs torch.distributed initialised (run under torchrun and call "
                               "dist.init_process_group first), or use shard=False")
        world = world or (dist.get_world_size() if dist.is_initialized() else 1)
        self.model = policy.load(model, self.device, world, chunk=chunk_size, temperature=temperature, trainable=False,
                                 shard=shard, offload=offload, mesh=mesh)
        self.vocab_size = self.model.lm.get_output_embeddings().weight.shape[0]

    def submit(self, rows: list) -> None:
        """Queue rows (policy.Row) for finish(). A local teacher scores the step's rows together, after the rollout:
        it shares the GPU with the engine."""
        self.submitted.extend(rows)

    def finish(self) -> None:
        """Set teacher_logp of every submitted row (the trainer's rows: non-empty, ids checked against this vocabulary
        at start-up). Sharded, a collective: every rank calls it, even with no rows."""
        rows = sorted(self.submitted, key=lambda r: r.uid)  # step order: the same micro-batches however groups finished
        self.submitted = []
        start = time.perf_counter()
        outputs, stats = policy.logprobs(self.model, rows, self.token_budget, self.device, topk=self.topk,
                                         topk_vocab=self.topk_vocab)
        # One column per field: log-probs [n] (and with topk, the ids [n, k] and their log-probs [n, k]) of each row.
        columns = list(zip(*outputs)) if self.topk else [outputs]
        if not rows:  # nothing to copy (this rank still took part in the collective forwards)
            columns = []
        for field, column in zip(("teacher_logp", "teacher_topk_ids", "teacher_topk_logp"), columns):
            values = torch.cat(column).cpu().split([len(r.response) for r in rows])  # one host copy, not one per row
            for r, value in zip(rows, values):
                setattr(r, field, value)
        seconds = time.perf_counter() - start
        self.last_stats = dict(stats, sequences=len(rows), tokens=stats["unpadded"], seconds=seconds)

    def logprobs(self, sequences) -> list:
        """log pi_T(y_t | x, y_<t) for each (prompt_ids, response_ids): a list of float32 [len(response_ids)]."""
        rows = [policy.Row(prompt=_ids(p), response=_ids(r)) for p, r in sequences]
        for k, r in enumerate(rows):
            if r.response and not r.prompt:
                raise ValueError(f"sequence {k}: empty prompt_ids, so its first response token has no context; "
                                 "score prompt + response with a non-empty prompt (e.g. the chat template)")
            ids = r.prompt + r.response
            if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
                raise ValueError(f"sequence {k}: token id out of range for the teacher's vocabulary (size "
                                 f"{self.vocab_size}); do student and teacher share a tokenizer? (check_tokenizers)")
        todo = [r for r in rows if r.response]
        out, stats = policy.logprobs(self.model, todo, self.token_budget, self.device)
        self.last_stats = dict(stats, sequences=len(rows), tokens=stats["unpadded"])
        flat = torch.cat(out).float().cpu() if out else torch.zeros(0)  # one host copy per call, not one per row
        parts = iter(flat.split([len(r.response) for r in todo]))
        return [next(parts) if r.response else torch.zeros(0) for r in rows]

def _ids(ids) -> list:
    """Token ids as a list of ints, from a list or a 1-D tensor."""
    return ids.tolist() if torch.is_tensor(ids) else list(ids)

# ---- a served teacher -----------------------------------------------------------------------------------------
# vLLM's answer holds one `"logprob":<number>` per scored token; a JSON string cannot contain that text unescaped
# (its quotes would read \"), so one regex over the raw bytes finds them all, in order, 5x faster than json.loads
# and a comprehension (measured: 3.6 ms against 19 ms for 9.4K tokens; benchmarks/bench_served_teacher.py).
_LOGPROB = re.compile(rb'"logprob":(-?[0-9][0-9.eE+-]*)')

def check_served_temperature(temperature: float) -> None:
    if temperature != 1.0:
        raise ValueError(f"--temperature {temperature} with --teacher_url: vLLM's prompt log-probs are raw (at 1), the "
                         "student's at the rollout temperature: different distributions. Use --temperature 1, or a "
                         "local teacher (--teacher, without --teacher_url)")

class ServedTeacher:
    """The teacher behind vLLM OpenAI servers ("http://host:8000/v1,..."). A batch of rows (<= token_budget tokens) is
    one POST /completions of their ids with prompt_logprobs 0; request i of a step goes to replica (rank + i) mod n,
    max_in_flight at once. submit(rows) sends a group's requests at once when `stream` is on, so the server scores it
    while the engine still generates the next groups (else they wait for finish()); finish() waits for the answers,
    and a failure on any rank stops every rank together before the update. Checked at construction, before any
    weights load: each server answers, tokenizes the student's probes alike (/tokenize), takes max_len tokens."""

    def __init__(self, urls: str, tokenizer=None, *, temperature: float = 1.0, max_len: int = 0,
                 token_budget: int = 16384, max_in_flight: int = 8, timeout_s: float = 300.0, name: str = "student",
                 stream: bool = True, topk: int = 0, topk_vocab=None):
        check_served_temperature(temperature)
        self.urls = [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]
        self.token_budget = token_budget  # most tokens in one request
        self.max_in_flight = max_in_flight  # concurrent requests per rank
        self.timeout_s = timeout_s  # how long a failing request is retried
        self.stream = stream  # send each submitted group's requests at once
        self.topk = topk  # > 0: also each position's k most likely tokens (prompt_logprobs = k; vllm --max-logprobs)
        self.topk_vocab = topk_vocab  # the student's vocabulary size: a top-k id past it stops the run (see _score)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.models = {}  # url -> the served model's name
        self.last_stats = {}  # what the last step's requests did (sequences, tokens, requests, seconds)
        self.requests = []  # this step's (rows, future: None until sent)
        self.pending = []  # rows of the request being filled
        self.pending_tokens = 0  # their tokens
        self.pool = None  # this step's request threads
        self.started = 0.0  # when this step's first request was submitted
        self.warned = False  # the first failed request of this process printed its line
        error = ""
        try:
            for url in self.urls:
                info = json.loads(self._request([url], "/models"))["data"][0]
                self.models[url] = info["id"]
                if max_len and info.get("max_model_len", max_len) < max_len:
                    raise ValueError(f"served teacher {url}: max_model_len {info['max_model_len']} < {max_len} "
                                     f"(max_prompt_tokens + max_tokens): serve it with --max-model-len {max_len}")
                if tokenizer is not None:
                    encode = lambda text: json.loads(self._request(  # noqa: E731
                        [url], "/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"]
                    compare_encodings(tokenizer, encode, name, f"{url} ({info['id']})")
        except (OSError, ValueError, KeyError, IndexError) as e:
            error = str(e) if not isinstance(e, (KeyError, IndexError)) else f"served teacher {url}: odd answer {e!r}"
        self._stop_together(error)

    def _request(self, urls: list, path: str, body=None) -> bytes:
        """GET (no body) or POST JSON to url + path ("/tokenize" lives at the root, without /v1), retrying a timeout,
        a refused connection or a 5xx on the next url with exponential backoff until timeout_s has passed."""
        deadline, wait = time.monotonic() + self.timeout_s, 0.5
        for url in itertools.cycle(urls):
            target = (url.removesuffix("/v1") if path == "/tokenize" else url) + path
            data = None if body is None else json.dumps(dict(body, model=self.models.get(url))).encode()
            request = urllib.request.Request(target, data, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=max(deadline - time.monotonic(), 0.1)) as answer:
                    return answer.read()
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the server refused this request: retrying would not help
                    raise ValueError(f"served teacher {url}: HTTP {e.code} on {path}: "
                                     f"{e.read()[:300].decode(errors='replace')}".replace("\n", " ")) from None
                reason = f"HTTP {e.code}"
            except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short, timed out, no such host
                reason = str(getattr(e, "reason", e))
            if not self.warned:  # at once, not after timeout_s of silence: the user learns what the run waits for
                self.warned = True
                print(f"waiting for the served teacher at {url}: {reason} on {path}; retrying for up to "
                      f"{self.timeout_s:g} s (--teacher_timeout_s), then stopping", file=sys.stderr, flush=True)
            if time.monotonic() + wait > deadline:
                raise OSError(f"served teacher {url}: no answer on {path} within --teacher_timeout_s "
                              f"{self.timeout_s:g} ({reason}); is the server up (`vllm serve MODEL`)?")
            time.sleep(wait)
            wait = min(2 * wait, 30.0)

    def _stop_together(self, error: str) -> None:
        """Every rank learns whether any rank failed (one all_reduce) and all stop: no collective is left hanging."""
        if policy.reduce_ints([1 if error else 0], "sum")[0]:
            raise SystemExit(error or f"served teacher {','.join(self.urls)}: a request failed on another rank")

    def _score(self, i: int, rows: list) -> list:
        """Request i of the step: the log-probs of each row's response tokens ([n] per row; with topk, the triple
        (log-probs [n], the k most likely ids [n, k], their log-probs [n, k]) per row)."""
        start = (self.rank + i) % len(self.urls)
        raw = self._request(self.urls[start:] + self.urls[:start], "/completions",
                            {"prompt": [r.prompt + r.response for r in rows], "max_tokens": 1,
                             "prompt_logprobs": self.topk})
        if self.topk:  # k + 1 entries per position: the JSON parser it is (about 1 ms per 1,000 entries)
            choices = sorted(json.loads(raw)["choices"], key=lambda c: c["index"])
            if len(choices) != len(rows):
                raise ValueError(f"served teacher {self.urls[start]}: {len(choices)} answers for {len(rows)} sequences")
            out = [_topk(choice["prompt_logprobs"], r.response, self.topk) for choice, r in zip(choices, rows)]
            # The server ranks the teacher's whole vocabulary; a local Teacher takes its top-k among the student's ids.
            largest = max((int(ids.max()) for _, ids, _ in out if ids.numel()), default=-1)
            if self.topk_vocab and largest >= self.topk_vocab:
                raise ValueError(f"served teacher {self.urls[start]}: its top-{self.topk} holds token id {largest}, "
                                 f"past the student's vocabulary ({self.topk_vocab} ids): the teacher's embedding has "
                                 "more rows than the student's. A local teacher (--teacher, no --teacher_url) takes "
                                 "its top-k among the student's ids; kdrl and rlad read only the sampled token's "
                                 "log-prob")
            return out
        lens = [len(r.prompt) + len(r.response) - 1 for r in rows]  # every prompt token but the first has a log-prob
        flat = torch.tensor(list(map(float, _LOGPROB.findall(raw))), dtype=torch.float32)  # vLLM: -inf -> -9999
        if flat.numel() != sum(lens):
            raise ValueError(f"served teacher {self.urls[start]}: {flat.numel()} log-probs for {sum(lens)} tokens")
        return [logp[len(logp) - len(r.response):] for logp, r in zip(flat.split(lens), rows)]

    def submit(self, rows: list) -> None:
        """Score rows (policy.Row; each needs a non-empty prompt), a group at a time. A request holds consecutive rows
        up to token_budget tokens (a longer row goes alone) and closes when another group of this size would not
        fit; with `stream` it is sent then, while the engine still generates, else at finish(). The requests are the
        same either way, only their time differs."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.max_in_flight)
            self.started = time.perf_counter()
        rows = [r for r in rows if r.response]
        for r in rows:
            if self.pending and self.pending_tokens + len(r.prompt) + len(r.response) > self.token_budget:
                self._close_request()
            self.pending.append(r)
            self.pending_tokens += len(r.prompt) + len(r.response)
        added = sum(len(r.prompt) + len(r.response) for r in rows)
        if self.pending and self.pending_tokens + added > self.token_budget:  # a group like this one would not fit:
            self._close_request()  # the request goes now, not when the next group arrives

    def _close_request(self) -> None:
        """The pending rows become request i of the step: sent now when streaming, else at finish()."""
        future = self.pool.submit(self._score, len(self.requests), self.pending) if self.stream else None
        self.requests.append((self.pending, future))
        self.pending = []
        self.pending_tokens = 0

    def finish(self) -> None:
        """Send what is not sent yet, wait, and set teacher_logp of every submitted row. A collective: every rank
        calls it once per step, with or without rows of its own."""
        if self.pool is None:
            self.submit([])
        if self.pending:
            self._close_request()
        if not self.stream:  # the teacher's time starts with its first request, not with the first submit
            self.started = time.perf_counter()
        futures = [future or self.pool.submit(self._score, i, batch)
                   for i, (batch, future) in enumerate(self.requests)]
        error = ""
        try:
            for (batch, _), future in zip(self.requests, futures):
                for r, result in zip(batch, future.result()):
                    if self.topk:
                        r.teacher_logp, r.teacher_topk_ids, r.teacher_topk_logp = result
                    else:
                        r.teacher_logp = result
        except Exception as e:  # any failure on any rank stops every rank: none is left waiting in a collective
            error = str(e) if str(e).startswith("served teacher") else f"served teacher {self.urls[0]}...: {e!r}"
        finally:
            self.pool.shutdown(cancel_futures=True)  # requests not yet sent are dropped, not retried for timeout_s
        rows = [r for batch, _ in self.requests for r in batch]
        self.last_stats = {"sequences": len(rows), "tokens": sum(len(r.prompt) + len(r.response) for r in rows),
                           "requests": len(self.requests), "seconds": time.perf_counter() - self.started}
        self.requests = []
        self.pool = None
        self._stop_together(error)

    def logprobs(self, sequences) -> list:
        """Teacher.logprobs, as a collective: every rank calls it, with its own rows (even none)."""
        rows = [policy.Row(prompt=_ids(p), response=_ids(r)) for p, r in sequences]
        if any(r.response and not r.prompt for r in rows):
            raise ValueError("empty prompt_ids: the first response token has no context")
        self.submit(rows)
        self.finish()
        return [r.teacher_logp if r.teacher_logp is not None else torch.zeros(0) for r in rows]

def _topk(positions: list, response: list, k: int) -> tuple:
    """One sequence's prompt_logprobs (k > 0): each position holds the actual token and the k most likely, as
    {"id": {"logprob", "rank", ...}}. Returns, over the response positions, the actual tokens' log-probs [n] and the
    k most likely ids and their log-probs, [n, k] each, most likely first."""
    logp = []  # [n]
    ids = []  # [n, k]
    topk_logp = []  # [n, k]
    for token, entries in zip(response, positions[len(positions) - len(response):]):
        logp.append(entries[str(token)]["logprob"])
        best = sorted(entries.items(), key=lambda item: -item[1]["logprob"])[:k]  # the actual token may rank past k
        ids.append([int(token_id) for token_id, _ in best])
        topk_logp.append([entry["logprob"] for _, entry in best])
    return torch.tensor(logp), torch.tensor(ids, dtype=torch.long), torch.tensor(topk_logp)

# ---- tokenizer compatibility -------------------------------------------------------------------------------
_PROBES = ["Alice is a knight and Bob is a knave. So who is a knight?",
           "0 1 2 3 42 100 2026 3.14159 -7 1e-6 123456789",
           "Let x = \\frac{1}{2}; then \\boxed{\\sqrt{2}} and <think>reasoning</think> <answer>(1)</answer>",
           "Ünïcödé: café, naïve, 数学题, Ελληνικά, emoji \U0001F600, em-dash \u2014, tab\tand newline\n",
           "   leading spaces and trailing   "]

def check_tokenizers(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """Raise ValueError unless both tokenizers turn the same text into the same ids and share the eos id: token-level
    distillation compares pi_S(y_t) and pi_T(y_t) for the same token id, meaningless across vocabularies. Embedding
    matrices padded differently (Qwen3 sizes differ across the family) do not matter and are not compared."""
    compare_encodings(student_tokenizer, lambda text: teacher_tokenizer(text, add_special_tokens=False)["input_ids"],
                      student_name, teacher_name)
    if student_tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        raise ValueError(f"tokenizer mismatch: student {student_name!r} eos id {student_tokenizer.eos_token_id} "
                         f"!= teacher {teacher_name!r} eos id {teacher_tokenizer.eos_token_id}")

def compare_encodings(student_tokenizer, teacher_encode, student_name: str, teacher_name: str) -> None:
    """Raise ValueError unless teacher_encode(text) (ids, no special tokens added) equals the student's ids on every
    probe: _PROBES, the student's chat template (its special tokens) and each special token on its own."""
    probes = list(_PROBES)
    if getattr(student_tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
        probes.append(student_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    for text in probes + list(student_tokenizer.all_special_tokens):
        s = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        t = teacher_encode(text)
        if s != t:
            raise ValueError(f"tokenizer mismatch: student {student_name!r} and teacher {teacher_name!r} encode "
                             f"{text[:60]!r} differently ({s[:12]} vs {t[:12]}); token-level distillation needs "
                             "one shared tokenizer: pick a teacher from the student's model family")
