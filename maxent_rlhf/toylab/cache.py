"""Build-on-first-use artifact cache: recipe hashes, an atomic manifest written last, a file lock.

Layout of the cache directory (default ~/.cache/maxent_rlhf/toylab, or $MAXENT_RLHF_CACHE):
    <profile>/<name>/                  the artifact (files as the builder wrote them)
    <profile>/<name>/MANIFEST.json     written LAST and atomically (tmp file + os.replace): recipe hash,
                                       and the size and sha256 of every file
    <profile>/.lock-<name>             fcntl lock: one process builds, the others wait and then reuse
    <profile>/.build-<name>-<pid>/     where a build happens; renamed into place when complete

An artifact is used only when its manifest exists, its recipe hash equals the current recipe's and every
file matches its recorded size and checksum. Anything else (killed build, edited file, changed recipe)
is rebuilt, and the reason is printed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

MANIFEST = "MANIFEST.json"
ENV_CACHE = "MAXENT_RLHF_CACHE"


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/maxent_rlhf/toylab").expanduser()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listing(root: Path) -> dict:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return files


def write_manifest(root: Path, recipe_hash: str, recipe: dict, extra: Optional[dict] = None) -> None:
    """Record every file of `root`, then publish the manifest atomically (the commit point of a build)."""
    manifest = {"recipe_hash": recipe_hash, "recipe": recipe, "files": _listing(root), "built_at": time.time()}
    if extra:
        manifest.update(extra)
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def check_artifact(root: Path, recipe_hash: str, verify_checksums: bool = True) -> Optional[str]:
    """None when `root` holds a complete build of this recipe; otherwise why it cannot be used."""
    if not root.is_dir():
        return "not built yet"
    mpath = root / MANIFEST
    if not mpath.is_file():
        return "no manifest: an earlier build did not finish (killed?)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest ({e})"
    if manifest.get("recipe_hash") != recipe_hash:
        return f"recipe changed (cached {str(manifest.get('recipe_hash'))[:12]}, wanted {recipe_hash[:12]})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            return f"file {rel} is missing"
        if p.stat().st_size != meta.get("size"):
            return f"file {rel} has size {p.stat().st_size}, manifest says {meta.get('size')} (truncated or edited)"
        if verify_checksums and file_sha256(p) != meta.get("sha256"):
            return f"file {rel} does not match its checksum (corrupted or edited)"
    return None


@contextlib.contextmanager
def file_lock(path: Path, poll_s: float = 0.2, announce_after_s: float = 2.0):
    """An exclusive fcntl lock on `path` (released when the holder exits, even when killed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    t0, announced = time.time(), False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not announced and time.time() - t0 > announce_after_s:
                    print(f"[toylab] waiting for another process building {path.name[len('.lock-'):]} ...", flush=True)
                    announced = True
                time.sleep(poll_s)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_built(
    profile_dir: Path,
    name: str,
    recipe: dict,
    recipe_hash: str,
    build: Callable[[Path], None],
    verify_checksums: bool = True,
) -> Path:
    """Return `profile_dir/name`, building it with `build(tmp_dir)` first when it is missing or stale."""
    root = profile_dir / name
    if check_artifact(root, recipe_hash, verify_checksums) is None:  # fast path, no lock
        return root
    with file_lock(profile_dir / f".lock-{name}"):
        reason = check_artifact(root, recipe_hash, verify_checksums)  # someone may have built it meanwhile
        if reason is None:
            return root
        print(f"[toylab] building {name} in {root} ({reason})", flush=True)
        tmp = profile_dir / f".build-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in profile_dir.glob(f".build-{name}-*"):  # left by killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.time()
        build(tmp)
        write_manifest(tmp, recipe_hash, recipe, {"build_seconds": round(time.time() - t0, 2)})
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
        print(f"[toylab] built {name} in {time.time() - t0:.1f}s", flush=True)
        return root
