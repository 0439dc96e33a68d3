"""KL between consecutive policies, in both directions, from samples of the older policy.

The paper plots KL(pi_t || pi_{t-1}) (Fig. 3 bottom, Figs. 10-12); an RLOO iteration only has samples of
pi_{t-1} = pi_old and the log-probs of those samples before (old) and after (new) the update. On the
enumerable autoregressive toy (variable-length responses padded after EOS) the exact expectation under
pi_old of each estimator in `objectives` is compared with the exact sequence-level KL in its direction.
"""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from maxent_rlhf import objectives
from theory import strategies as S
from theory.toys import ARPolicy, categorical, expectation, make_ar_toy

AR_TOY = make_ar_toy(vocab_size=3, max_len=3)  # 15 responses of lengths 1, 2, 3, padded with EOS


def _perturbed(policy: ARPolicy, delta: float, seed: int) -> ARPolicy:
    """A second policy: every parameter moved by delta * N(0, 1) (small delta: one small update)."""
    g = torch.Generator().manual_seed(seed)
    other = ARPolicy(policy.vocab_size, policy.max_len, seed=0)
    with torch.no_grad():
        for p_new, p_old in zip(other.parameters(), policy.parameters()):
            p_new.copy_(p_old + delta * torch.randn(p_old.shape, generator=g, dtype=p_old.dtype))
    return other


def _token_and_sequence_logprobs(policy: ARPolicy, temperature: float):
    with torch.no_grad():
        tok = objectives.token_logprobs(policy.logits(AR_TOY.sequences), AR_TOY.sequences, temperature=temperature)
    return tok, objectives.masked_sum(tok, AR_TOY.mask)


def _exact_expectations(old: ARPolicy, new: ARPolicy, temperature: float):
    old_tok, old_seq = _token_and_sequence_logprobs(old, temperature)
    new_tok, new_seq = _token_and_sequence_logprobs(new, temperature)
    assert abs(float(torch.logsumexp(old_seq, 0))) < 1e-12, "the enumerated responses must carry all the mass"
    kl_old_new = torch.distributions.kl_divergence(categorical(old_seq), categorical(new_seq))
    kl_new_old = torch.distributions.kl_divergence(categorical(new_seq), categorical(old_seq))
    estimates = {}
    for name in ("k1", "k3"):
        per_seq_rev = objectives.kl_old_new_from_old_samples(old_tok, new_tok, AR_TOY.mask, name)
        per_seq_fwd = objectives.kl_new_old_from_old_samples(old_tok, new_tok, AR_TOY.mask, name)
        estimates[name] = (per_seq_rev, per_seq_fwd, expectation(old_seq, per_seq_rev), expectation(old_seq, per_seq_fwd))
    return float(kl_old_new), float(kl_new_old), estimates


@given(S.seeds, S.seeds, S.bounded_floats(0.3, 2.0), S.bounded_floats(0.01, 2.0), S.bounded_floats(0.5, 2.0), st.booleans())
def test_each_consecutive_kl_estimator_is_unbiased_in_its_direction(seed_old, seed_step, scale, delta, temperature, independent):
    """Beyond the paper (its Figs. 3, 10-12 plot KL(pi_t || pi_{t-1})): for responses y ~ pi_old and
    w = exp(sum_t [log pi_new(y_t) - log pi_old(y_t)]) over the real tokens,
      E_old[w log w] = E_old[w log w - w + 1] = KL(pi_new || pi_old)    (`kl_new_old_from_old_samples`),
      E_old[sum_t k1] = E_old[sum_t k3] = KL(pi_old || pi_new)          (`kl_old_new_from_old_samples`),
    exactly, on the autoregressive toy (variable lengths, padding masked), at any sampling temperature, for
    a nearby pi_new (one small update, delta) or an unrelated one. Each estimator misses the other
    direction by exactly the gap between the two KLs; every k3 term (either direction) is >= 0."""
    old = ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=seed_old, scale=scale)
    new = (ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=seed_step + 1, scale=scale) if independent
           else _perturbed(old, delta, seed_step))
    kl_old_new, kl_new_old, estimates = _exact_expectations(old, new, temperature)
    tol = 1e-10 * max(1.0, kl_old_new, kl_new_old)
    for name, (per_seq_rev, per_seq_fwd, e_rev, e_fwd) in estimates.items():
        assert abs(float(e_fwd) - kl_new_old) < tol, name
        assert abs(float(e_rev) - kl_old_new) < tol, name
        gap = abs(kl_new_old - kl_old_new)
        if gap > 1e-6:  # the directions differ: each estimator tells them apart
            assert abs(float(e_fwd) - kl_old_new) > 0.5 * gap and abs(float(e_rev) - kl_new_old) > 0.5 * gap
        if name == "k3":
            assert bool((per_seq_fwd >= -1e-12).all()) and bool((per_seq_rev >= -1e-12).all())


def test_consecutive_kl_directions_differ_in_the_large_drift_regime():
    """Companion on two fixed policies: after one small step the directions agree to second order
    (relative gap ~ step size), after a large drift they differ by a large factor -- so a curve of
    KL(pi_{t-1} || pi_t) is not the paper's KL(pi_t || pi_{t-1}) exactly where the paper looks."""
    old = ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=7)
    small_rev, small_fwd, _ = _exact_expectations(old, _perturbed(old, 0.01, 3), 1.0)
    assert 0 < small_fwd and abs(small_fwd - small_rev) < 0.05 * small_fwd
    # a sharp pi_new: it puts its mass where pi_old has little, so KL(new || old) and KL(old || new) part
    sharp = ARPolicy(AR_TOY.vocab_size, AR_TOY.max_len, seed=11, scale=3.0)
    large_rev, large_fwd, estimates = _exact_expectations(old, sharp, 1.0)
    assert abs(large_fwd - large_rev) > 0.25 * max(large_fwd, large_rev)
    assert abs(float(estimates["k1"][3]) - large_fwd) < 1e-10 * max(1.0, large_fwd)
