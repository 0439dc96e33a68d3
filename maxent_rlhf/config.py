"""One config system for every script: typed dataclasses whose fields carry their help text.

Precedence: dataclass defaults < YAML file (`--config path.yaml`) < command line (`--key value`).
Unknown keys are errors that suggest the closest valid key; wrong types name the field and the type
that was expected. The resolved config is written to the run directory by the scripts (`save_config`).

    @dataclass
    class MyConfig(TrainConfig):          # BaseConfig for a script that does not train
        beta: float = cfg(0.1, "inverse temperature")

    cfg = parse_config(MyConfig)          # reads sys.argv
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem the user can fix; the message says which key and how."""


def cfg(default: Any = dataclasses.MISSING, help: str = "", choices: Optional[Sequence[Any]] = None, **kw):
    """A dataclass field with its help text (and optional allowed values)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


LR_SCHEDULER_TYPES = ("linear", "cosine", "constant")


@dataclasses.dataclass
class BaseConfig:
    """Fields every script shares (the judge included): where the output goes, seeding, precision."""

    output_dir: str = cfg("runs/default", "run directory: resolved config, metrics.jsonl, checkpoints/")
    seed: int = cfg(1, "random seed (torch, numpy, python); each process adds nothing: streams are identical per config")
    mixed_precision: str = cfg(
        "auto", "'auto' (bf16 on GPU, float32 on CPU), 'no', 'bf16' or 'fp16' (accelerate's name). On CPU: 'bf16' "
        "autocasts to bfloat16, 'fp16' runs float32 (accelerate has no fp16 autocast on CPU). A training run's "
        "config.yaml and closing summary record the precision that ran",
        choices=("auto", "no", "bf16", "fp16"),
    )
    trust_remote_code: bool = cfg(False, "allow custom model code from the hub (off unless you trust the repo)")

    def __post_init__(self) -> None:
        check_ranges(self)

    def range_checks(self) -> list:
        """(ok, message) pairs of this config's value ranges; subclasses and mixed-in configs add theirs
        (see check_ranges), each calling super()'s."""
        return getattr(super(), "range_checks", list)() + [
            (bool(str(self.output_dir).strip()), "`output_dir` must not be empty")
        ]


@dataclasses.dataclass
class PreferenceLossArgs:
    """The pairwise / listwise losses' hyper-parameters (`objectives.PreferenceLossParams`), one set of fields for
    the offline trainer (train_offline.py) and the online one (train_online.py)."""

    beta: float = cfg(0.1, "inverse temperature of dpo/ipo/chipo/simpo/simpo_pl/cpo (SimPO: beta of beta*A)")
    simpo_gamma: float = cfg(0.5, "SimPO / SimPO-PL target margin, absolute (TRL's simpo_gamma, not the ratio gamma/beta)")
    length_normalize: bool = cfg(True, "SimPO / SimPO-PL: average log-probs over response tokens (A = S/|y|)")
    cpo_alpha: float = cfg(1.0, "CPO: weight of the chosen NLL term (TRL's cpo_alpha)")
    orpo_lambda: float = cfg(0.1, "ORPO: weight lambda of the odds-ratio term")
    slic_delta: float = cfg(1.0, "SLiC-HF: hinge margin delta on S_w - S_l")
    slic_nll_coef: float = cfg(0.1, "SLiC-HF: weight of the chosen NLL term")
    chipo_reward_clip: float = cfg(1.0, "chi-PO: R_max; the reward difference is clipped to +-2 R_max")


@dataclasses.dataclass
class TrainConfig(BaseConfig):
    """Fields every training script shares, under transformers' TrainingArguments / TRL names where they
    have one: model and data, batch sizes, the optimizer and its schedule, checkpointing and logging.
    Scripts override a default (or a help text) where their behaviour needs another one."""

    # model and data
    model_name_or_path: str = cfg(
        "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr", "model to train: hub id, local path or toylab://NAME"
    )
    dataset_name: str = cfg(
        "trl-lib/tldr", "training data: hub id, local .json/.jsonl/.parquet file or directory, or toylab://NAME"
    )
    dataset_train_split: str = cfg("train", "split of dataset_name to train on")
    prompt_column: str = cfg("prompt", "column holding the prompt text")
    max_prompt_length: int = cfg(512, "longest prompt in tokens")
    # batch sizes: the GLOBAL batch is fixed, so results do not depend on the number of GPUs
    global_batch_size: int = cfg(64, "examples per optimizer step over all processes (fixed: accumulation is derived)")
    per_device_train_batch_size: int = cfg(
        8, "examples per forward/backward on one process; accumulation = global / (processes x this)"
    )
    # optimizer (AdamW) and learning-rate schedule
    learning_rate: float = cfg(1e-6, "peak AdamW learning rate")
    lr_scheduler_type: str = cfg(
        "linear", "learning-rate decay after warmup: 'linear' to 0, 'cosine' to 0, or 'constant'", choices=LR_SCHEDULER_TYPES
    )
    warmup_ratio: float = cfg(0.0, "fraction of the optimizer steps spent warming the learning rate up from 0")
    weight_decay: float = cfg(0.0, "AdamW weight decay")
    adam_beta1: float = cfg(0.9, "AdamW beta1")
    adam_beta2: float = cfg(0.999, "AdamW beta2")
    adam_epsilon: float = cfg(1e-8, "AdamW epsilon")
    max_grad_norm: float = cfg(1.0, "gradient clipping norm (<= 0: no clipping; the norm is still logged)")
    gradient_checkpointing: bool = cfg(False, "recompute activations in backward (less memory, ~30% slower)")
    shared_prefix: bool = cfg(
        True, "responses of one prompt (chosen and rejected; RLOO's rloo_k completions) share one prompt pass whose KV "
        "cache is repeated for them: same values, fewer prompt FLOPs; off, or automatically under FSDP / ZeRO-3 / "
        "gradient checkpointing: one plain forward per row"
    )
    # checkpoints and logging
    resume: Optional[str] = cfg(
        None, "resume from 'latest' (the newest checkpoint in output_dir; none yet: says so and starts fresh) or "
        "from a checkpoint directory"
    )
    overwrite_output_dir: bool = cfg(
        False, "start over in an output_dir that holds another run: the old run is moved (not deleted) to "
        "<output_dir>.replaced-<UTC time>"
    )
    save_steps: int = cfg(0, "save a checkpoint every N steps/iterations (0: only at the end)")
    save_total_limit: int = cfg(0, "keep only the newest N checkpoints (0: keep all)")
    logging_steps: int = cfg(1, "log metrics every N steps/iterations")
    report_to: str = cfg(
        "auto",
        "extra trackers: 'auto' (tensorboard when installed), 'tensorboard', 'wandb', 'none'; metrics.jsonl is always written",
        choices=("auto", "tensorboard", "wandb", "none"),
    )
    tracker_project_name: str = cfg("maxent-rlhf", "project name for wandb / tensorboard")

    def range_checks(self) -> list:
        return super().range_checks() + [
            (self.max_prompt_length >= 1, f"`max_prompt_length` = {self.max_prompt_length} must be >= 1"),
            (self.global_batch_size >= 1, f"`global_batch_size` = {self.global_batch_size} must be >= 1"),
            (self.per_device_train_batch_size >= 1,
             f"`per_device_train_batch_size` = {self.per_device_train_batch_size} must be >= 1"),
            (self.learning_rate >= 0 and math.isfinite(self.learning_rate),
             f"`learning_rate` = {self.learning_rate} must be a finite number >= 0"),
            (0.0 <= self.warmup_ratio <= 1.0, f"`warmup_ratio` = {self.warmup_ratio} must be in [0, 1]"),
            (self.weight_decay >= 0, f"`weight_decay` = {self.weight_decay} must be >= 0"),
            (0.0 <= self.adam_beta1 < 1.0, f"`adam_beta1` = {self.adam_beta1} must be in [0, 1)"),
            (0.0 <= self.adam_beta2 < 1.0, f"`adam_beta2` = {self.adam_beta2} must be in [0, 1)"),
            (self.adam_epsilon >= 0, f"`adam_epsilon` = {self.adam_epsilon} must be >= 0"),
            (self.save_steps >= 0, f"`save_steps` = {self.save_steps} must be >= 0 (0: only at the end)"),
            (self.save_total_limit >= 0, f"`save_total_limit` = {self.save_total_limit} must be >= 0 (0: keep all)"),
            (self.logging_steps >= 1, f"`logging_steps` = {self.logging_steps} must be >= 1 (1: log every step)"),
            (self.resume is None or str(self.resume).strip() != "",
             "`resume` must be 'latest' or a checkpoint directory (leave it unset for a fresh run)"),
        ]


# --------------------------------------------------------------------------------------------------
# type coercion
# --------------------------------------------------------------------------------------------------
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def check_ranges(config: Any) -> None:
    """Raise a ConfigError naming the first field whose value is out of range (`range_checks`).

    Called by `__post_init__`, so a config built in-process is checked like one from the command line
    (`config_from_dict` prefixes the source: the YAML file or "command line")."""
    for ok, message in config.range_checks():
        if not ok:
            raise ConfigError(message)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null" if len(args) == 1 else " or ".join(map(_type_name, args))
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, tp: Any, value: Any, source: str) -> Any:
    def fail() -> ConfigError:
        return ConfigError(
            f"{source}: field `{name}` expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in typing.get_args(tp):
                return None
            raise fail()
        for arg in args:
            try:
                return _coerce(name, arg, value, source)
            except ConfigError:
                continue
        raise fail()
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_coerce(name, inner, v, source) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise fail() from None
            if f.is_integer():
                return int(f)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    return value


def _fields(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{source}: unknown key `{key}`{hint}")


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict:
    """A YAML mapping read with `yaml.safe_load`; every problem is a ConfigError naming the file (and the
    line and column of a syntax error or of a refused tag such as `!!python/object`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a .yaml file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_yaml_error_message(path, e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value, got {type(data).__name__}")
    return data


def _yaml_error_message(path: Path, e: "yaml.MarkedYAMLError") -> str:
    mark = e.problem_mark or e.context_mark
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(e.problem or e.context or "not valid YAML").split())
    if isinstance(e, yaml.constructor.ConstructorError):
        return (f"{where}: {problem}; configs are read with yaml.safe_load, which refuses Python tags such as "
                "!!python/object: write plain values (numbers, strings, lists, mappings)")
    context = f" ({' '.join(str(e.context).split())})" if e.context and e.problem else ""
    return f"{where}: not valid YAML: {problem}{context}"


def config_from_dict(cls: Type[T], values: dict, source: str = "config") -> T:
    """Build `cls` from a plain mapping, checking keys, types and choices."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), source)
        f, tp = fields[key]
        v = _coerce(key, tp, value, source)
        choices = f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise ConfigError(f"{source}: field `{key}` must be one of {list(choices)}, got {v!r}")
        kwargs[key] = v
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{source}: {e}") from None
    except ConfigError as e:  # a value out of range (check_ranges)
        raise ConfigError(f"{source}: {e}") from None


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block above them): `prog: error: ...`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: command line: {message} (see --help)\n")


def _help_formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=40, width=110)


def build_parser(cls: type, description: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        description=description or (cls.__doc__ or ""),
        formatter_class=_help_formatter,
        allow_abbrev=False,
        epilog="Every option can also be set in the YAML file given by --config; the command line wins.",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (keys as below, without --)")
    for name, (f, tp) in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        extra = f" {{{', '.join(map(str, choices))}}}" if choices else ""
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])  # --max-new-tokens too
        parser.add_argument(
            *flags,
            dest=name,
            metavar=_type_name(tp).upper().replace(" ", "_"),
            nargs="?" if tp is bool else None,
            const="true" if tp is bool else None,
            default=argparse.SUPPRESS,
            help=f"{help_text}{extra} (default: {default})".replace("%", "%%"),
        )
    return parser


def _join_negative_numbers(argv: Sequence[str]) -> list[str]:
    """`--key -1e-6` -> `--key=-1e-6`: argparse takes a value such as -1e-6 or -.5e3 for an option
    (its negative-number rule knows only -1 and -1.5), and would report a missing value instead of the
    range error the value deserves."""
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if token.startswith("-") and prev.startswith("--") and "=" not in prev and _is_number(token):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_config(
    cls: Type[T], argv: Optional[Sequence[str]] = None, description: Optional[str] = None, exit_on_error: bool = True
) -> T:
    """Parse `--config file.yaml` and `--key value` overrides into a `cls` instance.

    A ConfigError exits with one line (argparse style, status 2), or is raised with
    `exit_on_error=False` (`cli.run_script` reports it, and shows its traceback under MAXENT_RLHF_DEBUG).
    """
    argv = _join_negative_numbers(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, description)
    args, unknown = parser.parse_known_args(argv)
    valid = list(_fields(cls))
    try:
        for token in unknown:
            if token.startswith("--"):
                raise _unknown_key(token[2:].split("=", 1)[0], valid, "command line")
            raise ConfigError(f"command line: unexpected argument {token!r} (options look like --key value)")
        values: dict = {}
        if args.config:
            values.update(load_yaml(args.config))
            config_from_dict(cls, values, source=args.config)  # report YAML errors against the file
        cli = {k: v for k, v in vars(args).items() if k != "config"}
        values.update(cli)
        return config_from_dict(cls, values, source="command line" if cli else (args.config or "config"))
    except ConfigError as e:
        if not exit_on_error or os.environ.get("MAXENT_RLHF_DEBUG", "").strip() not in ("", "0"):
            raise
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with --config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)


def derive_batch_sizes(
    global_batch_size: int, num_processes: int, per_device_batch_size: int, name: str = "global_batch_size",
    per_device_name: str = "per_device_train_batch_size",
) -> tuple[int, int]:
    """Split a global batch into per-process micro-batches and gradient-accumulation steps.

    Returns (per_process_batch, gradient_accumulation_steps) so that
    global = num_processes * per_device_batch_size * gradient_accumulation_steps: the optimisation does
    not change with the number of GPUs.
    """
    if global_batch_size <= 0 or per_device_batch_size <= 0:
        raise ConfigError(
            f"`{name}` ({global_batch_size}) and `{per_device_name}` ({per_device_batch_size}) must be >= 1"
        )
    if global_batch_size % num_processes:
        raise ConfigError(
            f"`{name}` = {global_batch_size} does not divide over {num_processes} processes; "
            f"use a multiple of {num_processes}"
        )
    per_process = global_batch_size // num_processes
    if per_process % per_device_batch_size:
        raise ConfigError(
            f"`{name}` = {global_batch_size} over {num_processes} processes gives {per_process} per process, "
            f"which `{per_device_name}` = {per_device_batch_size} does not divide; pick a "
            f"`{per_device_name}` that divides {per_process}"
        )
    return per_process, per_process // per_device_batch_size
