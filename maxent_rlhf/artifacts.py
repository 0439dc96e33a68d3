"""Resolution of model / dataset locations.

A location is a hub id, a local path, or `toylab://NAME`: an artifact of the toy lab (tokenizer, data,
SFT policy, reward model) that `maxent_rlhf.toylab` builds on first use into its cache and reuses
afterwards. Every loader in the package passes its argument through `resolve_path`, so configs can name
toy-lab artifacts anywhere a hub id is accepted.
"""
from __future__ import annotations

from pathlib import Path

TOYLAB_SCHEME = "toylab://"


def resolve_path(name_or_path: str) -> str:
    if isinstance(name_or_path, str) and name_or_path.startswith(TOYLAB_SCHEME):
        from .toylab import ensure_artifact  # lazy: building artifacts needs the whole toy lab

        return str(ensure_artifact(name_or_path[len(TOYLAB_SCHEME) :]))
    return name_or_path


def is_local_path(location: str) -> bool:
    """Whether `location` is meant as a local path rather than a hub id (`name` or `owner/name`): an
    existing path, an absolute one, one starting with `.` or `~`, or one with more than one `/`. Loaders
    use it to report a missing local directory as such, not as an invalid hub id."""
    if not isinstance(location, str) or not location:
        return False
    if Path(location).expanduser().exists():
        return True
    return location.startswith(("/", ".", "~", "\\")) or location.count("/") >= 2 or "\\" in location
