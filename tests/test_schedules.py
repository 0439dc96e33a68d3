"""The shared learning-rate schedule (maxent_rlhf.schedules): hand-computed values, transformers' numbers,
and train_rloo's historical linear decay bit for bit."""
import math

import pytest
import torch

from maxent_rlhf.config import ConfigError
from maxent_rlhf.schedules import build_lr_scheduler


def lrs(kind, n, warmup_ratio, base_lr=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = build_lr_scheduler(opt, kind, n, warmup_ratio)
    out = []
    for _ in range(n + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_hand_computed_values_with_warmup():
    # N = 10, warmup 0.2 -> 2 warmup steps: 0, 1/2, then decay over the remaining 8 steps
    lin, cos, const = lrs("linear", 10, 0.2), lrs("cosine", 10, 0.2), lrs("constant", 10, 0.2)
    assert lin[:3] == cos[:3] == const[:3] == [0.0, 0.5, 1.0]
    assert lin[6] == pytest.approx(0.5) and lin[10] == 0.0
    assert cos[6] == pytest.approx(0.5) and cos[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert cos[10] == pytest.approx(0.0, abs=1e-12)
    assert const[3:] == [1.0] * 8  # 'constant' honours the warmup, then stays at the peak


def test_numbers_equal_transformers_get_scheduler():
    from transformers import get_scheduler

    for kind, hf_name, n, ratio in [("cosine", "cosine", 37, 0.0), ("cosine", "cosine", 37, 0.1),
                                    ("linear", "linear", 37, 0.05), ("constant", "constant_with_warmup", 37, 0.3)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        hf = get_scheduler(hf_name, opt, num_warmup_steps=int(ratio * n), num_training_steps=n)
        expected = []
        for _ in range(n + 1):
            expected.append(hf.get_last_lr()[0])
            opt.step()
            hf.step()
        assert lrs(kind, n, ratio, base_lr=3e-4) == expected, (kind, ratio)  # exactly


@pytest.mark.parametrize("n", [10, 80, 976])
def test_linear_without_warmup_is_train_rloos_historical_decay_bit_for_bit(n):
    lr = 1e-6
    assert lrs("linear", n, 0.0, base_lr=lr) == [lr * max(0.0, 1.0 - t / n) for t in range(n + 1)]


def test_bad_values_name_the_key():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="`lr_scheduler_type` must be one of"):
        build_lr_scheduler(opt, "polynomial", 10)
    with pytest.raises(ConfigError, match="`warmup_ratio` = 1.5 must be in"):
        build_lr_scheduler(opt, "linear", 10, 1.5)
