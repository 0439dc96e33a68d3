"""LoRA in the trainers (use_peft): DPO / SimPO / SFT / reward model and RLOO (kl and entropy) end to end on
tiny models; the reference is the policy with its adapter switched off and equals the base model loaded
separately; adapter checkpoints resume exactly and are judged exactly as their merged copy; sharded runs
(DDP, FSDP2) on two CPU processes equal one process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the scripts are top-level modules, importable from the repo root

import train_offline  # noqa: E402
from maxent_rlhf import checkpoints, lora, models, objectives, runs  # noqa: E402
from maxent_rlhf.config import ConfigError  # noqa: E402
from test_offline import datasets, make_cfg  # noqa: E402,F401  (the module's fixture and config builder)

LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)


def _trainable_names(ckpt) -> set:
    from safetensors import safe_open

    with safe_open(str(Path(ckpt) / lora.ADAPTER_WEIGHTS), framework="pt") as f:
        return set(f.keys())


# --------------------------------------------------------------------------------------------------
# offline: every family end to end, the reference is the adapter switched off
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["dpo", "simpo", "sft", "reward"])
def test_offline_lora_runs_and_saves_an_adapter(loss, tmp_path, datasets, tiny_policy_dir):
    from peft import PeftModel

    dataset = datasets["sft4"] if loss == "sft" else datasets["pairs4"]
    kw = dict(LORA, lora_task_type="SEQ_CLS", normalize_reward=False) if loss == "reward" else LORA
    c = make_cfg(tmp_path, tiny_policy_dir, dataset, loss_type=loss, max_steps=5, learning_rate=2e-2, **kw)
    run = train_offline.main(c)
    metrics = [m for m in runs.read_metrics(run) if "train/loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] - 1e-3  # one fixed batch: the adapter fits it
    ckpt = checkpoints.latest_checkpoint(run)
    assert lora.is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").exists()  # the adapter, not the weights
    config = lora.read_adapter_config(ckpt)
    assert config["base_model_name_or_path"] == tiny_policy_dir and config["r"] == 4
    names = _trainable_names(ckpt)
    assert names and all("lora_" in n or (loss == "reward" and "score" in n) for n in names)
    if loss == "reward":
        assert any("score" in n for n in names)  # SEQ_CLS: the new head trains in full and is saved
        return
    base = models.load_policy(tiny_policy_dir)
    loaded = PeftModel.from_pretrained(base, str(ckpt))  # what the issue promises: peft loads it as is
    assert any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)  # it trained


def test_offline_lora_dpo_loads_no_reference_copy(tmp_path, datasets, tiny_policy_dir, monkeypatch):
    loaded = []
    real = models.load_policy
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: loaded.append(a[0]) or real(*a, **k))
    c = make_cfg(tmp_path, tiny_policy_dir, datasets["pairs4"], loss_type="dpo", max_steps=1, **LORA)
    train_offline.main(c)
    assert loaded == [tiny_policy_dir]  # the policy once; the reference is the same weights, adapter off


def test_reference_logprobs_of_the_adapter_off_policy_equal_the_base_model(tmp_path, datasets, tiny_policy_dir):
    """Trainer level: the DPO reference log-probs precomputed by the LoRA run (adapter off) equal those of
    the base model loaded separately (a full-fine-tuning run's reference copy), and a live LoRA reference
    logs the same ref/logratio after training moved the adapter."""
    captured = {}
    real = train_offline.reference_logprobs_table

    def capture(c, model, shared, examples, pad_id, accelerator):
        captured.setdefault(c.use_peft, real(c, model, shared, examples, pad_id, accelerator))
        return captured[c.use_peft]

    train_offline.reference_logprobs_table = capture
    try:
        for use_peft in (False, True):
            kw = LORA if use_peft else {}
            train_offline.main(make_cfg(tmp_path / f"p{use_peft}", tiny_policy_dir, datasets["pairs12"], loss_type="dpo",
                                        max_steps=1, precompute_ref_logprobs=True, mixed_precision="no", **kw))
    finally:
        train_offline.reference_logprobs_table = real
    assert torch.equal(captured[True], captured[False])
    # the live adapter-off reference during training: ref/logratio is the base model's at every step
    live = train_offline.main(make_cfg(tmp_path / "live", tiny_policy_dir, datasets["pairs12"], loss_type="dpo",
                                       max_steps=3, learning_rate=2e-2, **LORA))
    pre = train_offline.main(make_cfg(tmp_path / "pre", tiny_policy_dir, datasets["pairs12"], loss_type="dpo",
                                      max_steps=3, learning_rate=2e-2, precompute_ref_logprobs=True, **LORA))
    ml, mp = [m for m in runs.read_metrics(live) if "train/loss" in m], [m for m in runs.read_metrics(pre) if "train/loss" in m]
    assert len(ml) == 3 and ml[-1]["rewards/margins"] != ml[0]["rewards/margins"]
    for a, b in zip(ml, mp):
        for k in ("ref/logratio", "train/loss", "rewards/margins"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
