"""Tests of the memory-lean log-prob / entropy functions and the KL estimators in `maxent_rlhf.objectives`.

Reference values are either written out by hand (python floats and `math`) or computed with the naive
`gather(log_softmax(logits))`, which the memory-lean implementation must reproduce exactly.
"""
import math

import pytest
import torch

from maxent_rlhf import objectives as obj


def naive_token_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def naive_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------------------------------
# token_logprobs: hand values
# --------------------------------------------------------------------------------------------------
def test_token_logprobs_hand_values():
    # row [0, 0, ln 2]: softmax = [1/4, 1/4, 1/2]
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    out = obj.token_logprobs(logits, labels)
    assert out.tolist() == pytest.approx([math.log(0.5), math.log(0.25)], abs=1e-15)
    # temperature 2: logits / 2 = [0, 0, ln(2)/2] -> weights [1, 1, sqrt 2]
    out_t = obj.token_logprobs(logits, labels, temperature=2.0)
    z = 2.0 + math.sqrt(2.0)
    assert out_t.tolist() == pytest.approx([math.log(math.sqrt(2.0) / z), math.log(1.0 / z)], abs=1e-15)


def test_sequence_logprobs_hand_values():
    # uniform over 4 tokens: every token has log-prob -ln 4
    logits = torch.zeros(2, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2], [3, 3, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 0]])
    s = obj.sequence_logprobs(logits, labels, mask)
    assert s.tolist() == pytest.approx([-3 * math.log(4.0), -math.log(4.0)], abs=1e-14)
    a = obj.sequence_logprobs(logits, labels, mask, average=True)
    assert a.tolist() == pytest.approx([-math.log(4.0), -math.log(4.0)], abs=1e-14)


# --------------------------------------------------------------------------------------------------
# token_logprobs vs naive gather(log_softmax): dtypes, temperatures, chunk sizes, masks, gradients
# --------------------------------------------------------------------------------------------------
# 2 x 5 = 10 rows: chunk 1 (one row per chunk), 3 (does not divide 10), 5 (divides), 10 (exact), 1024 (> rows)
CHUNKS = [1, 3, 5, 10, 1024]
TEMPERATURES = [1.0, 0.7, 2.5]


def _make(dtype, batch=2, time=5, vocab=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(batch, time, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (batch, time), generator=g)
    return logits, labels


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_token_logprobs_matches_naive(dtype, tol, temperature, chunk_size):
    logits, labels = _make(dtype)
    out = obj.token_logprobs(logits, labels, temperature=temperature, chunk_size=chunk_size)
    ref = naive_token_logprobs(logits, labels, temperature)
    assert out.dtype == dtype and out.shape == labels.shape
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_token_logprobs_large_vocab_and_large_logits(dtype, tol):
    # a realistic vocabulary and logits of size ~30: still equal to the naive form
    g = torch.Generator().manual_seed(1)
    logits = (10.0 * torch.randn(3, 4, 5000, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, 5000, (3, 4), generator=g)
    for temperature in (1.0, 0.7):
        out = obj.token_logprobs(logits, labels, temperature=temperature, chunk_size=5)
        # float32 log-probs of size ~40: allow relative rounding of the result itself
        torch.testing.assert_close(out, naive_token_logprobs(logits, labels, temperature), atol=tol, rtol=tol)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_half_precision_upcasts(half, temperature):
    logits, labels = _make(half)
    out = obj.token_logprobs(logits, labels, temperature=temperature, chunk_size=3)
    assert out.dtype == torch.float32
    # exact up to float32 rounding against the naive form on the same (rounded) logits in float32
    torch.testing.assert_close(
        out, naive_token_logprobs(logits.float(), labels, temperature), atol=1e-5, rtol=1e-6
    )
    # loose against the naive form computed in half precision
    naive_half = naive_token_logprobs(logits, labels, temperature).float()
    torch.testing.assert_close(out, naive_half, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_gradient_equals_naive(temperature, chunk_size):
    logits, labels = _make(torch.float64, seed=3)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x1 = logits.clone().requires_grad_(True)
    (obj.token_logprobs(x1, labels, temperature=temperature, chunk_size=chunk_size) * upstream).sum().backward()
    x2 = logits.clone().requires_grad_(True)
    (naive_token_logprobs(x2, labels, temperature) * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)


def test_token_logprobs_gradient_float32_equals_naive():
    logits, labels = _make(torch.float32, seed=5)
    x1 = logits.clone().requires_grad_(True)
    obj.token_logprobs(x1, labels, temperature=0.7, chunk_size=3).sum().backward()
    x2 = logits.clone().requires_grad_(True)
    naive_token_logprobs(x2, labels, 0.7).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=0)


def test_token_logprobs_gradient_half_precision_and_accumulation():
    # bf16 logits: gradient in bf16, equal to the float32 naive gradient up to bf16 rounding;
    # logits used twice: the two gradients accumulate
    logits, labels = _make(torch.bfloat16, seed=14)
    x1 = logits.clone().requires_grad_(True)
    out = obj.token_logprobs(x1, labels, temperature=0.7, chunk_size=3)
    (out.sum() + 2.0 * obj.token_logprobs(x1, labels, chunk_size=4).sum()).backward()
    assert x1.grad.dtype == torch.bfloat16
    x2 = logits.float().requires_grad_(True)
    (naive_token_logprobs(x2, labels, 0.7).sum() + 2.0 * naive_token_logprobs(x2, labels).sum()).backward()
    torch.testing.assert_close(x1.grad.float(), x2.grad, atol=2e-2, rtol=1e-2)


def test_token_logprobs_gradient_flows_through_a_graph():
    # logits produced by a linear layer: the parameter gradient equals the naive one
    g = torch.Generator().manual_seed(15)
    h = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    w1 = w.clone().requires_grad_(True)
    obj.sequence_logprobs(h @ w1, labels, torch.ones(2, 4), temperature=1.3, chunk_size=3).sum().backward()
    w2 = w.clone().requires_grad_(True)
    naive_token_logprobs(h @ w2, labels, 1.3).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda w_: obj.token_logprobs(h @ w_, labels, 0.8, 5), (w1.detach().requires_grad_(True),))


def test_token_logprobs_no_grad_and_no_requires_grad():
    logits, labels = _make(torch.float32)
    with torch.no_grad():
        out = obj.token_logprobs(logits.requires_grad_(True), labels)
    assert not out.requires_grad
    assert not obj.token_logprobs(logits.detach(), labels).requires_grad


def test_token_logprobs_gradcheck():
    logits, labels = _make(torch.float64, batch=2, time=3, vocab=5, seed=6)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: obj.token_logprobs(x, labels, temperature=0.7, chunk_size=4), (logits,))


def test_token_logprobs_shifted_noncontiguous_logits():
    # the usual caller passes logits[:, :-1] (not viewable as [-1, V]); values and gradient unchanged
    logits, _ = _make(torch.float64, time=6, seed=7)
    labels = torch.randint(0, logits.shape[-1], (2, 5), generator=torch.Generator().manual_seed(8))
    x1 = logits.clone().requires_grad_(True)
    sliced = x1[:, :-1]
    assert not sliced.is_contiguous()
    out = obj.token_logprobs(sliced, labels, temperature=0.7, chunk_size=3)
    x2 = logits.clone().requires_grad_(True)
    ref = naive_token_logprobs(x2[:, :-1], labels, 0.7)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)


def test_token_logprobs_other_shapes():
    logits, labels = _make(torch.float64)
    # 1-D leading shape and a single position
    torch.testing.assert_close(
        obj.token_logprobs(logits[0], labels[0], chunk_size=2), naive_token_logprobs(logits[0], labels[0])
    )
    one = obj.token_logprobs(logits[0, 0], labels[0, 0])
    assert one.shape == () and one.item() == pytest.approx(naive_token_logprobs(logits[0, 0], labels[0, 0]).item())
    # empty leading shape
    empty = obj.token_logprobs(torch.zeros(0, 3, 7), torch.zeros(0, 3, dtype=torch.long))
    assert empty.shape == (0, 3)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_sequence_logprobs_matches_naive_with_masks(dtype, tol, temperature, chunk_size):
    logits, labels = _make(dtype, batch=3, time=5, seed=9)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    tok = naive_token_logprobs(logits, labels, temperature)
    # explicit per-row python sums over the masked positions
    expected_sum = [sum(tok[b, t].item() for t in range(5) if mask[b, t]) for b in range(3)]
    lengths = [int(mask[b].sum()) for b in range(3)]
    s = obj.sequence_logprobs(logits, labels, mask, temperature=temperature, chunk_size=chunk_size)
    a = obj.sequence_logprobs(logits, labels, mask.long(), temperature=temperature, average=True, chunk_size=chunk_size)
    assert s.tolist() == pytest.approx(expected_sum, abs=tol)
    assert a.tolist() == pytest.approx([v / n for v, n in zip(expected_sum, lengths)], abs=tol)


def test_sequence_logprobs_ignores_masked_positions():
    logits, labels = _make(torch.float64, seed=10)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 1]])
    base = obj.sequence_logprobs(logits, labels, mask)
    changed = logits.clone()
    changed[mask == 0] = 50.0 * torch.randn_like(changed[mask == 0])
    torch.testing.assert_close(obj.sequence_logprobs(changed, labels, mask), base, atol=1e-12, rtol=0)


def test_sequence_logprobs_gradient_equals_naive():
    logits, labels = _make(torch.float64, seed=11)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    x1 = logits.clone().requires_grad_(True)
    obj.sequence_logprobs(x1, labels, mask, temperature=0.7, average=True, chunk_size=3).sum().backward()
    x2 = logits.clone().requires_grad_(True)
    tok = naive_token_logprobs(x2, labels, 0.7)
    ((tok * mask).sum(-1) / mask.sum(-1)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)
    # masked positions receive exactly zero gradient
    assert bool((x1.grad[mask == 0] == 0).all())


# --------------------------------------------------------------------------------------------------
# token entropy
# --------------------------------------------------------------------------------------------------
def test_token_entropy_hand_values():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [5.0, 5.0, 5.0]], dtype=torch.float64)
    h = obj.token_entropy(logits)
    # [1/4, 1/4, 1/2]: H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2; uniform over 3: ln 3
    assert h.tolist() == pytest.approx([1.5 * math.log(2.0), math.log(3.0)], abs=1e-14)
    # temperature 2 on row 0: weights [1, 1, sqrt 2]
    z = 2.0 + math.sqrt(2.0)
    p = [1 / z, 1 / z, math.sqrt(2.0) / z]
    h_t = obj.token_entropy(logits[:1], temperature=2.0)
    assert h_t.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-14)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_token_entropy_matches_naive(dtype, tol, temperature, chunk_size):
    logits, _ = _make(dtype, seed=12)
    out = obj.token_entropy(logits, temperature=temperature, chunk_size=chunk_size)
    assert out.dtype == dtype and out.shape == logits.shape[:-1]
    torch.testing.assert_close(out, naive_entropy(logits, temperature), atol=tol, rtol=0)


def test_token_entropy_half_and_noncontiguous_and_gradient():
    logits, _ = _make(torch.float64, time=6, seed=13)
    out_bf16 = obj.token_entropy(logits.to(torch.bfloat16), chunk_size=4)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, naive_entropy(logits.to(torch.bfloat16).float()), atol=1e-5, rtol=1e-6)
    x1 = logits.clone().requires_grad_(True)
    e1 = obj.token_entropy(x1[:, 1:], temperature=0.7, chunk_size=4)
    x2 = logits.clone().requires_grad_(True)
    e2 = naive_entropy(x2[:, 1:], 0.7)
    torch.testing.assert_close(e1, e2, atol=1e-12, rtol=0)
    e1.sum().backward()
    e2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.3], dtype=torch.float64)
    d = [-0.5, 1.0, 0.0]  # log pi_ref - log pi
    assert obj.kl_estimate(logp, ref, "k1").tolist() == pytest.approx([-x for x in d], abs=1e-15)
    assert obj.kl_estimate(logp, ref, "k2").tolist() == pytest.approx([x * x / 2 for x in d], abs=1e-15)
    k3 = obj.kl_estimate(logp, ref, "k3")
    assert k3.tolist() == pytest.approx([math.exp(x) - 1 - x for x in d], abs=1e-15)
    assert obj.kl_estimate(logp, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])  # default k1


def test_kl_k3_nonnegative_and_k1_k3_unbiased_exactly():
    # exact expectations under pi on a small categorical: E[k1] = E[k3] = KL(pi || ref)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl = sum(p * math.log(p / q) for p, q in zip(pi.tolist(), ref.tolist()))
    for est in ("k1", "k3"):
        per_token = obj.kl_estimate(pi.log(), ref.log(), est)
        assert (pi * per_token).sum().item() == pytest.approx(kl, abs=1e-14)
    assert bool((obj.kl_estimate(pi.log(), ref.log(), "k3") >= 0).all())


# --------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument
# --------------------------------------------------------------------------------------------------
def test_logprob_bad_input():
    logits, labels = _make(torch.float32)
    mask = torch.ones_like(labels)
    with pytest.raises(ValueError, match="`labels`"):
        obj.token_logprobs(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="`mask`"):
        obj.sequence_logprobs(logits, labels, mask[:, :-1])
    with pytest.raises(ValueError, match="`mask`"):
        obj.sequence_logprobs(logits, labels, torch.zeros_like(labels))  # empty mask
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`temperature`"):
            obj.token_logprobs(logits, labels, temperature=bad)
        with pytest.raises(ValueError, match="`temperature`"):
            obj.sequence_logprobs(logits, labels, mask, temperature=bad)
        with pytest.raises(ValueError, match="`temperature`"):
            obj.token_entropy(logits, temperature=bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="`chunk_size`"):
            obj.token_logprobs(logits, labels, chunk_size=bad)
        with pytest.raises(ValueError, match="`chunk_size`"):
            obj.token_entropy(logits, chunk_size=bad)


def test_kl_bad_input():
    with pytest.raises(ValueError, match="`estimator`"):
        obj.kl_estimate(torch.zeros(3), torch.zeros(3), "k4")
    with pytest.raises(ValueError, match="`ref_logprobs`"):
        obj.kl_estimate(torch.zeros(3), torch.zeros(2), "k1")
