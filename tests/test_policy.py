"""policy.py: micro-batching, and the FSDP2 student's per-token log-probs against a plain float64 forward.

Real parts: a tiny Qwen3 from tiny.py, FSDP2 over a gloo process group of one (train.setup_distributed).
"""
import random

import pytest
import torch


@pytest.fixture(scope="module")
def device():
    import train
    return train.setup_distributed()[2]


def random_rows(n, seed, vocab=500):
    import policy
    rng = random.Random(seed)
    return [policy.Row(prompt=[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))],
                       response=[rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))], uid=i) for i in range(n)]


@pytest.mark.parametrize("budget", [1, 16, 40, 10_000])
def test_pack_keeps_every_row_once_within_the_budget(budget):
    import policy
    rows = random_rows(37, seed=budget)
    mbs = policy.pack(rows, budget)
    assert sorted(r.uid for mb in mbs for r in mb) == list(range(37))
    for mb in mbs:
        lens = [len(r.prompt) + len(r.response) - 1 for r in mb]  # the model's input length per row
        assert lens[0] == max(lens)  # the first row sets the padded width
        assert len(mb) == 1 or len(mb) * lens[0] <= budget  # a lone row may exceed the budget: it still runs
    if budget == 10_000:
        assert len(mbs) == 1


def test_collate_lays_out_rows_and_the_dummy(device):
    import policy
    rows = [policy.Row(prompt=[5, 6, 7], response=[8, 9], teacher_logp=torch.tensor([-1.0, -2.0]), adv=0.5,
                       correct=True),
            policy.Row(prompt=[5], response=[10, 11, 12, 13], teacher_logp=torch.tensor([-3.0, -4.0, -5.0, -6.0]),
                       adv=-1.0, correct=False)]
    b = policy.collate(rows, device)
    assert b["ids"].tolist() == [[5, 6, 7, 8], [5, 10, 11, 12]]  # the last response token is never an input
    assert b["attn"] is None  # both rows fill the width: no mask needed
    assert b["mask"].tolist() == [[True, True, False, False], [True, True, True, True]]
    assert b["teacher_logp"].tolist() == [[-1.0, -2.0, 0.0, 0.0], [-3.0, -4.0, -5.0, -6.0]]
    assert "old_logp" not in b  # a per-token field only where every row has it
    assert b["targets"].tolist() == [8, 9, 10, 11, 12, 13]
    assert b["src"].tolist() == [2, 3, 4, 5, 6, 7]  # the position that predicts each response token, [B * L] flat
    assert b["adv"].tolist() == [0.5, -1.0] and b["wrong"].tolist() == [False, True]
    assert (b["tokens"], b["unpadded"], b["slots"]) == (6, 8, 8)
    dummy = policy.collate([], device)  # a rank with no rows: one masked token, so its collectives still run
    assert not dummy["mask"].any() and (dummy["tokens"], dummy["unpadded"]) == (0, 0)
    assert set(policy.TOKEN_FIELDS) <= set(dummy)


def reference_logprobs(model_dir, rows, temperature):
    """Row by row (no padding), float64, full logits: what the chunked, padded, sharded path must equal."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r.prompt + r.response[:-1]])
            logits = lm(ids).logits[0, len(r.prompt) - 1:] / temperature  # [R, V]
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
            out.append((logp.gather(1, torch.tensor(r.response)[:, None])[:, 0], ent))
    return out


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_logprobs_and_entropy_equal_a_plain_forward(tiny_model_dir, device, chunk):
    import policy
    rows = random_rows(9, seed=chunk)
    model = policy.load(tiny_model_dir, device, 1, chunk=chunk, temperature=0.7)
    want = reference_logprobs(tiny_model_dir, rows, 0.7)
    for mb in policy.pack(rows, budget=40):  # several rows per micro-batch: right padding in play
        b = policy.collate(mb, device)
        lp, ent, _ = policy.forward(model, b)  # [B, R], [B, R]
        assert lp.shape == ent.shape == b["mask"].shape
        assert torch.all(lp[~b["mask"]] == 0)
        for i, r in enumerate(mb):
            n = len(r.response)
            assert torch.allclose(lp[i, :n].double(), want[r.uid][0], atol=2e-5), (chunk, r.uid)
            assert torch.allclose(ent[i, :n].double(), want[r.uid][1], atol=2e-5), (chunk, r.uid)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_gradients_equal_a_plain_forward_at_any_chunk_size(tiny_model_dir, device, entropy_grad):
    import policy
    from transformers import AutoModelForCausalLM
    rows = random_rows(6, seed=3)
    b = policy.collate(rows, device)
    weights = torch.randn(b["mask"].shape, generator=torch.Generator().manual_seed(0))  # [B, R]
    # reference: float64, row by row, full logits; the entropy term counts only when entropy_grad is on
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    loss = 0.0
    for i, r in enumerate(rows):
        logits = lm(torch.tensor([r.prompt + r.response[:-1]])).logits[0, len(r.prompt) - 1:]  # [R, V]
        logp = torch.log_softmax(logits, -1)
        n = len(r.response)
        loss = loss + (logp.gather(1, torch.tensor(r.response)[:, None])[:, 0] * weights[i, :n].double()).sum()
        if entropy_grad:
            loss = loss - (logp.exp() * logp).sum()
    loss.backward()
    want = {n: p.grad for n, p in lm.named_parameters()}
    for chunk in (3, 1024):  # 3 rows of the LM head at a time vs all at once
        model = policy.load(tiny_model_dir, device, 1, chunk=chunk)
        lp, ent, _ = policy.forward(model, b, entropy_grad=entropy_grad)  # [B, R], [B, R]
        ((lp * weights).sum() + ent.sum()).backward()
        got = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
        assert got.keys() == want.keys()
        for name in got:
            assert torch.allclose(got[name].double(), want[name], atol=1e-5, rtol=1e-4), (chunk, name)


def test_full_params_are_the_checkpoint_weights_under_hf_names(tiny_model_dir, device):
    import policy
    from transformers import AutoModelForCausalLM
    model = policy.load(tiny_model_dir, device, 1, trainable=False)
    assert not any(p.requires_grad for p in model.parameters())
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    want = dict(lm.named_parameters())
    got = dict(policy.full_params(model))
    assert got.keys() == want.keys() and "lm_head.weight" in got  # the names vLLM's load_weights expects
    for name, tensor in got.items():
        assert not hasattr(tensor, "full_tensor") and torch.equal(tensor, want[name]), name


def test_metrics_mean_total_and_max(device):
    """mean: sum of totals / sum of counts; total: the sum over ranks, averaged over `over` calls' worth (the loss of
    each optimizer step, averaged over the step's optimizer steps); max: the largest value. One process here (the
    2-rank sums are tests/test_train_dist.py's)."""
    import policy
    m = policy.Metrics()
    m.mean("reward", torch.tensor(3.0), 4)
    m.mean("reward", 1.0, 4)  # two calls: (3 + 1) / (4 + 4)
    m.total("kept_rows", 12)
    m.total("loss", torch.tensor(0.9), over=3)  # the summed shares of 3 optimizer steps
    m.mean("empty", 0.0, 0)  # present, 0 without a count
    m.max("time/step", 2.0)
    m.max("time/step", torch.tensor(5.0))
    m.max("time/step", 1.0)
    out = m.reduce(device)
    assert out == pytest.approx({"reward": 0.5, "kept_rows": 12.0, "loss": 0.3, "empty": 0.0, "time/step": 5.0})
