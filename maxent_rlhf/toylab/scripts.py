"""How the toy lab runs the project's scripts: as a user does, one subprocess per run,

    python train_offline.py [--config configs/toy/dpo.yaml] --key value ...

Why a subprocess: the package never imports the scripts (they sit above it: scripts -> package), a run
is exactly the command a user can copy from the log, and each run starts with a fresh process, so no
Accelerator, process group or random state is shared with the caller (which may itself run under
`accelerate launch`). Cost: a few seconds of imports per run (5 s on a busy 2-core machine).

Where the scripts are. They are not part of the installed package: they are the readable entry points
at the root of a clone, next to `configs/toy/`. The toy lab looks
  1. in $MAXENT_RLHF_SCRIPTS, when set (a folder holding the scripts and configs/toy/), then
  2. in the folder above the imported `maxent_rlhf` package, when it holds them (a clone used through
     `pip install -e .` or PYTHONPATH),
and otherwise stops with an error saying this. So a non-editable install (`pip install .`, a wheel) runs
the toy lab given a clone: `MAXENT_RLHF_SCRIPTS=/path/to/clone`. A script imports the `maxent_rlhf` it
finds from its own folder first (Python puts the script's folder first on sys.path), as when a user
runs it there.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ENV_SCRIPTS = "MAXENT_RLHF_SCRIPTS"
SCRIPTS = ("train_offline.py", "train_rloo.py", "train_online.py", "evaluate_judge.py")
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds the `maxent_rlhf` package
# launcher variables a child must not inherit: it runs alone, not as a rank of the caller's launch
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")
_LAUNCH_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_")


def _holds_scripts(folder: Path) -> bool:
    return all((folder / s).is_file() for s in SCRIPTS) and (folder / "configs" / "toy").is_dir()


def scripts_dir(package_parent: Path = PACKAGE_PARENT) -> Path:
    """The folder with the project's scripts and configs/toy/ (see the module docstring)."""
    env = os.environ.get(ENV_SCRIPTS)
    if env:
        folder = Path(env).expanduser()
        if not _holds_scripts(folder):
            raise FileNotFoundError(
                f"{ENV_SCRIPTS}={env}: that folder does not hold {', '.join(SCRIPTS)} and configs/toy/; "
                "point it at the root of a clone of the repository"
            )
        return folder
    if _holds_scripts(package_parent):
        return package_parent
    raise FileNotFoundError(
        f"the toy lab runs the project's scripts ({', '.join(SCRIPTS)}) and configs/toy/, which are not part of "
        f"the installed package (found none next to it, in {package_parent}): run from a clone of the repository "
        f"(pip install -e .), or set {ENV_SCRIPTS} to the root of a clone"
    )


def toy_config(name: str) -> Path:
    """configs/toy/NAME.yaml of the scripts' folder."""
    path = scripts_dir() / "configs" / "toy" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"toy config {path} not found")
    return path


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def clean_env(threads: Optional[int] = 1) -> dict:
    """The caller's environment without launcher variables; `threads` CPU threads for torch (tiny models
    on a shared CPU: one thread is several times faster than two under contention)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith(_LAUNCH_PREFIXES)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_subprocess(cmd: list[str], what: str, log: Optional[Path] = None) -> None:
    """Run `cmd` in a clean environment (`clean_env`), its output going to ours, or to the file `log`
    (artifact builds: their progress bars and closing summaries would bury the caller's own output;
    on a failure the log's last lines are printed); an error names the command."""
    print(f"[toylab] {what}: {shlex.join(cmd)}" + (f"  (output: {log})" if log else ""), flush=True)
    t0 = time.time()
    if log is None:
        rc = subprocess.run(cmd, env=clean_env()).returncode
    else:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=clean_env(), stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = Path(log).read_text(errors="replace").splitlines()[-20:]
            print("\n".join(tail), file=sys.stderr, flush=True)
    if rc != 0:
        where = f"its output is in {log}, last lines above" if log else "its output is above"
        raise RuntimeError(f"toy lab: {what} failed (exit status {rc}; {where}): {shlex.join(cmd)}")
    print(f"[toylab] {what} done in {time.time() - t0:.0f}s", flush=True)


def script_command(script: str, config: Optional[Path] = None, **options) -> list[str]:
    """`python SCRIPT [--config CONFIG] --key value ...`, SCRIPT (e.g. "train_rloo.py") from `scripts_dir()`."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; the toy lab runs {', '.join(SCRIPTS)}")
    cmd = [sys.executable, str(scripts_dir() / script)]
    if config is not None:
        cmd += ["--config", str(config)]
    for key, value in options.items():
        cmd += [f"--{key}", _cli_value(value)]
    return cmd


def run_script(script: str, config: Optional[Path] = None, log: Optional[Path] = None, **options) -> None:
    """`script_command` run by `run_subprocess` (output to ours, or to the file `log`)."""
    run_subprocess(script_command(script, config, **options), script, log)
