"""The toy-lab sweep: every run through the project's scripts, as a user runs them.

    python -m maxent_rlhf.toylab sweep                   # full: 5 regularisers x 2 lrs x 3 seeds + offline
    python -m maxent_rlhf.toylab sweep --seeds 1         # reduced
    python -m maxent_rlhf.toylab report --out runs/toylab

Online runs: `python train_rloo.py --config configs/toy/REG.yaml --learning_rate LR --seed S --output_dir ...`
for REG in REGULARIZERS (the configs hold each regulariser's coefficient). Offline runs: DPO (Figure 4's
reference log-ratio) and SimPO for several gamma at two learning rates (Figure 6), `python
train_offline.py --config configs/toy/{dpo,simpo}.yaml ...`. Every checkpoint of every run (and the SFT
baseline) is decoded greedily and judged by the gold judge, and scored by the proxy reward model,
with `python evaluate_judge.py --config configs/toy/eval.yaml --judge {toy-gold,reward-model} ...`.
Each command is printed before it runs (`scripts.py`); a finished stage is skipped on rerun.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

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
SIMPO_GAMMAS = (0.0, 0.5, 1.0, 2.0)
SIMPO_LRS = (3e-4, 3e-3)  # a gradual and an aggressive lr (the paper's 2e-7 and 1e-6 roles)
EVAL_N = 200


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def run_rloo(out: Path, reg: str, lr: float, seed: int, iterations: Optional[int] = None, extra: Optional[dict] = None) -> Path:
    """configs/toy/REG.yaml at this learning rate and seed (`extra`: more options) into `out`."""
    options = dict(learning_rate=lr, seed=seed, output_dir=str(out))
    if iterations:
        options["num_iterations"] = iterations
    options.update(extra or {})
    return _run_once(out, "train_rloo.py", toy_config(reg), options,
                     {"kind": "rloo", "regularizer": reg, "learning_rate": lr, "seed": seed})


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
    """Gold win rate (toy-gold) and proxy reward (reward-model judge) of every checkpoint + the SFT baseline."""
    gold_dir, proxy_dir = run_dir / "eval_gold", run_dir / "eval_proxy"
    common = dict(checkpoints=[str(run_dir)], n=n, per_device_eval_batch_size=n, plot=True)
    out = {}
    if not (gold_dir / "summary.json").exists():
        run_script("evaluate_judge.py", toy_config("eval"), output_dir=str(gold_dir), judge="toy-gold", **common)
    out["gold"] = json.loads((gold_dir / "summary.json").read_text())
    if proxy:
        if not (proxy_dir / "summary.json").exists():
            if (gold_dir / "generations").is_dir() and not (proxy_dir / "generations").exists():
                shutil.copytree(gold_dir / "generations", proxy_dir / "generations")  # same greedy decodes
            run_script("evaluate_judge.py", toy_config("eval"), output_dir=str(proxy_dir), judge="reward-model",
                       reward_model_name_or_path="toylab://reward", judge_batch_size=n, **common)
        out["proxy"] = json.loads((proxy_dir / "summary.json").read_text())
    return out


def _done(out: Path) -> bool:
    return (out / "DONE.json").exists()


def _mark_done(out: Path, info: dict) -> None:
    (out / "DONE.json").write_text(json.dumps(info, indent=1))


def sweep(
    out: str | Path = "runs/toylab",
    regularizers=REGULARIZERS,
    lrs=LEARNING_RATES,
    seeds=SEEDS,
    iterations: Optional[int] = None,
    simpo_gammas=SIMPO_GAMMAS,
    simpo_lrs=SIMPO_LRS,
    offline: bool = True,
    eval_n: int = EVAL_N,
    write_meta: bool = True,
) -> Path:
    """Run (or complete: finished runs are skipped) the sweep into `out`. write_meta=False adds runs to
    an existing sweep (e.g. an extra learning rate) without changing what sweep.json says the sweep is."""
    from .build import ensure_artifact

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for name in ("reward", "prompts"):
        ensure_artifact(name)
    timings = {"build_s": time.time() - t0}
    plan = [(reg, lr, seed) for seed in seeds for lr in lrs for reg in regularizers]
    for i, (reg, lr, seed) in enumerate(plan):
        run = out / "rloo" / f"{reg}_lr{lr_tag(lr)}_s{seed}"
        t = time.time()
        print(f"[toylab sweep] ({i + 1}/{len(plan)}) RLOO {reg} lr {lr:g} seed {seed} -> {run}", flush=True)
        run_rloo(run, reg, lr, seed, iterations)
        evaluate_run(run, eval_n)
        print(f"[toylab sweep] done in {time.time() - t:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
    timings["rloo_s"] = time.time() - t0 - timings["build_s"]
    if offline:
        t = time.time()
        dpo = run_offline(out / "offline" / "dpo", "dpo", 1e-3, extra={"beta": 0.1})
        evaluate_run(dpo, eval_n, proxy=False)
        for lr in simpo_lrs:
            for g in simpo_gammas:
                run = run_offline(out / "offline" / f"simpo_lr{lr_tag(lr)}_g{g:g}", "simpo", lr,
                                  extra={"beta": 2.0, "simpo_gamma": g})
                evaluate_run(run, eval_n, proxy=False)
        timings["offline_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    if not write_meta:
        return out
    (out / "sweep.json").write_text(json.dumps({
        "regularizers": list(regularizers), "lrs": list(lrs), "seeds": list(seeds), "iterations": iterations,
        "simpo_gammas": list(simpo_gammas), "simpo_lrs": list(simpo_lrs), "eval_n": eval_n, "timings": timings,
    }, indent=1))
    print(f"[toylab sweep] finished in {timings['total_s']:.0f}s: {out}", flush=True)
    return out
