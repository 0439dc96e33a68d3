"""The toy problems themselves: the enumerations are complete, so every "exact expectation" is exact."""
from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from maxent_rlhf import objectives
from theory import strategies as S
from theory.toys import EOS, ARPolicy, all_rankings, all_tuples, make_ar_toy, make_bandit


@given(st.integers(2, 4), st.integers(1, 3), S.seeds)
def test_ar_toy_enumerates_a_complete_distribution(vocab, max_len, seed):
    """Every response (ends at its first EOS, or after T tokens) appears once; pi(y|x) sums to one over them."""
    toy = make_ar_toy(vocab, max_len)
    w = vocab - 1
    assert toy.num_sequences == sum(w ** (length - 1) for length in range(1, max_len + 1)) + w**max_len
    assert len({tuple(s[: int(n)].tolist()) for s, n in zip(toy.sequences, toy.lengths)}) == toy.num_sequences
    for s, n in zip(toy.sequences, toy.lengths):
        body = s[: int(n)].tolist()
        assert EOS not in body[:-1] and (body[-1] == EOS or int(n) == max_len)
    assert torch.equal(toy.mask.sum(-1), toy.lengths.to(toy.mask.dtype))
    logp = ARPolicy(vocab, max_len, seed=seed).sequence_logprobs(toy).detach()
    assert abs(float(torch.logsumexp(logp, 0))) < 1e-12


def test_enumeration_helpers_sizes():
    bandit = make_bandit(torch.zeros(2, 4))
    x, i, j = bandit.pairs()
    assert len(x) == 2 * 4 * 3 and bool((i != j).all())
    assert all_rankings(4).shape == (math.factorial(4), 4)
    assert all_tuples(5, 3).shape == (125, 3)
    assert objectives.maxent_optimal_policy(bandit.rewards, 1.0).shape == (2, 4)
