"""Appendix C.5 (Lemma 1, Lemma 2) and C.6 (Theorem 1, Proposition 1): reward equivalence classes
r'(x,y) = r(x,y) + f(x), on the exact bandit."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from maxent_rlhf import objectives
from theory import strategies as S
from theory.toys import all_rankings, make_bandit


@st.composite
def class_members(draw, max_responses=6):
    """(bandit with reward r, alpha, f) with f(x) one shift per prompt: r' = r + f(x) is in r's class."""
    shape = draw(S.bandit_shapes(max_responses=max_responses))
    bandit = make_bandit(draw(S.reward_tables(shape)))
    f = draw(S.float_tensors((shape[0],), -S.SHIFT_BOUND, S.SHIFT_BOUND))
    return bandit, draw(S.alphas()), f


@given(class_members(max_responses=5))
def test_c5_lemma1_same_class_same_preferences(problem):
    """Lemma 1 (C.5): "Under the Plackett-Luce preference framework, and in particular the Bradley-Terry
    framework, two reward functions from the same equivalence class induce the same preference
    distribution" — p_{r+f}(tau) = p_r(tau) for every ranking tau of every prompt (Eq. 11), and every
    pairwise Bradley-Terry probability (Eq. 1) is unchanged."""
    bandit, _, f = problem
    shifted = bandit.rewards + f[:, None]
    rankings = all_rankings(bandit.num_responses)
    for x in range(bandit.num_prompts):
        assert torch.allclose(
            objectives.plackett_luce_log_likelihood(shifted[x][rankings]),
            objectives.plackett_luce_log_likelihood(bandit.rewards[x][rankings]),
            atol=1e-9,
        )
    x, i, j = bandit.pairs()
    assert torch.allclose(
        objectives.bradley_terry_probability(shifted[x, i], shifted[x, j]),
        objectives.bradley_terry_probability(bandit.rewards[x, i], bandit.rewards[x, j]),
        atol=1e-12,
    )


@given(class_members(), S.logit_tables((3, 6)))
def test_c5_lemma2_same_class_same_optimal_policy(problem, logits):
    """Lemma 2 (C.5): "Two reward functions from the same equivalence class induce the same optimal policy
    under the entropy-regularized RL problem": pi_{r+f} = pi_r (Eq. 8). Moreover J_{r+f}(pi) = J_r(pi) + f(x)
    for every policy pi, so the whole objective landscape is only shifted per prompt."""
    bandit, alpha, f = problem
    shifted = bandit.rewards + f[:, None]
    assert torch.allclose(
        objectives.maxent_optimal_policy(shifted, alpha), objectives.maxent_optimal_policy(bandit.rewards, alpha),
        atol=1e-12,
    )
    logpi = torch.log_softmax(logits[: bandit.num_prompts, : bandit.num_responses], -1)
    assert torch.allclose(
        objectives.maxent_objective(logpi, shifted, alpha),
        objectives.maxent_objective(logpi, bandit.rewards, alpha) + f,
        atol=1e-9,
    )


@given(class_members())
def test_c6_theorem1_every_class_is_alpha_log_pi(problem):
    """Theorem 1 (C.6): "All reward equivalence classes ... can be represented with the reparameterization
    r(x,y) = alpha log pi(y|x) for some model pi(y|x)". The operator f(r, alpha) = r - alpha log Z(x)
    gives r' = alpha log pi_r with pi_r a distribution; r' is in r's class (r' - r depends on x only), and
    f maps every member r + g(x) of the class to the same r' (via Lemma 2)."""
    bandit, alpha, g = problem
    log_z = objectives.maxent_log_partition(bandit.rewards, alpha)
    r_prime = bandit.rewards - alpha * log_z[:, None]
    pi_r = objectives.maxent_optimal_policy(bandit.rewards, alpha)
    assert torch.allclose(pi_r.sum(-1), torch.ones_like(log_z), atol=1e-12)
    assert torch.allclose(objectives.reward_from_policy(pi_r.log(), alpha), r_prime, atol=1e-9)
    diff = r_prime - bandit.rewards
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-9), "r' - r must not depend on y"
    other = bandit.rewards + g[:, None]  # another member of the class
    pi_other = objectives.maxent_optimal_policy(other, alpha)
    assert torch.allclose(objectives.reward_from_policy(pi_other.log(), alpha), r_prime, atol=1e-9)


@given(
    st.integers(1, 3).flatmap(lambda x: st.tuples(S.policy_logprobs((x, 5), allow_zeros=False), S.float_tensors((x,), -20.0, 20.0))),
    S.alphas(),
    st.booleans(),
)
def test_c6_proposition1_representative_is_unique(pi_and_f, alpha, zero_shift):
    """Proposition 1 (C.6): "every equivalence class of reward functions has a unique reward function
    r(x,y), which can be reparameterized as r(x,y) = alpha log pi(y|x)". If r = alpha log pi and
    r' = r + f(x) = alpha log pi' with pi, pi' distributions, then "pi(y|x) exp(f(x)/alpha) = pi'(y|x)" and
    summing over y forces exp(f(x)/alpha) = 1, i.e. f(x) = 0: exp(r'/alpha) sums to exp(f(x)/alpha), so it
    is normalised exactly when f = 0, and the canonical member of r''s class is r itself."""
    logpi, f = pi_and_f
    if zero_shift:
        f = torch.zeros_like(f)
    r = objectives.reward_from_policy(logpi, alpha)
    r_prime = r + f[:, None]
    # total mass of exp(r'/alpha) is exp(f/alpha): one (a distribution) iff f = 0
    assert torch.allclose(objectives.maxent_log_partition(r_prime, alpha), f / alpha, atol=1e-10)
    normalised = objectives.maxent_log_partition(r_prime, alpha).abs() < 1e-12
    assert bool((normalised == (f.abs() < 1e-12 * alpha)).all())
    # the representative alpha log pi_{r'} of r''s class is r (= alpha log pi), whatever f was
    representative = objectives.reward_from_policy(objectives.maxent_optimal_policy(r_prime, alpha).log(), alpha)
    assert torch.allclose(representative, r, atol=1e-9)
