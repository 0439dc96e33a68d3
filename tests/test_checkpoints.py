"""Checkpoints (maxent_rlhf.checkpoints): exact round trip, atomic writes, keep_last, resume resolution, a
damaged file named."""
import random

import numpy as np
import pytest
import torch

from maxent_rlhf.checkpoints import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, resolve_resume,
                                     save_checkpoint)
from maxent_rlhf.models import build_tiny_policy
from maxent_rlhf.runs import RunDir


def _train_steps(model, opt, sched, n):
    for _ in range(n):
        ids = torch.randint(3, 20, (2, 6))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_rng(tmp_path, tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    run = RunDir(tmp_path / "run")
    torch.manual_seed(0)
    _train_steps(model, opt, sched, 2)
    path = save_checkpoint(run, 2, model, tiny_tokenizer, opt, sched, state={"epoch": 0, "position": 4})
    # continue: the reference trajectory
    ref_draw = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123), np.random.seed(123), torch.manual_seed(123)  # perturb RNG to prove it is restored
    _train_steps(model, opt, sched, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = build_tiny_policy(tiny_tokenizer, seed=99)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state == {"epoch": 0, "position": 4, "step": 2}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == ref_draw
    assert sched2.last_epoch == 2
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    _train_steps(model2, opt2, sched2, 2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_checkpoint_is_hf_loadable_safetensors(tmp_path, tiny_tokenizer):
    from maxent_rlhf.models import load_policy, load_tokenizer

    model = build_tiny_policy(tiny_tokenizer, seed=0)
    path = save_checkpoint(RunDir(tmp_path), 5, model, tiny_tokenizer)
    assert path.name == "step_00000005"
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    loaded = load_policy(str(path))
    ids = torch.tensor([[3, 4, 5]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert len(load_tokenizer(str(path))) == len(tiny_tokenizer)


def test_keep_last_and_latest(tmp_path, tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    run = RunDir(tmp_path)
    for step in (1, 2, 3, 4):
        save_checkpoint(run, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert resolve_resume("latest", tmp_path).name == "step_00000004"
    assert resolve_resume(None, tmp_path) is None


def test_partial_checkpoint_is_never_picked(tmp_path, tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    run = RunDir(tmp_path)
    save_checkpoint(run, 1, model)
    # a kill while saving leaves a temporary directory, and a step dir without trainer_state.json
    (tmp_path / "checkpoints" / ".tmp-step_00000002").mkdir()
    (tmp_path / "checkpoints" / "step_00000003").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step_00000003"), tmp_path)


def test_a_damaged_checkpoint_file_is_named_with_the_ways_on(tmp_path, tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    run = RunDir(tmp_path / "run")
    first = save_checkpoint(run, 1, model, tiny_tokenizer)
    second = save_checkpoint(run, 2, model, tiny_tokenizer)
    weights = second / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # a copy cut short
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(second, model=model)
    message = str(e.value)
    assert message.startswith(f"{weights} is damaged and cannot be read (") and "\n" not in message
    assert message.endswith(f"resume from an earlier checkpoint with --resume {first}, or start over with --overwrite_output_dir")
    state = first / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{state} is damaged .* --resume <checkpoint dir>, or start over"):
        load_checkpoint(first, model=model)
