"""Appendix C.1 (optimum of the entropy-regularised objective), Eq. 2-4 and Eq. 6, on the exact bandit."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from maxent_rlhf import objectives
from theory import strategies as S
from theory.toys import categorical, expectation, make_bandit

ATOL = 1e-9


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per prompt, from torch.distributions (an independent reference)."""
    return torch.distributions.kl_divergence(categorical(logp), categorical(logq))


@st.composite
def bandit_and_policy(draw, allow_zeros=True):
    shape = draw(S.bandit_shapes())
    rewards = draw(S.reward_tables(shape))
    alpha = draw(S.alphas())
    logpi = draw(S.policy_logprobs(shape, allow_zeros=allow_zeros))
    return make_bandit(rewards), alpha, logpi


@given(bandit_and_policy())
def test_c1_optimal_policy_maximises_objective(problem):
    """C.1, Eq. 3 / Eq. 8: "pi*(y|x) = (1/Z(x)) exp(r(x,y)/alpha)" is the optimum of
    "max_pi E_{x~D, y~pi}[r(x,y)] + alpha H[pi(y|x)]" (Eq. 2).

    Checked two ways: J(pi) <= J(pi*) for an arbitrary (possibly not fully supported) policy, and pi*
    is a stationary point of J in the logits (the gradient of the objective vanishes there).
    """
    bandit, alpha, logpi = problem
    pistar = objectives.maxent_optimal_policy(bandit.rewards, alpha)
    assert torch.allclose(pistar.sum(-1), torch.ones(bandit.num_prompts, dtype=pistar.dtype), atol=1e-12)
    assert bool((pistar > 0).all())
    j_pi = objectives.maxent_objective(logpi, bandit.rewards, alpha)
    j_star = objectives.maxent_objective(pistar.log(), bandit.rewards, alpha)
    assert bool((j_pi <= j_star + ATOL).all())

    logits = pistar.log().clone().requires_grad_(True)
    j = objectives.maxent_objective(torch.log_softmax(logits, -1), bandit.rewards, alpha).sum()
    (grad,) = torch.autograd.grad(j, logits)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-9)


@given(bandit_and_policy())
def test_c1_suboptimality_gap_is_alpha_kl(problem):
    """C.1: "max_pi E[r] + alpha H = min_pi E_x[ D_KL(pi(y|x) || pi*(y|x)) - log Z(x) ]" (times alpha), i.e.
    J(pi) - J(pi*) = -alpha KL(pi || pi*) for every policy pi — so by Gibbs' inequality the maximiser is
    unique and equals pi* (Eq. 8)."""
    bandit, alpha, logpi = problem
    logpistar = objectives.maxent_optimal_policy(bandit.rewards, alpha).log()
    gap = objectives.maxent_objective(logpi, bandit.rewards, alpha) - objectives.maxent_objective(
        logpistar, bandit.rewards, alpha
    )
    assert torch.allclose(gap, -alpha * _kl(logpi, logpistar), atol=ATOL, rtol=1e-9)


@given(bandit_and_policy())
def test_c1_optimal_value_is_alpha_log_partition(problem):
    """C.1: with "Z(x) = sum_y exp(r(x,y)/alpha)", the optimal value is J(pi*) = alpha log Z(x)
    (the KL term vanishes at pi*, leaving -log Z inside the minimisation, times -alpha)."""
    bandit, alpha, _ = problem
    logpistar = objectives.maxent_optimal_policy(bandit.rewards, alpha).log()
    j_star = objectives.maxent_objective(logpistar, bandit.rewards, alpha)
    log_z = objectives.maxent_log_partition(bandit.rewards, alpha)
    assert torch.allclose(j_star, alpha * log_z, atol=ATOL, rtol=1e-10)
    # log Z is the log of the sum of exp(r / alpha), computed here by brute force in float64
    brute = torch.log(torch.exp(bandit.rewards / alpha).sum(-1))
    assert torch.allclose(log_z, brute, atol=1e-10, rtol=1e-12)


@S.scaled(0.4)
@given(
    shape=S.bandit_shapes(max_responses=5),
    data=st.data(),
    alpha=S.alphas(1.0, 5.0),
)
def test_c1_gradient_ascent_converges_to_optimum(shape, data, alpha):
    """C.1: "the minimum is attained by the policy that minimizes the first KL term" — pi* is the unique
    maximiser, so plain gradient ascent on J (Eq. 2) over softmax-table logits, from a random start,
    increases J monotonically and converges to pi* = softmax(r/alpha) (Eq. 8), with J -> alpha log Z.

    (Rewards in [-1, 1], alpha >= 1: r/alpha spans at most 2 nats, so 800 steps of size
    2 / (alpha + max r - min r) converge to ~1e-8. Plain gradient ascent still converges for wide
    spreads, but its rate near the optimum is ~ alpha * min_y pi*(y): an r/alpha spread of 100 nats
    would need astronomically many steps.)"""
    rewards = data.draw(S.reward_tables(shape, bound=1.0))
    logits = data.draw(S.logit_tables(shape, bound=2.0)).clone().requires_grad_(True)
    lr = 2.0 / (alpha + float(rewards.max() - rewards.min()))
    values = []
    for _ in range(800):
        j = objectives.maxent_objective(torch.log_softmax(logits, -1), rewards, alpha).sum()
        (grad,) = torch.autograd.grad(j, logits)
        with torch.no_grad():
            logits += lr * grad
        values.append(float(j.detach()))
    values = torch.tensor(values, dtype=torch.float64)
    assert bool((values.diff() >= -1e-12).all()), "gradient ascent on J must not decrease J"
    pistar = objectives.maxent_optimal_policy(rewards, alpha)
    pi = torch.softmax(logits.detach(), -1)
    assert torch.allclose(pi, pistar, atol=1e-6)
    assert abs(values[-1] - alpha * objectives.maxent_log_partition(rewards, alpha).sum()) < 1e-8


@given(bandit_and_policy(allow_zeros=False), S.float_tensors((3,), -20.0, 20.0))
def test_eq4_reward_is_alpha_log_policy_plus_alpha_log_partition(problem, shifts):
    """Eq. 4: "r(x,y) = alpha log pi_r(y|x) + alpha log Z(x)". Recovering the reward from the optimal
    policy and the partition function gives back r exactly; and for any policy pi and any offset c(x),
    the reward alpha log pi + alpha c(x) has pi as its MaxEnt-optimal policy (the map is a bijection
    between policies and reward classes)."""
    bandit, alpha, logpi = problem
    logpistar = objectives.maxent_optimal_policy(bandit.rewards, alpha).log()
    log_z = objectives.maxent_log_partition(bandit.rewards, alpha)
    recovered = objectives.reward_from_policy(logpistar, alpha, log_z)
    assert torch.allclose(recovered, bandit.rewards, atol=1e-9, rtol=1e-10)

    c = shifts[: bandit.num_prompts]
    r_pi = objectives.reward_from_policy(logpi, alpha, c)
    assert torch.allclose(objectives.maxent_optimal_policy(r_pi, alpha).log(), logpi, atol=1e-9)
    assert torch.allclose(objectives.maxent_log_partition(r_pi, alpha), c, atol=1e-9)


@given(bandit_and_policy(allow_zeros=False), st.booleans())
def test_eq6_regularised_reward_expectation_is_maxent_objective(problem, min_entropy):
    """Eq. 6: the MaxEnt RLOO reward "r - alpha log pi(y|x)" has expectation under pi equal to the MaxEnt
    objective E[r] + alpha H(pi) (Eq. 2): E_pi[r - alpha log pi] = J(pi). A negative coefficient is the
    minimum-entropy variant (Sec. 4.2.1): E_pi[r + alpha log pi] = E[r] - alpha H(pi)."""
    bandit, alpha, logpi = problem
    coef = -alpha if min_entropy else alpha
    # every (x, y) is a one-token "sequence"; its log-prob is the single token's log-prob
    flat_scores = bandit.rewards.reshape(-1)
    flat_logp = logpi.reshape(-1, 1)
    reg = objectives.regularized_reward(flat_scores, flat_logp, torch.ones_like(flat_logp), "entropy", coef)
    lhs = expectation(logpi, reg.rewards.reshape(bandit.rewards.shape))
    entropy = objectives.token_entropy(logpi)
    assert torch.allclose(lhs, expectation(logpi, bandit.rewards) + coef * entropy, atol=ATOL)
    if not min_entropy:
        assert torch.allclose(lhs, objectives.maxent_objective(logpi, bandit.rewards, alpha), atol=ATOL)
