"""Online (RLOO) pieces of `maxent_rlhf.objectives`: regularised reward, leave-one-out advantages,
whitening and the PPO clipped policy loss, against hand values and explicit python loops."""
import math

import pytest
import torch

from maxent_rlhf import objectives as obj


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def approx(values, tol=1e-12):
    return pytest.approx(values, abs=tol)


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
