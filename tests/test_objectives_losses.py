"""Offline preference losses of `maxent_rlhf.objectives` against hand-computed values (python floats and
`math`, never the same torch expression), gradcheck in float64, and bad-input errors."""
import math

import pytest
import torch

from maxent_rlhf import objectives as obj


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
