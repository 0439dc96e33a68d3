"""LoRA policies: the adapter-off model is the base model, merged weights are the adapter model, adapter
checkpoints load back identically, and bad options are one ConfigError line."""
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from maxent_rlhf.config import ConfigError, TrainConfig, config_from_dict  # noqa: E402
from maxent_rlhf.generation import response_logprobs  # noqa: E402
from maxent_rlhf.lora import (  # noqa: E402
    PeftArgs, adapter_disabled, apply_lora, is_adapter_dir, load_merged_from_adapter, merged_state_dict,
    require_peft, save_adapter,
)
from maxent_rlhf.models import load_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS = 32, 2  # tiny_gpt_neox_config's defaults (the tiny_policy_dir fixture)


def _batch(vocab_size: int, rows: int = 4, prompt: int = 5, response: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (rows, prompt + response), generator=g)
    return ids, torch.ones_like(ids), prompt


def _logps(model, batch):
    ids, mask, context = batch
    with torch.no_grad():
        return response_logprobs(model, ids, mask, context)


def _lora(policy_dir, **kw):
    return apply_lora(load_policy(policy_dir), PeftArgs(use_peft=True, **kw), base_model_name_or_path=policy_dir)


def _train_step(model, batch, lr=1e-2):
    """One AdamW step raising the batch's response log-likelihood (dropout on: a real training step)."""
    ids, mask, context = batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = -response_logprobs(model, ids, mask, context).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


@pytest.fixture()
def trained(tiny_policy_dir):
    """(LoRA model after one training step, base model loaded separately, batch)."""
    model = _lora(tiny_policy_dir).eval()
    base = load_policy(tiny_policy_dir).eval()
    batch = _batch(base.config.vocab_size)
    _train_step(model, batch)
    return model, base, batch


# --------------------------------------------------------------------------------------------------
# config and the peft dependency
# --------------------------------------------------------------------------------------------------
@dataclass
class LoraTrainConfig(PeftArgs, TrainConfig):
    """PeftArgs mixed into a training config, as the trainers do."""


def test_peft_args_have_trl_defaults_and_ranges_are_config_errors():
    args = LoraTrainConfig()
    assert (args.use_peft, args.lora_r, args.lora_alpha, args.lora_dropout) == (False, 16, 32, 0.05)
    assert args.lora_target_modules is None and args.lora_task_type == "CAUSAL_LM"
    with pytest.raises(ConfigError, match="`lora_r` = 0 must be >= 1"):
        LoraTrainConfig(lora_r=0)
    with pytest.raises(ConfigError, match=r"`lora_dropout` = 1.5 must be in \[0, 1\)"):
        LoraTrainConfig(lora_dropout=1.5)
    with pytest.raises(ConfigError, match="`lora_alpha`"):
        LoraTrainConfig(lora_alpha=0)
    with pytest.raises(ConfigError, match="lora_task_type"):
        config_from_dict(LoraTrainConfig, {"lora_task_type": "SEQ_2_SEQ_LM"})
    with pytest.raises(ConfigError, match="global_batch_size"):  # chained: TrainConfig's checks still run
        LoraTrainConfig(global_batch_size=0)
    # the command-line form of the list
    assert config_from_dict(LoraTrainConfig, {"lora_target_modules": "query_key_value,dense"}).lora_target_modules == [
        "query_key_value", "dense"]


def test_require_peft_without_peft_is_one_config_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ConfigError) as e:
        require_peft()
    assert "not installed" in str(e.value) and 'pip install -e ".[peft]"' in str(e.value) and "\n" not in str(e.value)


def test_require_peft_refuses_a_peft_older_than_the_floor(monkeypatch):
    import peft

    from maxent_rlhf.lora import PEFT_FLOOR

    monkeypatch.setattr(peft, "__version__", "0.17.1")
    with pytest.raises(ConfigError, match=f"peft 0.17.1 is older than {PEFT_FLOOR}"):
        require_peft()


def test_unknown_target_module_is_a_config_error(tiny_policy_dir):
    with pytest.raises(ConfigError, match="lora_target_modules"):
        _lora(tiny_policy_dir, lora_target_modules=["no_such_module"])


# --------------------------------------------------------------------------------------------------
# the adapter and the reference
# --------------------------------------------------------------------------------------------------
def test_only_lora_parameters_are_trainable(tiny_policy_dir):
    r = 4
    model = _lora(tiny_policy_dir, lora_r=r)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # peft's default for GPT-NeoX adapts query_key_value (HIDDEN -> 3 HIDDEN): A is r x HIDDEN, B is 3 HIDDEN x r
    assert sum(trainable.values()) == LAYERS * (r * HIDDEN + 3 * HIDDEN * r)
    assert len(trainable) == 2 * LAYERS
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for p in load_policy(tiny_policy_dir).parameters())


def test_all_linear_targets_every_linear_layer_but_the_output_head(tiny_policy_dir):
    model = _lora(tiny_policy_dir, lora_target_modules=["all-linear"], lora_r=2)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def test_adapter_gradients_under_activation_checkpointing_equal_the_plain_ones(tiny_policy_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random A
        model = apply_lora(load_policy(tiny_policy_dir, gradient_checkpointing=checkpointing), PeftArgs(lora_dropout=0.0))
        with torch.no_grad():  # B = 0 at init would give A no gradient
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        model.train()
        ids, mask, context = _batch(model.config.vocab_size)
        response_logprobs(model, ids, mask, context).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[1].keys() == grads[0].keys() and all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    assert all(torch.allclose(grads[1][n], grads[0][n], atol=1e-6) for n in grads[0])


def test_adapter_off_is_the_base_model_before_and_after_a_training_step(tiny_policy_dir):
    model = _lora(tiny_policy_dir).eval()
    base = load_policy(tiny_policy_dir).eval()
    batch = _batch(base.config.vocab_size)
    base_logps = _logps(base, batch)
    with adapter_disabled(model):
        assert torch.equal(_logps(model, batch), base_logps)
    assert torch.equal(_logps(model, batch), base_logps)  # B = 0 at init: the adapter starts as the identity

    _train_step(model, batch)
    on = _logps(model, batch)
    assert (on - base_logps).abs().max() > 1e-3  # the step changed the policy...
    assert on.sum() > base_logps.sum()  # ...in the direction of its loss
    with adapter_disabled(model):
        assert torch.equal(_logps(model, batch), base_logps)  # ...and not the reference
    assert torch.equal(_logps(model, batch), on)  # the adapter is back on after the context
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_reference_through_an_accelerate_prepared_model(trained):
    from accelerate import Accelerator

    model, base, batch = trained
    on = _logps(model, batch)
    prepared = Accelerator(cpu=True).prepare(model)
    with adapter_disabled(prepared):
        assert torch.equal(_logps(prepared, batch), _logps(base, batch))
    assert torch.equal(_logps(prepared, batch), on)
    with pytest.raises(TypeError, match="PeftModel"):
        with adapter_disabled(base):
            pass


@pytest.fixture()
def one_process_group(tmp_path):
    """A gloo process group of one process, for the DDP and FSDP2 wrappers (the 2-process runs are in the
    sharded tests)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg_store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_reference_and_training_through_a_ddp_wrapper(tiny_policy_dir, one_process_group):
    from torch.nn.parallel import DistributedDataParallel

    model = _lora(tiny_policy_dir).eval()
    base = load_policy(tiny_policy_dir).eval()
    batch = _batch(base.config.vocab_size)
    ddp = DistributedDataParallel(model)
    for _ in range(2):  # reference forward, then a training step through the wrapper: gradients still arrive
        with torch.no_grad(), adapter_disabled(ddp):
            assert torch.equal(_logps(ddp, batch), _logps(base, batch))
        _train_step(ddp, batch)
    assert (_logps(ddp, batch) - _logps(base, batch)).abs().max() > 1e-3
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if ".lora_" not in n)


def test_reference_and_merged_weights_under_fsdp2(tiny_policy_dir, one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _lora(tiny_policy_dir).eval()
    base = load_policy(tiny_policy_dir).eval()
    batch = _batch(base.config.vocab_size)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.get_base_model().gpt_neox.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the PeftModel becomes an FSDP module in place (no wrapper)
    _train_step(model, batch)
    on = _logps(model, batch)
    with adapter_disabled(model):
        assert torch.equal(_logps(model, batch), _logps(base, batch))
    merged = merged_state_dict(model)
    assert all(type(v) is torch.Tensor for v in merged.values())  # gathered, not DTensors
    fresh = load_policy(tiny_policy_dir).eval()
    fresh.load_state_dict(merged, strict=True)
    assert torch.allclose(_logps(fresh, batch), on, atol=1e-5)
    assert (on - _logps(base, batch)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# merged weights
# --------------------------------------------------------------------------------------------------
def test_merged_state_dict_is_the_adapter_model_and_leaves_it_unmerged(trained, tiny_policy_dir):
    model, base, batch = trained
    on = _logps(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    merged = merged_state_dict(model)

    fresh = load_policy(tiny_policy_dir).eval()
    assert set(merged) == set(fresh.state_dict())  # the base model's own names
    fresh.load_state_dict(merged, strict=True)
    assert torch.allclose(_logps(fresh, batch), on, atol=1e-5)
    assert not torch.allclose(_logps(fresh, batch), _logps(base, batch), atol=1e-3)
    # the model was not merged: same weights bit for bit, same forward, adapter trainable, reference intact
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(_logps(model, batch), on)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    with adapter_disabled(model):
        assert torch.equal(_logps(model, batch), _logps(base, batch))


def test_merged_state_dict_with_embedding_and_output_head_adapters(tiny_policy_dir):
    fresh = load_policy(tiny_policy_dir).eval()
    head = next(n for n, m in fresh.named_modules() if m is fresh.get_output_embeddings())  # lm_head (embed_out in 4.x)
    model = _lora(tiny_policy_dir, lora_target_modules=["embed_in", "query_key_value", head], lora_r=4).eval()
    assert any(".lora_embedding_A." in n for n, _ in model.named_parameters())  # an Embedding LoRA layer
    assert any(f"{head}.lora_A." in n for n, _ in model.named_parameters())
    batch = _batch(model.config.vocab_size)
    _train_step(model, batch)
    before = _logps(fresh, batch)
    merged = merged_state_dict(model)
    for name in ("gpt_neox.embed_in.weight", f"{head}.weight"):
        assert not torch.allclose(merged[name], fresh.state_dict()[name])  # the update is in both
    fresh.load_state_dict(merged, strict=True)
    assert torch.allclose(_logps(fresh, batch), _logps(model, batch), atol=1e-5)
    assert not torch.allclose(_logps(fresh, batch), before, atol=1e-3)


def test_merged_state_dict_of_a_reward_model_names_the_trained_score_head(tiny_tokenizer, tmp_path):
    from maxent_rlhf.generation import reward_model_scores_with_grad
    from maxent_rlhf.models import build_tiny_reward_model, load_reward_model

    build_tiny_reward_model(tiny_tokenizer, seed=1, save_dir=tmp_path)
    model = apply_lora(load_reward_model(str(tmp_path)), PeftArgs(lora_task_type="SEQ_CLS")).eval()
    ids, mask, _ = _batch(len(tiny_tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA B and the trainable copy of the score head
                p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        on = reward_model_scores_with_grad(model.get_base_model(), ids, mask)
        fresh = load_reward_model(str(tmp_path)).eval()
        before = reward_model_scores_with_grad(fresh, ids, mask)
        fresh.load_state_dict(merged_state_dict(model), strict=True)
        assert torch.allclose(reward_model_scores_with_grad(fresh, ids, mask), on, atol=1e-5)
    assert not torch.allclose(before, on, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# adapter checkpoints and the merge command
# --------------------------------------------------------------------------------------------------
def test_save_adapter_loads_back_with_peft_from_pretrained(trained, tiny_policy_dir, tmp_path):
    from peft import PeftModel

    model, base, batch = trained
    save_adapter(model, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and not any(f.endswith(".bin") for f in files)
    assert is_adapter_dir(tmp_path / "adapter") and not is_adapter_dir(tiny_policy_dir)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_policy_dir and config["r"] == 16

    loaded = PeftModel.from_pretrained(load_policy(tiny_policy_dir), str(tmp_path / "adapter")).eval()
    assert torch.equal(_logps(loaded, batch), _logps(model, batch))
    merged = load_merged_from_adapter(tmp_path / "adapter")  # the base resolved from adapter_config.json
    assert type(merged).__name__ == "GPTNeoXForCausalLM"
    assert torch.allclose(_logps(merged, batch), _logps(model, batch), atol=1e-5)


def test_load_merged_from_adapter_resolves_a_registered_scheme(trained, tiny_policy_dir, tmp_path):
    from maxent_rlhf import artifacts

    model, _, batch = trained
    artifacts.register_scheme("loratest", lambda name: tiny_policy_dir if name == "base" else f"/nonexistent/{name}")
    model.peft_config["default"].base_model_name_or_path = "loratest://base"
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "loratest://base"  # the location as given, not the resolved path
    merged = load_merged_from_adapter(tmp_path / "adapter")
    assert torch.allclose(_logps(merged, batch), _logps(model, batch), atol=1e-5)


def test_a_relative_base_path_is_written_absolute(tiny_policy_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(tiny_policy_dir).parent)
    model = apply_lora(load_policy(tiny_policy_dir), PeftArgs(), base_model_name_or_path=f"./{Path(tiny_policy_dir).name}")
    save_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == str(Path(tiny_policy_dir).absolute())
    monkeypatch.chdir(tmp_path)  # elsewhere: still found
    assert type(load_merged_from_adapter(tmp_path / "adapter")).__name__ == "GPTNeoXForCausalLM"


def test_adapter_config_problems_are_config_errors(tmp_path):
    from maxent_rlhf.lora import read_adapter_config

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        read_adapter_config(tmp_path / "file")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}')
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        read_adapter_config(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "CAUSAL_LM"}')
    with pytest.raises(ConfigError, match="names no base model"):
        read_adapter_config(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"base_model_name_or_path": "x", ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_adapter_config(tmp_path / "a")


def _merge_cli(*args):
    return subprocess.run([sys.executable, "-m", "maxent_rlhf.lora", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_merge_command_writes_plain_hf_weights_equal_to_the_adapter_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, batch = trained
    save_adapter(model, tmp_path / "adapter")
    done = _merge_cli("merge", tmp_path / "adapter", tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "merged"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists() and not list(tmp_path.glob("*.tmp-merge"))
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.allclose(_logps(merged, batch), _logps(model, batch), atol=1e-5)
    for k, v in merged_state_dict(model).items():  # the CLI's merge and merged_state_dict agree
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k
    AutoTokenizer.from_pretrained(str(out))  # the base model's tokenizer came along

    again = _merge_cli("merge", tmp_path / "adapter", out)  # nothing is overwritten
    assert again.returncode == 2 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_merge_command_errors_are_one_line(tiny_policy_dir, tmp_path):
    missing = _merge_cli("merge", tmp_path / "nope", tmp_path / "out")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    not_adapter = _merge_cli("merge", tiny_policy_dir, tmp_path / "out")
    assert not_adapter.returncode == 2 and "not an adapter" in not_adapter.stderr
    for done in (missing, not_adapter):
        assert done.stderr.strip().startswith("python -m maxent_rlhf.lora: error:")
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    no_out = _merge_cli("merge", tmp_path)
    assert no_out.returncode == 2 and "OUT_DIR" in no_out.stderr and len(no_out.stderr.strip().splitlines()) == 1
    helped = _merge_cli("merge", "--help")
    assert helped.returncode == 0 and "ADAPTER_DIR" in helped.stdout and "adapter_config.json" in helped.stdout
