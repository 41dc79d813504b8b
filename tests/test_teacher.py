"""teacher.py on tiny real Qwen3 models: batched log-probs equal a naive one-sequence full forward.

(Interface change: the teacher is a frozen policy.Policy now. Its packed one-row layout and the vLLM-backed
scorer are gone, and with them their tests: neither was used by train.py, and no measurement showed a gain.)"""
import pytest
import torch

import teacher
import tiny


def random_sequences(seed=0, count=12, max_prompt=20, max_response=40):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(count):
        p = torch.randint(0, 512, (int(torch.randint(1, max_prompt, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(0, 512, (int(torch.randint(1, max_response, (1,), generator=g)),), generator=g).tolist()
        seqs.append((p, r))
    seqs[3] = (seqs[3][0], [])  # an empty response
    seqs[5] = ([7, 8, 9], torch.randint(0, 512, (90,), generator=g).tolist())  # longer than the small budgets
    return seqs


def naive_logprobs(model, prompt, response):
    """The definition: one full forward of prompt + response, full log-softmax, pick the sampled tokens."""
    if not response:
        return torch.zeros(0)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]  # [P + R, V]
    logp = torch.log_softmax(logits.double(), dim=-1)[len(prompt) - 1:-1]  # [R, V]
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0].float()  # [R]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny.make_model(tiny_tokenizer, seed=0)


@pytest.fixture(scope="module")
def sequences():
    return random_sequences()


@pytest.fixture(scope="module")
def reference(model, sequences):
    return [naive_logprobs(model, p, r) for p, r in sequences]


@pytest.mark.parametrize("budget", [1, 32, 100, 16384])
def test_matches_naive_forward(model, sequences, reference, budget):
    t = teacher.Teacher(model, token_budget=budget, chunk_size=16)
    out = t.logprobs(sequences)
    assert [o.shape[0] for o in out] == [len(r) for _, r in sequences]
    for got, want in zip(out, reference):
        assert got.dtype == torch.float32 and got.device.type == "cpu" and not got.requires_grad
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    stats = t.last_stats
    assert stats["tokens"] == sum(len(p) + len(r) - 1 for p, r in sequences if r)
    longest = max(len(p) + len(r) - 1 for p, r in sequences)
    # Never over the budget, except a single sequence longer than it, which runs alone.
    assert stats["max_slots"] <= max(budget, longest)
    if budget == 1:
        assert stats["micro_batches"] == len([r for _, r in sequences if r])
    if budget == 16384:
        assert stats["micro_batches"] == 1
    assert 0.0 <= stats["pad_fraction"] < 1.0 and stats["slots"] >= stats["tokens"]


def test_order_preserved(model, sequences, reference):
    t = teacher.Teacher(model, token_budget=64)
    perm = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(1)).tolist()
    # Tensors are accepted as well as lists.
    out = t.logprobs([(torch.tensor(sequences[i][0]), torch.tensor(sequences[i][1])) for i in perm])
    for k, i in enumerate(perm):
        torch.testing.assert_close(out[k], reference[i], atol=1e-5, rtol=0)


def test_empty_inputs_and_bad_input(model):
    t = teacher.Teacher(model)
    assert t.logprobs([]) == []
    out = t.logprobs([([1, 2, 3], []), ([4], [])])
    assert [o.numel() for o in out] == [0, 0] and t.last_stats["micro_batches"] == 0
    with pytest.raises(ValueError, match="empty prompt_ids"):
        t.logprobs([([], [5, 6])])
    with pytest.raises(ValueError, match="out of range"):
        t.logprobs([([1, 2], [3, 512])])


def test_frozen_and_loaded_from_path(tiny_tied_model_dir, tiny_tokenizer):
    t = teacher.Teacher(tiny_tied_model_dir)
    lm = t.model.lm
    assert all(p.dtype == torch.float32 for p in lm.parameters()) and not lm.training
    assert not any(p.requires_grad for p in lm.parameters())
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # tied, like Qwen3-0.6B
    seqs = random_sequences(seed=3, count=6)
    with torch.enable_grad():
        out = t.logprobs(seqs)
    for (p, r), got in zip(seqs, out):
        torch.testing.assert_close(got, naive_logprobs(lm, p, r), atol=1e-5, rtol=0)


def test_tokenizer_check(tiny_tokenizer):
    same = tiny.make_tokenizer()
    teacher.check_tokenizers(tiny_tokenizer, same, "tiny-student", "tiny-teacher")
    other_corpus = tiny.make_tokenizer(corpus="The quick brown fox jumps over the lazy dog. 0123456789 " * 20)
    with pytest.raises(ValueError, match="tiny-student.*tiny-teacher"):
        teacher.check_tokenizers(tiny_tokenizer, other_corpus, "tiny-student", "tiny-teacher")
    smaller = tiny.make_tokenizer(vocab_size=400)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        teacher.check_tokenizers(tiny_tokenizer, smaller, "tiny-student", "tiny-teacher")


def test_padded_vocabulary_is_fine(tiny_tokenizer, model):
    """Same tokenizer, teacher embedding matrix padded to a larger vocabulary (as across the Qwen3 family)."""
    padded = tiny.make_model(tiny_tokenizer, seed=0)
    padded.resize_token_embeddings(576, mean_resizing=False)
    with torch.no_grad():  # rows for ids the tokenizer never produces
        padded.lm_head.weight[len(tiny_tokenizer):] = 0
    assert padded.config.vocab_size == 576 != model.config.vocab_size
    teacher.check_tokenizers(tiny_tokenizer, tiny.make_tokenizer(), "student", "padded-teacher")
    t = teacher.Teacher(padded, token_budget=64)
    seqs = random_sequences(seed=4, count=6)
    for (p, r), got in zip(seqs, t.logprobs(seqs)):
        torch.testing.assert_close(got, naive_logprobs(padded, p, r), atol=1e-5, rtol=0)


def test_finish_with_no_rows_is_a_no_op(model):
    """A rank whose every group was filtered still calls finish() (a collective when sharded): nothing to set."""
    for topk in (0, 4):
        t = teacher.Teacher(model, token_budget=64, topk=topk)
        t.submit([])
        t.finish()
        assert t.last_stats["sequences"] == 0 and t.last_stats["micro_batches"] == 0
