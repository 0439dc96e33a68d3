"""The learning-rate schedule of every training script: `lr_scheduler_type` + `warmup_ratio`, one helper.

transformers' schedules (the numbers of `transformers.get_scheduler`): a linear warmup from 0 over
int(warmup_ratio * num_training_steps) steps, then 'linear' or 'cosine' decay to 0, or 'constant'.
Two deliberate differences:
- 'constant' honours the warmup (transformers' 'constant_with_warmup'; its plain 'constant' ignores
  the warmup silently);
- 'linear' without warmup is computed as 1 - t / N, the expression train_rloo has always used
  (transformers writes (N - t) / N: the same number up to the last bit, ~1e-14 relative, but runs made
  before this helper existed reproduce bit for bit only with their own expression).
One scheduler step = one optimizer step in train_offline, one iteration in train_rloo.
"""
from __future__ import annotations

import functools

import torch

from .config import LR_SCHEDULER_TYPES, ConfigError


def _linear_without_warmup(step: int, num_training_steps: int) -> float:
    return max(0.0, 1.0 - step / num_training_steps)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, lr_scheduler_type: str, num_training_steps: int, warmup_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `num_training_steps` scheduler steps (its state is checkpointed with the optimizer)."""
    from transformers import get_scheduler

    if lr_scheduler_type not in LR_SCHEDULER_TYPES:
        raise ConfigError(f"`lr_scheduler_type` must be one of {list(LR_SCHEDULER_TYPES)}, got {lr_scheduler_type!r}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError(f"`warmup_ratio` = {warmup_ratio} must be in [0, 1]")
    num_warmup_steps = int(warmup_ratio * num_training_steps)
    if lr_scheduler_type == "linear" and num_warmup_steps == 0:
        lr_lambda = functools.partial(_linear_without_warmup, num_training_steps=max(1, num_training_steps))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    name = "constant_with_warmup" if lr_scheduler_type == "constant" else lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
