"""The toy lab: the paper's phenomena end to end on a laptop CPU in minutes.

`ensure_artifact(NAME)` builds (on first use) and returns the local path of a toy-lab artifact.
Importing this package registers two plugins with the core modules, which never name the toy lab:
the location scheme `toylab://NAME` (`artifacts.register_scheme`: every loader then accepts it where a
hub id goes) and the judge `toy-gold` (`judges.register_judge`, in `judge.py`). The three scripts
import it; so does any program of yours that reads `toylab://` locations.
Artifacts: tokenizer, sft_data, prompts, sft, pairs, reward (`build.py`); the task and the gold judge
are in `task.py`; `python -m maxent_rlhf.toylab {build,sweep,report}` is the command line. The toy lab
trains and evaluates through the project's scripts, run as a user runs them (`scripts.py` says where it
finds them, also for a non-editable install).
"""
from __future__ import annotations

from ..artifacts import register_scheme
from .build import ARTIFACTS, PROFILES, ensure_artifact
from .cache import default_cache_dir
from .task import gold_breakdown, gold_preference, gold_score

__all__ = ["ensure_artifact", "ARTIFACTS", "PROFILES", "gold_score", "gold_preference", "gold_breakdown", "default_cache_dir"]

register_scheme("toylab", ensure_artifact)
from . import judge as _judge  # noqa: E402,F401  (registers the `toy-gold` judge)
