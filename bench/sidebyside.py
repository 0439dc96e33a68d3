"""Shared machinery of the side-by-side benchmarks (bench_rloo.py, bench_offline.py).

Method: every measurement is a WHOLE fresh process (imports, model loading, dataset preparation,
training, final save) run twice, once for a short run of `short` steps and once for a long run of
`long` steps. Time per step = (wall_long - wall_short) / (long - short): everything that does not
scale with the step count (start-up, loading, warm-up of the first step, precomputation over a fixed
dataset, the final checkpoint) cancels. Peak memory is the long run's peak resident set, read from the
kernel's accounting of the finished child (`os.wait4`), so it covers every thread and allocator of
that process and nothing of the benchmark's own.

CPU seconds per step come the same way from the children's user + system time: with 1 thread they
are the work itself and barely move with other processes' load; with 2 threads they include the time
OpenMP threads spin waiting for each other, which grows on a loaded machine.

Sides are interleaved repeat by repeat (A B, B A, A B, ...), so a machine whose load changes during
the benchmark slows both sides alike; the load average is printed before and after.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent

TRL_SETUP = """TRL {want} is not importable by {python}.
TRL is never a dependency of this project: put it in a scratch virtual environment that reuses this
environment's torch / transformers / accelerate / datasets, then point the benchmark at its python:

    python -m venv --system-site-packages /tmp/venvs/trl116
    /tmp/venvs/trl116/bin/pip install trl=={want}
    python {script} --trl --trl-python /tmp/venvs/trl116/bin/python

(`pip install --dry-run trl=={want}` in that venv shows what else it would pull in; with this project's
transformers 5.x / accelerate 1.x / datasets 5.x it installs trl alone.)"""



def add_side_by_side_args(ap, trainer: str, unit: str, default_long: str, script: str) -> None:
    """The options both benches share: the TRL side, the interleaved repeats, the short/long runs, threads."""
    import argparse

    ap.add_argument("--trl", action="store_true", help=f"run TRL 1.16's {trainer} side by side (needs --trl-python)")
    ap.add_argument("--trl-python", default=sys.executable,
                    help="python of a scratch venv where trl 1.16 is installed (default: this python)")
    ap.add_argument("--ours", action="append", default=None, metavar="LABEL=SCRIPT[:VAR=VALUE,...]",
                    help=f"our trainer(s) to time (repeatable; default ours={script}); VAR=VALUE: an upper-case VAR "
                    "goes to its environment, a lower-case one overrides that field of its config (e.g. "
                    "shared_prefix=false, kl_prev_per_prompt=1)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per side, interleaved (median, min, max reported)")
    ap.add_argument("--short", type=int, default=2, help=f"{unit} of the short run (its time is subtracted)")
    ap.add_argument("--long", type=int, default=0, help=f"{unit} of the long run (0: {default_long})")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every run (both sides)")
    ap.add_argument("--json", default=None, help="also write all runs to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--script", default=script, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)

def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def trl_version(python: str) -> Optional[str]:
    """Version of trl importable by `python`, or None."""
    p = subprocess.run([python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True,
                       env=clean_env(1))
    return p.stdout.strip() if p.returncode == 0 else None


def require_trl(python: str, want: str, script: str) -> None:
    """Exit with set-up instructions when `python` cannot import trl `want`.x (nothing is installed)."""
    have = trl_version(python)
    if have is None or have.split(".")[:2] != want.split(".")[:2]:
        found = f" (found trl {have})" if have else ""
        sys.exit(TRL_SETUP.format(want=want, python=python + found, script=script))


def clean_env(threads: int, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               WANDB_MODE="disabled", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)  # each side sees only what its command line puts on the path
    env.update(extra or {})
    return env


def run_process(cmd: list[str], env: dict, cwd: Optional[Path] = None) -> dict:
    """Run `cmd` to the end: wall seconds, the child's peak RSS in MiB (kernel accounting via wait4:
    every thread and allocator of that process), and the JSON of its last `RESULT ` stdout line."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd or REPO), stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    cpu = usage.ru_utime + usage.ru_stime
    result: dict = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": usage.ru_maxrss / 1024, "rc": proc.returncode}
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        result["error"] = (stderr or stdout)[-3000:]
        return result
    result.update(json.loads(lines[-1][len("RESULT "):]))
    result["wall_s"], result["cpu_s"], result["peak_rss_mib"] = wall, cpu, usage.ru_maxrss / 1024
    return result


@dataclass
class Side:
    """One trainer in the comparison: a label and how to start its worker for `steps` steps."""

    label: str
    command: callable  # steps -> list[str]
    env: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)  # one dict per repeat: step_s, peak_rss_mib, extra


def measure(sides: list[Side], short: int, long: int, repeats: int, threads: int, log=print) -> None:
    """Interleaved repeats of (short, long) whole-process runs for every side; fills `side.runs`."""
    if long <= short:
        raise ValueError(f"long run ({long} steps) must be longer than the short one ({short})")
    for r in range(repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            env = clean_env(threads, side.env)
            a = run_process(side.command(short), env)
            b = run_process(side.command(long), env) if "error" not in a else a
            if "error" in b:
                log(f"  {side.label}: FAILED\n{b['error']}")
                continue
            step_s = (b["wall_s"] - a["wall_s"]) / (long - short)
            cpu_step_s = (b["cpu_s"] - a["cpu_s"]) / (long - short)
            rec = {"step_s": step_s, "cpu_step_s": cpu_step_s, "peak_rss_mib": b["peak_rss_mib"], "short": a, "long": b}
            side.runs.append(rec)
            log(f"  repeat {r + 1} {side.label}: {step_s:.3f} s/step (runs of {short}: {a['wall_s']:.1f} s, "
                f"{long}: {b['wall_s']:.1f} s), {cpu_step_s:.3f} CPU-s/step, peak RSS {b['peak_rss_mib']:.0f} MiB, load {load_average()}")


def summarize(side: Side, items_per_step: int) -> Optional[dict]:
    if not side.runs:
        return None
    rates = sorted(items_per_step / r["step_s"] for r in side.runs if r["step_s"] > 0)
    if not rates:
        return None
    cpu = [items_per_step / r["cpu_step_s"] for r in side.runs if r.get("cpu_step_s", 0) > 0]
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "n": len(rates),
            "cpu": statistics.median(cpu) if cpu else float("nan"), "rss": max(r["peak_rss_mib"] for r in side.runs)}


def print_table(title: str, unit: str, rows: list[tuple[str, Side]], items_per_step: int, baseline: Optional[Side],
                log=print) -> list[dict]:
    """One markdown table: median / min / max of items per second over repeats, ratio to `baseline`, peak RSS."""
    base = summarize(baseline, items_per_step) if baseline is not None else None
    log(f"\n{title}")
    vs = baseline.label if baseline else "-"
    log(f"| trainer | {unit} median | min | max | repeats | ratio vs {vs} | per CPU-second (ratio) | peak RSS MiB |")
    log("|---|---|---|---|---|---|---|---|")
    out = []
    for name, side in rows:
        s = summarize(side, items_per_step)
        if s is None:
            log(f"| {name} | failed | | | 0 | | | |")
            continue
        ratio = f"{s['median'] / base['median']:.2f}x" if base and side is not baseline else "1.00x" if base else "-"
        cpu_ratio = f" ({s['cpu'] / base['cpu']:.2f}x)" if base else ""
        log(f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {s['n']} | {ratio} | "
            f"{s['cpu']:.2f}{cpu_ratio} | {s['rss']:.0f} |")
        out.append({"name": name, **s, "ratio": s["median"] / base["median"] if base else None})
    return out


def load_script(path: str):
    """Import a training script (train_rloo.py, a copy of it...) by path, the repository on sys.path."""
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path if not Path(path).is_absolute() else path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


OVERRIDES_ENV = "BENCH_CONFIG_OVERRIDES"  # lower-case VAR=VALUE of --ours, as JSON, for the worker


def apply_config_overrides(config):
    """The worker's config with the --ours row's lower-case VAR=VALUE fields replaced (typed like the field)."""
    import dataclasses

    overrides = json.loads(os.environ.get(OVERRIDES_ENV, "{}"))
    fields = {f.name for f in dataclasses.fields(config)}
    typed = {}
    for key, value in overrides.items():
        if key not in fields:
            sys.exit(f"--ours: {key} is not a field of {type(config).__name__}")
        current = getattr(config, key)
        if isinstance(current, bool):
            typed[key] = value.lower() in ("1", "true", "yes")
        else:
            typed[key] = type(current)(value) if current is not None else value
    return dataclasses.replace(config, **typed)


def parse_ours(specs: list[str]) -> list[tuple[str, str, dict]]:
    """LABEL=SCRIPT[:VAR=VALUE[,VAR=VALUE]] -> (label, script, env); lower-case VARs are config overrides,
    passed in the environment as JSON (`apply_config_overrides`)."""
    out = []
    for spec in specs:
        if "=" not in spec:
            sys.exit(f"--ours {spec!r}: expected LABEL=SCRIPT[:VAR=VALUE,...], e.g. ours=train_rloo.py")
        label, rest = spec.split("=", 1)
        script, _, env_s = rest.partition(":")
        if not (REPO / script).exists() and not Path(script).exists():
            sys.exit(f"--ours {spec!r}: script {script} not found (paths are relative to the repository root)")
        env: dict = {}
        last = None
        for part in [x for x in env_s.split(",") if x]:
            if "=" in part:  # VAR=VALUE; a part without "=" continues the previous value (PROTO=a,b)
                last, value = part.split("=", 1)
                env[last] = value
            elif last is not None:
                env[last] += "," + part
        overrides = {k: v for k, v in env.items() if k.islower()}
        env = {k: v for k, v in env.items() if not k.islower()}
        if overrides:
            env[OVERRIDES_ENV] = json.dumps(overrides)
        out.append((label, script, env))
    return out
