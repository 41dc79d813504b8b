"""tiny.py builds real models that transformers reloads bit for bit."""
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
