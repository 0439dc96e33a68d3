"""`maxent_rlhf.objectives`, every formula against a reference: the memory-lean log-prob / entropy
functions and the KL estimators; the offline preference losses; the online (RLOO) pieces; the
quantities behind the paper's curves.

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


# ==================================================================================================
# Offline preference losses of `maxent_rlhf.objectives` against hand-computed values (python floats and
# `math`, never the same torch expression), gradcheck in float64, and bad-input errors.
# ==================================================================================================
def logsig(x: float) -> float:
    """log sigma(x) with python floats."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def approx(values, tol=1e-12):
    return pytest.approx(values, abs=tol)


# --------------------------------------------------------------------------------------------------
# hand values
# --------------------------------------------------------------------------------------------------
def test_bradley_terry_hand():
    out = obj.bradley_terry_loss(t(1.0, -0.5), t(0.2, 0.5))
    assert out.losses.tolist() == approx([-logsig(0.8), -logsig(-1.0)])
    assert out.margins.tolist() == approx([0.8, -1.0])
    assert out.accuracies.tolist() == [1.0, 0.0]
    # p(chosen preferred) = exp(-loss)
    assert math.exp(-out.losses[0].item()) == pytest.approx(1 / (1 + math.exp(-0.8)))


def test_dpo_hand():
    out = obj.dpo_loss(t(-3.0, -5.0), t(-4.0, -4.5), t(-3.5, -4.0), t(-3.8, -4.2), beta=0.1)
    # chosen = 0.1 * (S_w - S_w^ref) = [0.05, -0.1]; rejected = 0.1 * (S_l - S_l^ref) = [-0.02, -0.03]
    assert out.chosen_rewards.tolist() == approx([0.05, -0.1])
    assert out.rejected_rewards.tolist() == approx([-0.02, -0.03])
    assert out.losses.tolist() == approx([-logsig(0.07), -logsig(-0.07)])
    assert out.margins.tolist() == approx([0.07, -0.07])
    assert out.accuracies.tolist() == [1.0, 0.0]


def test_simpo_hand_length_normalized_with_gamma():
    # A_w = [-6/3, -2/2] = [-2, -1]; A_l = [-9/3, -1/4] = [-3, -0.25]; beta = 2, gamma = 0.5
    out = obj.simpo_loss(t(-6.0, -2.0), t(-9.0, -1.0), t(3, 2), t(3, 4), beta=2.0, gamma=0.5)
    assert out.chosen_rewards.tolist() == approx([-4.0, -2.0])
    assert out.rejected_rewards.tolist() == approx([-6.0, -0.5])
    # logits = beta (A_w - A_l) - gamma = [2 - 0.5, -1.5 - 0.5]
    assert out.losses.tolist() == approx([-logsig(1.5), -logsig(-2.0)])


def test_simpo_hand_without_length_normalization():
    # beta * S: chosen [-12, -4], rejected [-18, -2]; gamma = 0
    out = obj.simpo_loss(t(-6.0, -2.0), t(-9.0, -1.0), t(3, 2), t(3, 4), beta=2.0, length_normalize=False)
    assert out.chosen_rewards.tolist() == approx([-12.0, -4.0])
    assert out.losses.tolist() == approx([-logsig(6.0), -logsig(-2.0)])
    # with gamma 0.25 and no normalisation
    out_g = obj.simpo_loss(t(-6.0), t(-9.0), t(3), t(3), beta=2.0, gamma=0.25, length_normalize=False)
    assert out_g.losses.tolist() == approx([-logsig(6.0 - 0.25)])
    # lengths are not used (and not validated) without normalisation
    out_z = obj.simpo_loss(t(-6.0), t(-9.0), t(0), t(0), beta=2.0, length_normalize=False)
    assert out_z.losses.tolist() == approx([-logsig(6.0)])


def test_ipo_hand():
    # rho_w = (-3 - -4) / 2 = 0.5, rho_l = (-5 - -4) / 4 = -0.25, h = 0.75, 1/(2 beta) = 1
    out = obj.ipo_loss(t(-3.0, -1.0), t(-5.0, -2.0), t(-4.0, -1.0), t(-4.0, -1.0), t(2, 1), t(4, 1), beta=0.5)
    assert out.losses.tolist() == approx([0.0625, 0.0])  # second: h = 0 - (-1) = 1 -> (1 - 1)^2
    assert out.chosen_rewards.tolist() == approx([0.25, 0.0])
    assert out.rejected_rewards.tolist() == approx([-0.125, -0.5])


def test_cpo_hand_with_and_without_nll():
    # -log sigma(0.5 * (-4 - -6)) + nll_coef * 4 / 2
    out = obj.cpo_loss(t(-4.0), t(-6.0), t(2), beta=0.5)
    assert out.losses.tolist() == approx([-logsig(1.0) + 2.0])
    out = obj.cpo_loss(t(-4.0), t(-6.0), t(2), beta=0.5, nll_coef=0.3)
    assert out.losses.tolist() == approx([-logsig(1.0) + 0.6])
    out0 = obj.cpo_loss(t(-4.0), t(-6.0), t(2), beta=0.5, nll_coef=0.0)
    assert out0.losses.tolist() == approx([-logsig(1.0)])
    assert out0.chosen_rewards.tolist() == approx([-2.0])
    assert out0.rejected_rewards.tolist() == approx([-3.0])


def test_orpo_hand():
    # A_w = -1/2, A_l = -3/2; log odds(A) = A - log(1 - e^A)
    lam = 0.1
    log_odds = (-0.5 - math.log(1 - math.exp(-0.5))) - (-1.5 - math.log(1 - math.exp(-1.5)))
    out = obj.orpo_loss(t(-1.0), t(-3.0), t(2), t(2), lam=lam)
    assert out.losses.tolist() == approx([0.5 - lam * logsig(log_odds)])
    assert out.chosen_rewards.tolist() == approx([-0.05])
    assert out.rejected_rewards.tolist() == approx([-0.15])


def test_orpo_finite_at_extremes():
    # A = 0 (certain response) and A very negative: log(1 - e^A) must stay finite, gradient too
    pc = t(0.0, -1e-9, -2000.0).requires_grad_(True)
    pr = t(-1.0, -1e-3, -3000.0)
    out = obj.orpo_loss(pc, pr, t(1, 1, 10), t(1, 1, 10), lam=0.5)
    assert bool(torch.isfinite(out.losses).all())
    out.losses.sum().backward()
    assert bool(torch.isfinite(pc.grad).all())
    # A_w = -200, A_l = -300: log(1 - e^A) ~ -e^A ~ 0, log odds ~ 100, sigma ~ 1
    assert out.losses[2].item() == pytest.approx(200.0, abs=1e-9)


def test_slic_hand():
    # hinge max(0, 1 - (-2) + (-2.5)) = 0.5, nll 0.1 * 2/2; second: hinge max(0, 1 - 4) = 0, nll 0.1 * 1/1
    out = obj.slic_loss(t(-2.0, -1.0), t(-2.5, -5.0), t(2, 1), delta=1.0, nll_coef=0.1)
    assert out.losses.tolist() == approx([0.6, 0.1])
    out = obj.slic_loss(t(-2.0), t(-2.5), t(2), delta=2.0, nll_coef=0.0)
    assert out.losses.tolist() == approx([1.5])


def test_chipo_hand():
    rho_w, rho_l, beta = 0.5, -0.3, 0.2
    r_w = beta * (math.exp(rho_w) + rho_w)
    r_l = beta * (math.exp(rho_l) + rho_l)
    out = obj.chipo_loss(t(-1.0 + rho_w), t(-2.0 + rho_l), t(-1.0), t(-2.0), beta=beta, reward_clip=1.0)
    assert out.chosen_rewards.tolist() == approx([r_w])
    assert out.rejected_rewards.tolist() == approx([r_l])
    assert out.losses.tolist() == approx([-logsig(r_w - r_l)])


def test_chipo_clipping():
    # beta (e + 1) - beta (e^-1 - 1) = 2 * 4.35 = 8.7 > 2 R = 2: clipped at +-2R, zero gradient there
    pc = t(1.0, -1.0, 0.1).requires_grad_(True)
    pr = t(-1.0, 1.0, 0.0)
    out = obj.chipo_loss(pc, pr, t(0, 0, 0), t(0, 0, 0), beta=2.0, reward_clip=1.0)
    inner = 2.0 * ((math.exp(0.1) + 0.1) - (1.0 + 0.0))
    assert abs(inner) < 2.0
    assert out.losses.tolist() == approx([-logsig(2.0), -logsig(-2.0), -logsig(inner)])
    out.losses.sum().backward()
    assert pc.grad[0].item() == 0.0 and pc.grad[1].item() == 0.0
    assert pc.grad[2].item() != 0.0
    # a different clip value
    out_r = obj.chipo_loss(t(1.0), t(-1.0), t(0), t(0), beta=2.0, reward_clip=3.0)
    assert out_r.losses.tolist() == approx([-logsig(6.0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chipo_no_overflow_at_large_log_ratios(dtype):
    R = 1.0
    rho_w = torch.tensor([1000.0, -1000.0, 40.0, 35.0, 500.0, 95.0], dtype=dtype, requires_grad=True)
    rho_l = torch.tensor([0.0, 0.0, 35.0, 40.0, -500.0, 90.0], dtype=dtype)
    zeros = torch.zeros(6, dtype=dtype)
    out = obj.chipo_loss(rho_w, rho_l, zeros, zeros, beta=0.1, reward_clip=R)
    assert bool(torch.isfinite(out.losses).all())
    assert bool(torch.isfinite(out.chosen_rewards).all()) and bool(torch.isfinite(out.rejected_rewards).all())
    # true logit beta (e^rho_w + rho_w - e^rho_l - rho_l) is astronomically large with the sign of rho_w - rho_l
    expected = [-logsig(2 * R), -logsig(-2 * R), -logsig(2 * R), -logsig(-2 * R), -logsig(2 * R), -logsig(2 * R)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    out.losses.sum().backward()
    assert bool(torch.isfinite(rho_w.grad).all())


def _pl_hand(scores):
    """-sum_k log(exp(s_k) / sum_{j>=k} exp(s_j)) with python floats."""
    total = 0.0
    for k in range(len(scores)):
        total -= scores[k] - math.log(sum(math.exp(s) for s in scores[k:]))
    return total


def test_simpo_plackett_luce_hand():
    logps = t(-2.0, -4.0, -3.0).reshape(1, 3)
    lengths = t(1, 2, 1).reshape(1, 3)
    beta = 1.5
    a = [-2.0, -2.0, -3.0]
    loss = obj.simpo_plackett_luce_loss(logps, lengths, beta=beta)
    assert loss.tolist() == approx([_pl_hand([beta * x for x in a])])
    # gamma: score of rank k shifted down by gamma (K - 1 - k)
    loss_g = obj.simpo_plackett_luce_loss(logps, lengths, beta=beta, gamma=0.5)
    assert loss_g.tolist() == approx([_pl_hand([beta * a[0] - 1.0, beta * a[1] - 0.5, beta * a[2]])])
    # no length normalisation: scores beta * S
    loss_n = obj.simpo_plackett_luce_loss(logps, lengths, beta=beta, length_normalize=False)
    assert loss_n.tolist() == approx([_pl_hand([beta * -2.0, beta * -4.0, beta * -3.0])])


def test_simpo_plackett_luce_k2_equals_simpo():
    g = torch.Generator().manual_seed(0)
    pc, pr = -5 * torch.rand(4, generator=g, dtype=torch.float64), -5 * torch.rand(4, generator=g, dtype=torch.float64)
    lc, lr = t(1, 2, 3, 4), t(4, 3, 2, 1)
    for ln in (True, False):
        pl = obj.simpo_plackett_luce_loss(torch.stack([pc, pr], 1), torch.stack([lc, lr], 1), 2.0, 0.7, ln)
        pair = obj.simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.7, length_normalize=ln).losses
        torch.testing.assert_close(pl, pair, atol=1e-12, rtol=0)


def test_sft_loss_hand():
    assert obj.sft_loss(t(-6.0, -1.0), t(3, 2)).tolist() == approx([2.0, 0.5])


# --------------------------------------------------------------------------------------------------
# gradcheck in float64 (random inputs away from kinks)
# --------------------------------------------------------------------------------------------------
def _rand(n, seed, low=-8.0, high=-0.5):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(True)


LENGTHS_W = t(3, 5, 2, 7)
LENGTHS_L = t(4, 1, 6, 2)

GRADCHECK_CASES = {
    "bradley_terry": (lambda a, b, c, d: obj.bradley_terry_loss(a, b).losses),
    "dpo": (lambda a, b, c, d: obj.dpo_loss(a, b, c, d, beta=0.3).losses),
    "simpo_ln": (lambda a, b, c, d: obj.simpo_loss(a, b, LENGTHS_W, LENGTHS_L, beta=2.0, gamma=0.5).losses),
    "simpo_raw": (
        lambda a, b, c, d: obj.simpo_loss(a, b, LENGTHS_W, LENGTHS_L, beta=0.5, gamma=0.2, length_normalize=False).losses
    ),
    "ipo": (lambda a, b, c, d: obj.ipo_loss(a, b, c, d, LENGTHS_W, LENGTHS_L, beta=0.1).losses),
    "cpo": (lambda a, b, c, d: obj.cpo_loss(a, b, LENGTHS_W, beta=0.5, nll_coef=1.0).losses),
    "cpo_no_nll": (lambda a, b, c, d: obj.cpo_loss(a, b, LENGTHS_W, beta=0.5, nll_coef=0.0).losses),
    "orpo": (lambda a, b, c, d: obj.orpo_loss(a, b, LENGTHS_W, LENGTHS_L, lam=0.3).losses),
    "slic": (lambda a, b, c, d: obj.slic_loss(a, b, LENGTHS_W, delta=1.0, nll_coef=0.1).losses),
    "chipo": (lambda a, b, c, d: obj.chipo_loss(a, b, c, d, beta=0.05, reward_clip=5.0).losses),
    "sft": (lambda a, b, c, d: obj.sft_loss(a, LENGTHS_W)),
    "simpo_pl": (
        lambda a, b, c, d: obj.simpo_plackett_luce_loss(
            torch.stack([a, b, c, d], 1), torch.stack([LENGTHS_W, LENGTHS_L, LENGTHS_W, LENGTHS_L], 1), 2.0, 0.3
        )
    ),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_loss_gradcheck(name):
    fn = GRADCHECK_CASES[name]
    inputs = tuple(_rand(4, seed) for seed in range(4))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_slic_gradcheck_hinge_active_and_inactive():
    # one pair inside the margin (hinge active), one far outside (only the NLL term)
    a = t(-2.0, -1.0).requires_grad_(True)
    b = t(-2.4, -6.0).requires_grad_(True)
    fn = lambda x, y: obj.slic_loss(x, y, t(2, 1), delta=1.0, nll_coef=0.1).losses  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))


def test_chipo_gradcheck_near_large_ratios():
    # log-ratios around and beyond the exponent cap, with a reward clip large enough not to saturate
    # (beta = 1e-12 keeps beta * (e^29 - e^28.9) ~ 0.37 inside the clip)
    a = t(29.0, -3.0).requires_grad_(True)
    b = t(28.9, -3.1).requires_grad_(True)
    zeros = t(0.0, 0.0)
    fn = lambda x, y: obj.chipo_loss(x, y, zeros, zeros, beta=1e-12, reward_clip=100.0).losses  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_loss_bad_shapes():
    a, b3 = t(-1.0, -2.0), t(-1.0, -2.0, -3.0)
    L = t(1, 1)
    with pytest.raises(ValueError, match="`rejected_scores`"):
        obj.bradley_terry_loss(a, b3)
    with pytest.raises(ValueError, match="`ref_rejected_logps`"):
        obj.dpo_loss(a, a, a, b3, beta=0.1)
    with pytest.raises(ValueError, match="`policy_rejected_logps`"):
        obj.simpo_loss(a, b3, L, t(1, 1, 1), beta=1.0)
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        obj.simpo_loss(a, a, t(1, 1, 1), L, beta=1.0)
    with pytest.raises(ValueError, match="`ref_chosen_logps`"):
        obj.ipo_loss(a, a, b3, a, L, L, beta=0.1)
    with pytest.raises(ValueError, match="`rejected_lengths`"):
        obj.ipo_loss(a, a, a, a, L, t(1, 1, 1), beta=0.1)
    with pytest.raises(ValueError, match="`policy_rejected_logps`"):
        obj.cpo_loss(a, b3, L, beta=0.1)
    with pytest.raises(ValueError, match="`policy_rejected_logps`"):
        obj.orpo_loss(a, b3, L, t(1, 1, 1))
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        obj.slic_loss(a, a, t(1, 1, 1))
    with pytest.raises(ValueError, match="`ref_rejected_logps`"):
        obj.chipo_loss(a, a, a, b3, beta=0.1)
    with pytest.raises(ValueError, match="`ranked_lengths`"):
        obj.simpo_plackett_luce_loss(torch.zeros(2, 3), torch.ones(2, 2), beta=1.0)


def test_loss_zero_lengths_named():
    a, L, Z = t(-1.0, -2.0), t(1, 2), t(1, 0)
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        obj.simpo_loss(a, a, Z, L, beta=1.0)
    with pytest.raises(ValueError, match="`rejected_lengths`"):
        obj.simpo_loss(a, a, L, Z, beta=1.0)
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        obj.ipo_loss(a, a, a, a, Z, L, beta=0.1)
    with pytest.raises(ValueError, match="`rejected_lengths`"):
        obj.ipo_loss(a, a, a, a, L, Z, beta=0.1)
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        obj.cpo_loss(a, a, Z, beta=0.1)
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        obj.cpo_loss(a, a, Z, beta=0.1, nll_coef=0.0)
    with pytest.raises(ValueError, match="`rejected_lengths`"):
        obj.orpo_loss(a, a, L, t(-1, 2))
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        obj.slic_loss(a, a, Z)
    with pytest.raises(ValueError, match="`ranked_lengths`"):
        obj.simpo_plackett_luce_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0]]), beta=1.0)
    with pytest.raises(ValueError, match="`lengths`"):
        obj.sft_loss(a, Z)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_loss_non_positive_beta(bad):
    a, L = t(-1.0, -2.0), t(1, 2)
    calls = [
        lambda: obj.dpo_loss(a, a, a, a, beta=bad),
        lambda: obj.simpo_loss(a, a, L, L, beta=bad),
        lambda: obj.ipo_loss(a, a, a, a, L, L, beta=bad),
        lambda: obj.cpo_loss(a, a, L, beta=bad),
        lambda: obj.chipo_loss(a, a, a, a, beta=bad),
        lambda: obj.simpo_plackett_luce_loss(torch.zeros(2, 2), torch.ones(2, 2), beta=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="`beta`"):
            call()
    with pytest.raises(ValueError, match="`reward_clip`"):
        obj.chipo_loss(a, a, a, a, beta=0.1, reward_clip=bad)


def test_plackett_luce_needs_k_ge_2():
    with pytest.raises(ValueError, match="`ranked_logps`"):
        obj.simpo_plackett_luce_loss(torch.zeros(2, 1), torch.ones(2, 1), beta=1.0)
    with pytest.raises(ValueError, match="`ranked_logps`"):
        obj.simpo_plackett_luce_loss(torch.zeros(3), torch.ones(3), beta=1.0)
    with pytest.raises(ValueError, match="`ranked_scores`"):
        obj.plackett_luce_log_likelihood(torch.zeros(4, 1))


# ==================================================================================================
# Online (RLOO) pieces of `maxent_rlhf.objectives`: regularised reward, leave-one-out advantages,
# whitening and the PPO clipped policy loss, against hand values and explicit python loops.
# ==================================================================================================
# --------------------------------------------------------------------------------------------------
# regularised reward
# --------------------------------------------------------------------------------------------------
SCORES = t(1.0, 2.0)
LOGPROBS = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -7.0]], dtype=torch.float64)  # [1, 2] is padding
REF = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -9.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_regularized_reward_kl():
    out = obj.regularized_reward(SCORES, LOGPROBS, MASK, "kl", 0.1, ref_logprobs=REF)
    # sum of (log pi - log pi_ref) over the response: row 0: 0.5 - 1 + 0 = -0.5; row 1: 0.5 + 0.5 = 1
    assert out.non_score_reward.tolist() == approx([0.05, -0.1])
    assert out.rewards.tolist() == approx([1.05, 1.9])


def test_regularized_reward_entropy():
    out = obj.regularized_reward(SCORES, LOGPROBS, MASK, "entropy", 0.1)
    # log pi(y|x): row 0 = -6, row 1 = -1 (padding excluded); r - alpha log pi
    assert out.non_score_reward.tolist() == approx([0.6, 0.1])
    assert out.rewards.tolist() == approx([1.6, 2.1])


def test_regularized_reward_entropy_length_normalized():
    out = obj.regularized_reward(SCORES, LOGPROBS, MASK, "entropy", 0.1, length_normalize=True)
    # Eq. 7: r - (alpha / |y|) log pi: row 0: -6 / 3 = -2; row 1: -1 / 2 = -0.5
    assert out.non_score_reward.tolist() == approx([0.2, 0.05])
    assert out.rewards.tolist() == approx([1.2, 2.05])


def test_regularized_reward_negative_alpha_is_minimum_entropy():
    out = obj.regularized_reward(SCORES, LOGPROBS, MASK, "entropy", -0.1)
    assert out.non_score_reward.tolist() == approx([-0.6, -0.1])
    assert out.rewards.tolist() == approx([0.4, 1.9])
    out_ln = obj.regularized_reward(SCORES, LOGPROBS, MASK, "entropy", -0.1, length_normalize=True)
    assert out_ln.rewards.tolist() == approx([0.8, 1.95])


def test_regularized_reward_none():
    out = obj.regularized_reward(SCORES, LOGPROBS, MASK, "none", 0.3)
    assert out.rewards.tolist() == approx([1.0, 2.0])
    assert out.non_score_reward.tolist() == approx([0.0, 0.0])


def test_regularized_reward_ignores_padding_values():
    lp, ref = LOGPROBS.clone(), REF.clone()
    lp[1, 2], ref[1, 2] = -123.0, 45.0
    for reg in ("kl", "entropy"):
        a = obj.regularized_reward(SCORES, LOGPROBS, MASK, reg, 0.1, ref_logprobs=REF).rewards
        b = obj.regularized_reward(SCORES, lp, MASK, reg, 0.1, ref_logprobs=ref).rewards
        torch.testing.assert_close(a, b)


def test_regularized_reward_bad_input():
    with pytest.raises(ValueError, match="`regularizer`"):
        obj.regularized_reward(SCORES, LOGPROBS, MASK, "kl_uniform", 0.1)
    with pytest.raises(ValueError, match="`ref_logprobs`"):
        obj.regularized_reward(SCORES, LOGPROBS, MASK, "kl", 0.1)
    with pytest.raises(ValueError, match="`ref_logprobs`"):
        obj.regularized_reward(SCORES, LOGPROBS, MASK, "kl", 0.1, ref_logprobs=REF[:, :2])
    with pytest.raises(ValueError, match="`response_mask`"):
        obj.regularized_reward(SCORES, LOGPROBS, MASK[:, :2], "none", 0.1)
    with pytest.raises(ValueError, match="`scores`"):
        obj.regularized_reward(t(1.0, 2.0, 3.0), LOGPROBS, MASK, "none", 0.1)
    empty_row = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="`response_mask`"):
        obj.regularized_reward(SCORES, LOGPROBS, empty_row, "entropy", 0.1, length_normalize=True)


# --------------------------------------------------------------------------------------------------
# RLOO advantages
# --------------------------------------------------------------------------------------------------
def rloo_loop(rewards):
    out = []
    for row in rewards:
        k = len(row)
        out.append([row[i] - sum(row[j] for j in range(k) if j != i) / (k - 1) for i in range(k)])
    return out


@pytest.mark.parametrize("k", [2, 3, 5])
def test_rloo_advantages_match_loop(k):
    g = torch.Generator().manual_seed(k)
    rewards = torch.randn(4, k, generator=g, dtype=torch.float64)
    adv = obj.rloo_advantages(rewards)
    expected = rloo_loop(rewards.tolist())
    for got, want in zip(adv.tolist(), expected):
        assert got == approx(want)
    # k / (k - 1) (r - mean r): zero-sum per prompt
    assert adv.sum(1).abs().max().item() < 1e-12


def test_rloo_advantages_hand():
    adv = obj.rloo_advantages(t(1.0, 3.0, 8.0).reshape(1, 3))
    # baselines (3 + 8) / 2, (1 + 8) / 2, (1 + 3) / 2
    assert adv.tolist() == [approx([1.0 - 5.5, 3.0 - 4.5, 8.0 - 2.0])]
    assert obj.rloo_advantages(t(2.0, -1.0).reshape(1, 2)).tolist() == [approx([3.0, -3.0])]


def test_rloo_bad_input():
    with pytest.raises(ValueError, match="`rewards`.*k >= 2"):
        obj.rloo_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="`rewards`"):
        obj.rloo_advantages(torch.zeros(6))


# --------------------------------------------------------------------------------------------------
# whiten
# --------------------------------------------------------------------------------------------------
def test_whiten_hand():
    x = t(1.0, 2.0, 3.0, 6.0)
    w = obj.whiten(x, eps=0.0)
    mean = 3.0
    std = math.sqrt(sum((v - mean) ** 2 for v in x.tolist()) / 4)  # population std
    assert w.tolist() == approx([(v - mean) / std for v in x.tolist()])
    assert obj.whiten(x, shift_mean=False, eps=0.0).tolist() == approx([(v - mean) / std + mean for v in x.tolist()])


def test_whiten_masked_statistics():
    x = t(1.0, 3.0, 100.0, -50.0)
    mask = t(1.0, 1.0, 0.0, 0.0)
    w = obj.whiten(x, mask, eps=0.0)
    # statistics over the first two only: mean 2, std 1
    assert w[:2].tolist() == approx([-1.0, 1.0])


# --------------------------------------------------------------------------------------------------
# PPO clipped policy loss
# --------------------------------------------------------------------------------------------------
NEW = torch.tensor([[-1.0, -1.0], [-2.0, 5.0]], dtype=torch.float64)
OLD = torch.tensor([[-1.1, -1.0], [-1.5, 0.0]], dtype=torch.float64)
PPO_MASK = torch.tensor([[1, 1], [1, 0]])  # NEW/OLD differ at the padding position [1, 1]


def test_ppo_sequence_level_hand():
    eps = 0.05
    # log ratios: row 0: 0.1, row 1: -0.5 (padding excluded)
    r0, r1 = math.exp(0.1), math.exp(-0.5)
    out = obj.ppo_clipped_policy_loss(NEW, OLD, t(1.0, -2.0), PPO_MASK, eps, "sequence")
    # row 0 (A=1): max(-1.105, -1.05) = -1.05 clipped; row 1 (A=-2): max(2 * 0.607, 2 * 0.95) = 1.9 clipped
    assert out.loss.item() == pytest.approx((-1.05 + 1.9) / 2, abs=1e-12)
    assert out.clipfrac.item() == 1.0
    assert out.approxkl.item() == pytest.approx(0.5 * (0.01 + 0.25) / 2, abs=1e-12)
    assert out.ratio.item() == pytest.approx((r0 + r1) / 2, abs=1e-12)
    # row 0 with A = -1: max(1.105, 1.05) = unclipped; clip fraction 1/2
    out2 = obj.ppo_clipped_policy_loss(NEW, OLD, t(-1.0, -2.0), PPO_MASK, eps, "sequence")
    assert out2.loss.item() == pytest.approx((r0 + 1.9) / 2, abs=1e-12)
    assert out2.clipfrac.item() == 0.5


def ppo_token_loop(new, old, adv, mask, eps):
    losses, clipped_n, n, kl = 0.0, 0, 0, 0.0
    for b in range(len(new)):
        for s in range(len(new[b])):
            if not mask[b][s]:
                continue
            ratio = math.exp(new[b][s] - old[b][s])
            unclipped = -adv[b] * ratio
            clipped = -adv[b] * min(max(ratio, 1 - eps), 1 + eps)
            losses += max(unclipped, clipped)
            clipped_n += clipped > unclipped
            kl += 0.5 * (new[b][s] - old[b][s]) ** 2
            n += 1
    return losses / n, clipped_n / n, kl / n


@pytest.mark.parametrize("eps", [0.2, 0.05, 1e-4])
def test_ppo_token_level_matches_loop(eps):
    g = torch.Generator().manual_seed(0)
    new = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    old = new + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    adv = t(0.7, -1.3, 0.2)
    out = obj.ppo_clipped_policy_loss(new, old, adv, mask, eps, level="token")
    loss, clipfrac, kl = ppo_token_loop(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), eps)
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(clipfrac, abs=1e-12)
    assert out.approxkl.item() == pytest.approx(kl, abs=1e-12)


def test_ppo_token_level_hand():
    out = obj.ppo_clipped_policy_loss(NEW, OLD, t(1.0, -2.0), PPO_MASK, 0.05, level="token")
    # tokens: (0,0) ratio e^0.1, A=1 -> -1.05 (clipped); (0,1) ratio 1 -> -1; (1,0) ratio e^-0.5, A=-2 -> 1.9 (clipped)
    assert out.loss.item() == pytest.approx((-1.05 - 1.0 + 1.9) / 3, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(2 / 3, abs=1e-12)
    assert out.approxkl.item() == pytest.approx(0.5 * (0.01 + 0.0 + 0.25) / 3, abs=1e-12)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_ppo_tiny_cliprange_works(level):
    # cliprange 1e-4 (the paper's smallest): on-policy the ratio is 1, nothing is clipped and the gradient
    # is the plain policy gradient -A * d log pi; off-policy by 0.1 the clipped branch has zero gradient
    new = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], dtype=torch.float64, requires_grad=True)
    adv = t(1.0, -2.0)
    out = obj.ppo_clipped_policy_loss(new, new.detach(), adv, PPO_MASK, 1e-4, level)
    assert out.clipfrac.item() == 0.0
    # sequence: mean_b(-A_b) = 0.5; token: mean over the 3 response tokens of -A = (-1 - 1 + 2) / 3
    assert out.loss.item() == pytest.approx(0.5 if level == "sequence" else 0.0, abs=1e-12)
    out.loss.backward()
    grad = new.grad
    if level == "sequence":  # d/dnew of mean_b(-A_b exp(sum_t mask (new - old)))
        assert grad.tolist() == [approx([-0.5, -0.5]), approx([1.0, 0.0])]
    else:  # masked token mean over 3 tokens
        assert grad.tolist() == [approx([-1 / 3, -1 / 3]), approx([2 / 3, 0.0])]
    new.grad = None
    out = obj.ppo_clipped_policy_loss(new, new.detach() - 0.1, t(1.0, 1.0), PPO_MASK, 1e-4, level)
    assert out.clipfrac.item() == 1.0
    out.loss.backward()
    assert bool((new.grad == 0).all())
    assert math.isfinite(out.loss.item())


def test_ppo_gradcheck():
    g = torch.Generator().manual_seed(1)
    new = (-torch.rand(2, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = new.detach() + 0.05 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for level in ("sequence", "token"):
        fn = lambda x: obj.ppo_clipped_policy_loss(x, old, t(0.5, -1.5), mask, 0.5, level).loss  # noqa: E731
        assert torch.autograd.gradcheck(fn, (new,))


def test_ppo_bad_input():
    adv = t(1.0, 1.0)
    with pytest.raises(ValueError, match="`level`"):
        obj.ppo_clipped_policy_loss(NEW, OLD, adv, PPO_MASK, 0.2, level="batch")
    with pytest.raises(ValueError, match="`advantages`"):
        obj.ppo_clipped_policy_loss(NEW, OLD, t(1.0, 1.0, 1.0), PPO_MASK, 0.2)
    with pytest.raises(ValueError, match="`old_logprobs`"):
        obj.ppo_clipped_policy_loss(NEW, OLD[:, :1], adv, PPO_MASK, 0.2)
    with pytest.raises(ValueError, match="`response_mask`"):
        obj.ppo_clipped_policy_loss(NEW, OLD, adv, PPO_MASK[:1], 0.2)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="`cliprange`"):
            obj.ppo_clipped_policy_loss(NEW, OLD, adv, PPO_MASK, bad)


# ==================================================================================================
# The quantities behind the paper's curves: the unweighted sampled entropy (Figs. 1-2) and the
# KL between consecutive policies in both directions (Figs. 3, 10-12), on hand-built padded batches.
# ==================================================================================================
# three responses of lengths 4, 1, 2; the padding holds garbage that masking must ignore
CURVE_LOGPROBS = torch.tensor([
    [-0.5, -1.0, -2.0, -0.5],
    [-0.25, 7.0, 9.0, -3.0],
    [-3.0, -1.0, 5.0, 5.0],
], dtype=torch.float64)
CURVE_MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)
CURVE_SCORES = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def test_sampled_entropy_on_a_padded_batch_matches_hand_computed_values():
    """-log pi(y|x) summed over real tokens: 0.5 + 1 + 2 + 0.5 = 4, 0.25, 3 + 1 = 4; per token 1, 0.25, 2."""
    ent = obj.sampled_entropy(CURVE_LOGPROBS, CURVE_MASK)
    assert ent.sequence.tolist() == [4.0, 0.25, 4.0]
    assert ent.per_token.tolist() == [1.0, 0.25, 2.0]
    assert float(ent.sequence.mean()) == 2.75  # the batch mean logged every iteration
    assert float(ent.per_token.mean()) == pytest.approx(3.25 / 3, abs=1e-15)
    # a bool mask and float32 log-probs give the same numbers
    ent32 = obj.sampled_entropy(CURVE_LOGPROBS.float(), CURVE_MASK.bool())
    assert ent32.sequence.dtype == torch.float32 and ent32.sequence.tolist() == [4.0, 0.25, 4.0]


def test_sampled_entropy_does_not_depend_on_the_regulariser_or_alpha_zero():
    """Figure 1 has a coefficient-0 panel and is compared with KL runs: the weighted contribution is 0 for
    alpha = 0, `kl` and `none`, the unweighted quantity is the same 4, 0.25, 4 in every case; for alpha > 0
    the entropy regulariser's term is alpha times it (Eq. 6), or alpha times the per-token mean (Eq. 7)."""
    ent = obj.sampled_entropy(CURVE_LOGPROBS, CURVE_MASK)
    zero = obj.regularized_reward(CURVE_SCORES, CURVE_LOGPROBS, CURVE_MASK, "entropy", 0.0)
    assert zero.non_score_reward.abs().max() == 0 and bool((ent.sequence > 0).all())
    assert torch.equal(zero.rewards, CURVE_SCORES)
    ref = CURVE_LOGPROBS - 0.5
    for reg in ("kl", "none"):
        out = obj.regularized_reward(CURVE_SCORES, CURVE_LOGPROBS, CURVE_MASK, reg, 0.0, ref_logprobs=ref)
        assert out.non_score_reward.abs().max() == 0
    alpha = 0.5
    eq6 = obj.regularized_reward(CURVE_SCORES, CURVE_LOGPROBS, CURVE_MASK, "entropy", alpha)
    assert eq6.non_score_reward.tolist() == [2.0, 0.125, 2.0]
    eq7 = obj.regularized_reward(CURVE_SCORES, CURVE_LOGPROBS, CURVE_MASK, "entropy", alpha, length_normalize=True)
    assert eq7.non_score_reward.tolist() == [0.5, 0.125, 1.0]
    assert torch.equal(eq7.non_score_reward, alpha * ent.per_token)


def test_sampled_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="response_mask"):
        obj.sampled_entropy(CURVE_LOGPROBS, CURVE_MASK[:, :2])


# sum_t (new - old) over real tokens: 0.5, 0 and -1 (garbage in the padding of rows 2 and 3)
KL_OLD = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 4.0, 4.0], [-0.5, -0.5, 8.0]], dtype=torch.float64)
KL_NEW = torch.tensor([[-0.5, -1.25, -0.75], [-2.0, -9.0, 1.0], [-1.0, -1.0, -8.0]], dtype=torch.float64)
KL_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float64)
LOG_W = [0.5, 0.0, -1.0]


def test_consecutive_kl_both_directions_on_a_padded_batch():
    """KL(new || old) from old samples: w log w (k1) and w log w - w + 1 (k3) with w = exp(sum_t new - old);
    KL(old || new): sum_t (old - new) (k1) and sum_t [exp(new - old) - 1 - (new - old)] (k3)."""
    fwd_k1 = obj.kl_new_old_from_old_samples(KL_OLD, KL_NEW, KL_MASK, "k1")
    fwd_k3 = obj.kl_new_old_from_old_samples(KL_OLD, KL_NEW, KL_MASK, "k3")
    expected_k1 = [math.exp(lw) * lw for lw in LOG_W]
    expected_k3 = [math.exp(lw) * lw - math.exp(lw) + 1 for lw in LOG_W]
    assert fwd_k1.tolist() == pytest.approx(expected_k1, abs=1e-15)
    assert fwd_k3.tolist() == pytest.approx(expected_k3, abs=1e-15)
    assert fwd_k1[2] < 0 < fwd_k3[2]  # one sequence's k1 can be negative, k3 never
    rev_k1 = obj.kl_old_new_from_old_samples(KL_OLD, KL_NEW, KL_MASK, "k1")
    assert rev_k1.tolist() == pytest.approx([-lw for lw in LOG_W], abs=1e-15)
    d = [[0.5, -0.25, 0.25], [0.0], [-0.5, -0.5]]  # new - old on the real tokens
    rev_k3 = obj.kl_old_new_from_old_samples(KL_OLD, KL_NEW, KL_MASK, "k3")
    assert rev_k3.tolist() == pytest.approx([sum(math.exp(x) - 1 - x for x in row) for row in d], abs=1e-15)


def test_paper_direction_kl_keeps_the_callers_dtype_and_overflows_only_past_float32():
    """Computed in float64: a float32 caller gets float32; sum_t (new - old) = 100 is finite in float64
    (100 e^100) and inf in float32 (e^100 > 3.4e38), where the policies are wildly apart anyway."""
    old = torch.zeros(1, 2)
    new = torch.tensor([[50.0, 50.0]])
    mask = torch.ones(1, 2)
    assert obj.kl_new_old_from_old_samples(old, new * 0.01, mask).dtype == torch.float32
    assert math.isinf(float(obj.kl_new_old_from_old_samples(old, new, mask)))
    wide = obj.kl_new_old_from_old_samples(old.double(), new.double(), mask.double())
    assert float(wide) == pytest.approx(100 * math.exp(100), rel=1e-12)


def test_consecutive_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="estimator"):
        obj.kl_new_old_from_old_samples(KL_OLD, KL_NEW, KL_MASK, "k2")
    with pytest.raises(ValueError, match="estimator"):
        obj.kl_old_new_from_old_samples(KL_OLD, KL_NEW, KL_MASK, "wlogw")
    with pytest.raises(ValueError, match="new_logprobs"):
        obj.kl_new_old_from_old_samples(KL_OLD, KL_NEW[:, :2], KL_MASK)


def test_effective_sample_fraction():
    """(sum w)^2 / (n sum w^2): 1 for equal weights, (1 + 3)^2 / (2 (1 + 9)) = 0.8 for w = (1, 3), -> 1/n
    when one weight dominates; no overflow at log w = 1000."""
    frac = obj.effective_sample_fraction
    assert float(frac(torch.full((5,), 1000.0, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)
    assert float(frac(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64))) == pytest.approx(0.8, abs=1e-12)
    assert float(frac(torch.tensor([0.0, -1000.0, -1000.0, -1000.0]))) == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="log_weights"):
        frac(torch.zeros(2, 2))
