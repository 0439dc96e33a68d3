"""Appendix C.2 / Eq. 5 (Bradley-Terry, Z cancels) and C.3 (Plackett-Luce, Eq. 11-12)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from maxent_rlhf import objectives
from theory import strategies as S
from theory.toys import all_rankings, make_bandit

ATOL = 1e-10


def _pl_log_prob_by_definition(scores) -> float:
    """log prod_k exp(s_k) / sum_{j>=k} exp(s_j), written out term by term (Eq. 11), in float64 Python."""
    s = [float(v) for v in scores]
    total = 0.0
    for k in range(len(s)):
        m = max(s[k:])
        total += s[k] - (m + math.log(sum(math.exp(v - m) for v in s[k:])))
    return total


@st.composite
def bandit_problem(draw, max_responses=6):
    shape = draw(S.bandit_shapes(max_responses=max_responses))
    return make_bandit(draw(S.reward_tables(shape))), draw(S.alphas())


@given(S.reward_tables((2, 7)))
def test_c2_bradley_terry_matches_eq9(r):
    """Eq. 9: "p*(y1 > y2 | x) = exp(r*(x,y1)) / (exp(r*(x,y1)) + exp(r*(x,y2)))" = sigma(r1 - r2) (Eq. 1)."""
    p = objectives.bradley_terry_probability(r[0], r[1])
    by_definition = torch.exp(r[0]) / (torch.exp(r[0]) + torch.exp(r[1]))
    assert torch.allclose(p, by_definition, atol=1e-13, rtol=1e-12)
    assert torch.allclose(p + objectives.bradley_terry_probability(r[1], r[0]), torch.ones_like(p), atol=1e-14)


@given(bandit_problem())
def test_eq5_partition_function_cancels_under_bradley_terry(problem):
    """C.2 / Eq. 5: substituting Eq. 10 "r*(x,y) = alpha log pi*(y|x) + alpha log Z(x)" into Bradley-Terry,
    "p*(y1 > y2 | x) = sigma(alpha log pi*(y1|x) - alpha log pi*(y2|x))": Z(x) cancels. "The last line is
    the per-instance loss for SimPO, without target margin gamma and length normalization": so
    exp(-simpo_loss(pi*, beta=alpha, gamma=0, no length normalisation)) is the true preference probability
    of every ordered pair, though alpha log pi* differs from r* by alpha log Z(x)."""
    bandit, alpha = problem
    logpistar = objectives.maxent_optimal_policy(bandit.rewards, alpha).log()
    x, i, j = bandit.pairs()
    p_true = objectives.bradley_terry_probability(bandit.rewards[x, i], bandit.rewards[x, j])
    implicit = objectives.simpo_rewards(logpistar, torch.ones_like(logpistar), alpha, length_normalize=False)
    assert torch.allclose(implicit, alpha * logpistar, atol=1e-12)
    p_policy = objectives.bradley_terry_probability(implicit[x, i], implicit[x, j])
    assert torch.allclose(p_true, p_policy, atol=ATOL)
    ones = torch.ones_like(x, dtype=torch.float64)
    out = objectives.simpo_loss(logpistar[x, i], logpistar[x, j], ones, ones, beta=alpha, gamma=0.0, length_normalize=False)
    assert torch.allclose(torch.exp(-out.losses), p_true, atol=ATOL)
    # the implicit reward is r* shifted by the (nonzero in general) alpha log Z(x), per prompt
    shift = bandit.rewards - implicit
    assert torch.allclose(shift, alpha * objectives.maxent_log_partition(bandit.rewards, alpha)[:, None].expand_as(shift), atol=1e-9)


@given(st.integers(2, 5).flatmap(lambda k: S.reward_tables((k,))))
def test_c3_plackett_luce_matches_eq11_and_normalises(r):
    """Eq. 11: "p*(tau | y_1..y_K, x) = prod_{k=1}^{K} exp(r_k) / sum_{j=k}^{K} exp(r_j)" with
    r_k = r*(x, y_tau(k)); the log-likelihood in `objectives` equals this product for every ranking, and the
    K! ranking probabilities sum to one (it is a distribution over rankings)."""
    rankings = all_rankings(r.shape[0])
    logp = objectives.plackett_luce_log_likelihood(r[rankings])
    by_definition = torch.tensor([_pl_log_prob_by_definition(r[t]) for t in rankings], dtype=torch.float64)
    assert torch.allclose(logp, by_definition, atol=1e-11)
    assert abs(float(torch.logsumexp(logp, 0))) < 1e-11


@given(bandit_problem(max_responses=5))
def test_c3_plackett_luce_invariant_under_reparameterisation(problem):
    """C.3 / Eq. 12: "we can still leverage the reward parameterization by substituting the reward
    function expressed in terms of its optimal policy. As in Appendix C.2, the normalization constant Z(x)
    cancels out. Let s_k = alpha log pi*(y_tau(k)|x)" — the ranking likelihood of every ranking tau is the
    same with r_k = r*(x, y_tau(k)) (Eq. 11) and with s_k (Eq. 12)."""
    bandit, alpha = problem
    logpistar = objectives.maxent_optimal_policy(bandit.rewards, alpha).log()
    rankings = all_rankings(bandit.num_responses)
    for x in range(bandit.num_prompts):
        with_reward = objectives.plackett_luce_log_likelihood(bandit.rewards[x][rankings])
        with_policy = objectives.plackett_luce_log_likelihood(alpha * logpistar[x][rankings])
        assert torch.allclose(with_reward, with_policy, atol=1e-9)


@given(S.reward_tables((6, 2)))
def test_c3_plackett_luce_with_two_responses_is_bradley_terry(r):
    """C.3: "Observe that when K = 2, Equation 11 simplifies to the Bradley-Terry model" (Eq. 9)."""
    pl = objectives.plackett_luce_log_likelihood(r).exp()
    bt = objectives.bradley_terry_probability(r[:, 0], r[:, 1])
    assert torch.allclose(pl, bt, atol=1e-13)


@st.composite
def ranked_batch(draw):
    """[B, K] log-probs of ranked responses (from softmax-table policies) and their lengths |y| >= 1."""
    b, k = draw(st.integers(1, 4)), draw(st.integers(2, 5))
    logp = draw(S.policy_logprobs((b, k + 2), allow_zeros=False))[:, :k]  # log pi of K of the K+2 responses
    lengths = draw(S.float_tensors((b, k), 1.0, 12.0)).round()
    return logp, lengths


@given(ranked_batch(), S.alphas(), st.booleans())
def test_c3_listwise_simpo_loss_matches_objectives(batch, alpha, length_normalize):
    """C.3: "L_SimPO(pi_theta) = -E_D[ sum_{k=1}^{K} log exp(s_k^theta) / sum_{j=k}^{K} exp(s_j^theta) ]"
    with "s_k^theta = alpha log pi_theta(y_tau(k)|x)" — `objectives.simpo_plackett_luce_loss` (gamma = 0) is
    this sum, term by term; with length normalisation the score is s_k = (alpha / |y|) log pi (Sec. 3.2)."""
    logp, lengths = batch
    loss = objectives.simpo_plackett_luce_loss(logp, lengths, beta=alpha, gamma=0.0, length_normalize=length_normalize)
    scores = alpha * logp / lengths if length_normalize else alpha * logp
    by_definition = torch.tensor([-_pl_log_prob_by_definition(row) for row in scores], dtype=torch.float64)
    assert loss.shape == (logp.shape[0],)
    assert torch.allclose(loss, by_definition, atol=1e-10)


@given(ranked_batch(), S.alphas(), S.bounded_floats(0.0, 5.0), st.booleans())
def test_c3_listwise_loss_with_two_responses_is_simpo_loss_with_margin(batch, alpha, gamma, length_normalize):
    """C.3 with Sec. 3.2's margin: for K = 2 the Plackett-Luce SimPO loss with target margin gamma equals the
    pairwise SimPO loss "-log sigma((alpha/|y_w|) log pi(y_w|x) - (alpha/|y_l|) log pi(y_l|x) - gamma)",
    with and without length normalisation."""
    logp, lengths = batch
    logp, lengths = logp[:, :2], lengths[:, :2]
    listwise = objectives.simpo_plackett_luce_loss(logp, lengths, beta=alpha, gamma=gamma, length_normalize=length_normalize)
    pairwise = objectives.simpo_loss(
        logp[:, 0], logp[:, 1], lengths[:, 0], lengths[:, 1], beta=alpha, gamma=gamma, length_normalize=length_normalize
    ).losses
    assert torch.allclose(listwise, pairwise, atol=1e-11)
    # and both are the paper's displayed SimPO objective, evaluated directly
    a = alpha / lengths if length_normalize else torch.full_like(lengths, alpha)
    direct = -F.logsigmoid(a[:, 0] * logp[:, 0] - a[:, 1] * logp[:, 1] - gamma)
    assert torch.allclose(pairwise, direct, atol=1e-11)
