"""The toy lab: the paper's phenomena end to end on a laptop CPU in minutes.

`ensure_artifact(NAME)` builds (on first use) and returns the local path of a toy-lab artifact.
The package's metadata declares two plugins (entry points in setup.cfg), which the core modules find
when first asked, without naming the toy lab: the location scheme `toylab://NAME` (group
`maxent_rlhf.locations`: every loader accepts it where a hub id goes) and the judge `toy-gold` (group
`maxent_rlhf.judges`, `judge.py`). Nothing needs to import this package for either to work.
Artifacts: tokenizer, sft_data, prompts, sft, pairs, reward (`build.py`); the task and the gold judge
are in `task.py`; `python -m maxent_rlhf.toylab {build,sweep,report}` is the command line. The toy lab
trains and evaluates through the project's scripts, run as a user runs them (`scripts.py` says where it
finds them, also for a non-editable install).
"""
from __future__ import annotations

from .build import ARTIFACTS, PROFILES, ensure_artifact
from .cache import default_cache_dir
from .task import gold_breakdown, gold_preference, gold_score

__all__ = ["ensure_artifact", "ARTIFACTS", "PROFILES", "gold_score", "gold_preference", "gold_breakdown", "default_cache_dir"]
