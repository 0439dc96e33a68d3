"""The multi-process side of every script: launch checks, the Accelerator's precision and trackers,
what the scripts need beyond plain `accelerator.prepare` under DeepSpeed ZeRO and FSDP, random streams.

Plain CPU, one GPU and DDP need none of this: every helper here is a no-op (or the obvious thing) there,
so a script calls them unconditionally and stays one code path. Supported combinations:

    accelerate config          policy                    frozen ref / reward model      generation
    cpu / single / multi_gpu   DDP (or bare)              replica on every process       unwrapped module
    deepspeed_zero2.yaml       ZeRO-2 engine              bf16 replica on every GPU      unwrapped module
    deepspeed_zero3.yaml       ZeRO-3 engine (sharded)    own ZeRO-3 inference engine,   full weights gathered
                                                          weights offloaded to CPU       on every GPU, synced_gpus
    fsdp2.yaml                 FSDP2 (fully_shard)        bf16 replica on every GPU      per-layer all-gather,
                                                                                         synced_gpus
    FSDP version 1             refused for generation (`unwrap_for_generation` says so): use fsdp2.yaml

Gradient accumulation: both scripts divide each micro-batch loss by their accumulation count and call
`accelerator.backward` per micro-batch inside `micro_step(...)`. Under DDP / FSDP that skips the
gradient all-reduce on all but the last micro-batch; under DeepSpeed it tells the engine which backward
ends the accumulation (the engine steps there and only there), and `configure_deepspeed` keeps
DeepSpeed's own accumulation count at the Accelerator's (1 for these scripts) so it does not divide the
loss a second time (a script using `accelerator.accumulate` would get its count instead). The optimizer
step the script calls afterwards is a no-op under DeepSpeed (accelerate's wrapper); clipping then uses
DeepSpeed's `gradient_clipping`, which `configure_deepspeed` sets to the script's max_grad_norm.

Sampling: `sampling_rng` ties each rollout chunk's random stream to its rows of the global batch, so N
processes sample what one process samples. Checkpoints under DeepSpeed / FSDP: see `checkpoints.uses_engine_state`.

The FSDP2 and ZeRO-2 / ZeRO-3 branches run on two CPU processes in tests/test_distributed.py (accelerate
does not shard CPU processes by itself: tests/helpers/cpu_sharding.py says how the test gets it to); on GPUs
they have yet to run (bench/gpu_smoke.sh is the acceptance run).
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
from typing import Optional

import numpy as np
import torch


def distributed_type(accelerator) -> str:
    """accelerate's DistributedType as a plain string ('NO', 'MULTI_GPU', 'MULTI_CPU', 'DEEPSPEED', 'FSDP', ...)."""
    if accelerator is None:
        return "NO"
    dt = getattr(accelerator, "distributed_type", "NO")
    return str(getattr(dt, "value", dt))


def is_deepspeed(accelerator) -> bool:
    return distributed_type(accelerator) == "DEEPSPEED"


def zero_stage(accelerator) -> int:
    """ZeRO stage under DeepSpeed, else 0."""
    if not is_deepspeed(accelerator):
        return 0
    plugin = accelerator.state.deepspeed_plugin
    stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", getattr(plugin, "zero_stage", 0))
    return int(stage)


def fsdp_version(accelerator) -> int:
    """1 or 2 under FSDP, else 0."""
    if distributed_type(accelerator) != "FSDP":
        return 0
    plugin = accelerator.state.fsdp_plugin
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def needs_synced_gpus(accelerator) -> bool:
    """True when a forward pass is a collective (ZeRO-3, FSDP): every process must keep calling the model
    until all have finished generating (HF `generate(synced_gpus=True)`), or the others would hang."""
    return zero_stage(accelerator) == 3 or fsdp_version(accelerator) > 0


def is_main_process(accelerator=None) -> bool:
    return accelerator is None or accelerator.is_main_process


def check_launch(accelerator=None) -> None:
    """Refuse a launch whose processes did not join one process group.

    torchrun / `accelerate launch` set WORLD_SIZE for every process. On a machine without GPUs, accelerate
    1.x only forms a (gloo) group when told to use the CPU; otherwise each process silently runs alone and
    they all write the same run directory. Called by `runs.RunDir`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    seen = accelerator.num_processes if accelerator is not None else 1
    # accelerate 1.x shards only on GPUs: on CPU processes an FSDP config silently becomes plain DDP and a
    # DeepSpeed one processes that each think they run alone (tests/helpers/cpu_sharding.py has the details)
    asked = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(flag, "false").lower() == "true"]
    if accelerator is not None and asked:
        got = distributed_type(accelerator)
        if got not in asked or seen != world:
            raise RuntimeError(
                f"the accelerate config asks for {asked[0]} over {world} process(es), but accelerate set up {got} "
                f"over {seen}: accelerate shards (FSDP, DeepSpeed) only on GPUs. On CPUs use "
                "configs/accelerate/cpu.yaml; with GPUs, check that CUDA is visible to every process"
            )
    if world > 1 and seen != world:
        raise RuntimeError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate sees {seen}: the processes "
            "did not join one process group. On a machine without GPUs set ACCELERATE_USE_CPU=true "
            "(see configs/accelerate/cpu.yaml); with GPUs, check that CUDA is visible to every process"
        )


# --------------------------------------------------------------------------------------------------
# the Accelerator's settings: precision and trackers
# --------------------------------------------------------------------------------------------------
def resolve_mixed_precision(mixed_precision: str) -> str:
    """accelerate `mixed_precision` for BaseConfig.mixed_precision: 'auto' takes what `accelerate launch`
    set (ACCELERATE_MIXED_PRECISION), else bf16 on a GPU and 'no' on CPU; other values pass through."""
    if mixed_precision != "auto":
        return mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher:
        return launcher
    return "bf16" if torch.cuda.is_available() else "no"


def precision_that_ran(mixed_precision: str, accelerator=None) -> str:
    """The `mixed_precision` a run actually trained under: what the Accelerator applied ('auto' resolved,
    a DeepSpeed config's own), and 'no' for 'fp16' on CPU, where accelerate has no fp16 autocast (the
    policy trains in float32; `models.resolve_dtype` keeps the frozen models in float32 there too).
    The run's config.yaml records it and the closing summary prints it."""
    ran = getattr(accelerator, "mixed_precision", None) or resolve_mixed_precision(mixed_precision)
    device = getattr(accelerator, "device", None)
    on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    return "no" if ran == "fp16" and on_cpu else str(ran)


def resolve_trackers(report_to: str) -> list:
    """accelerate `log_with` names for TrainConfig.report_to: 'auto' means tensorboard when installed."""
    if report_to in ("none", "", None):
        return []
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                return []
        return ["tensorboard"]
    return [report_to]


# --------------------------------------------------------------------------------------------------
# DeepSpeed configuration of the trained model
# --------------------------------------------------------------------------------------------------
def _set_ds_value(config: dict, dotted: str, value, source: str) -> None:
    """Fill `dotted` in a DeepSpeed config dict: 'auto' or missing -> value; a different number -> error."""
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current in ("auto", None) or current == value:
        node[leaf] = value
        return
    raise ValueError(
        f"DeepSpeed config `{dotted}` = {current!r}, but {source} = {value!r}: leave it 'auto' (or remove it) "
        "in the DeepSpeed / accelerate config so the experiment config decides"
    )


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill DeepSpeed's batch fields from the experiment config; call before `accelerator.prepare`.

    - train_micro_batch_size_per_gpu = the script's micro-batch (accelerate needs it when no DataLoader
      is prepared, as in both scripts);
    - gradient_accumulation_steps = the Accelerator's, which is 1 in both scripts: they divide the loss
      by their own accumulation count and mark the last micro-batch with `micro_step`, so DeepSpeed must
      not scale the loss a second time (a script using `accelerator.accumulate` would set the
      Accelerator's count instead, and DeepSpeed would then do the scaling);
      train_batch_size = micro x accumulation x processes;
    - gradient_clipping = max_grad_norm (DeepSpeed clips inside its step; 0 turns clipping off).
    No-op without DeepSpeed. A value set explicitly in the DeepSpeed config that disagrees is an error.
    """
    if not is_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    accum = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
    _set_ds_value(config, "train_micro_batch_size_per_gpu", int(micro_batch_size), "the micro-batch size")
    _set_ds_value(config, "gradient_accumulation_steps", accum, "the Accelerator's gradient_accumulation_steps")
    _set_ds_value(config, "train_batch_size", int(micro_batch_size) * accum * accelerator.num_processes,
                  "micro-batch x accumulation x processes")
    _set_ds_value(config, "gradient_clipping", float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else 0.0, "max_grad_norm")


@contextlib.contextmanager
def micro_step(accelerator, model, is_last: bool):
    """One micro-batch of gradient accumulation (wrap the forward and `accelerator.backward`).

    DDP / FSDP: gradients are all-reduced only on the last micro-batch (`no_sync` before it).
    DeepSpeed: the engine steps inside `accelerator.backward` when accelerate's sync flag is set, so the
    flag is held False until the last micro-batch. Single process: nothing to do.
    """
    if accelerator is None or accelerator.num_processes == 1 and not is_deepspeed(accelerator):
        yield
        return
    if is_deepspeed(accelerator):
        state = accelerator.gradient_state
        previous = state.sync_gradients
        state._set_sync_gradients(bool(is_last))
        try:
            yield
        finally:
            state._set_sync_gradients(previous)
        return
    if is_last:
        yield
        return
    with accelerator.no_sync(model):
        yield


# --------------------------------------------------------------------------------------------------
# frozen models (reference policy, reward model)
# --------------------------------------------------------------------------------------------------
def frozen_offload_device() -> str:
    """Where ZeRO-3 keeps frozen models' weights: MAXENT_FROZEN_OFFLOAD = 'cpu' (default) or 'none'."""
    value = os.environ.get("MAXENT_FROZEN_OFFLOAD", "cpu").strip().lower()
    if value not in ("cpu", "none"):
        raise ValueError(f"MAXENT_FROZEN_OFFLOAD must be 'cpu' or 'none', got {value!r}")
    return value


@contextlib.contextmanager
def frozen_model_loading(accelerator):
    """Load frozen models inside this context.

    ZeRO-3 with `zero3_init_flag`: turns `deepspeed.zero.Init` off, so the model arrives whole on the CPU
    and `prepare_frozen_model` can put its weights where MAXENT_FROZEN_OFFLOAD says (a model built under
    zero.Init stays sharded on the GPUs, which is correct but not offloaded).
    FSDP with `fsdp_cpu_ram_efficient_loading: true`: transformers would load real weights on rank 0 only
    and leave meta tensors elsewhere (accelerate broadcasts them for the PREPARED model only), so the
    setting is switched off while a frozen replica loads. Elsewhere: nothing."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) if is_deepspeed(accelerator) else None
    if plugin is not None and zero_stage(accelerator) == 3 and getattr(plugin, "zero3_init_flag", False):
        with plugin.zero3_init_context_manager(enable=False):
            yield
    elif fsdp_version(accelerator) and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true"):
        previous = os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"]
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        try:
            yield
        finally:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = previous
    else:
        yield


def frozen_inference_config(ds_config: dict, offload: str, hidden_size: Optional[int] = None) -> dict:
    """The DeepSpeed config of a frozen model's inference-only ZeRO-3 engine, from the policy's config:
    same precision and stage 3, no optimizer / scheduler, batch fields made concrete, parameters offloaded
    to `offload` ('cpu' or 'none')."""
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    config["train_micro_batch_size_per_gpu"] = micro if isinstance(micro, int) else 1
    config["gradient_accumulation_steps"] = 1
    config.pop("train_batch_size", None)  # DeepSpeed derives it from micro x accumulation x processes
    config.pop("gradient_clipping", None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    zero["offload_param"] = {"device": "cpu", "pin_memory": True} if offload == "cpu" else {"device": "none"}
    if hidden_size:  # TRL's settings for a frozen ZeRO-3 model: small buckets, no prefetch
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
        zero["stage3_prefetch_bucket_size"] = 0
    for key, value in list(zero.items()):
        if value == "auto":
            zero.pop(key)
    return config


def prepare_frozen_model(model: torch.nn.Module, accelerator, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Put a frozen model (reference policy, reward model) where it belongs; returns the model to call.

    Gradients off and eval mode always. ZeRO-3: wrapped in its own inference-only ZeRO-3 engine whose
    weights are offloaded to CPU (MAXENT_FROZEN_OFFLOAD) and streamed to the GPU layer by layer in each
    forward; every process must then run the same number of forwards (equal per-process batches, which
    `derive_batch_sizes` guarantees). Everything else: a plain replica moved to `accelerator.device`
    (cast to `dtype` when given). The returned object is called like the model (`generation` helpers
    reach the HF model through `.module` when it is an engine).
    """
    model.requires_grad_(False)
    model.eval()
    if zero_stage(accelerator) == 3:
        import deepspeed

        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        config = frozen_inference_config(ds_config, frozen_offload_device(), hidden)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def hf_model(model):
    """The HF model inside an accelerate / DeepSpeed / DDP wrapper (attributes such as `score`,
    `base_model_prefix`, `generate`); FSDP2 modules are their own HF model; a peft LoRA model's is the
    model its adapter layers were injected into."""
    while not hasattr(model, "base_model_prefix") and hasattr(model, "module"):
        model = model.module
    peft = sys.modules.get("peft")  # imported by maxent_rlhf.lora whenever a LoRA model exists
    if peft is not None and isinstance(model, peft.PeftModel):
        model = model.get_base_model()
    return model


def parameters_sharded(model) -> bool:
    """Are the model's parameters split over processes (DeepSpeed ZeRO-3, FSDP1 or FSDP2), so that every
    forward all-gathers them?"""
    hf = hf_model(model)
    if any(hasattr(p, "ds_id") for p in hf.parameters()):  # DeepSpeed ZeRO-3 partitioned parameters
        return True
    import torch.distributed.fsdp as fsdp

    kinds = tuple(t for t in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)) if t)
    return any(isinstance(m, kinds) for m in (model, *hf.modules()))  # FSDP1 wrapper or FSDP2 module


# --------------------------------------------------------------------------------------------------
# generation with a sharded policy
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def unwrap_for_generation(accelerator, model, gather: bool = True):
    """Yield the HF model to call `generate` / rollout forwards on, ready for this accelerate setup.

    - no accelerator, CPU, one GPU, DDP, ZeRO-1/2: the unwrapped module (weights are whole everywhere);
    - ZeRO-3: the full weights are gathered on every GPU for the duration (`GatheredParameters`; 14 GB
      for 6.9B in bf16), so generation runs at single-GPU speed; `gather=False` keeps them sharded (one
      all-gather per layer per token: slow, least memory). Pass `synced_gpus=needs_synced_gpus(acc)`;
    - FSDP2: the module itself (each layer all-gathers in its forward); pass synced_gpus as above;
    - FSDP1: refused (the root's parameters are flat-sharded; HF generate cannot run through it).
    """
    if accelerator is None:
        yield hf_model(model)
        return
    version = fsdp_version(accelerator)
    if version == 1:
        raise NotImplementedError(
            "generation under FSDP version 1 is not supported: use FSDP2 (configs/accelerate/fsdp2.yaml, "
            "fsdp_version: 2) or DeepSpeed ZeRO-3 (configs/accelerate/deepspeed_zero3.yaml)"
        )
    root = accelerator.unwrap_model(model)
    unwrapped = hf_model(root)
    if version == 2 and unwrapped is not root and hasattr(root, "_get_fsdp_state"):
        # a LoRA policy: the FSDP2 root is the PeftModel around the HF model, and generate's forwards start
        # inside it. FSDP2 picks its root in the first forward (lazy init); do that now, as the root's own
        # forward would, or the first inner unit would claim to be the root
        root._get_fsdp_state()._lazy_init()
    if zero_stage(accelerator) == 3 and gather:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
            yield unwrapped
        return
    yield unwrapped


# --------------------------------------------------------------------------------------------------
# random streams that do not depend on the number of processes
# --------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch with the run's seed, the same on every process (the streams that must
    differ between processes are drawn inside `sampling_rng`)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def mix_seed(seed: int, *parts: int, multiplier: int = 1_000_003) -> int:
    """The seed of one random stream of a run, from the run's seed and the integers that name the stream
    (epoch; iteration and first row of the global batch; ...): ((seed * m + p1) * m + p2) ... modulo
    2^63 - 1, a valid torch seed. Every process computes the same value, streams of one run do not share
    random numbers, and a stream does not depend on what else the run drew before it.

    `multiplier` is a prime. train_offline's epoch shuffle passes 100_003, the value its runs (and the
    toy lab's SFT and reward models) have always been shuffled with; everything else uses the default."""
    out = int(seed)
    for p in parts:
        out = out * multiplier + int(p)
    return out % (2**63 - 1)


@contextlib.contextmanager
def sampling_rng(seed: int, iteration: int, first_row: int, device=None):
    """Sample inside this context from a stream tied to (seed, iteration, position in the global batch),
    then give the caller's RNG back untouched.

    Without it every process starts from the same seed, so all processes draw the same random numbers
    for their different prompts (correlated samples across GPUs), and a run's samples change with the
    number of processes. With it, and chunks that start at the same global rows (a rollout chunk size
    that divides the per-process batch), N processes sample exactly what one process samples, and the
    processes' other random streams (shuffling) stay in step.
    """
    device = torch.device(device) if device is not None else None
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mix_seed(seed, iteration, first_row))
        yield


def process_state():
    """accelerate's PartialState, honouring ACCELERATE_USE_CPU like `Accelerator` does.

    A bare `PartialState()` ignores that variable, so under `configs/accelerate/cpu.yaml` every CPU
    process would think it runs alone (each generating and writing everything).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
