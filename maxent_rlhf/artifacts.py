"""Resolution of model / dataset locations, and the lookup of installed plugins.

A location is a hub id, a local path, or `SCHEME://NAME` for a scheme that a plugin provides. Every
loader in the package passes its argument through `resolve_path`, so a scheme works anywhere a hub id
is accepted. Plugins declare themselves in their package metadata (Python's entry points), so no module
or script of the project names one: the first `scheme://` location of an unregistered scheme looks up
the entry point `scheme` of the group `maxent_rlhf.locations` and registers what it names, a resolver
`NAME -> local path (or hub id)`. The toy lab declares `toylab` this way (setup.cfg):

    [options.entry_points]
    maxent_rlhf.locations =
        toylab = maxent_rlhf.toylab.build:ensure_artifact

Entry points exist in installed metadata only: a source checkout needs `pip install -e .`. In a
program of your own, `register_scheme` does the same for the current process:

    from maxent_rlhf import artifacts
    artifacts.register_scheme("mylab", lambda name: f"/data/mylab/{name}")   # mylab://sft -> /data/mylab/sft
"""
from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from .config import ConfigError

LOCATIONS_GROUP = "maxent_rlhf.locations"
_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.DOTALL)
_RESOLVERS: dict[str, Callable[[str], "str | Path"]] = {}


def installed_plugin(group: str, name: str):
    """What the installed entry point `name` of `group` names (imported now), or None when no installed
    distribution declares one."""
    for ep in entry_points(group=group, name=name):
        return ep.load()
    return None


def installed_plugin_names(group: str) -> set[str]:
    return {ep.name for ep in entry_points(group=group)}


def register_scheme(scheme: str, resolver: Callable[[str], "str | Path"]) -> None:
    """Resolve `scheme://NAME` locations with `resolver(NAME)`, which returns a local path (or a hub id).
    Registering a scheme again replaces its resolver."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"location scheme {scheme!r}: use lowercase letters, digits, '+', '-' or '.', starting with a letter")
    _RESOLVERS[scheme] = resolver


def known_schemes() -> list[str]:
    """Schemes registered in this process or declared by an installed plugin."""
    return sorted(set(_RESOLVERS) | installed_plugin_names(LOCATIONS_GROUP))


def resolve_path(name_or_path: str) -> str:
    """`name_or_path` itself, or what the resolver of its scheme returns for `scheme://NAME`."""
    m = _SCHEME_RE.match(name_or_path) if isinstance(name_or_path, str) else None
    if m is None:
        return name_or_path
    scheme, name = m.groups()
    if scheme not in _RESOLVERS:
        resolver = installed_plugin(LOCATIONS_GROUP, scheme)
        if resolver is None:
            known = ", ".join(f"{s}://" for s in known_schemes()) or "none"
            raise ConfigError(
                f"location {name_or_path!r}: no installed plugin provides the scheme {scheme}:// (known: {known}); "
                f"a plugin declares it as an entry point of the group {LOCATIONS_GROUP} (CONTRIBUTING.md), and a "
                "source checkout must be installed (`pip install -e .`) for its entry points to exist"
            )
        register_scheme(scheme, resolver)
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
