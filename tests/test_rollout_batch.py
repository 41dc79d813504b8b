"""Regression: seeded sampling of a batch bigger than one vLLM scheduler step, on the CPU engine.

With vLLM 0.32's chunked prefill a prompt split across steps rewinds its seeded generator, which CPU generators
cannot do, and the engine died with "CPU Generator does not use offset" (seen first with eval.py on 70 K&K
prompts x 4 samples). rollout.py turns chunked prefill off on CPU. This needs its own engine: the one in
test_rollout.py admits too few sequences per step to overflow the step's token budget.
"""
import rollout


def test_seeded_batch_larger_than_one_step(tiny_model_dir):
    engine = rollout.VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=512, seed=0, max_num_seqs=64,
                                kv_cache_memory_bytes=64 * 2**20)
    try:
        prompts = [[(7 * i + j) % 400 + 3 for j in range(300)] for i in range(12)]  # 48 requests x 300 > 4096
        first = engine.generate(prompts, n=4, max_tokens=4, temperature=0.8, seed=3)
        again = engine.generate(prompts, n=4, max_tokens=4, temperature=0.8, seed=3)
        other = engine.generate(prompts, n=4, max_tokens=4, temperature=0.8, seed=4)
    finally:
        engine.shutdown()
    ids = lambda out: [[s["response_ids"] for s in group] for group in out]  # noqa: E731
    assert len(first) == 12 and all(len(group) == 4 for group in first)
    assert ids(first) == ids(again)  # seeded: reproducible
    assert ids(first) != ids(other)
