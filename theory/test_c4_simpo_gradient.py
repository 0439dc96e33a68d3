"""Appendix C.4: the closed-form SimPO gradient, checked against autograd of `objectives.simpo_loss` on the
tiny autoregressive toy with a parametric policy (so grad_theta log pi(y|x) is nontrivial and differs
between sequences of different lengths).

General form (derived here; the paper states the gamma = 0, unnormalised case). With
A(y) = log pi_theta(y|x) / |y| under length normalisation (A = log pi_theta(y|x) otherwise),
u = beta A(y_w) - beta A(y_l) - gamma and L = -E[log sigma(u)]:

    grad_theta L = -E[ sigma'(u) / sigma(u) * grad_theta u ] = -E[ beta * sigma(-u) * (grad A(y_w) - grad A(y_l)) ],

using sigma'(u) = sigma(u) (1 - sigma(u)) and 1 - sigma(u) = sigma(-u); the margin gamma only moves the
point where sigma(-u) is evaluated, and length normalisation divides each grad log pi by its |y|.
"""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from maxent_rlhf import objectives
from theory import strategies as S
from theory.toys import ARPolicy, make_ar_toy

TOY = make_ar_toy(vocab_size=3, max_len=3)  # 15 responses of lengths 1, 2, 3


@st.composite
def preference_pairs(draw, max_pairs=4):
    """Index pairs (w, l), w != l, into the enumerated responses."""
    n = TOY.num_sequences
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1]),
            min_size=1,
            max_size=max_pairs,
        )
    )
    w, l = zip(*pairs)
    return torch.tensor(w), torch.tensor(l)


def _autograd_and_closed_form(seed, pairs, beta, gamma, length_normalize):
    policy = ARPolicy(TOY.vocab_size, TOY.max_len, seed=seed)
    w, l = pairs
    logps = policy.sequence_logprobs(TOY)  # S = log pi_theta(y|x) for every response
    lengths = TOY.lengths.to(torch.float64)
    loss = objectives.simpo_loss(
        logps[w], logps[l], lengths[w], lengths[l], beta=beta, gamma=gamma, length_normalize=length_normalize
    ).losses.mean()
    autograd = policy.flat_grad(loss)

    # closed form: grad A(y) from the per-response Jacobian of log pi_theta (no loss involved)
    used, inverse = torch.unique(torch.cat([w, l]), return_inverse=True)
    grad_logp = policy.per_sequence_grads(logps[used])[inverse]  # rows: grad log pi(y_w) ..., grad log pi(y_l) ...
    grad_w, grad_l = grad_logp[: len(w)], grad_logp[len(w) :]
    a = logps.detach() / lengths if length_normalize else logps.detach()
    if length_normalize:
        grad_w, grad_l = grad_w / lengths[w, None], grad_l / lengths[l, None]
    u = beta * a[w] - beta * a[l] - gamma
    closed = (-beta * torch.sigmoid(-u)[:, None] * (grad_w - grad_l)).mean(0)
    return autograd, closed, grad_logp[: len(w)] - grad_logp[len(w) :]


@given(S.seeds, preference_pairs(), S.alphas())
def test_c4_simpo_gradient_closed_form_paper(seed, pairs, alpha):
    """C.4: "grad_theta L_SimPO(pi_theta) = -E_{(x,y_w,y_l)~D}[ alpha sigma(alpha log pi_theta(y_l|x)
    - alpha log pi_theta(y_w|x)) [grad_theta log pi(y_w|x) - grad_theta log pi(y_l|x)] ]" — the paper's
    case (no target margin, no length normalisation) equals autograd of `objectives.simpo_loss`."""
    autograd, closed, grad_diff = _autograd_and_closed_form(seed, pairs, alpha, 0.0, False)
    assert bool((grad_diff.norm(dim=-1) > 1e-6).all()), "the toy policy must give distinct grad log pi"
    assert torch.allclose(autograd, closed, atol=1e-11, rtol=1e-9)


@given(S.seeds, preference_pairs(), S.alphas(), S.bounded_floats(0.0, 3.0), st.booleans())
def test_c4_simpo_gradient_closed_form_general(seed, pairs, beta, gamma, length_normalize):
    """C.4, general form (module docstring): with A = log pi_theta(y|x) / |y| (length normalisation, Sec. 3.2)
    or A = log pi_theta(y|x), and u = beta A_w - beta A_l - gamma,
    "dL/dtheta = -beta sigma(-u) [grad A_w - grad A_l]", averaged over the preference pairs; equals autograd
    of `objectives.simpo_loss` for any target margin gamma >= 0."""
    autograd, closed, _ = _autograd_and_closed_form(seed, pairs, beta, gamma, length_normalize)
    assert torch.allclose(autograd, closed, atol=1e-11, rtol=1e-9)
