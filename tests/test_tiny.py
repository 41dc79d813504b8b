"""tiny.py builds real models that transformers reloads bit for bit."""
import pytest
import torch


def test_tiny_model_roundtrip(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import tiny
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == model.config.vocab_size == len(tiny_tokenizer)
    text = "Alice is a knight ünïcode ∑ <answer>"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: every string round-trips
    fresh = tiny.make_model(tiny_tokenizer, seed=0)
    ids = torch.tensor([tok(text)["input_ids"]])
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)


def torch_default_violations(model, hidden: int) -> list:
    """Every way `model` (a tiny.make_gpt2 GPT-2) departs from PyTorch's per-module default init, [] if none.
    Each statistic may stray 5 standard errors for its tensor's size (any seed passes: checked on 300 seeds of the
    study's two sizes); a normal init at std 0.1 fails every module but the LayerNorms (embeddings std 0.1, not 1;
    weights past the bound or too wide or narrow; biases 0)."""
    import math
    from transformers.pytorch_utils import Conv1D
    bad, seen = [], set()

    def uniform(name, t, bound):  # U(-bound, bound): inside the bound, reaching near it, mean 0, std bound / sqrt(3)
        n, std = t.numel(), bound / math.sqrt(3)
        if t.abs().max() > bound or t.abs().max() < 0.8 * bound:  # P(all n below 0.8 bound) = 0.8^n <= 1e-6
            bad.append(f"{name}: max |x| {t.abs().max():.4f}, bound {bound:.4f}")
        if abs(t.mean()) > 5 * std / math.sqrt(n):
            bad.append(f"{name}: mean {t.mean():.4f}")
        if abs(t.std().item() / std - 1) > 5 * math.sqrt(0.8 / (4 * n)):  # the uniform's kurtosis is 1.8
            bad.append(f"{name}: std {t.std():.4f}, uniform's {std:.4f}")

    for name, module in model.named_modules():
        seen.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, torch.nn.Embedding):  # N(0, 1): wte 18 x hidden, wpe 64 x hidden
            w, n = module.weight, module.weight.numel()
            if abs(w.mean()) > 5 / math.sqrt(n) or abs(w.std() - 1) > 5 / math.sqrt(2 * n):
                bad.append(f"{name}: mean {w.mean():.3f} std {w.std():.3f}, want N(0, 1)")
        elif isinstance(module, Conv1D):  # weight [in, out]: fan_in is its first dimension
            bound = 1 / math.sqrt(module.weight.shape[0])
            uniform(name + ".weight", module.weight, bound)
            uniform(name + ".bias", module.bias, bound)
        elif isinstance(module, torch.nn.Linear):  # the head: [vocab, hidden], no bias
            if module.bias is not None:
                bad.append(f"{name}: has a bias")
            uniform(name + ".weight", module.weight, 1 / math.sqrt(hidden))
        elif isinstance(module, torch.nn.LayerNorm):
            if not (torch.equal(module.weight, torch.ones_like(module.weight))
                    and torch.equal(module.bias, torch.zeros_like(module.bias))):
                bad.append(f"{name}: not weight 1, bias 0")
    assert seen == {id(p) for p in model.parameters()}  # every parameter was looked at
    return bad


def test_gpt2_torch_default_init_per_module(tmp_path):
    """init="torch_default": embeddings N(0, 1), Conv1D weights and biases U(+-1/sqrt(in)), the bias-free head
    U(+-1/sqrt(hidden)), LayerNorms 1 and 0; seeded; saved and reloaded as is. The default stays GPT-2's normal
    scheme at std 0.1, which the same checks reject."""
    from transformers import AutoModelForCausalLM
    import tiny
    tok = tiny.make_arith_tokenizer()
    kinds = set()
    for seed, sizes in ((1, dict(hidden_size=64, num_layers=2, num_heads=2)),  # the study's student and teacher
                        (0, dict(hidden_size=96, num_layers=3, num_heads=3))):
        model = tiny.make_gpt2(tok, init="torch_default", seed=seed, **sizes)
        assert torch_default_violations(model, sizes["hidden_size"]) == []
        kinds |= {type(m).__name__ for m in model.modules() if list(m.parameters(recurse=False))}
        normal = tiny.make_gpt2(tok, seed=seed, **sizes)
        bad = torch_default_violations(normal, sizes["hidden_size"])
        for part in ("wte", "wpe", "lm_head", "c_attn.weight", "c_fc.weight", "c_proj.weight", "c_attn.bias"):
            assert any(part in b for b in bad), part  # N(0, 0.1) fails each module's check
    assert kinds == {"Embedding", "Conv1D", "Linear", "LayerNorm"}
    swapped = tiny.make_gpt2(tok, init="torch_default", seed=1)  # fan_in read as a Linear's: Conv1D's 2nd dim
    with torch.no_grad():
        for name, module in swapped.named_modules():
            if type(module).__name__ == "Conv1D":
                module.weight.uniform_(-module.weight.shape[1] ** -0.5, module.weight.shape[1] ** -0.5)
    bad = torch_default_violations(swapped, 64)
    assert all(any(part in b for b in bad) for part in ("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    same = tiny.make_gpt2(tok, init="torch_default", seed=1)
    other = tiny.make_gpt2(tok, init="torch_default", seed=2)
    again = tiny.make_gpt2(tok, init="torch_default", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), again.parameters()))
    assert not torch.equal(same.transformer.wte.weight, other.transformer.wte.weight)
    default = tiny.make_gpt2(tok, seed=1)  # unchanged: init="normal" at init_std 0.1
    explicit = tiny.make_gpt2(tok, init="normal", init_std=0.1, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), explicit.parameters()))
    assert default.transformer.wte.weight.std() < 0.12
    tied = tiny.make_gpt2(tok, init="torch_default", seed=1, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.transformer.wte.weight and abs(tied.lm_head.weight.std() - 1) < 0.1
    with pytest.raises(ValueError, match="init_std"):
        tiny.make_gpt2(tok, init="torch_default", init_std=0.1)
    with pytest.raises(ValueError, match="torch_default"):
        tiny.make_gpt2(tok, init="xavier")
    path = tiny.save_tiny(str(tmp_path / "gpt2"), tok, family="gpt2", init="torch_default", seed=1)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), loaded.state_dict().values()))
