"""The entry point of every script: a mistake the user can fix costs one line, never a traceback.

    if __name__ == "__main__":
        run_script(main, RLOOConfig)

`run_script` parses the command line into the config dataclass, calls `main(config)` and turns the
errors that describe the user's input or the run's state into ONE line on stderr,
`script.py: error: <message>`, with the exit status of argparse's conventions:

    2  usage and configuration: ConfigError (unknown key, wrong type, a value out of range, batch
       sizes that do not divide, a model path that does not exist), malformed YAML (file, line, column)
    1  data and run time: DataError (file, line or row named), NonFiniteError (names the last good
       checkpoint), CheckpointError (a damaged checkpoint file), JudgeError, a missing file
       (FileNotFoundError / other OSError naming the file)

Anything else is a bug, and keeps its full traceback. `MAXENT_RLHF_DEBUG=1` shows the traceback of the
one-line errors too. Under `accelerate launch` every process that fails prints its line, prefixed with
its rank when there are several.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

DEBUG_ENV = "MAXENT_RLHF_DEBUG"


def _user_error_classes() -> tuple[tuple[type, int], ...]:
    """(exception class, exit status) of the errors a user can fix; a module that was never imported
    cannot have raised its error, so it is looked up, not imported (the CLI stays light)."""
    from .config import ConfigError

    found: list[tuple[type, int]] = [(ConfigError, 2)]
    for module, name, status in (
        ("maxent_rlhf.data", "DataError", 1),
        ("maxent_rlhf.runs", "NonFiniteError", 1),
        ("maxent_rlhf.vllm_engine", "EngineSyncError", 1),
        ("maxent_rlhf.checkpoints", "CheckpointError", 1),
        ("maxent_rlhf.judges", "JudgeError", 1),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append((cls, status))
    try:
        import yaml

        found.append((yaml.YAMLError, 2))  # config.load_yaml converts these; a stray one still gets a line
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def one_line(message: str) -> str:
    """The message on one line (continuation lines joined with '; ')."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) if parts else "(no message)"


def describe_error(err: BaseException) -> Optional[tuple[str, int]]:
    """(one-line message, exit status) for an error the user can fix; None for anything else (a bug)."""
    for cls, status in _user_error_classes():
        if isinstance(err, cls):
            return one_line(str(err)), status
    if isinstance(err, OSError) and getattr(err, "filename", None) is not None:
        # FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError of a named path
        return one_line(f"{err.filename}: {err.strerror or err}"), 1
    if isinstance(err, FileNotFoundError):  # raised with a message of our own
        return one_line(str(err)), 1
    return None


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""


def run_script(
    main: Callable[[Any], Any],
    config_cls: type,
    argv: Optional[Sequence[str]] = None,
    prog: Optional[str] = None,
) -> Any:
    """Parse `argv` (default sys.argv[1:]) into `config_cls`, run `main(config)`, report user errors
    in one line (see the module docstring). Returns what `main` returns."""
    from .config import parse_config

    prog = prog or Path(sys.argv[0]).name or "script"
    try:
        config = parse_config(config_cls, argv, exit_on_error=False)
        return main(config)
    except Exception as err:  # noqa: BLE001 - sorted below: user errors get a line, bugs their traceback
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        described = describe_error(err)
        if described is None:
            raise
        message, status = described
        sys.stdout.flush()
        print(f"{_rank_prefix()}{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None
