"""Beyond the paper: consequences the suite relies on, checked exactly.

- maximum entropy = KL regularisation towards the uniform policy, so DPO with a uniform reference has the
  MaxEnt optimum;
- the population SimPO loss (gamma = 0, no length normalisation) on Bradley-Terry data from r* is
  minimised by softmax(r* / alpha);
- the sequence-entropy chain rule on the autoregressive toy;
- the RLOO estimator built from `objectives` is unbiased for the exact MaxEnt gradient (Eq. 6), and
  what happens with the length-normalised reward (Eq. 7);
- k1 and k3 are unbiased for KL.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from maxent_rlhf import objectives
from theory import strategies as S
from theory.toys import ARPolicy, all_tuples, categorical, expectation, make_ar_toy, make_bandit

AR_SMALL = make_ar_toy(vocab_size=3, max_len=2)  # 7 responses (lengths 1, 2)
AR_TOY = make_ar_toy(vocab_size=3, max_len=3)  # 15 responses (lengths 1, 2, 3)


# --------------------------------------------------------------------------------------------------
# maximum entropy = KL to uniform; DPO with a uniform reference
# --------------------------------------------------------------------------------------------------
@given(st.integers(2, 8).flatmap(lambda y: S.policy_logprobs((3, y))))
def test_entropy_is_log_size_minus_kl_to_uniform(logpi):
    """Beyond the paper: "H(pi) = log|Y| - KL(pi || U)" — maximum entropy is KL regularisation towards the
    uniform policy U. `objectives.token_entropy` against torch's KL and entropy (independent references)."""
    y = logpi.shape[-1]
    uniform = torch.full_like(logpi, -math.log(y))
    h = objectives.token_entropy(logpi)
    kl = torch.distributions.kl_divergence(categorical(logpi), categorical(uniform))
    assert torch.allclose(h, math.log(y) - kl, atol=1e-12)
    assert torch.allclose(h, categorical(logpi).entropy(), atol=1e-12)


@given(S.bandit_shapes().flatmap(lambda s: st.tuples(S.reward_tables(s), S.policy_logprobs(s, allow_zeros=False))), S.alphas())
def test_dpo_with_uniform_reference_is_maxent(problem, alpha):
    """Beyond the paper: with H(pi) = log|Y| - KL(pi || U), the KL-regularised objective with a uniform
    reference, E[r] - alpha KL(pi || U), is the MaxEnt objective (Eq. 2) minus the constant alpha log|Y|;
    so its optimum "pi_ref exp(r / alpha) / Z" (DPO's) is pi* = softmax(r / alpha) (Eq. 8), and the DPO loss
    with pi_ref = U is, pair by pair, the SimPO loss without margin and length normalisation (C.2)."""
    rewards, logpi = problem
    y = rewards.shape[-1]
    log_u = torch.full_like(logpi, -math.log(y))
    # the KL-regularised sequence reward of `objectives` (k1 on the sampled response), one-token responses
    kl_reward = objectives.regularized_reward(
        rewards.reshape(-1), logpi.reshape(-1, 1), torch.ones(logpi.numel(), 1, dtype=logpi.dtype), "kl", alpha,
        ref_logprobs=log_u.reshape(-1, 1),
    ).rewards.reshape(rewards.shape)
    assert torch.allclose(
        expectation(logpi, kl_reward), objectives.maxent_objective(logpi, rewards, alpha) - alpha * math.log(y), atol=1e-9
    )
    # DPO's closed form pi_ref * exp(r / alpha) / Z = softmax(r / alpha + log pi_ref)
    dpo_optimum = objectives.maxent_optimal_policy(rewards + alpha * log_u, alpha)
    assert torch.allclose(dpo_optimum, objectives.maxent_optimal_policy(rewards, alpha), atol=1e-12)
    # the DPO loss with a uniform reference equals the MaxEnt (SimPO) loss on every ordered pair
    bandit = make_bandit(rewards)
    x, i, j = bandit.pairs()
    ones = torch.ones(len(x), dtype=torch.float64)
    dpo = objectives.dpo_loss(logpi[x, i], logpi[x, j], log_u[x, i], log_u[x, j], beta=alpha).losses
    simpo = objectives.simpo_loss(logpi[x, i], logpi[x, j], ones, ones, beta=alpha, gamma=0.0, length_normalize=False).losses
    assert torch.allclose(dpo, simpo, atol=1e-11)


# --------------------------------------------------------------------------------------------------
# population SimPO on Bradley-Terry data recovers pi*
# --------------------------------------------------------------------------------------------------
@S.scaled(0.4)
@given(S.bandit_shapes(max_prompts=2, max_responses=5).flatmap(S.reward_tables), S.alphas())
def test_population_simpo_minimiser_is_maxent_policy(rewards, alpha):
    """Beyond the paper (C.2 read backwards): minimising the population SimPO loss (gamma = 0, no length
    normalisation), E_{pair} E_{winner ~ BT(r*)}[-log sigma(alpha log pi(y_w) - alpha log pi(y_l))], over
    softmax-table policies recovers pi* = softmax(r* / alpha). Every ordered pair (y_i, y_j) is weighted
    exactly by P(pair) * sigma(r*_i - r*_j); the logits are fitted with L-BFGS in float64."""
    bandit = make_bandit(rewards)
    x, i, j = bandit.pairs()
    weight = objectives.bradley_terry_probability(rewards[x, i], rewards[x, j]) / len(x)
    ones = torch.ones(len(x), dtype=torch.float64)
    logits = torch.zeros_like(rewards, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logits], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15, history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logpi = torch.log_softmax(logits, -1)
        losses = objectives.simpo_loss(logpi[x, i], logpi[x, j], ones, ones, beta=alpha, gamma=0.0, length_normalize=False).losses
        loss = (weight * losses).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    fitted = torch.softmax(logits.detach(), -1)
    pistar = objectives.maxent_optimal_policy(rewards, alpha)
    assert torch.allclose(fitted, pistar, atol=1e-6)
    # the implicit rewards alpha log pi recover r* up to the per-prompt constant (Z cancels, C.2)
    implicit = alpha * fitted.log()
    assert torch.allclose(implicit - implicit.mean(-1, keepdim=True), rewards - rewards.mean(-1, keepdim=True), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# sequence entropy chain rule on the autoregressive toy
# --------------------------------------------------------------------------------------------------
@given(S.seeds, S.bounded_floats(0.5, 2.0), S.bounded_floats(0.3, 3.0))
def test_sequence_entropy_chain_rule(seed, temperature, scale):
    """Beyond the paper: the sequence entropy obeys the chain rule,
    H(pi(.|x)) = -sum_y pi(y|x) log pi(y|x) = E_{y~pi}[ sum_{t <= |y|} H(pi(.|x, y_<t)) ],
    on the autoregressive toy (responses of variable length ending at EOS), at any sampling temperature:
    `objectives.sequence_logprobs` (left) and the masked `objectives.token_entropy` (right)."""
    policy = ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=seed, scale=scale)
    with torch.no_grad():
        logits = policy.logits(AR_TOY.sequences)
        seq_logp = objectives.sequence_logprobs(logits, AR_TOY.sequences, AR_TOY.mask, temperature=temperature)
        assert abs(float(torch.logsumexp(seq_logp, 0))) < 1e-12, "the enumerated responses must carry all the mass"
        h_sequence = -expectation(seq_logp, seq_logp)
        per_token = objectives.token_entropy(logits, temperature=temperature)
        h_chain = expectation(seq_logp, objectives.masked_sum(per_token, AR_TOY.mask))
    assert abs(float(h_sequence - h_chain)) < 1e-12
    assert abs(float(h_sequence - categorical(seq_logp).entropy())) < 1e-12


# --------------------------------------------------------------------------------------------------
# RLOO with the MaxEnt reward is unbiased for the exact gradient
# --------------------------------------------------------------------------------------------------
def _expected_rloo_gradient(policy, toy, scores, coef, k, length_normalize):
    """Exact E over k i.i.d. samples of the RLOO gradient estimate (1/k) sum_i A_i grad log pi(y_i), with
    A = objectives.rloo_advantages(objectives.regularized_reward(..., 'entropy', coef)), by enumerating all
    N^k ordered k-tuples of responses, each weighted by its probability prod_i pi(y_i)."""
    logits = policy.logits(toy.sequences)
    seq_logp = objectives.sequence_logprobs(logits, toy.sequences, toy.mask)
    token_logp = objectives.token_logprobs(logits, toy.sequences).detach()
    tuples = all_tuples(toy.num_sequences, k)  # [N^k, k]
    flat = tuples.reshape(-1)
    reg = objectives.regularized_reward(
        scores[flat], token_logp[flat], toy.mask[flat], "entropy", coef, length_normalize=length_normalize
    )
    adv = objectives.rloo_advantages(reg.rewards.reshape(tuples.shape))  # one "prompt" per tuple
    tuple_prob = seq_logp.detach()[tuples].sum(-1).exp()
    surrogate = (tuple_prob[:, None] * adv.detach() * seq_logp[tuples]).sum() / k
    return policy.flat_grad(surrogate), seq_logp


@S.scaled(0.5)
@given(S.seeds, st.integers(2, 3), S.alphas(), st.booleans(), st.data())
def test_rloo_maxent_estimator_is_unbiased(seed, k, alpha, min_entropy, data):
    """Beyond the paper (Eq. 6): with the MaxEnt reward r - alpha log pi(y|x) and the leave-one-out baseline,
    E[(1/k) sum_i A_i grad log pi(y_i)] = grad_theta (E_pi[r] + alpha H(pi)) exactly. (The reward depends on
    theta, but the -alpha log pi term's own gradient has zero expectation: E_pi[grad log pi] = 0, so the
    score-function estimator with reward r - alpha log pi is unbiased.) Also for alpha < 0 (minimum entropy,
    Sec. 4.2.1). Exact expectation over all k-tuples, k = 2 and 3, on the autoregressive toy."""
    toy = AR_TOY if k == 2 else AR_SMALL
    coef = -alpha if min_entropy else alpha
    policy = ARPolicy(toy.vocab_size, toy.max_len, seed=seed)
    scores = data.draw(S.reward_tables((toy.num_sequences,)))
    estimate, seq_logp = _expected_rloo_gradient(policy, toy, scores, coef, k, length_normalize=False)
    exact = policy.flat_grad(objectives.maxent_objective(seq_logp, scores, coef))
    assert torch.allclose(estimate, exact, atol=1e-10, rtol=1e-8)


@S.scaled(0.25)
@given(S.seeds, S.alphas(), st.data())
def test_rloo_length_normalised_entropy_reward_gradient(seed, alpha, data):
    """Beyond the paper (Eq. 7), a caveat: with the length-normalised reward r - (alpha/|y|) log pi(y|x), the
    RLOO estimator is unbiased for E[(r - (alpha/|y|) log pi) grad log pi], which is NOT the gradient of
    J7 = E_pi[r - (alpha/|y|) log pi]: grad J7 has the extra term -alpha E_pi[grad log pi(y) / |y|], nonzero
    when lengths vary (E_pi[grad log pi] = 0 only without the 1/|y| weight). The identity
    E[estimate] = grad J7 + alpha E_pi[grad log pi / |y|] is checked exactly (k = 2)."""
    toy = AR_TOY
    policy = ARPolicy(toy.vocab_size, toy.max_len, seed=seed)
    scores = data.draw(S.reward_tables((toy.num_sequences,)))
    estimate, seq_logp = _expected_rloo_gradient(policy, toy, scores, alpha, 2, length_normalize=True)
    lengths = toy.lengths.to(torch.float64)
    pi = seq_logp.exp()
    j7 = (pi * (scores - alpha * seq_logp / lengths)).sum()
    grad_j7 = policy.flat_grad(j7)
    correction = policy.flat_grad((pi.detach() * seq_logp / lengths).sum())  # E_pi[grad log pi / |y|]
    assert torch.allclose(estimate, grad_j7 + alpha * correction, atol=1e-10, rtol=1e-8)


def test_rloo_length_normalised_bias_is_not_zero():
    """Companion of the above on one fixed toy: the bias alpha * E_pi[grad log pi / |y|] is clearly nonzero
    (so Eq. 7's RLOO update does not ascend J7 = E[r] + alpha E[-log pi / |y|] exactly), while the same
    weight without 1/|y| has zero expectation (the score-function identity)."""
    policy = ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=1234)
    seq_logp = policy.sequence_logprobs(AR_TOY)
    pi = seq_logp.exp().detach()
    weighted = policy.flat_grad((pi * seq_logp / AR_TOY.lengths.to(torch.float64)).sum())
    plain = policy.flat_grad((pi * seq_logp).sum())
    assert float(plain.norm()) < 1e-12
    assert float(weighted.norm()) > 1e-3


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------
@given(st.integers(2, 8).flatmap(lambda y: st.tuples(S.policy_logprobs((3, y)), S.policy_logprobs((3, y), allow_zeros=False))))
def test_k1_and_k3_are_unbiased_for_kl(p_and_q):
    """Beyond the paper: for tokens y ~ pi, with d = log pi_ref(y) - log pi(y), k1 = -d and k3 = exp(d) - 1 - d
    are unbiased for KL(pi || pi_ref): E_pi[k1] = E_pi[k3] = KL (torch's KL as the reference); k3 >= 0.

    k3's unbiasedness needs E_pi[pi_ref / pi] = 1, i.e. pi_ref's support inside pi's (always true for softmax
    policies with finite logits). If pi puts zero mass where pi_ref does not, E_pi[k3] = KL - pi_ref(outside
    supp pi): checked too. k1 is unbiased regardless."""
    logp, logq = p_and_q
    kl = torch.distributions.kl_divergence(categorical(logp), categorical(logq))
    k1 = objectives.kl_estimate(logp, logq, "k1")
    assert torch.allclose(expectation(logp, k1), kl, atol=1e-10, rtol=1e-10)
    k3 = objectives.kl_estimate(logp, logq, "k3")
    missing_ref_mass = torch.where(logp == -math.inf, logq.exp(), torch.zeros_like(logq)).sum(-1)
    assert torch.allclose(expectation(logp, k3), kl - missing_ref_mass, atol=1e-10, rtol=1e-10)
    full_support = logp.isfinite().all(-1)
    assert torch.allclose(expectation(logp, k3)[full_support], kl[full_support], atol=1e-10, rtol=1e-10)
    assert bool((k3[logp.isfinite()] >= -1e-15).all())


@given(S.seeds, S.seeds, S.bounded_floats(0.3, 2.0))
def test_k1_and_k3_summed_over_tokens_are_unbiased_for_sequence_kl(seed_p, seed_q, scale):
    """Beyond the paper: on the autoregressive toy, the per-token k1 and k3 summed over the response tokens
    (as the RLOO KL reward does) are unbiased for the sequence-level KL(pi(.|x) || pi_ref(.|x)) (chain rule)."""
    pi = ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=seed_p, scale=scale)
    ref = ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=seed_q + 1, scale=scale)
    with torch.no_grad():
        lp_tok = objectives.token_logprobs(pi.logits(AR_TOY.sequences), AR_TOY.sequences)
        lq_tok = objectives.token_logprobs(ref.logits(AR_TOY.sequences), AR_TOY.sequences)
        lp_seq = objectives.masked_sum(lp_tok, AR_TOY.mask)
        lq_seq = objectives.masked_sum(lq_tok, AR_TOY.mask)
        kl = torch.distributions.kl_divergence(categorical(lp_seq), categorical(lq_seq))
        for name in ("k1", "k3"):
            est = objectives.masked_sum(objectives.kl_estimate(lp_tok, lq_tok, name), AR_TOY.mask)
            assert abs(float(expectation(lp_seq, est) - kl)) < 1e-10, name
