"""Bounded hypothesis strategies (no NaN / inf) for the theory suite.

Ranges follow the paper's regime: rewards in [-5, 5], temperatures alpha in [0.1, 5], logits in
[-4, 4], equivalence-class shifts f(x) in [-20, 20]. Everything is float64.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

DTYPE = torch.float64

REWARD_BOUND = 5.0
ALPHA_RANGE = (0.1, 5.0)
LOGIT_BOUND = 4.0
SHIFT_BOUND = 20.0


def scaled(fraction: float, minimum: int = 5) -> settings:
    """Settings with max_examples = fraction * the active profile's (for tests that run an optimiser)."""
    return settings(max_examples=max(minimum, int(settings.default.max_examples * fraction)))


def bounded_floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


def alphas(lo: float = ALPHA_RANGE[0], hi: float = ALPHA_RANGE[1]) -> st.SearchStrategy[float]:
    return bounded_floats(lo, hi)


def shifts(bound: float = SHIFT_BOUND) -> st.SearchStrategy[float]:
    return bounded_floats(-bound, bound)


def float_tensors(shape, lo: float, hi: float) -> st.SearchStrategy[torch.Tensor]:
    """float64 tensors of a fixed shape with every entry in [lo, hi]."""
    return arrays(np.float64, tuple(shape), elements=bounded_floats(lo, hi)).map(
        lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DTYPE)
    )


def reward_tables(shape, bound: float = REWARD_BOUND) -> st.SearchStrategy[torch.Tensor]:
    return float_tensors(shape, -bound, bound)


def logit_tables(shape, bound: float = LOGIT_BOUND) -> st.SearchStrategy[torch.Tensor]:
    return float_tensors(shape, -bound, bound)


@st.composite
def bandit_shapes(draw, max_prompts: int = 3, min_responses: int = 2, max_responses: int = 6):
    """(num_prompts X, num_responses Y)."""
    return draw(st.integers(1, max_prompts)), draw(st.integers(min_responses, max_responses))


@st.composite
def policy_logprobs(draw, shape, allow_zeros: bool = True):
    """log pi for softmax-table policies of `shape` [..., Y]; optionally with some responses at
    probability exactly 0 (log pi = -inf), never all of them."""
    logits = draw(logit_tables(shape))
    if allow_zeros and draw(st.booleans()):
        keep = draw(arrays(np.bool_, tuple(shape)))
        keep = torch.from_numpy(keep)
        keep[..., 0] |= ~keep.any(-1)  # at least one response in every row keeps mass
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


seeds = st.integers(0, 2**31 - 1)
