"""Run directory, metrics logging, seeding and checkpoints shared by every script.

Layout of a run directory:
    config.yaml            resolved config (what actually ran)
    metrics.jsonl          one JSON object per logged step: {"step": N, "train/loss": ..., ...}
    checkpoints/step_00000010/
        model.safetensors, config.json, tokenizer files      HF `save_pretrained` (what the judge loads)
        trainer_state.pt     optimizer, scheduler, step, data position, user state (torch.load weights_only)
        rng_state_<rank>.pt  python / numpy / torch RNG states of every process
        trainer_state.json   the human-readable part (step, user state)
        engine_state/        only under DeepSpeed or FSDP: accelerate `save_state` output (sharded
                             weights + optimizer state of every process); trainer_state.pt then has
                             optimizer None and "engine_state": True. See `uses_engine_state`.

Distributed runs: every process calls the functions here; only the main process writes logs and the
HF weights; checkpoints of several nodes need `output_dir` on a filesystem that every node sees.

Checkpoints are written to a temporary directory and renamed into place, so a run killed while saving
never leaves a half checkpoint that `--resume latest` would pick up.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from .config import ConfigError, save_config
from .distributed import distributed_type

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def is_main_process(accelerator=None) -> bool:
    return accelerator is None or accelerator.is_main_process


def check_launch(accelerator=None) -> None:
    """Refuse a launch whose processes did not join one process group.

    torchrun / `accelerate launch` set WORLD_SIZE for every process. On a machine without GPUs, accelerate
    1.x only forms a (gloo) group when told to use the CPU; otherwise each process silently runs alone and
    they all write the same run directory. Called by `RunDir`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    seen = accelerator.num_processes if accelerator is not None else 1
    # accelerate 1.x shards only on GPUs: on CPU processes an FSDP config silently becomes plain DDP and a
    # DeepSpeed one processes that each think they run alone (tests/cpu_sharding.py has the details)
    asked = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(flag, "false").lower() == "true"]
    if accelerator is not None and asked:
        from .distributed import distributed_type

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


def mean_over_processes(accelerator, metrics: dict) -> dict:
    """Average scalar metrics over all processes in one all-reduce (each process holds an equal share
    of the global batch, so the mean of the per-process means is the global-batch mean).

    Returns python floats; non-scalar values are passed through unchanged. Every process must call it
    with the same keys in the same order.
    """
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)]
    out = dict(metrics)
    if not keys:
        return out
    values = torch.tensor(
        [float(metrics[k].detach().float().item()) if isinstance(metrics[k], torch.Tensor) else float(metrics[k]) for k in keys],
        dtype=torch.float64,
    )
    if accelerator is not None and accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean").cpu()
    for k, v in zip(keys, values.tolist()):
        out[k] = v
    return out


ENGINE_STATE_DIR = "engine_state"


def uses_engine_state(accelerator) -> bool:
    """True under DeepSpeed and FSDP, whose optimizer state is sharded over the processes: a checkpoint
    then keeps model + optimizer in accelerate's own format (`accelerator.save_state`, every process
    writing its shard) under `engine_state/`, next to the gathered HF weights. False on CPU, one GPU and
    DDP, where the optimizer state is whole on every process and goes into trainer_state.pt."""
    return distributed_type(accelerator) in ("DEEPSPEED", "FSDP")


class NonFiniteError(RuntimeError):
    """A loss or reward became NaN/inf; the last checkpoint on disk is still usable."""


def check_finite(name: str, value: torch.Tensor | float, step: int, run_dir: Optional["RunDir"] = None) -> None:
    """Raise NonFiniteError when `value` (its mean) is NaN or inf; the message names the last good checkpoint
    (checkpoints are only written after a finite step, so the newest one on disk is good)."""
    v = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        last = latest_checkpoint(run_dir.path) if run_dir is not None else None
        if last is not None:
            where = (f"; the last good checkpoint is {last} (step {checkpoint_step(last)}): continue from it with "
                     f"--resume {last} after changing the settings")
        elif run_dir is not None:
            where = f"; no checkpoint was saved in {run_dir.path} yet (save_steps sets how often)"
        else:
            where = ""
        raise NonFiniteError(
            f"{name} is {v} at step {step}: stopping. Lower the learning rate, check the data, or use "
            f"float32{where}"
        )


class RunDir:
    """The run directory. Only the main process writes files; every process may call the methods."""

    def __init__(self, output_dir: str | Path, accelerator=None):
        check_launch(accelerator)
        self.path = Path(output_dir)
        self.accelerator = accelerator
        self.checkpoints_dir = self.path / "checkpoints"
        if self.is_main:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if accelerator is not None:
            accelerator.wait_for_everyone()

    @property
    def is_main(self) -> bool:
        return is_main_process(self.accelerator)

    def save_config(self, config: Any) -> None:
        if self.is_main:
            save_config(config, self.path / "config.yaml")

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Append to metrics.jsonl and send to accelerate's trackers (main process only)."""
        record = {"step": int(step)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().item() if v.numel() == 1 else v.detach().float().tolist()
            record[k] = v
        if self.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(scalars, step=int(step))

    def append_jsonl(self, filename: str, records: Iterable[dict]) -> None:
        if self.is_main:
            with open(self.path / filename, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
                f.flush()

    def truncate_logs_after(self, step: int, filenames: Iterable[str] = ("metrics.jsonl",)) -> None:
        """On resume from `step`, drop lines a killed run logged past its last checkpoint."""
        if not self.is_main:
            return
        for name in filenames:
            path = self.path / name
            if not path.exists():
                continue
            kept = [r for r in read_jsonl(path) if r.get("step", -1) <= step]  # the lines were json.dumps output
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_jsonl(path: str | Path, numbered: bool = False, torn: Optional[list] = None) -> list:
    """The records of a JSONL file, in order ([] when the file does not exist).

    A line that is not valid JSON is skipped, and its number appended to `torn` when a list is given:
    every JSONL file of the suite is appended and flushed one record at a time, so such a line is one
    that a kill cut short, and it must not stop a resume or a report. Blank lines are skipped.
    `numbered=True` returns (line number, record) pairs, for messages that name the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn is not None:
                torn.append(number)
            continue
        out.append((number, record) if numbered else record)
    return out


def open_jsonl_for_append(path: str | Path):
    """`open(path, "a")` for JSONL records, creating the folder; when a kill tore the file's last line,
    a newline closes it first, so the next record starts a line of its own (and `read_jsonl` skips only
    the torn fragment, not the record written after it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


# --------------------------------------------------------------------------------------------------
# checkpoints
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
# the output_dir policy of every script: nothing is overwritten or silently mixed
# --------------------------------------------------------------------------------------------------
# what makes a directory hold a run: its logs or checkpoints (a config.yaml alone is left by an attempt
# that failed before its first step: it is replaced, so that fixing a typo never needs a new output_dir)
RUN_LOG_FILES = ("metrics.jsonl", "samples.jsonl")


def run_contents(output_dir: str | Path, files: Iterable[str] = RUN_LOG_FILES) -> list[str]:
    """What of an earlier run `output_dir` holds (`files` that exist, its checkpoints); [] when none."""
    root = Path(output_dir)
    found = [name for name in files if (root / name).exists()]
    ckpts = list_checkpoints(root)
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s), the newest {ckpts[-1].name}")
    return found


def replace_old_run(output_dir: str | Path) -> Optional[Path]:
    """--overwrite_output_dir: move EVERYTHING in `output_dir` into a sibling `<name>.replaced-<UTC time>`
    (renames on the same filesystem: instant, nothing copied, nothing deleted) and return it; the new run
    starts in an empty directory, so no log line or checkpoint of the old one can mix with it. Delete
    the sibling when it is no longer needed. None when there was nothing to move."""
    import time

    root = Path(output_dir)
    entries = sorted(root.iterdir()) if root.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = root.resolve().parent / f"{root.resolve().name}.replaced-{stamp}"
    k = 2
    while target.exists():
        target, k = root.resolve().parent / f"{root.resolve().name}.replaced-{stamp}-{k}", k + 1
    target.mkdir(parents=True)
    for entry in entries:
        shutil.move(str(entry), str(target / entry.name))
    return target


def open_run_dir(
    output_dir: str | Path, resume: Optional[str] = None, overwrite_output_dir: bool = False, accelerator=None,
    log_files: Iterable[str] = ("metrics.jsonl", "samples.jsonl"),
) -> tuple["RunDir", Optional[Path]]:
    """The run directory of a training script and the checkpoint to resume from (None: a fresh start).
    Every process calls it, before anything is written into `output_dir`. One policy for all scripts:

    - no `resume`, `output_dir` holds another run (metrics.jsonl, samples.jsonl or checkpoints): a ConfigError that says how to continue it (--resume latest) or start over
      (--overwrite_output_dir, or another output_dir); with `overwrite_output_dir` the old run is
      moved aside first (`replace_old_run`), and the line printed says where.
    - `resume: latest` and no checkpoint yet: prints "no checkpoint in DIR: starting fresh" and starts
      fresh; the log lines of the attempt that saved no checkpoint are dropped (they describe steps the
      new run will redo).
    - `resume` = 'latest' with a checkpoint, or a checkpoint directory: log lines past its step (written
      by a killed run after its last checkpoint) are dropped.
    """
    main = is_main_process(accelerator)
    found = run_contents(output_dir)
    if resume:
        ckpt = resolve_resume(resume, output_dir)
        if ckpt is None and main:
            print(f"[maxent_rlhf] no checkpoint in {output_dir}: starting fresh (--resume latest)", flush=True)
    else:
        ckpt = None
        if found and not overwrite_output_dir:
            raise ConfigError(
                f"output_dir {str(output_dir)!r} already holds a run ({', '.join(found)}): pass --resume latest "
                "to continue it, or --overwrite_output_dir to start over (the old run is moved to a "
                f"'{Path(output_dir).name}.replaced-<time>' directory next to it), or choose another output_dir"
            )
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process decided on the same files before any is moved
    if not resume and found and overwrite_output_dir and main:
        moved = replace_old_run(output_dir)
        print(f"[maxent_rlhf] --overwrite_output_dir: the earlier run in {output_dir} was moved to {moved}", flush=True)
    run_dir = RunDir(output_dir, accelerator)  # waits for every process
    run_dir.truncate_logs_after(checkpoint_step(ckpt) if ckpt is not None else 0, log_files)
    return run_dir, ckpt


def check_same_evaluation(output_dir: str | Path, config: Any, keys: Iterable[str], config_file: str, holds: Iterable[str]) -> None:
    """The output_dir policy of a script that continues in place (evaluate_judge.py): its outputs are
    keyed caches, so a rerun continues; but when `output_dir` already holds outputs (`holds`: files or
    folders, any non-empty) made under other values of `keys` (read from the `config_file` written then),
    they would mix with this run's, and this is a ConfigError naming the key, the two values and the
    way out (another output_dir)."""
    root = Path(output_dir)
    saved_path = root / config_file
    if not saved_path.is_file():
        return
    if not any((root / h).is_file() or ((root / h).is_dir() and any((root / h).iterdir())) for h in holds):
        return  # an earlier attempt that stopped before producing anything
    from .config import load_yaml

    try:
        saved = load_yaml(saved_path)
    except ConfigError:
        return  # unreadable: the run that wrote it died while writing; outputs are checked by their keys
    for key in keys:
        if key in saved and saved[key] != getattr(config, key):
            raise ConfigError(
                f"output_dir {str(output_dir)!r} holds outputs made with `{key}` = {saved[key]!r} (this run: "
                f"{getattr(config, key)!r}); they would mix: choose another output_dir, or move {root} away"
            )


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
    run_dir: RunDir,
    step: int,
    model: torch.nn.Module,
    tokenizer=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    state: Optional[dict] = None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoints/step_{step:08d}: HF weights (safetensors), tokenizer, optimizer, scheduler,
    RNG of every process and `state` (JSON-able: step, data position, ...). Atomic by rename.

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


def load_checkpoint(
    path: str | Path,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    accelerator=None,
) -> dict:
    """Restore weights (when `model` is given), optimizer, scheduler and this process's RNG state.

    Returns the `state` dict saved with the checkpoint, plus "step".

    A checkpoint written under DeepSpeed / FSDP (engine_state/) is restored with
    `accelerator.load_state`: call this on every process, after `accelerator.prepare`, under the same
    accelerate config and number of processes. The two kinds of checkpoint do not mix (the optimizer
    layouts differ); the error says so. Either kind's HF weights start a new run as a model path.
    """
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
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
    if model is not None:
        # Load through HF (from_pretrained maps saved names such as embed_out <-> lm_head across
        # transformers versions), then copy into the live, possibly accelerate-wrapped, model.
        target = accelerator.unwrap_model(model) if accelerator is not None else model
        if not list(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{path} has no .safetensors weights")
        loaded = type(target).from_pretrained(path, dtype=next(target.parameters()).dtype, use_safetensors=True)
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
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    state = dict(blob.get("state") or {})
    state["step"] = int(blob["step"])
    return state


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


def resolve_mixed_precision(mixed_precision: str) -> str:
    """accelerate `mixed_precision` for BaseConfig.mixed_precision: 'auto' takes what `accelerate launch`
    set (ACCELERATE_MIXED_PRECISION), else bf16 on a GPU and 'no' on CPU; other values pass through.
    Used by train_offline.py and train_rloo.py."""
    if mixed_precision != "auto":
        return mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher:
        return launcher
    return "bf16" if torch.cuda.is_available() else "no"
