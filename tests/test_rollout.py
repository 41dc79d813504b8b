"""rollout.py on the real vLLM CPU engine: log-probs, weight sync (untied and tied), sleep/wake, HF agreement.

One vLLM engine per model (module-scoped, parametrised: untied then tied), fp32 so that vLLM and transformers
agree to ~1e-5. Tests that change the engine's weights put the original ones back before they return.

The sync tests sample prompts of several KV blocks (vLLM's block is 16 tokens) before and after each sync: a
prompt shorter than one block never hits vLLM's prefix cache, so a sync that kept KV computed with the old
weights (no prefix-cache reset) would pass them unnoticed.
"""
import copy
import os

import pytest
import torch

import rollout

TOL = 1e-4


@pytest.fixture(scope="module", params=["untied", "tied"])
def setup(request, tiny_model_dir, tiny_tied_model_dir):
    """(engine, hf_model, model_dir, environment before the engine, torch threads before)."""
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model_dir if request.param == "untied" else tiny_tied_model_dir
    env_before, threads_before = dict(os.environ), torch.get_num_threads()
    engine = rollout.VLLMEngine(model_dir, dtype="float32", max_model_len=256, seed=0, max_num_seqs=16,
                                kv_cache_memory_bytes=64 * 2**20)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    yield engine, hf, model_dir, env_before, threads_before
    engine.shutdown()


def prompts(tok):
    texts = ["Alice said that Bob is a knight.", "Solve: 2x + 1 = 2", "Who is a knave?"]
    return [tok(t)["input_ids"] for t in texts]  # different lengths: exercises left padding in HFEngine


def long_prompts(tok):
    """112, 136 and 157 tokens: 7 to 9 full KV blocks each, cached by vLLM after the first generate."""
    ids = tok(" ".join(["Alice said that Bob is a knight and Charlie is a knave. Who is a knave?"] * 40))["input_ids"]
    return [ids[i:i + n] for i, n in ((0, 112), (3, 136), (5, 157))]


def reference_logprobs(model, prompt, response, temperature=1.0):
    """transformers' log_softmax of the sampled tokens at `temperature`, the plain way."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature  # [R, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)  # [R]


def max_error(model, outputs, prompt_ids, temperature=1.0):
    errs = [(torch.tensor(s["logprobs"]) - reference_logprobs(model, p, s["response_ids"], temperature)).abs().max()
            .item() for p, samples in zip(prompt_ids, outputs) for s in samples]
    return max(errs)


def perturbed(model, seed=7, scale=0.3):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


def test_logprobs_are_those_of_the_sampling_distribution(setup, tiny_tokenizer):
    engine, hf, *_ = setup
    ps = prompts(tiny_tokenizer)
    # temperature 0.7: the returned log-probs are those of softmax(logits / 0.7), what the engine sampled from and
    # what the trainer computes (interface change: they used to be the raw, temperature-1 ones)
    out = engine.generate(ps, n=3, max_tokens=24, temperature=0.7, seed=1)
    assert [len(o) for o in out] == [3, 3, 3]
    assert all(len(s["logprobs"]) == len(s["response_ids"]) > 0 for o in out for s in o)
    assert max_error(hf, out, ps, temperature=0.7) < TOL
    assert max_error(hf, out, ps) > 0.01  # not the raw ones


def test_groups_as_they_finish_are_vllms_own_samples(setup, tiny_tokenizer):
    """generate_groups hands each prompt's group back when its last sample finishes, while the engine still generates
    the others (36 sequences, the engine runs 16 at once), and every sample is exactly what vLLM's own LLM.generate
    draws for the same requests and seeds: tokens and log-probs equal to the bit."""
    from vllm import SamplingParams
    engine, *_ = setup
    ps = prompts(tiny_tokenizer) * 3  # 9 prompts x 4 samples: more than the engine runs at once
    groups, in_flight = {}, []
    for i, samples in engine.generate_groups(ps, n=4, max_tokens=12, temperature=1.0, seed=7):
        groups[i] = samples
        in_flight.append(engine.llm.llm_engine.has_unfinished_requests())  # the others, still being generated
    assert sorted(groups) == list(range(len(ps))) and in_flight[0] and not in_flight[-1]
    params = [SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=7 + i * 4, logprobs=0, flat_logprobs=True,
                             detokenize=False) for i in range(len(ps))]
    with rollout.torch_threads(engine.engine_threads):
        direct = engine.llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    for i, out in enumerate(direct):
        want = sorted(out.outputs, key=lambda c: c.index)
        assert [s["response_ids"] for s in groups[i]] == [list(c.token_ids) for c in want]
        assert [s["logprobs"] for s in groups[i]] == [list(c.logprobs.logprobs) for c in want]
    assert engine.generate(ps, n=4, max_tokens=12, temperature=1.0, seed=7) == [groups[i] for i in range(len(ps))]
    stream = engine.generate_groups(ps, n=4, max_tokens=12, temperature=1.0, seed=7)
    next(stream)
    stream.close()  # a caller that stops early leaves no request behind
    assert not engine.llm.llm_engine.has_unfinished_requests()


def test_load_weights_follows_perturbed_model(setup, tiny_tokenizer):
    engine, hf, *_ = setup
    ps = long_prompts(tiny_tokenizer)
    assert max_error(hf, engine.generate(ps, n=2, max_tokens=24, seed=2), ps) < TOL  # fills the prefix cache
    new = perturbed(hf)
    # named_parameters() of a tied model has no lm_head.weight: the engine must tie it itself.
    engine.load_weights(new.named_parameters())
    out = engine.generate(ps, n=2, max_tokens=24, seed=2)
    assert max_error(new, out, ps) < TOL
    assert max_error(hf, out, ps) > 0.1  # the sync really changed the engine's model
    engine.load_weights(hf.named_parameters())
    assert max_error(hf, engine.generate(ps, n=2, max_tokens=24, seed=2), ps) < TOL


def test_state_dict_with_lm_head_also_syncs(setup, tiny_tokenizer):
    """A state_dict (tied models include lm_head.weight there) works as well as named_parameters()."""
    engine, hf, *_ = setup
    ps = long_prompts(tiny_tokenizer)
    engine.generate(ps, max_tokens=16, seed=3)  # the old weights' KV in the prefix cache
    new = perturbed(hf, seed=8)
    engine.load_weights(iter(new.state_dict().items()))
    assert max_error(new, engine.generate(ps, max_tokens=16, seed=3), ps) < TOL
    engine.load_weights(hf.named_parameters())


def test_partial_sync_is_refused(setup):
    engine, hf, *_ = setup
    some = [(n, p) for n, p in hf.named_parameters() if "layers.0." not in n]
    with pytest.raises(ValueError, match="layers.0"):
        engine.load_weights(some)
    with pytest.raises(RuntimeError, match="load_weights"):  # never generate from half-synced weights
        engine.generate([[1, 2, 3]], max_tokens=2)
    with pytest.raises(RuntimeError, match="load_weights"):  # half-synced weights are never woken
        engine.sleep()
        engine.wake()
    engine.load_weights(hf.named_parameters())
    engine.wake()


def test_wake_generates_with_latest_weights(setup, tiny_tokenizer):
    engine, hf, *_ = setup
    ps = long_prompts(tiny_tokenizer)
    engine.generate(ps, max_tokens=16, seed=4)  # the old weights' KV in the prefix cache
    new = perturbed(hf, seed=9)
    engine.sleep()
    with pytest.raises(RuntimeError, match="wake"):
        engine.generate(ps, max_tokens=4)
    engine.load_weights(new.named_parameters())  # the trainer syncs while the engine sleeps
    engine.wake()
    assert max_error(new, engine.generate(ps, max_tokens=16, seed=4), ps) < TOL
    # Sleep discards the weights (level 2, the only level: interface change): waking without a sync must refuse.
    engine.sleep()
    with pytest.raises(RuntimeError, match="load_weights"):
        engine.wake()
    engine.load_weights(hf.named_parameters())
    engine.wake()
    assert max_error(hf, engine.generate(ps, max_tokens=16, seed=4), ps) < TOL


def test_partial_wake_is_an_error_not_a_hang(setup, tiny_tokenizer):
    """vLLM's scheduler paused for real (sleep level 0, which CPU vLLM honours): wake() must notice and refuse
    instead of letting generate() wait forever on a scheduler that never runs."""
    engine, hf, *_ = setup
    engine.sleep()
    engine.llm.sleep(level=0)  # vLLM itself: scheduling paused, as after a partial wake_up
    engine.load_weights(hf.named_parameters())
    with pytest.raises(RuntimeError, match="still partly asleep after wake"):
        engine.wake()
    assert engine.llm.wake_up(tags=["scheduling"])  # vLLM's own resume; our wake() then goes through
    engine.sleep()
    engine.load_weights(hf.named_parameters())
    engine.wake()
    assert len(engine.generate(prompts(tiny_tokenizer), max_tokens=4, seed=1)) == 3


def test_other_vllm_versions_are_refused(monkeypatch, tiny_model_dir):
    import vllm
    rollout.check_vllm_version(vllm.__version__)  # the installed one is the tested one
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(RuntimeError, match=f"vllm 0.31.0 is installed.*pip install vllm=={rollout.TESTED_VLLM}"):
        rollout.VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 * 2**20)


def test_n_samples_max_tokens_and_seeds(setup, tiny_tokenizer):
    engine, *_ = setup
    ps = prompts(tiny_tokenizer)
    a = engine.generate(ps, n=4, max_tokens=6, temperature=1.0, seed=5)
    b = engine.generate(ps, n=4, max_tokens=6, temperature=1.0, seed=5)
    c = engine.generate(ps, n=4, max_tokens=6, temperature=1.0, seed=6)
    assert a == b  # seeded: identical ids, log-probs and finish reasons
    assert a != c
    for samples in a:
        assert len(samples) == 4
        assert len({tuple(s["response_ids"]) for s in samples}) > 1  # n samples are distinct draws
        for s in samples:
            assert s["finish_reason"] == ("stop" if s["response_ids"][-1] == tiny_tokenizer.eos_token_id
                                          else "length")
            assert len(s["response_ids"]) == 6 or s["finish_reason"] == "stop"
    # The same prompt twice in one call: independent samples, not copies.
    twice = engine.generate([ps[0], ps[0]], n=2, max_tokens=6, seed=5)
    assert twice[0] != twice[1]


def test_prompt_too_long_names_the_fix(setup):
    engine, *_ = setup
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[5] * 250], max_tokens=10)
    with pytest.raises(TypeError, match="token ids"):
        engine.generate(["a string prompt"], max_tokens=4)


def test_hf_engine_agrees_with_vllm_greedy(setup, tiny_tokenizer):
    engine, hf, model_dir, *_ = setup
    ps = prompts(tiny_tokenizer)
    hf_engine = rollout.HFEngine(model_dir, batch_size=2)  # 2 rows per batch: batches and padding both vary
    v = engine.generate(ps, n=2, max_tokens=16, temperature=0)
    h = hf_engine.generate(ps, n=2, max_tokens=16, temperature=0)
    for vs, hs in zip(v, h):
        assert vs[0]["response_ids"] == vs[1]["response_ids"]  # greedy: n copies of one answer
        for a, b in zip(vs, hs):
            assert a["response_ids"] == b["response_ids"]
            assert a["finish_reason"] == b["finish_reason"]
            torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=TOL, rtol=0)


def test_eos_stops_both_engines(setup, tiny_tokenizer):
    """Swap the output rows of the greedy first token and EOS: both engines must then stop at once with EOS."""
    engine, hf, *_ = setup
    eos = tiny_tokenizer.eos_token_id
    ps = [[x] * 4 for x in range(100, 110)]
    first = [o[0]["response_ids"][0] for o in engine.generate(ps, max_tokens=1, temperature=0)]
    # Tied: the swap also swaps two input embeddings, harmless while neither token is in the prompt.
    cases = [(p, t) for p, t in zip(ps, first) if t not in p and t != eos][:2]
    assert cases
    for p, t in cases:
        new = copy.deepcopy(hf)
        with torch.no_grad():
            out_emb = new.get_output_embeddings().weight  # [V, H]
            out_emb[[t, eos]] = out_emb[[eos, t]]
        engine.load_weights(new.named_parameters())
        for eng in (engine, rollout.HFEngine(new)):
            s = eng.generate([p], n=2, max_tokens=8, temperature=0)[0][0]
            assert s["response_ids"] == [eos] and s["finish_reason"] == "stop"
            assert abs(s["logprobs"][0] - reference_logprobs(new, p, [eos]).item()) < TOL
    engine.load_weights(hf.named_parameters())


def test_hf_engine_sampling_and_shared_module(setup, tiny_tokenizer):
    _, hf, *_ = setup
    ps = prompts(tiny_tokenizer)
    model = copy.deepcopy(hf).train()
    eng = rollout.HFEngine(model)
    assert eng.model is model  # shares the trainer's module
    a = eng.generate(ps, n=3, max_tokens=8, temperature=0.8, top_p=0.9, seed=11)
    rng_state = torch.get_rng_state()
    assert a == eng.generate(ps, n=3, max_tokens=8, temperature=0.8, top_p=0.9, seed=11)
    assert torch.equal(rng_state, torch.get_rng_state())  # a seeded call leaves the global RNG alone
    assert model.training  # and the trainer's module is back in train mode
    assert max_error(hf, a, ps, temperature=0.8) < TOL  # at the sampling temperature, as vLLM's (top-p left out)
    new = perturbed(hf, seed=12)
    eng.load_weights(new.state_dict().items())  # copies into the shared module (lm_head of tied is skipped)
    assert max_error(new, eng.generate(ps, max_tokens=8, seed=11), ps) < TOL


def test_engine_leaves_process_state_alone(setup):
    engine, _, _, env_before, threads_before = setup
    engine.generate([[1, 2, 3]], max_tokens=2)  # runs with vLLM's serving thread count, then puts ours back
    assert torch.get_num_threads() == threads_before
    assert torch.set_num_threads.__module__ == "torch"  # vLLM's no-op patch was undone
    for key in ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "TORCHINDUCTOR_COMPILE_THREADS"):
        assert os.environ.get(key) == env_before.get(key), key


def test_shutdown_is_idempotent_and_final(setup):
    engine, *_ = setup
    # A second engine would share vLLM's process-wide state with the fixture's; check on the fixture's own
    # engine instead: this is the last test of the file that uses it (the fixture's teardown shuts it again).
    engine.shutdown()
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        engine.generate([[1, 2, 3]], max_tokens=2)


def test_construction_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        rollout.VLLMEngine(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        rollout.HFEngine(str(tmp_path))
