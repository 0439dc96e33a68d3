"""Single-process checks of the distributed plumbing whose DeepSpeed / FSDP branches cannot run here
(no GPU, no deepspeed): checkpoint branch selection and contents, DeepSpeed config filling, the
accumulation context, generation refusal, launch check. The fakes stand in for an
accelerate Accelerator with exactly the attributes the code reads."""
import json
import types
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

from maxent_rlhf import distributed
from maxent_rlhf.models import build_tiny_policy
from maxent_rlhf.checkpoints import ENGINE_STATE_DIR, load_checkpoint, save_checkpoint, uses_engine_state
from maxent_rlhf.distributed import check_launch
from maxent_rlhf.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]


class FakeAccelerator:
    """Just enough of accelerate.Accelerator for runs.py / checkpoints.py / distributed.py in one process."""

    def __init__(self, dtype=DistributedType.NO, num_processes=1, ds_config=None, fsdp_version=None):
        self.distributed_type = dtype
        self.num_processes = num_processes
        self.gradient_accumulation_steps = 1
        self.process_index = 0
        self.is_main_process = True
        self.device = torch.device("cpu")
        self.trackers = []
        self.calls = []
        self._models = []
        self.gradient_state = types.SimpleNamespace(sync_gradients=True)
        self.gradient_state._set_sync_gradients = lambda v: setattr(self.gradient_state, "sync_gradients", v)
        plugin = types.SimpleNamespace(deepspeed_config=ds_config, zero_stage=(ds_config or {}).get("zero_optimization", {}).get("stage", 0))
        self.state = types.SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=types.SimpleNamespace(fsdp_version=fsdp_version))

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model):
        return model.state_dict()

    def save_state(self, output_dir):
        self.calls.append(("save_state", output_dir))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "shard_rank0").write_text("engine")

    def load_state(self, input_dir):
        self.calls.append(("load_state", input_dir))

    def no_sync(self, model):
        self.calls.append(("no_sync",))
        return torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)  # any context manager


def _model_opt(tok):
    model = build_tiny_policy(tok, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 20, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model, opt


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def test_engine_checkpoint_branch_uses_save_state_and_keeps_hf_weights(tmp_path, tiny_tokenizer):
    acc = FakeAccelerator(DistributedType.DEEPSPEED)
    assert uses_engine_state(acc) and uses_engine_state(FakeAccelerator(DistributedType.FSDP))
    assert not uses_engine_state(FakeAccelerator(DistributedType.MULTI_GPU)) and not uses_engine_state(None)
    model, opt = _model_opt(tiny_tokenizer)
    path = save_checkpoint(RunDir(tmp_path / "run", acc), 3, model, tiny_tokenizer, opt, state={"position": 7})
    assert acc.calls == [("save_state", str(tmp_path / "run/checkpoints/.tmp-step_00000003" / ENGINE_STATE_DIR))]
    assert (path / ENGINE_STATE_DIR / "shard_rank0").exists() and (path / "model.safetensors").exists()
    blob = torch.load(path / "trainer_state.pt", weights_only=True)
    assert blob["engine_state"] is True and blob["optimizer"] is None  # only rank 0's shard: not saved

    # resume: load_state restores weights + optimizer; load_checkpoint must not touch them itself
    acc2 = FakeAccelerator(DistributedType.DEEPSPEED)
    acc2._models = [model]
    model2, opt2 = build_tiny_policy(tiny_tokenizer, seed=5), None
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    state = load_checkpoint(path, model2, opt2, accelerator=acc2)
    assert state == {"position": 7, "step": 3}
    assert acc2.calls == [("load_state", str(path / ENGINE_STATE_DIR))]
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())


def test_engine_checkpoint_must_be_loaded_after_prepare(tmp_path, tiny_tokenizer):
    acc = FakeAccelerator(DistributedType.FSDP)
    model, opt = _model_opt(tiny_tokenizer)
    path = save_checkpoint(RunDir(tmp_path / "run", acc), 1, model, tiny_tokenizer, opt)
    with pytest.raises(RuntimeError, match="after accelerator.prepare"):
        load_checkpoint(path, model, opt, accelerator=FakeAccelerator(DistributedType.FSDP))


def test_checkpoint_kinds_do_not_mix(tmp_path, tiny_tokenizer):
    model, opt = _model_opt(tiny_tokenizer)
    plain = save_checkpoint(RunDir(tmp_path / "plain"), 1, model, tiny_tokenizer, opt)
    blob = torch.load(plain / "trainer_state.pt", weights_only=True)
    assert "engine_state" not in blob and blob["optimizer"] is not None  # CPU/DDP layout unchanged
    with pytest.raises(RuntimeError, match=r"without DeepSpeed/FSDP .* this run uses DEEPSPEED"):
        load_checkpoint(plain, model, opt, accelerator=FakeAccelerator(DistributedType.DEEPSPEED))
    engine = save_checkpoint(RunDir(tmp_path / "eng", FakeAccelerator(DistributedType.DEEPSPEED)), 1, model, tiny_tokenizer, opt)
    with pytest.raises(RuntimeError, match=r"under DeepSpeed/FSDP .* this run uses no accelerator"):
        load_checkpoint(engine, model, opt)
    # reading only the run state (no model / optimizer) is allowed from either kind
    assert load_checkpoint(engine)["step"] == 1


# --------------------------------------------------------------------------------------------------
# launch check
# --------------------------------------------------------------------------------------------------
def test_launch_without_a_process_group_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*accelerate sees 1.*ACCELERATE_USE_CPU=true"):
        RunDir(tmp_path / "run", FakeAccelerator(num_processes=1))
    check_launch(FakeAccelerator(DistributedType.MULTI_CPU, num_processes=2))  # a real group: fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(None)


# --------------------------------------------------------------------------------------------------
# DeepSpeed config, accumulation, generation, frozen models
# --------------------------------------------------------------------------------------------------
def test_configure_deepspeed_fills_auto_fields_and_names_conflicts():
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    acc = FakeAccelerator(DistributedType.DEEPSPEED, num_processes=4, ds_config=cfg)
    distributed.configure_deepspeed(acc, micro_batch_size=2, max_grad_norm=1.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_batch_size"] == 8 and cfg["gradient_clipping"] == 1.0
    # a script using accelerator.accumulate: DeepSpeed accumulates (and scales the loss) as many times
    cfg3 = {"zero_optimization": {"stage": 3}}
    acc3 = FakeAccelerator(DistributedType.DEEPSPEED, num_processes=2, ds_config=cfg3)
    acc3.gradient_accumulation_steps = 3
    distributed.configure_deepspeed(acc3, micro_batch_size=2, max_grad_norm=0.0)
    assert (cfg3["gradient_accumulation_steps"], cfg3["train_batch_size"], cfg3["gradient_clipping"]) == (3, 12, 0.0)
    bad = {"gradient_clipping": 0.5}
    with pytest.raises(ValueError, match=r"`gradient_clipping` = 0.5, but max_grad_norm = 1.0"):
        distributed.configure_deepspeed(FakeAccelerator(DistributedType.DEEPSPEED, ds_config=bad), 2, 1.0)
    distributed.configure_deepspeed(FakeAccelerator(DistributedType.MULTI_GPU, ds_config=None), 2, 1.0)  # no-op


def test_micro_step_holds_deepspeed_sync_until_the_last_micro_batch():
    acc = FakeAccelerator(DistributedType.DEEPSPEED, num_processes=2, ds_config={"zero_optimization": {"stage": 2}})
    seen = []
    for last in (False, False, True):
        with distributed.micro_step(acc, None, last):
            seen.append(acc.gradient_state.sync_gradients)
    assert seen == [False, False, True] and acc.gradient_state.sync_gradients is True
    ddp = FakeAccelerator(DistributedType.MULTI_GPU, num_processes=2)
    for last in (False, True):
        with distributed.micro_step(ddp, None, last):
            pass
    assert ddp.calls == [("no_sync",)]  # all-reduce skipped only before the last micro-batch


def test_generation_refuses_fsdp1_and_flags_synced_gpus(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    with pytest.raises(NotImplementedError, match="FSDP version 1.*fsdp2.yaml"):
        with distributed.unwrap_for_generation(FakeAccelerator(DistributedType.FSDP, fsdp_version=1), model):
            pass
    fsdp2 = FakeAccelerator(DistributedType.FSDP, fsdp_version=2)
    with distributed.unwrap_for_generation(fsdp2, model) as m:
        assert m is model
    assert distributed.needs_synced_gpus(fsdp2)
    assert distributed.needs_synced_gpus(FakeAccelerator(DistributedType.DEEPSPEED, ds_config={"zero_optimization": {"stage": 3}}))
    assert not distributed.needs_synced_gpus(FakeAccelerator(DistributedType.DEEPSPEED, ds_config={"zero_optimization": {"stage": 2}}))
    assert not distributed.needs_synced_gpus(FakeAccelerator(DistributedType.MULTI_GPU)) and not distributed.needs_synced_gpus(None)


def test_generate_accepts_a_ddp_style_wrapper(tiny_tokenizer):
    from maxent_rlhf.generation import generate

    model = build_tiny_policy(tiny_tokenizer, seed=0)
    wrapper = torch.nn.Module()
    wrapper.module = model  # DDP exposes the model as .module and has no .generate
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    torch.manual_seed(0)
    a = generate(wrapper, ids, mask, 4, 0, 1, do_sample=False)
    b = generate(model, ids, mask, 4, 0, 1, do_sample=False)
    assert torch.equal(a, b) and a.shape == (1, 4)


def test_frozen_inference_config_offloads_and_drops_training_fields(monkeypatch):
    ds = {
        "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"}, "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto"},
    }
    cfg = distributed.frozen_inference_config(ds, "cpu", hidden_size=8)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu" and cfg["bf16"] == {"enabled": True}
    assert "optimizer" not in cfg and "offload_optimizer" not in cfg["zero_optimization"] and "train_batch_size" not in cfg
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["zero_optimization"]["reduce_bucket_size"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and "optimizer" in ds  # the policy's config is untouched
    monkeypatch.setenv("MAXENT_FROZEN_OFFLOAD", "gpu")
    with pytest.raises(ValueError, match="MAXENT_FROZEN_OFFLOAD must be 'cpu' or 'none'"):
        distributed.frozen_offload_device()


def test_prepare_frozen_model_without_zero3_is_a_frozen_replica(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0).train()
    out = distributed.prepare_frozen_model(model, FakeAccelerator(DistributedType.MULTI_CPU, num_processes=2), dtype=torch.bfloat16)
    assert out is model and not model.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    with distributed.frozen_model_loading(FakeAccelerator()):
        pass


# --------------------------------------------------------------------------------------------------
# shipped accelerate configs
# --------------------------------------------------------------------------------------------------
def test_accelerate_configs_load_and_use_bf16_on_gpu():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.stem for p in (ROOT / "configs/accelerate").glob("*.yaml")}
    assert {"cpu", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"} <= names
    for name in sorted(names):
        path = ROOT / "configs/accelerate" / f"{name}.yaml"
        raw = yaml.safe_load(path.read_text())
        cfg = load_config_from_file(str(path))
        assert cfg.mixed_precision == ("no" if name.startswith("cpu") else "bf16"), name  # cpu*.yaml: float32 on CPU
        assert path.read_text().lstrip().startswith("#"), f"{name}: starts with a comment on when to pick it"
    z3 = yaml.safe_load((ROOT / "configs/accelerate/deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    assert z3["zero_stage"] == 3 and z3["zero3_init_flag"] and z3["zero3_save_16bit_model"]
    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "GPTNeoXLayer"


def test_frozen_model_loading_switches_fsdp_rank0_only_loading_off(monkeypatch):
    import os

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with distributed.frozen_model_loading(FakeAccelerator(DistributedType.FSDP, fsdp_version=2)):
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # real weights on every rank
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


@pytest.mark.parametrize("config", ["multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_slurm_launch_line_gives_torchrun_a_c10d_rendezvous(config):
    """What scripts/slurm/train_multinode.sbatch hands `accelerate launch` on node 1 of 2 becomes
    torchrun's nnodes / node_rank / rdzv_endpoint (parsed only: nothing is launched)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    sbatch = (ROOT / "scripts/slurm/train_multinode.sbatch").read_text()
    for flag in ("--num_machines", "--machine_rank \"$SLURM_PROCID\"", "--main_process_ip", "--rdzv_backend c10d"):
        assert flag in sbatch, flag
    args = launch_command_parser().parse_args([
        "--config_file", str(ROOT / f"configs/accelerate/{config}.yaml"), "--num_machines", "2", "--num_processes", "16",
        "--machine_rank", "1", "--main_process_ip", "node-a", "--main_process_port", "29500", "--rdzv_backend", "c10d",
        "train_rloo.py", "--config", "x.yaml",
    ])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # several nodes: torchrun on each node, not DeepSpeed's pdsh runner over ssh
        assert args.deepspeed_multinode_launcher == "standard"
    prepare_multi_gpu_env(args)  # the env torchrun gets (DeepSpeed's "standard" launcher builds the same)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("c10d", "node-a:29500")
