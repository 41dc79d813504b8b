"""A tied model whose embedding is not called embed_tokens (GPT-2: transformer.wte) stays in sync in vLLM.

vLLM on CPU keeps its own repacked copy of a tied LM head, refreshed only when lm_head.weight itself is streamed;
VLLMEngine feeds the model's input embedding under that name too. The embedding is found by the model class
(get_input_embeddings), not by a Qwen-style name: a GPT-2 head fed nothing would stay at the old weights. Its own
engine (a second model family), a tiny GPT2LMHeadModel: learned positions, head_dim 32 (vLLM CPU's list).
"""
import copy

import torch

import rollout

TOL = 1e-4


def logprob_error(model, outputs, prompts):
    errs = []
    for p, samples in zip(prompts, outputs):
        for s in samples:
            ids = torch.tensor([p + s["response_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, len(p) - 1:-1].float()  # [R, V]
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s["response_ids"])[:, None])[:, 0]
            errs.append((torch.tensor(s["logprobs"]) - want).abs().max().item())
    return max(errs)


def test_tied_gpt2_head_follows_a_sync(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = tiny_tokenizer
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_head=2, n_layer=2, n_positions=256, tie_word_embeddings=True,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = rollout.VLLMEngine(str(tmp_path), dtype="float32", max_model_len=256, seed=0, max_num_seqs=8,
                                kv_cache_memory_bytes=32 * 2**20)
    try:
        ps = [tok("Alice said that Bob is a knight.")["input_ids"], tok("Solve: 2x + 1 = 2")["input_ids"]]
        assert logprob_error(hf, engine.generate(ps, n=2, max_tokens=16, seed=1), ps) < TOL
        new = copy.deepcopy(hf)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        engine.sleep()
        engine.load_weights(new.named_parameters())  # no lm_head.weight: tied parameters are listed once
        engine.wake()
        out = engine.generate(ps, n=2, max_tokens=16, seed=1)
        assert logprob_error(new, out, ps) < TOL
        assert logprob_error(hf, out, ps) > 0.1  # the sync really moved the engine
    finally:
        engine.shutdown()
