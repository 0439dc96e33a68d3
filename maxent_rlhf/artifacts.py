"""Resolution of model / dataset locations.

A location is a hub id, a local path, or `SCHEME://NAME` for a scheme that a plugin registered with
`register_scheme`. Every loader in the package passes its argument through `resolve_path`, so a
registered scheme works anywhere a hub id is accepted. The toy lab registers `toylab://` (its
artifacts: tokenizer, data, SFT policy, reward model, built on first use) when `maxent_rlhf.toylab` is
imported; the three scripts import it. This module names no plugin: plugins import it, never the reverse.

    from maxent_rlhf import artifacts
    artifacts.register_scheme("mylab", lambda name: f"/data/mylab/{name}")   # mylab://sft -> /data/mylab/sft
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from .config import ConfigError

_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.DOTALL)
_RESOLVERS: dict[str, Callable[[str], "str | Path"]] = {}


def register_scheme(scheme: str, resolver: Callable[[str], "str | Path"]) -> None:
    """Resolve `scheme://NAME` locations with `resolver(NAME)`, which returns a local path (or a hub id).
    Registering a scheme again replaces its resolver (a reloaded plugin)."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"location scheme {scheme!r}: use lowercase letters, digits, '+', '-' or '.', starting with a letter")
    _RESOLVERS[scheme] = resolver


def registered_schemes() -> list[str]:
    return sorted(_RESOLVERS)


def resolve_path(name_or_path: str) -> str:
    """`name_or_path` itself, or what the resolver of its scheme returns for `scheme://NAME`."""
    m = _SCHEME_RE.match(name_or_path) if isinstance(name_or_path, str) else None
    if m is None:
        return name_or_path
    scheme, name = m.groups()
    if scheme not in _RESOLVERS:
        known = ", ".join(f"{s}://" for s in registered_schemes()) or "none"
        raise ConfigError(
            f"location {name_or_path!r}: no plugin registered the scheme {scheme}:// in this process "
            f"(registered: {known}). Import the plugin that provides it first (for toylab://: "
            "`import maxent_rlhf.toylab`, as the scripts do), or call maxent_rlhf.artifacts.register_scheme"
        )
    return str(_RESOLVERS[scheme](name))


def is_local_path(location: str) -> bool:
    """Whether `location` is meant as a local path rather than a hub id (`name` or `owner/name`): an
    existing path, an absolute one, one starting with `.` or `~`, one with more than one `/`, or
    `folder/name` where `folder` is an existing local directory (`runs/x` next to a `runs/` folder).
    Loaders use it to report a missing local directory as such, not as an invalid hub id."""
    if not isinstance(location, str) or not location:
        return False
    if Path(location).expanduser().exists():
        return True
    if location.startswith(("/", ".", "~", "\\")) or location.count("/") >= 2 or "\\" in location:
        return True
    return "/" in location and Path(location.split("/", 1)[0]).is_dir()
