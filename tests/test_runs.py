"""Run directory and checkpoints: exact round trip, atomic writes, keep_last, resume resolution."""
import json
import random

import numpy as np
import pytest
import torch

from maxent_rlhf.checkpoints import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, resolve_resume,
                                     save_checkpoint)
from maxent_rlhf.models import build_tiny_policy
from maxent_rlhf.runs import NonFiniteError, RunDir, check_finite, read_metrics


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


def test_metrics_jsonl_and_truncation_on_resume(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 6):
        run.log_metrics({"train/loss": torch.tensor(1.0 / step), "train/lr": 0.1}, step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut by a kill
    run.truncate_logs_after(3)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["train/loss"] == pytest.approx(0.5)


def test_check_finite_names_the_quantity_and_the_checkpoint(tmp_path, tiny_tokenizer):
    run = RunDir(tmp_path)
    save_checkpoint(run, 4, build_tiny_policy(tiny_tokenizer, seed=0))
    check_finite("train/loss", torch.tensor(1.0), 5, run)
    with pytest.raises(NonFiniteError, match=r"train/loss is nan at step 5.*step_00000004"):
        check_finite("train/loss", torch.tensor(float("nan")), 5, run)


def test_jsonl_after_a_torn_line_keeps_every_later_record(tmp_path):
    """A kill mid-write leaves a torn last line; the next append starts a line of its own, so only the
    fragment is lost (evaluate_judge's generations and the judgment cache append this way)."""
    from maxent_rlhf.runs import open_jsonl_for_append, read_jsonl

    path = tmp_path / "sub" / "g.jsonl"
    with open_jsonl_for_append(path) as f:  # creates the folder
        f.write('{"id": "a"}\n')
    with open(path, "a") as f:
        f.write('{"id": "b", "gen')  # killed here
    with open_jsonl_for_append(path) as f:
        f.write('{"id": "c"}\n')
    torn = []
    assert read_jsonl(path, torn=torn) == [{"id": "a"}, {"id": "c"}] and torn == [2]
    assert read_jsonl(path, numbered=True) == [(1, {"id": "a"}), (3, {"id": "c"})]
    with open(path, "a") as f:  # the naive append glues the next record to the fragment: it is lost
        f.write('{"id": "b", "gen')
    with open(path, "a") as f:
        f.write('{"id": "d"}\n')
    assert {"id": "d"} not in read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


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


def test_the_saved_config_records_the_precision_that_ran(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from maxent_rlhf.config import TrainConfig, load_yaml
    from maxent_rlhf.distributed import precision_that_ran

    def acc(mp, device):
        return SimpleNamespace(mixed_precision=mp, device=torch.device(device), is_main_process=True, num_processes=1,
                               wait_for_everyone=lambda: None)

    assert precision_that_ran("fp16", acc("fp16", "cpu")) == "no"  # accelerate has no fp16 autocast on CPU
    assert precision_that_ran("bf16", acc("bf16", "cpu")) == "bf16"
    assert precision_that_ran("fp16", acc("fp16", "cuda")) == "fp16"
    assert precision_that_ran("auto", acc("bf16", "cuda")) == "bf16"  # what the Accelerator applied
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_that_ran("auto") == "no"
    run = RunDir(tmp_path / "run", acc("fp16", "cpu"))
    run.save_config(TrainConfig(output_dir=str(tmp_path / "run"), mixed_precision="fp16"))
    assert load_yaml(tmp_path / "run" / "config.yaml")["mixed_precision"] == "no"
