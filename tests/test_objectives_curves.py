"""The quantities behind the paper's curves (issue 12): the unweighted sampled entropy (Figs. 1-2) and the
KL between consecutive policies in both directions (Figs. 3, 10-12), on hand-built padded batches."""
from __future__ import annotations

import math

import pytest
import torch

from maxent_rlhf import objectives

# three responses of lengths 4, 1, 2; the padding holds garbage that masking must ignore
LOGPROBS = torch.tensor([
    [-0.5, -1.0, -2.0, -0.5],
    [-0.25, 7.0, 9.0, -3.0],
    [-3.0, -1.0, 5.0, 5.0],
], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)
SCORES = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def test_sampled_entropy_on_a_padded_batch_matches_hand_computed_values():
    """-log pi(y|x) summed over real tokens: 0.5 + 1 + 2 + 0.5 = 4, 0.25, 3 + 1 = 4; per token 1, 0.25, 2."""
    ent = objectives.sampled_entropy(LOGPROBS, MASK)
    assert ent.sequence.tolist() == [4.0, 0.25, 4.0]
    assert ent.per_token.tolist() == [1.0, 0.25, 2.0]
    assert float(ent.sequence.mean()) == 2.75  # the batch mean logged every iteration
    assert float(ent.per_token.mean()) == pytest.approx(3.25 / 3, abs=1e-15)
    # a bool mask and float32 log-probs give the same numbers
    ent32 = objectives.sampled_entropy(LOGPROBS.float(), MASK.bool())
    assert ent32.sequence.dtype == torch.float32 and ent32.sequence.tolist() == [4.0, 0.25, 4.0]


def test_sampled_entropy_does_not_depend_on_the_regulariser_or_alpha_zero():
    """Figure 1 has a coefficient-0 panel and is compared with KL runs: the weighted contribution is 0 for
    alpha = 0, `kl` and `none`, the unweighted quantity is the same 4, 0.25, 4 in every case; for alpha > 0
    the entropy regulariser's term is alpha times it (Eq. 6), or alpha times the per-token mean (Eq. 7)."""
    ent = objectives.sampled_entropy(LOGPROBS, MASK)
    zero = objectives.regularized_reward(SCORES, LOGPROBS, MASK, "entropy", 0.0)
    assert zero.non_score_reward.abs().max() == 0 and bool((ent.sequence > 0).all())
    assert torch.equal(zero.rewards, SCORES)
    ref = LOGPROBS - 0.5
    for reg in ("kl", "none"):
        out = objectives.regularized_reward(SCORES, LOGPROBS, MASK, reg, 0.0, ref_logprobs=ref)
        assert out.non_score_reward.abs().max() == 0
    alpha = 0.5
    eq6 = objectives.regularized_reward(SCORES, LOGPROBS, MASK, "entropy", alpha)
    assert eq6.non_score_reward.tolist() == [2.0, 0.125, 2.0]
    eq7 = objectives.regularized_reward(SCORES, LOGPROBS, MASK, "entropy", alpha, length_normalize=True)
    assert eq7.non_score_reward.tolist() == [0.5, 0.125, 1.0]
    assert torch.equal(eq7.non_score_reward, alpha * ent.per_token)


def test_sampled_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="response_mask"):
        objectives.sampled_entropy(LOGPROBS, MASK[:, :2])


# sum_t (new - old) over real tokens: 0.5, 0 and -1 (garbage in the padding of rows 2 and 3)
OLD = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 4.0, 4.0], [-0.5, -0.5, 8.0]], dtype=torch.float64)
NEW = torch.tensor([[-0.5, -1.25, -0.75], [-2.0, -9.0, 1.0], [-1.0, -1.0, -8.0]], dtype=torch.float64)
KL_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float64)
LOG_W = [0.5, 0.0, -1.0]


def test_consecutive_kl_both_directions_on_a_padded_batch():
    """KL(new || old) from old samples: w log w (k1) and w log w - w + 1 (k3) with w = exp(sum_t new - old);
    KL(old || new): sum_t (old - new) (k1) and sum_t [exp(new - old) - 1 - (new - old)] (k3)."""
    fwd_k1 = objectives.kl_new_old_from_old_samples(OLD, NEW, KL_MASK, "k1")
    fwd_k3 = objectives.kl_new_old_from_old_samples(OLD, NEW, KL_MASK, "k3")
    expected_k1 = [math.exp(lw) * lw for lw in LOG_W]
    expected_k3 = [math.exp(lw) * lw - math.exp(lw) + 1 for lw in LOG_W]
    assert fwd_k1.tolist() == pytest.approx(expected_k1, abs=1e-15)
    assert fwd_k3.tolist() == pytest.approx(expected_k3, abs=1e-15)
    assert fwd_k1[2] < 0 < fwd_k3[2]  # one sequence's k1 can be negative, k3 never
    rev_k1 = objectives.kl_old_new_from_old_samples(OLD, NEW, KL_MASK, "k1")
    assert rev_k1.tolist() == pytest.approx([-lw for lw in LOG_W], abs=1e-15)
    d = [[0.5, -0.25, 0.25], [0.0], [-0.5, -0.5]]  # new - old on the real tokens
    rev_k3 = objectives.kl_old_new_from_old_samples(OLD, NEW, KL_MASK, "k3")
    assert rev_k3.tolist() == pytest.approx([sum(math.exp(x) - 1 - x for x in row) for row in d], abs=1e-15)


def test_paper_direction_kl_keeps_the_callers_dtype_and_overflows_only_past_float32():
    """Computed in float64: a float32 caller gets float32; sum_t (new - old) = 100 is finite in float64
    (100 e^100) and inf in float32 (e^100 > 3.4e38), where the policies are wildly apart anyway."""
    old = torch.zeros(1, 2)
    new = torch.tensor([[50.0, 50.0]])
    mask = torch.ones(1, 2)
    assert objectives.kl_new_old_from_old_samples(old, new * 0.01, mask).dtype == torch.float32
    assert math.isinf(float(objectives.kl_new_old_from_old_samples(old, new, mask)))
    wide = objectives.kl_new_old_from_old_samples(old.double(), new.double(), mask.double())
    assert float(wide) == pytest.approx(100 * math.exp(100), rel=1e-12)


def test_consecutive_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="estimator"):
        objectives.kl_new_old_from_old_samples(OLD, NEW, KL_MASK, "k2")
    with pytest.raises(ValueError, match="estimator"):
        objectives.kl_old_new_from_old_samples(OLD, NEW, KL_MASK, "wlogw")
    with pytest.raises(ValueError, match="new_logprobs"):
        objectives.kl_new_old_from_old_samples(OLD, NEW[:, :2], KL_MASK)


def test_effective_sample_fraction():
    """(sum w)^2 / (n sum w^2): 1 for equal weights, (1 + 3)^2 / (2 (1 + 9)) = 0.8 for w = (1, 3), -> 1/n
    when one weight dominates; no overflow at log w = 1000."""
    frac = objectives.effective_sample_fraction
    assert float(frac(torch.full((5,), 1000.0, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)
    assert float(frac(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64))) == pytest.approx(0.8, abs=1e-12)
    assert float(frac(torch.tensor([0.0, -1000.0, -1000.0, -1000.0]))) == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="log_weights"):
        frac(torch.zeros(2, 2))
