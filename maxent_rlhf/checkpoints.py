"""Checkpoints of a training run: save, load, find the newest, keep the last N.

Layout of one checkpoint (inside the run directory's checkpoints/ folder, see `runs.RunDir`):
    checkpoints/step_00000010/
        model.safetensors, config.json, tokenizer files      HF `save_pretrained` (what the judge loads)
        trainer_state.pt     optimizer, scheduler, step, data position, user state (torch.load weights_only)
        rng_state_<rank>.pt  python / numpy / torch RNG states of every process
        trainer_state.json   the human-readable part (step, user state)
        engine_state/        only under DeepSpeed or FSDP: accelerate `save_state` output (sharded
                             weights + optimizer state of every process); trainer_state.pt then has
                             optimizer None and "engine_state": True. See `uses_engine_state`.

A LoRA run (use_peft) saves the adapter instead of the HF weights: adapter_model.safetensors +
adapter_config.json (`PeftModel.from_pretrained(base, ckpt)`; the base model is the one adapter_config.json
names), with the same trainer state, whose optimizer holds the adapter's parameters only. Full merged
weights: `python -m maxent_rlhf.lora merge CKPT OUT_DIR`; evaluate_judge.py takes the checkpoint as it is.

A checkpoint is written to a temporary directory and renamed into place, so a run killed while saving
never leaves a half checkpoint that `--resume latest` would pick up; trainer_state.json is written last
and marks a complete one. Every process calls `save_checkpoint` / `load_checkpoint`; only the main
process writes the HF weights; checkpoints of several nodes need `output_dir` on a filesystem that every
node sees.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .distributed import distributed_type

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
ENGINE_STATE_DIR = "engine_state"
ADAPTER_CONFIG = "adapter_config.json"  # peft's names for a saved adapter (maxent_rlhf.lora builds on these)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (damaged, truncated, partly copied); the message names it."""


def _peft_part(model: torch.nn.Module) -> tuple[Optional[torch.nn.Module], str]:
    """(the PeftModel inside an unwrapped model, its state-dict prefix), or (None, "") for a plain model
    (e.g. train_offline's RewardScorer holds one under `model.`)."""
    import sys

    peft = sys.modules.get("peft")  # no PeftModel can exist unless peft was imported
    if peft is None:
        return None, ""
    for name, module in model.named_modules():
        if isinstance(module, peft.PeftModel):
            return module, f"{name}." if name else ""
    return None, ""


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding a saved LoRA adapter (adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def write_adapter(peft_model, directory: str | Path, state_dict: Optional[dict] = None) -> None:
    """adapter_model.safetensors + adapter_config.json of a `peft.PeftModel` (its save_pretrained), loadable
    with `PeftModel.from_pretrained(base, directory)`; `state_dict`: the model's full state dict when the
    parameters are sharded (peft picks the adapter's entries from it)."""
    # save_embedding_layers=False: the vocabulary is never resized here, so no full embedding matrix is
    # saved (peft's "auto" would also look up the base model's config by its location, which may be toylab://)
    peft_model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)


def uses_engine_state(accelerator) -> bool:
    """True under DeepSpeed and FSDP, whose optimizer state is sharded over the processes: a checkpoint
    then keeps model + optimizer in accelerate's own format (`accelerator.save_state`, every process
    writing its shard) under `engine_state/`, next to the gathered HF weights. False on CPU, one GPU and
    DDP, where the optimizer state is whole on every process and goes into trainer_state.pt."""
    return distributed_type(accelerator) in ("DEEPSPEED", "FSDP")


# --------------------------------------------------------------------------------------------------
# finding checkpoints
# --------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run directory (or of its checkpoints/ folder), oldest first."""
    root = Path(run_dir)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    m = CHECKPOINT_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step_00000010)")
    return int(m.group(1))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """'latest' -> newest checkpoint in output_dir (None if there is none yet); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(
            f"resume: {path} is not a complete checkpoint (no trainer_state.json); "
            f"use 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)]}"
        )
    return path


# --------------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_python(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_python(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def save_checkpoint(
    run_dir,  # a runs.RunDir (its accelerator, checkpoints_dir, path)
    step: int,
    model: torch.nn.Module,
    tokenizer=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    state: Optional[dict] = None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoints/step_{step:08d}: HF weights (safetensors), tokenizer, optimizer, scheduler,
    RNG of every process and `state` (JSON-able: step, data position, ...). Atomic by rename; with
    `keep_last` > 0 only the newest `keep_last` checkpoints stay.

    Every process must call it. Under DeepSpeed / FSDP (`uses_engine_state`) the optimizer state is
    saved by `accelerator.save_state` into engine_state/ (a collective: each process writes its shard)
    instead of `optimizer.state_dict()`, which would hold only the main process's shard."""
    acc = run_dir.accelerator
    engine = uses_engine_state(acc)
    final = run_dir.checkpoints_dir / f"step_{step:08d}"
    tmp = run_dir.checkpoints_dir / f".tmp-step_{step:08d}"
    if run_dir.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if acc is not None:
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(model)
        state_dict = acc.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards on the main process
    else:
        unwrapped, state_dict = model, None
    # every process saves its own RNG streams (tmp exists for all after the barrier above)
    rank = acc.process_index if acc is not None else 0
    torch.save(_rng_state(), tmp / f"rng_state_{rank}.pt")
    if engine:
        acc.save_state(str(tmp / ENGINE_STATE_DIR))  # every process: its weight + optimizer shards
    if run_dir.is_main:
        peft_model, prefix = _peft_part(unwrapped)
        if peft_model is not None:  # LoRA: the adapter (peft picks its entries from the full state dict)
            if state_dict is not None:
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            write_adapter(peft_model, tmp, state_dict=state_dict)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        blob = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None and not engine else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "state": state or {},
        }
        if engine:
            blob["engine_state"] = True
        torch.save(blob, tmp / "trainer_state.pt")
    if acc is not None:
        acc.wait_for_everyone()
    if run_dir.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "state": _to_python(state or {})}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last and keep_last > 0:
            for old in list_checkpoints(run_dir.path)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if acc is not None:
        acc.wait_for_everyone()
    return final


def _damaged(file: Path, err: Exception) -> CheckpointError:
    """The one-line error for a checkpoint file that cannot be parsed (a kill or a copy cut it short, a
    disk error): which file, and the two ways on (an earlier checkpoint, or a fresh start)."""
    ckpt = file.parent
    earlier = [p for p in list_checkpoints(ckpt.parent) if p.name < ckpt.name]
    reason = " ".join(str(err).split()) or type(err).__name__
    return CheckpointError(
        f"{file} is damaged and cannot be read ({reason}): resume from an earlier checkpoint with --resume "
        f"{earlier[-1] if earlier else '<checkpoint dir>'}, or start over with --overwrite_output_dir"
    )


def _torch_load(file: Path) -> Any:
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # torch's zip reader, an empty file
        raise _damaged(file, err) from err


def _load_hf_weights(path: Path, target: torch.nn.Module) -> torch.nn.Module:
    """`from_pretrained` of the checkpoint's HF weights, in the live model's dtype; a weights file that
    safetensors cannot parse is a CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    try:
        return type(target).from_pretrained(path, dtype=next(target.parameters()).dtype, use_safetensors=True)
    except SafetensorError as err:
        for file in files:  # the message of safetensors names no file: find the one it cannot open
            try:
                with safe_open(file, framework="pt"):
                    pass
            except SafetensorError as broken:
                raise _damaged(file, broken) from err
        raise _damaged(files[0], err) from err


def _load_adapter_weights(path: Path, peft_model: torch.nn.Module) -> None:
    """Copy the checkpoint's adapter (adapter_model.safetensors) into the live LoRA model; every adapter
    entry must be there (a checkpoint of a full fine-tuning run is refused by name)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise RuntimeError(f"{path} holds no adapter ({ADAPTER_WEIGHTS}) but this run trains one (use_peft): "
                           "resume with the settings that wrote it, or start a new run from its weights")
    try:
        weights = load_file(str(file))
    except SafetensorError as err:
        raise _damaged(file, err) from err
    result = set_peft_model_state_dict(peft_model, weights)
    adapter = peft_model.active_adapter
    missing = [k for k in result.missing_keys if f".{adapter}." in k and ("lora_" in k or "modules_to_save" in k)]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"{file} does not fit this run's adapter (unexpected {sorted(result.unexpected_keys)[:3]}, "
                           f"missing {missing[:3]}): resume with the LoRA settings that wrote it")


def load_checkpoint(
    path: str | Path,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    accelerator=None,
) -> dict:
    """Restore weights (when `model` is given), optimizer, scheduler and this process's RNG state.

    Returns the `state` dict saved with the checkpoint, plus "step". A file of the checkpoint that cannot
    be read is a CheckpointError naming it.

    A checkpoint written under DeepSpeed / FSDP (engine_state/) is restored with
    `accelerator.load_state`: call this on every process, after `accelerator.prepare`, under the same
    accelerate config and number of processes. The two kinds of checkpoint do not mix (the optimizer
    layouts differ); the error says so. Either kind's HF weights start a new run as a model path.
    """
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    blob = _torch_load(path / "trainer_state.pt")
    saved_engine = bool(blob.get("engine_state", False))
    if saved_engine != uses_engine_state(accelerator) and (model is not None or optimizer is not None):
        here = distributed_type(accelerator) if accelerator is not None else "no accelerator"
        raise RuntimeError(
            f"{path} was written {'under DeepSpeed/FSDP (sharded optimizer state in engine_state/)' if saved_engine else 'without DeepSpeed/FSDP (whole optimizer state)'}"
            f", but this run uses {here}: resume with the accelerate config and number of processes that "
            f"wrote it, or start a new run from its HF weights (model path {path})"
        )
    if saved_engine and (model is not None or optimizer is not None):
        if not getattr(accelerator, "_models", None):
            raise RuntimeError(f"{path}: call load_checkpoint after accelerator.prepare(model, optimizer, ...) under DeepSpeed/FSDP")
        accelerator.load_state(str(path / ENGINE_STATE_DIR))  # weights + optimizer shards of this process
        model = optimizer = None  # restored; the HF copy and trainer_state.pt hold no optimizer state
    target = None if model is None else accelerator.unwrap_model(model) if accelerator is not None else model
    peft_model = None if target is None else _peft_part(target)[0]
    if peft_model is not None:
        _load_adapter_weights(path, peft_model)
    elif target is not None:
        if is_adapter_dir(path):
            raise RuntimeError(f"{path} holds a LoRA adapter but this run trains all weights: resume with "
                               f"use_peft: true, or start a new run from its merged weights "
                               f"(python -m maxent_rlhf.lora merge {path} OUT_DIR)")
        # Load through HF (from_pretrained maps saved names such as embed_out <-> lm_head across
        # transformers versions), then copy into the live, possibly accelerate-wrapped, model.
        loaded = _load_hf_weights(path, target)
        target.load_state_dict(loaded.state_dict())
        del loaded
    if optimizer is not None and blob.get("optimizer") is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob.get("scheduler") is not None:
        scheduler.load_state_dict(blob["scheduler"])
    rank = accelerator.process_index if accelerator is not None else 0
    rng_file = path / f"rng_state_{rank}.pt"
    if not rng_file.exists():
        rng_file = path / "rng_state_0.pt"
    if rng_file.exists():
        _set_rng_state(_torch_load(rng_file))
    state = dict(blob.get("state") or {})
    state["step"] = int(blob["step"])
    return state
