"""The toy lab: the paper's phenomena end to end on a laptop CPU in minutes.

`ensure_artifact(NAME)` builds (on first use) and returns the local path of a toy-lab artifact.
Importing this package registers two plugins with the core modules, which never name the toy lab:
the location scheme `toylab://NAME` (`artifacts.register_scheme`: every loader then accepts it where a
hub id goes) and the judge `toy-gold` (`judges.register_judge`, in `judge.py`). The three scripts
import it; so does any program of yours that reads `toylab://` locations.
Artifacts: tokenizer, sft_data, prompts, sft, pairs, reward (`build.py`); the task and the gold judge
are in `task.py`; `python -m maxent_rlhf.toylab {build,sweep,report}` is the command line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..artifacts import register_scheme
from .build import ARTIFACTS, PROFILES, ensure_artifact as _ensure_in_process, recipe_hash, split_name
from .cache import check_artifact, default_cache_dir
from .task import gold_breakdown, gold_preference, gold_score

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")


def _inside_running_script() -> bool:
    """True under `accelerate launch` / torchrun, or when this process already set up accelerate.

    Building then happens in a clean subprocess: the builders run train_offline.main, whose own
    Accelerator must not join (and deadlock) the caller's process group or clash with its state.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    try:
        from accelerate.state import PartialState

        return bool(PartialState._shared_state)
    except Exception:
        return False


def ensure_artifact(name: str, cache_dir: Optional[str | Path] = None) -> Path:
    """Local path of toy-lab artifact `name` (`NAME` or `PROFILE/NAME`), built on first use, reused
    afterwards, rebuilt when its recipe changes or its files do not match the manifest."""
    profile, art = split_name(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / profile / art
    if check_artifact(path, recipe_hash(profile, art)) is None:
        return path
    if _inside_running_script():
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
        cmd = [sys.executable, "-m", "maxent_rlhf.toylab", "build", f"{profile}/{art}", "--cache-dir", str(root)]
        print(f"[toylab] building {profile}/{art} in a subprocess: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env=env, check=True)
        reason = check_artifact(path, recipe_hash(profile, art))
        if reason is not None:
            raise RuntimeError(f"toy-lab artifact {profile}/{art} is still unusable after building: {reason}")
        return path
    return _ensure_in_process(f"{profile}/{art}", root)


__all__ = ["ensure_artifact", "ARTIFACTS", "PROFILES", "gold_score", "gold_preference", "gold_breakdown", "default_cache_dir"]

register_scheme("toylab", ensure_artifact)
from . import judge as _judge  # noqa: E402,F401  (registers the `toy-gold` judge)
