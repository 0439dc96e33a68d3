"""Resolution of model / dataset locations.

A location is a hub id, a local path, or `toylab://NAME`: an artifact of the toy lab (tokenizer, data,
SFT policy, reward model) that `maxent_rlhf.toylab` builds on first use into its cache and reuses
afterwards. Every loader in the package passes its argument through `resolve_path`, so configs can name
toy-lab artifacts anywhere a hub id is accepted.
"""
from __future__ import annotations

TOYLAB_SCHEME = "toylab://"


def resolve_path(name_or_path: str) -> str:
    if isinstance(name_or_path, str) and name_or_path.startswith(TOYLAB_SCHEME):
        from .toylab import ensure_artifact  # lazy: building artifacts needs the whole toy lab

        return str(ensure_artifact(name_or_path[len(TOYLAB_SCHEME) :]))
    return name_or_path
