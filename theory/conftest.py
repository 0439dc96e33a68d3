"""Hypothesis profiles for the theory suite.

- `ci`  (selected when the environment variable CI is set): derandomised, no deadline, no example
  database, a moderate number of examples. Same examples on every run.
- `dev` (default): random examples, no deadline (the first torch call of a process is slow), a few
  more examples than `ci`.
Select another explicitly with `HYPOTHESIS_PROFILE=<name>` (also `ci-long` for a slow, thorough run).
Individual tests that run an optimiser lower `max_examples` themselves (always relative to the
profile via `theory.strategies.scaled`).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

settings.register_profile("ci", derandomize=True, database=None, max_examples=50, **_COMMON)
settings.register_profile("dev", max_examples=40, **_COMMON)
settings.register_profile("ci-long", derandomize=True, database=None, max_examples=400, **_COMMON)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """The toys are tiny: intra-op threads only add hand-off latency (30x slower backward passes on a
    busy 2-core machine). Restores the caller's setting so tests elsewhere are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
