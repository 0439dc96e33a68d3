"""The run directory of every training script: its layout, its logs, and the output_dir policy.

Layout of a run directory:
    config.yaml            resolved config (what actually ran: `mixed_precision` as accelerate applied it)
    metrics.jsonl          one JSON object per logged step: {"step": N, "train/loss": ..., ...}
    checkpoints/step_00000010/   one checkpoint (`maxent_rlhf.checkpoints` writes and reads them)

Distributed runs: every process calls the functions here; only the main process writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .checkpoints import checkpoint_step, latest_checkpoint, list_checkpoints, resolve_resume
from .config import ConfigError, save_config
from .distributed import check_launch, is_main_process, precision_that_ran


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
        """Write config.yaml, with `mixed_precision` as it ran ('auto' resolved; 'fp16' on CPU is 'no')."""
        if hasattr(config, "mixed_precision"):
            config = dataclasses.replace(config, mixed_precision=precision_that_ran(config.mixed_precision, self.accelerator))
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
