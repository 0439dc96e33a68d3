"""Two ways of killing a training run for the exact-resume tests."""
import shutil
from pathlib import Path

import pytest


def copy_killed_run(full: Path, killed: Path, checkpoint_step: int, logged_lines: int) -> Path:
    """What a run killed after `checkpoint_step` leaves on disk: that checkpoint of the uninterrupted run `full`
    and its first `logged_lines` metrics.jsonl lines (lines past the checkpoint must be dropped by the resume)."""
    (killed / "checkpoints").mkdir(parents=True)
    name = f"step_{checkpoint_step:08d}"
    shutil.copytree(full / "checkpoints" / name, killed / "checkpoints" / name)
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:logged_lines]) + "\n")
    return killed


def run_killed_inside(monkeypatch, module, function: str, calls_before_kill: int, run) -> None:
    """Run `run()` with `module.function` raising KeyboardInterrupt (the process "dies") on its call number
    `calls_before_kill + 1`; the real function is restored afterwards."""
    real = getattr(module, function)
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > calls_before_kill:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(module, function, dying)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, function, real)


def assert_same_checkpoint_weights(a: Path, b: Path, step: int) -> None:
    """The model weights two runs saved at `step` are bitwise equal (same tensors, same names)."""
    import torch
    from safetensors.torch import load_file

    name = f"step_{step:08d}"
    wa, wb = (load_file(run / "checkpoints" / name / "model.safetensors") for run in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
