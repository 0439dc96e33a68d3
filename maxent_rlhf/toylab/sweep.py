"""The toy-lab sweep: every run through the project's scripts, as a user runs them.

    python -m maxent_rlhf.toylab sweep                   # the whole sweep, then report/report.md
    python -m maxent_rlhf.toylab sweep --shard 0/2 & python -m maxent_rlhf.toylab sweep --shard 1/2; wait
    python -m maxent_rlhf.toylab sweep                   # (after the shards) skips every finished run, reports
    python -m maxent_rlhf.toylab report --out runs/toylab

Online runs: `python train_rloo.py --config configs/toy/REG.yaml --learning_rate LR --seed S --output_dir ...`
(the configs hold each regulariser's coefficient):
  1. the grid: REGULARIZERS x LEARNING_RATES x SEEDS;
  2. a lower lr (LOW_LR) for the entropy runs and coefficient 0, where runs keep their gains (claims 2-3);
  3. an entropy-coefficient sweep at the high lr (COEF_SWEEP, `--entropy_coef C`, beside the config's
     coefficient and the no-regulariser runs as coefficient 0), so "regardless of the entropy
     coefficient" is tested (claim 1).
Offline runs: DPO (Figure 4's reference log-ratio) and SimPO for several gamma at several learning
rates (Figure 6), `python train_offline.py --config configs/toy/{dpo,simpo}.yaml ...`. Every checkpoint
of every run (and the SFT baseline) is decoded greedily and judged by the gold judge in both orders,
and scored by the proxy reward model, with `python evaluate_judge.py --config configs/toy/eval.yaml
--judge {toy-gold,reward-model} ...`. Each command is printed before it runs (`scripts.py`); a finished
stage is skipped on rerun; DONE.json records each run's training and evaluation seconds, from which the
report adds up the sweep's cost in one process.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from ..config import load_yaml
from .scripts import run_script, toy_config

# regulariser name = its config, configs/toy/NAME.yaml (coefficients chosen on the toy)
REGULARIZERS = ("kl", "maxent", "entropy", "minent", "none")
REGULARIZER_LABELS = {
    "kl": "KL (beta 0.05)",
    "maxent": "entropy, length-normalised (Eq. 7)",
    "entropy": "entropy (Eq. 6)",
    "minent": "minimum entropy",
    "none": "no regulariser",
}
LEARNING_RATES = (1e-4, 1e-3)  # toy analogues of the paper's low "reference-free" lr (1e-7) and the "KL works" lr (1e-6)
SEEDS = (1, 2, 3)
LOW_LR = 2e-5  # where the entropy runs keep their gains for 80 iterations (claims 2-3 need such runs)
LOW_LR_REGULARIZERS = ("maxent", "entropy", "none")
# extra entropy coefficients at the high lr: with configs/toy/maxent.yaml's 0.5 and coefficient 0 ("none"),
# 0.1-1.0 spans 10x
COEF_SWEEP = {"maxent": (0.1, 1.0)}
SIMPO_GAMMAS = (0.0, 0.5, 1.0, 2.0)
SIMPO_LRS = (1e-4, 3e-4, 3e-3)  # gradual to aggressive (the paper's 2e-7 and 1e-6 roles)
DPO = {"learning_rate": 1e-3, "beta": 0.1}
EVAL_N = 200


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def default_entropy_coef(reg: str) -> Optional[float]:
    """The entropy coefficient configs/toy/REG.yaml sets (None for a config without an entropy term)."""
    values = load_yaml(toy_config(reg)) or {}
    return float(values["entropy_coef"]) if values.get("regularizer") == "entropy" and "entropy_coef" in values else None


def rloo_run_name(reg: str, lr: float, seed: int, entropy_coef: Optional[float] = None) -> str:
    """kl_lr1e-3_s1; an entropy coefficient other than the config's adds _c<coef>: maxent_c0.1_lr1e-3_s1."""
    coef = f"_c{entropy_coef:g}" if entropy_coef is not None and entropy_coef != default_entropy_coef(reg) else ""
    return f"{reg}{coef}_lr{lr_tag(lr)}_s{seed}"


def run_rloo(out: Path, reg: str, lr: float, seed: int, iterations: Optional[int] = None, extra: Optional[dict] = None) -> Path:
    """configs/toy/REG.yaml at this learning rate and seed (`extra`: more options) into `out`."""
    options = dict(learning_rate=lr, seed=seed, output_dir=str(out))
    if iterations:
        options["num_iterations"] = iterations
    options.update(extra or {})
    record = {"kind": "rloo", "regularizer": reg, "learning_rate": lr, "seed": seed}
    coef = options.get("entropy_coef", default_entropy_coef(reg))
    if coef is not None:
        record["entropy_coef"] = coef
    return _run_once(out, "train_rloo.py", toy_config(reg), options, record)


def run_offline(out: Path, config: str, lr: float, seed: int = 1, extra: Optional[dict] = None) -> Path:
    """configs/toy/CONFIG.yaml (dpo, simpo) at this learning rate and seed into `out`."""
    options = dict(learning_rate=lr, seed=seed, output_dir=str(out), **(extra or {}))
    return _run_once(out, "train_offline.py", toy_config(config), options,
                     {"kind": config, "learning_rate": lr, "seed": seed, **(extra or {})})


def _run_once(out: Path, script: str, config: Path, options: dict, record: dict) -> Path:
    """Run `script` into `out` unless a finished run is already there (a half run is started over)."""
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    run_script(script, config, **options)
    _mark_done(out, {**record, "seconds": time.time() - t0})
    return out


def evaluate_run(run_dir: Path, n: int = EVAL_N, proxy: bool = True) -> dict:
    """Gold win rate (toy-gold, both orders) and proxy reward (reward-model judge) of every checkpoint + the
    SFT baseline."""
    gold_dir, proxy_dir = run_dir / "eval_gold", run_dir / "eval_proxy"
    common = dict(checkpoints=[str(run_dir)], n=n, per_device_eval_batch_size=n, plot=True)
    out, t0 = {}, time.time()
    ran = not (gold_dir / "summary.json").exists() or (proxy and not (proxy_dir / "summary.json").exists())
    if not (gold_dir / "summary.json").exists():
        # both orders: toy-gold scores each summary alone, so its verdicts should not depend on the order
        # (the report checks: position consistency and first-position preference per checkpoint)
        run_script("evaluate_judge.py", toy_config("eval"), output_dir=str(gold_dir), judge="toy-gold",
                   both_orders=True, **common)
    out["gold"] = json.loads((gold_dir / "summary.json").read_text())
    if proxy:
        if not (proxy_dir / "summary.json").exists():
            if (gold_dir / "generations").is_dir() and not (proxy_dir / "generations").exists():
                shutil.copytree(gold_dir / "generations", proxy_dir / "generations")  # same greedy decodes
            run_script("evaluate_judge.py", toy_config("eval"), output_dir=str(proxy_dir), judge="reward-model",
                       reward_model_name_or_path="toylab://reward", judge_batch_size=n, **common)
        out["proxy"] = json.loads((proxy_dir / "summary.json").read_text())
    if ran and _done(run_dir):  # the report adds these up into the sweep's one-process cost
        info = json.loads((run_dir / "DONE.json").read_text())
        info["eval_seconds"] = info.get("eval_seconds", 0.0) + time.time() - t0
        _mark_done(run_dir, info)
    return out


def _done(out: Path) -> bool:
    return (out / "DONE.json").exists()


def _mark_done(out: Path, info: dict) -> None:
    (out / "DONE.json").write_text(json.dumps(info, indent=1))


def rloo_plan(regularizers=tuple(REGULARIZERS), lrs=LEARNING_RATES, seeds=SEEDS, low_lr: Optional[float] = LOW_LR,
              coef_sweep: Optional[dict] = None) -> list[tuple[str, float, int, Optional[float]]]:
    """(regulariser, lr, seed, entropy coefficient or None for the default) of every online run, seed by
    seed (a sweep cut short has every configuration at the first seeds rather than some at all seeds)."""
    coef_sweep = COEF_SWEEP if coef_sweep is None else coef_sweep
    plan = []
    for seed in seeds:
        plan += [(reg, lr, seed, None) for lr in lrs for reg in regularizers]
        if low_lr:
            plan += [(reg, low_lr, seed, None) for reg in LOW_LR_REGULARIZERS if reg in regularizers]
        if lrs:
            plan += [(reg, max(lrs), seed, c) for reg, cs in coef_sweep.items() if reg in regularizers for c in cs]
    return plan


def offline_plan(simpo_gammas=SIMPO_GAMMAS, simpo_lrs=SIMPO_LRS) -> list[tuple[str, str, float, dict]]:
    """(run name, configs/toy config, lr, extra settings) of every offline run."""
    plan = [("dpo", "dpo", DPO["learning_rate"], {"beta": DPO["beta"]})]
    plan += [(f"simpo_lr{lr_tag(lr)}_g{g:g}", "simpo", lr, {"beta": 2.0, "simpo_gamma": g}) for lr in simpo_lrs for g in simpo_gammas]
    return plan


def shard_items(items: list, shard: tuple[int, int]) -> list:
    """Shard (i, n) of a plan: every n-th item starting at i (runs of all kinds spread over the shards)."""
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: expected 0 <= i < n")
    return [x for k, x in enumerate(items) if k % n == i]


def sweep(
    out: str | Path = "runs/toylab",
    regularizers=REGULARIZERS,
    lrs=LEARNING_RATES,
    seeds=SEEDS,
    iterations: Optional[int] = None,
    simpo_gammas=SIMPO_GAMMAS,
    simpo_lrs=SIMPO_LRS,
    offline: bool = True,
    online: bool = True,
    eval_n: int = EVAL_N,
    write_meta: bool = True,
    low_lr: Optional[float] = LOW_LR,
    coef_sweep: Optional[dict] = None,
    shard: tuple[int, int] = (0, 1),
) -> Path:
    """Run (or complete: finished runs are skipped) the sweep into `out`. shard=(i, n) runs every n-th
    run starting at i (online and offline lists alike), so n processes split one sweep. sweep.json (the
    plan) is written first; write_meta=False adds runs to an existing sweep without changing it."""
    from .build import ensure_artifact

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    i_shard, n_shards = shard
    mine = lambda items: shard_items(items, shard)  # noqa: E731
    t0 = time.time()
    for name in ("reward", "prompts"):
        ensure_artifact(name)
    plan = rloo_plan(regularizers, lrs, seeds, low_lr, coef_sweep)
    off = offline_plan(simpo_gammas, simpo_lrs)
    if write_meta:  # the plan, written first: a report made before the sweep ends lists what is missing
        meta = {
            "regularizers": list(regularizers), "lrs": list(lrs), "seeds": list(seeds), "iterations": iterations,
            "low_lr": low_lr, "low_lr_regularizers": [r for r in LOW_LR_REGULARIZERS if r in regularizers] if low_lr else [],
            "coef_sweep": {k: list(v) for k, v in (COEF_SWEEP if coef_sweep is None else coef_sweep).items()},
            "rloo_runs": [rloo_run_name(*p) for p in plan], "offline_runs": [p[0] for p in off],
            "simpo_gammas": list(simpo_gammas), "simpo_lrs": list(simpo_lrs), "eval_n": eval_n,
        }
        tmp = out / f".sweep.json.{i_shard}"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(out / "sweep.json")  # atomic: shards writing the same plan at once leave one whole file
    # order: every online configuration at the first seed, then the offline runs, then the other seeds (a sweep
    # cut short still tests every claim, at fewer seeds); shards take every n-th job of that one list
    first = [("rloo", p) for p in plan if p[2] == plan[0][2]] if plan else []
    jobs = ([j for j in first if online] + [("offline", o) for o in off if offline]
            + [("rloo", p) for p in plan if online and ("rloo", p) not in first])
    todo = mine(jobs)
    for i, (kind, job) in enumerate(todo):
        t = time.time()
        if kind == "rloo":
            reg, lr, seed, coef = job
            run = out / "rloo" / rloo_run_name(reg, lr, seed, coef)
            print(f"[toylab sweep] ({i + 1}/{len(todo)}) RLOO {run.name} -> {run}", flush=True)
            run_rloo(run, reg, lr, seed, iterations, extra=None if coef is None else {"entropy_coef": coef})
            evaluate_run(run, eval_n)
        else:
            name, config, lr, extra = job
            run = out / "offline" / name
            print(f"[toylab sweep] ({i + 1}/{len(todo)}) offline {name} -> {run}", flush=True)
            evaluate_run(run_offline(run, config, lr, extra=extra), eval_n, proxy=False)
        print(f"[toylab sweep] done in {time.time() - t:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
    print(f"[toylab sweep] finished in {time.time() - t0:.0f}s: {out}", flush=True)
    return out
