"""LoRA policies (the `peft` library): the reference model is the same model with its adapter switched off.

A LoRA policy trains low-rank updates W + (alpha / r) * B @ A of chosen weight matrices and keeps the
base weights W frozen, so the reference model of the KL reward, `objective/kl_ref` and the DPO-family
losses needs no second copy of the weights: it is the policy with the adapter disabled
(`adapter_disabled`), as in TRL. Memory: the base weights once, plus the adapter's weights, gradients
and two AdamW moments; full fine-tuning holds the weights, their gradients, two AdamW moments and the
reference copy. Pythia-6.9B at r 16 on query_key_value (peft's default for GPT-NeoX): 32 layers x
(16 x 4096 + 12288 x 16) = 8.4M adapter parameters, 134 MB in float32 with gradients and AdamW state.

    cfg = ...                                       # a training config that mixes in PeftArgs
    model = apply_lora(load_policy(path), cfg, base_model_name_or_path=cfg.model_name_or_path)
    model = accelerator.prepare(model)              # DDP / FSDP2 wrappers are fine
    with torch.no_grad(), adapter_disabled(model):  # the reference forward, through the prepared model
        ref_logprobs = response_logprobs(model, ...)
    save_adapter(model, ckpt_dir)                   # adapter_model.safetensors + adapter_config.json
    merged_state_dict(model)                        # full HF-named merged weights; the model stays unmerged

Command line: `python -m maxent_rlhf.lora merge ADAPTER_DIR OUT_DIR` writes full merged weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .artifacts import is_local_path
from .checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir, write_adapter  # noqa: F401 (re-exported)
from .config import ConfigError, cfg

LORA_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
INSTALL_HINT = 'pip install -e ".[peft]" (or pip install peft)'
PEFT_FLOOR = "0.18.0"  # 0.17 does not import with transformers 5 (HybridCache was removed); as in setup.cfg


# --------------------------------------------------------------------------------------------------
# config fields (TRL's ModelConfig names and defaults)
# --------------------------------------------------------------------------------------------------
@dataclass
class PeftArgs:
    """LoRA options, mixed into a training config (TRL's `ModelConfig` names and defaults)."""

    use_peft: bool = cfg(
        False, "train a LoRA adapter (peft) instead of all weights; the reference model is the same model with the "
        "adapter disabled (no second copy); checkpoints hold the adapter (full merged weights: python -m "
        "maxent_rlhf.lora merge CKPT OUT_DIR; evaluate_judge.py takes the adapter checkpoint as it is)")
    lora_r: int = cfg(16, "LoRA rank r of the update B @ A")
    lora_alpha: int = cfg(32, "LoRA alpha: the update is scaled by lora_alpha / lora_r")
    lora_dropout: float = cfg(0.05, "dropout on the LoRA branch's input (training only; the online trainers switch "
                              "every dropout of the policy off, this one too)")
    lora_target_modules: Optional[list[str]] = cfg(
        None, "modules that get an adapter, by name (comma-separated), or all-linear; null: peft's default for the "
        "architecture (GPT-NeoX / Pythia: query_key_value)")
    lora_task_type: str = cfg(
        "CAUSAL_LM", "task type passed to LoRA: CAUSAL_LM for a policy, SEQ_CLS for a reward model (its new `score` "
        "head is then trained in full and saved with the adapter)", choices=LORA_TASK_TYPES)

    def range_checks(self) -> list:
        """Value ranges of the LoRA options (config.check_ranges; chained with the other mixed-in configs)."""
        targets = self.lora_target_modules
        return getattr(super(), "range_checks", list)() + [
            (self.lora_r >= 1, f"`lora_r` = {self.lora_r} must be >= 1 (the rank of the LoRA update)"),
            (self.lora_alpha > 0, f"`lora_alpha` = {self.lora_alpha} must be > 0 (the update is scaled by alpha / r)"),
            (0.0 <= self.lora_dropout < 1.0, f"`lora_dropout` = {self.lora_dropout} must be in [0, 1)"),
            (targets is None or (len(targets) > 0 and all(str(t).strip() for t in targets)),
             f"`lora_target_modules` = {targets!r} must be null (peft's default) or a non-empty list of module names"),
            (self.lora_task_type in LORA_TASK_TYPES,
             f"`lora_task_type` = {self.lora_task_type!r} must be one of {list(LORA_TASK_TYPES)}"),
            (not (self.use_peft and getattr(self, "ref_model_name_or_path", None)),
             "`ref_model_name_or_path` with use_peft: the reference is the policy with its adapter disabled (no "
             "second model is loaded); set ref_model_name_or_path: null, or use_peft: false for another reference"),
        ]


def require_peft():
    """The `peft` module, or a ConfigError that names the install (also for a peft too old for this suite or
    for the installed transformers)."""
    from packaging.version import Version

    try:
        import peft
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "peft":
            raise ConfigError(f"`use_peft: true` needs the peft library, which is not installed: {INSTALL_HINT}") from None
        # e.g. peft < 0.18 with transformers 5 (a class it imports was removed)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"the installed peft cannot be imported ({message}); install peft>={PEFT_FLOOR}: "
                          f"{INSTALL_HINT}") from None
    if Version(peft.__version__) < Version(PEFT_FLOOR):
        raise ConfigError(f"peft {peft.__version__} is older than {PEFT_FLOOR}, the oldest this suite was tested with; "
                          f"{INSTALL_HINT}")
    return peft


# --------------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------------
def apply_lora(model, args: PeftArgs, base_model_name_or_path: Optional[str] = None):
    """`model` (a transformers model) with LoRA adapters from `args`: a `peft.PeftModel` whose only trainable
    parameters are the adapter's (and, for SEQ_CLS, the score head), in float32 whatever the base's dtype
    (the trainers load the frozen base in the mixed-precision dtype: bf16 on GPU). `base_model_name_or_path` is written into
    adapter_config.json: give the location the user gave (a hub id, `toylab://NAME`, or a local path, which
    is made absolute), so that the adapter's base can be found again; default: the model's own
    `name_or_path` (the resolved path)."""
    peft = require_peft()
    targets = args.lora_target_modules
    if targets is not None and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"  # peft's shortcut is a string (a one-element list would name a module)
    config = peft.LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, task_type=args.lora_task_type,
    )
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as e:
        if "target" in str(e).lower():
            raise ConfigError(f"`lora_target_modules` = {args.lora_target_modules!r}: {str(e).splitlines()[0]}") from None
        raise
    for p in peft_model.parameters():  # trainable = float32 (AdamW's state); the frozen base may be bf16
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if base_model_name_or_path is not None:
        location = str(base_model_name_or_path)
        if is_local_path(location) and Path(location).expanduser().exists():
            location = str(Path(location).expanduser().absolute())  # found again from any working directory
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = location
    return peft_model


def unwrap_peft_model(model):
    """The `PeftModel` inside what `accelerator.prepare` returned (DDP, DeepSpeed and torch.compile
    wrappers are removed; an FSDP2 model is the PeftModel itself), without touching the wrapper
    (the mixed-precision forward is kept)."""
    from accelerate.utils import extract_model_from_parallel

    peft = require_peft()
    inner = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    if not isinstance(inner, peft.PeftModel):
        raise TypeError(f"expected a peft.PeftModel (apply_lora), possibly wrapped by accelerate; got {type(inner).__name__}")
    return inner


@contextlib.contextmanager
def adapter_disabled(model):
    """Inside, `model` computes the reference: the base weights alone, with no second copy of them.

    `model` is the PeftModel or what `accelerator.prepare` made of it; the forward may go through the
    wrapper. Use it with `torch.no_grad()`: peft sets the adapter's `requires_grad` off on entry and
    back on at exit, and a DDP wrapper expects every trainable parameter to take part in a forward that
    builds a graph."""
    with unwrap_peft_model(model).disable_adapter():
        yield


_ADAPTER_SEGMENT = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict (its own names, as its `save_pretrained` writes them) with every LoRA
    update added: W + (alpha / r) * B @ A, computed by peft's `get_delta_weight` for each adapted matrix.

    The model is never merged: merging in place and unmerging would leave W + d - d, which differs from
    W by rounding (in bf16, peft's merge_adapter + unmerge_adapter changed 36% of the adapted entries of
    a tiny GPT-NeoX), and the reference (adapter off) would drift from the base. Cost: one new
    tensor per adapted matrix (its size); every other entry is the live parameter itself (shared storage,
    no copy: do not modify the returned tensors). The active adapter's copy of a `modules_to_save`
    module (the SEQ_CLS score head) stands under the module's own name. Under FSDP2 the sharded
    parameters (DTensors) are gathered: every process must call it, and each gets the full weights."""
    require_peft()
    from peft.tuners.lora import LoraLayer

    peft_model = unwrap_peft_model(model)
    adapter = peft_model.active_adapter
    base = peft_model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:  # Linear, Embedding, Conv LoRA layers alike
            if module.merged:
                raise ValueError(f"{name} is merged into its base layer; unmerge it before merged_state_dict")
            deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(adapter)
    mts = re.compile(r"\.modules_to_save\.([^.]+)\.")
    state = base.state_dict()
    assert set(deltas) <= set(state), f"adapted weights not in the state dict: {sorted(set(deltas) - set(state))}"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _ADAPTER_SEGMENT.search(key) or ".original_module." in key:
            continue
        m = mts.search(key)
        if m is not None:
            if m.group(1) != adapter:
                continue
            key_out = key[: m.start()] + "." + key[m.end():]
        else:
            key_out = key.replace(".base_layer.", ".")
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        out[key_out] = value.full_tensor() if hasattr(value, "full_tensor") else value  # an FSDP2 DTensor
    return out


# --------------------------------------------------------------------------------------------------
# adapter checkpoints
# --------------------------------------------------------------------------------------------------
def save_adapter(model, directory: str | Path, state_dict: Optional[dict] = None) -> None:
    """Write `adapter_model.safetensors` + `adapter_config.json` into `directory` (PeftModel.save_pretrained),
    loadable with `PeftModel.from_pretrained(base, directory)`. `state_dict`: the model's full state dict when
    the parameters are sharded (`accelerator.get_state_dict`); peft picks the adapter's entries from it."""
    write_adapter(unwrap_peft_model(model), directory, state_dict)


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of the adapter directory `path`, checked: a ConfigError names what is missing."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"adapter {str(path)!r}: directory does not exist")
    if not p.is_dir():
        raise ConfigError(f"adapter {str(path)!r} is a file; give the directory that holds {ADAPTER_CONFIG}")
    if not is_adapter_dir(p):
        raise ConfigError(f"{str(path)!r} is not an adapter: it has no {ADAPTER_CONFIG} (save_adapter writes one)")
    try:
        config = json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not (p / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"adapter {str(path)!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (save_adapter writes both)")
    if not config.get("base_model_name_or_path"):
        raise ConfigError(f"{p / ADAPTER_CONFIG} names no base model (`base_model_name_or_path`); "
                          "set it to the base model's hub id or directory")
    if config.get("task_type") not in (None,) + LORA_TASK_TYPES:
        raise ConfigError(f"{p / ADAPTER_CONFIG}: task_type {config.get('task_type')!r} is not one of {list(LORA_TASK_TYPES)}")
    return config


def load_merged_from_adapter(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                             revision=None):
    """The model an adapter directory describes, merged into a plain transformers model: the base model
    (`base_model_name_or_path` of adapter_config.json: hub id, path or a registered scheme such as
    toylab://) loaded by the project's loaders, the adapter applied, then merged (peft's
    `merge_and_unload`, in place: no second copy). A SEQ_CLS adapter gives a reward model."""
    from .models import load_policy, load_reward_model_for_training

    peft = require_peft()
    config = read_adapter_config(path)
    base_location = config["base_model_name_or_path"]
    revision = revision or config.get("revision")
    if config.get("task_type") == "SEQ_CLS":
        base = load_reward_model_for_training(base_location, dtype=dtype, trust_remote_code=trust_remote_code,
                                              revision=revision)
    else:
        base = load_policy(base_location, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    model = peft.PeftModel.from_pretrained(base, str(path))
    return model.merge_and_unload()


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False) -> Path:
    """Write the merged model of `adapter_dir` to `out_dir` as full HF weights (safetensors) + config +
    tokenizer (the adapter directory's, else the base model's). `out_dir` must not hold anything yet; it
    is written under a temporary name and renamed at the end, so a killed merge leaves no half model."""
    from .models import TOKENIZER_FILES, load_tokenizer

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {str(out)!r} already exists and is not empty; give a new directory")
    config = read_adapter_config(adapter_dir)
    model = load_merged_from_adapter(adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    has_tokenizer = any((Path(adapter_dir) / f).exists() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(str(adapter_dir) if has_tokenizer else config["base_model_name_or_path"],
                               trust_remote_code=trust_remote_code)
    tmp = out.with_name(out.name + ".tmp-merge")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover of a killed merge
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    from .cli import describe_error
    from .config import _ArgumentParser  # argparse with one-line errors

    prog = "python -m maxent_rlhf.lora"
    parser = _ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser(
        "merge", help="write an adapter's full merged weights (a plain transformers model)",
        description="Load the base model named in ADAPTER_DIR/adapter_config.json (hub id, local path or toylab://NAME), "
        "apply the adapter, merge W + (alpha / r) * B @ A into the weights and write OUT_DIR: model.safetensors, "
        "config.json and the tokenizer, loadable with AutoModelForCausalLM.from_pretrained (a SEQ_CLS adapter: "
        "AutoModelForSequenceClassification) with no peft installed. OUT_DIR must be new or empty.")
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory with adapter_config.json and "
                       "adapter_model.safetensors (a checkpoint of a use_peft run)")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="where the merged model is written (new or empty directory)")
    merge.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help="dtype of the merge and of the written weights (default: float32; bfloat16 halves the size)")
    merge.add_argument("--trust_remote_code", action="store_true", help="allow custom model code of the base model")
    args = parser.parse_args(argv)

    try:
        out = merge_adapter(args.adapter_dir, args.out_dir, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - user errors get one line, bugs their traceback
        described = describe_error(err)
        if described is None:
            raise
        print(f"{prog}: error: {described[0]}", file=sys.stderr, flush=True)
        return described[1]
    print(f"merged {args.adapter_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
