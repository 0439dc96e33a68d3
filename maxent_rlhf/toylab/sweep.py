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
  4. further conditions (CONDITIONS): the length channel (configs/toy/length_{maxent,entropy}.yaml, and
     SimPO with and without length normalisation on the `length` build profile's pairs), the online pairwise
     experiment (rules.py: H1-H3; offline and online SimPO with and without the margin, online DPO through
     train_online.py), and LoRA vs full fine-tuning (rules.py: maxent with LoRA ranks 2 and 8 at the high lr);
     a condition whose config does not exist is skipped and listed as disabled; a condition's run identical to a
     main-grid run is not run twice (`reused_runs`).
Every run's DONE.json records the code commit and the sha256 of the pre-registered rules (`rules.py`);
the report refuses to mix runs whose code or rules differ. The cost of the whole plan is estimated from measured
per-run timings (`MINUTES`, `estimate_minutes`, written into sweep.json) and kept under BUDGET_MINUTES.
Offline runs: DPO (Figure 4's reference log-ratio) and SimPO for several gamma at several learning
rates (Figure 6), `python train_offline.py --config configs/toy/{dpo,simpo}.yaml ...`. Every checkpoint
of every run (and the SFT baseline) is decoded greedily and judged by the gold judge in both orders,
and scored by the proxy reward model (offline runs too: "overoptimised" needs the proxy), with `python evaluate_judge.py --config configs/toy/eval.yaml
--judge {toy-gold,reward-model} ...`. Each command is printed before it runs (`scripts.py`); a finished
stage is skipped on rerun; DONE.json records each run's training and evaluation seconds, from which the
report adds up the sweep's cost in one process.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import load_yaml
from . import rules
from .scripts import run_script, scripts_dir, toy_config

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
# a regulariser whose runs the rules read at fewer rates than the grid's runs only there: minimum entropy is read by
# claim 8 alone, at the high lr (rules.CLAIM_INPUTS[8]); its 1e-4 runs (3 x 3.4 CPU-min) would decide nothing
REGULARIZER_LRS = {"minent": (rules.HIGH_LR,)}
SEEDS = (1, 2, 3)
# claim 2 is judged at rules.low_lr() = 1e-3 / 10 = 1e-4 (in the grid above), fixed by rule before any run;
# LOW_LR (rules.LOW_LR_SCAN) is one more rate below it, reported beside, never deciding a verdict; claim 3 is
# tested at every rate where the entropy runs keep a gain (a rule of claims.py, computed from the runs)
LOW_LR = rules.LOW_LR_SCAN[0]
LOW_LR_REGULARIZERS = ("maxent", "entropy", "none")
# extra entropy coefficients at the high lr: with configs/toy/maxent.yaml's 0.5 and coefficient 0 ("none"),
# 0.1-1.0 spans 10x
COEF_SWEEP = {"maxent": (0.1, 1.0)}
SIMPO_GAMMAS = (0.0, 0.5, 1.0, 2.0)
SIMPO_LRS = (1e-4, 3e-4, 3e-3)  # gradual to aggressive (the paper's 2e-7 and 1e-6 roles)
DPO = {"learning_rate": 1e-3, "beta": 0.1}
EVAL_N = 200


# --------------------------------------------------------------------------------------------------
# further conditions: the length channel, and hooks for conditions whose configs other work adds
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """A set of runs beyond the main grid: `config` (configs/toy/CONFIG.yaml) through `kind`'s script
    ("rloo": train_rloo.py, "online": train_online.py, "offline": train_offline.py) at each lr and seed, with `options` on top; the
    runs go to OUT/<folder>/<kind>/<name>_lr<lr>_s<seed>. Evaluated with configs/toy/eval.yaml plus
    `eval_options`. A condition whose config file does not exist yet is skipped and listed as disabled."""

    name: str
    kind: str
    config: str
    lrs: tuple
    seeds: tuple
    options: dict = field(default_factory=dict)
    eval_options: dict = field(default_factory=dict)
    folder: str = "extra"
    minutes: float = 0.0  # CPU minutes per run (training + evaluation), for the cost estimate

    def enabled(self) -> bool:
        try:
            toy_config(self.config)
        except FileNotFoundError:
            return False
        return True

    def runs(self) -> list[tuple[str, float, int]]:
        return [(f"{self.name}_lr{lr_tag(lr)}_s{seed}", lr, seed) for seed in self.seeds for lr in self.lrs]


# Minutes per run (training with its in-training win rate + the gold and proxy evaluation of every checkpoint),
# measured one run each on the 2-core machine at load 5-7 (other processes beside it), OMP_NUM_THREADS=1, wall
# clock (CPU time, user + sys, in brackets):
#   RLOO, configs/toy/maxent.yaml at lr 1e-3, 80 iterations: 122 s (60 s) + evaluation of 8 checkpoints + SFT,
#     29 s (27 s) -> 2.5 min; LoRA rank 8 (configs/toy/lora_r8_maxent.yaml): 90 s (54 s) at load ~3, i.e. the same
#     cost (generation dominates a hidden-64 policy; the optimizer state is the small part);
#   offline SimPO (configs/toy/simpo.yaml, lr 1e-3): 49 s (30 s) + evaluation of 18 checkpoints, ~2 x 29 s -> 1.8 min;
#   online SimPO (configs/toy/online_simpo.yaml, lr 1e-3): 70 s (39 s) + 29 s -> 1.7 min;
#   artifacts: 92 s per profile (the last sweep). Length-channel RLOO runs decode 24 tokens instead of 16 (x1.3).
# The last sweep's DONE.json records (58 runs, partly at load 7-8) gave RLOO 188 s + 16 s: at that load the sweep
# costs ~1.35x this estimate.
MINUTES = {"rloo": 2.5, "offline": 1.8, "online": 1.7, "artifacts": 1.5}
# the whole sweep (every condition, hooks none): <= 4 CPU-hours, i.e. ~2 h of wall clock in two shards on 2 cores.
# To fit (from 286 min under the old per-run times + 20 for LoRA), without removing a run any rule reads:
#   - per-run times measured again (above);
#   - minimum entropy runs only at the high lr (REGULARIZER_LRS: claim 8 reads no other), -3 runs;
#   - a condition's run identical to a main-grid run (script, config, lr, seed, options) is not run again: the
#     pairwise experiment's offline SimPO at lr 1e-4, seed 1, gamma 0 and 0.5 reuses the SimPO grid's (`reused_runs`),
#     -2 runs;
#   - the LoRA baseline is the main grid's full-fine-tuning maxent runs (same lr and seeds), not rerun; LoRA runs
#     only at the rate its rule reads (rules.LORA_LRS).
# Kept at 3 seeds: every group a rule compares by mean or majority (claims 1-8, 14-16, H1-H3, LoRA).
BUDGET_MINUTES = 240


# the length-channel toy (build profile `length`): its proxy learned a taste for long summaries; the
# summaries get room to grow (24 tokens where the main toy's budget is 16); the gold judge is unchanged
LENGTH_TOKENS = 24
LENGTH_EVAL = {"sft_model_name_or_path": "toylab://length/sft", "dataset_name": "toylab://length/prompts",
               "max_new_tokens": LENGTH_TOKENS, "reward_model_name_or_path": "toylab://length/reward"}
LENGTH_OFFLINE = {"model_name_or_path": "toylab://length/sft", "dataset_name": "toylab://length/pairs",
                  "judge_dataset_name": "toylab://length/prompts", "max_new_tokens": LENGTH_TOKENS, "simpo_gamma": 0.5}
# (max_completion_length stays the SimPO config's 28: the pairs' responses are <= 24 tokens + EOS, and the prompt's
# 100 tokens + 28 fill the toy model's 128 positions)
# SimPO's beta scales the length-normalised log-prob; without normalisation the summed log-prob is |y|
# times larger, so beta is divided by the SFT summaries' typical length (8 tokens): 2.0 -> 0.25
CONDITIONS = (
    Condition("length_maxent", "rloo", "length_maxent", (rules.LENGTH_LR,), SEEDS, eval_options=LENGTH_EVAL,
              folder="length", minutes=round(1.3 * MINUTES["rloo"], 1)),
    Condition("length_entropy", "rloo", "length_entropy", (rules.LENGTH_LR,), SEEDS, eval_options=LENGTH_EVAL,
              folder="length", minutes=round(1.3 * MINUTES["rloo"], 1)),
    Condition("length_simpo_norm", "offline", "simpo", (rules.LENGTH_SIMPO_LR,), SEEDS,
              {**LENGTH_OFFLINE, "beta": 2.0, "length_normalize": True}, LENGTH_EVAL, "length", 1.8),
    Condition("length_simpo_plain", "offline", "simpo", (rules.LENGTH_SIMPO_LR,), SEEDS,
              {**LENGTH_OFFLINE, "beta": 0.25, "length_normalize": False}, LENGTH_EVAL, "length", 1.8),
    # the README main job (configs/toy/maxent.yaml as it is, lr 2e-4, seed 1), so the numbers quoted for it
    # come from a run of the report's tables; it decides no claim (its lr is in no rule)
    Condition("main_job", "rloo", "maxent", (2e-4,), (1,), folder="main", minutes=MINUTES["rloo"]),
    # LoRA vs full fine-tuning (rules.py): maxent (Eq. 7) with a LoRA policy of each rank at the main grid's high lr and
    # seeds, beside its full-fine-tuning maxent runs (the baseline is the main grid, not rerun); a LoRA toy run costs
    # what a full one does (generation dominates a hidden-64 policy)
    *(Condition(f"lora_r{r}_maxent", "rloo", f"lora_r{r}_maxent", rules.LORA_LRS, SEEDS, folder="lora",
                minutes=MINUTES["rloo"]) for r in rules.LORA_RANKS),
    # the online pairwise experiment (rules.py: H1-H3): offline SimPO (dataset constraint + margin), online SimPO
    # (margin only) and with gamma 0 (neither), online DPO, at the main grid's rates and seeds, beside its online
    # MaxEnt and KL RLOO runs; offline SimPO here is configs/toy/simpo.yaml at 3 seeds (the main grid's SimPO runs
    # have seed 1 only); a run identical to a main-grid run (lr 1e-4, gamma 0 and 0.5, seed 1) is not run twice:
    # the condition reuses the main grid's (`reused_runs`, recorded in sweep.json)
    Condition("pairwise_offline_simpo", "offline", "simpo", rules.PAIRWISE_LRS, SEEDS,
              {"beta": 2.0, "simpo_gamma": rules.PAIRWISE_GAMMA}, folder="pairwise", minutes=MINUTES["offline"]),
    Condition("pairwise_offline_simpo_gamma0", "offline", "simpo", rules.PAIRWISE_LRS, SEEDS,
              {"beta": 2.0, "simpo_gamma": 0.0}, folder="pairwise", minutes=MINUTES["offline"]),
    Condition("online_simpo", "online", "online_simpo", rules.PAIRWISE_LRS, SEEDS, folder="pairwise", minutes=MINUTES["online"]),
    Condition("online_simpo_gamma0", "online", "online_simpo_gamma0", rules.PAIRWISE_LRS, SEEDS, folder="pairwise",
              minutes=MINUTES["online"]),
    Condition("online_dpo", "online", "online_dpo", rules.PAIRWISE_LRS, SEEDS, folder="pairwise", minutes=MINUTES["online"]),
)



def _signature(script_kind: str, config: str, lr: float, seed: int, options: dict) -> tuple:
    """What makes two runs the same run: script, config, lr, seed and options."""
    return (script_kind, config, float(lr), int(seed), tuple(sorted((k, repr(v)) for k, v in options.items())))


def main_grid_runs(plan: list, off: list) -> dict:
    """signature -> the main grid's run folder (relative to the sweep's output), for every run of the grid."""
    runs = {}
    for reg, lr, seed, coef in plan:
        runs[_signature("rloo", reg, lr, seed, {} if coef is None else {"entropy_coef": coef})] = \
            f"rloo/{rloo_run_name(reg, lr, seed, coef)}"
    for name, config, lr, extra in off:
        runs[_signature("offline", config, lr, 1, extra)] = f"offline/{name}"  # run_offline's default seed
    return runs


def reused_runs(plan: list, off: list, conditions=CONDITIONS) -> dict:
    """condition run folder (FOLDER/KIND/NAME) -> the identical main-grid run folder it reuses instead of running."""
    grid = main_grid_runs(plan, off)
    out = {}
    for c in conditions:
        for name, lr, seed in c.runs():
            same = grid.get(_signature(c.kind, c.config, lr, seed, c.options))
            if same is not None and not c.eval_options:  # evaluated alike too
                out[f"{c.folder}/{c.kind}/{name}"] = same
    return out


def estimate_minutes(n_rloo: int, n_offline: int, conditions=CONDITIONS, enabled_only: bool = False,
                     reused: Optional[dict] = None) -> dict:
    """The sweep's CPU cost by part (minutes): the main grid, each condition (hooks too, unless
    enabled_only; its runs that reuse a main-grid run, `reused`, cost nothing), the artifact builds
    (default + length profiles)."""
    parts = {"main RLOO grid": n_rloo * MINUTES["rloo"], "offline (DPO, SimPO)": n_offline * MINUTES["offline"],
             "artifacts (2 profiles)": 2 * MINUTES["artifacts"]}
    reused = reused or {}
    for c in conditions:
        if c.enabled() or not enabled_only:
            n = sum(1 for name, _, _ in c.runs() if f"{c.folder}/{c.kind}/{name}" not in reused)
            parts[c.name + ("" if c.enabled() else " (hook, disabled)")] = n * c.minutes
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------------
# provenance: which code and which rules made a run
# --------------------------------------------------------------------------------------------------
def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(scripts_dir()), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict:
    """The code commit (with a dirty flag: uncommitted changes to tracked files), the rules file's sha256
    and the commit that last changed it. Recorded in every run's DONE.json and in sweep.json."""
    rel = rules.rules_file().resolve().relative_to(scripts_dir().resolve()).as_posix() \
        if rules.rules_file().resolve().is_relative_to(scripts_dir().resolve()) else None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"code_commit": _git("rev-parse", "HEAD"), "code_dirty": bool(status) if status is not None else None,
            "rules_sha256": rules.rules_sha256(),
            "rules_commit": (_git("log", "-1", "--format=%H", "--", rel) or None) if rel else None}


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


def run_online(out: Path, config: str, lr: float, seed: int, iterations: Optional[int] = None,
               extra: Optional[dict] = None) -> Path:
    """configs/toy/CONFIG.yaml (online_simpo, online_dpo, ...) through train_online.py at this learning rate and
    seed (`extra`: more options) into `out`."""
    options = dict(learning_rate=lr, seed=seed, output_dir=str(out))
    if iterations:
        options["num_iterations"] = iterations
    options.update(extra or {})
    return _run_once(out, "train_online.py", toy_config(config), options,
                     {"kind": "online", "config": config, "learning_rate": lr, "seed": seed, **(extra or {})})


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
    made_by = provenance()  # the code as the run starts: a commit made while it runs must not relabel it
    run_script(script, config, **options)
    _mark_done(out, {**record, "seconds": time.time() - t0, **made_by})
    return out


def evaluate_run(run_dir: Path, n: int = EVAL_N, proxy: bool = True, options: Optional[dict] = None) -> dict:
    """Gold win rate (toy-gold, both orders) and proxy reward (reward-model judge) of every checkpoint + the
    SFT baseline; `options` on top of configs/toy/eval.yaml (the length channel's artifacts and budget)."""
    gold_dir, proxy_dir = run_dir / "eval_gold", run_dir / "eval_proxy"
    options = dict(options or {})
    reward = options.pop("reward_model_name_or_path", "toylab://reward")
    common = dict(checkpoints=[str(run_dir)], n=n, per_device_eval_batch_size=n, plot=True, **options)
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
                       reward_model_name_or_path=reward, judge_batch_size=n, **common)
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
        plan += [(reg, lr, seed, None) for lr in lrs for reg in regularizers if lr in REGULARIZER_LRS.get(reg, lrs)]
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


def job_list(plan: list, off: list, extra_jobs: list, online: bool = True, offline: bool = True) -> list[tuple]:
    """The sweep's one ordered list of jobs: every online configuration at the first seed, the offline
    runs, the further conditions' first seed, then the other seeds of both (a sweep cut short still tests
    every claim, at fewer seeds); shards take every n-th job of it."""
    first = [("rloo", p) for p in plan if p[2] == plan[0][2]] if plan else []
    seed0 = min((j[1][3] for j in extra_jobs), default=None)
    return ([j for j in first if online] + [("offline", o) for o in off if offline]
            + [j for j in extra_jobs if j[1][3] == seed0]
            + [("rloo", p) for p in plan if online and ("rloo", p) not in first]
            + [j for j in extra_jobs if j[1][3] != seed0])


def condition_jobs(conditions=CONDITIONS, online: bool = True, offline: bool = True, reused: Optional[dict] = None
                   ) -> list[tuple]:
    """("condition", (condition, run name, lr, seed)) for every run of the enabled conditions, except those that
    reuse an identical main-grid run (`reused`: condition run folder -> main-grid run folder)."""
    reused = reused or {}
    return [("condition", (c, name, lr, seed)) for c in conditions if c.enabled() for name, lr, seed in c.runs()
            if (online if c.kind in ("rloo", "online") else offline) and f"{c.folder}/{c.kind}/{name}" not in reused]


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
    conditions=CONDITIONS,
) -> Path:
    """Run (or complete: finished runs are skipped) the sweep into `out`. shard=(i, n) runs every n-th
    run starting at i (online and offline lists alike), so n processes split one sweep. sweep.json (the
    plan, with the code and rules provenance) is written first; write_meta=False adds runs to an existing
    sweep without changing it. `conditions`: the further conditions (CONDITIONS; those without a config
    are skipped and listed in sweep.json as disabled)."""
    from .build import ensure_artifact

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    i_shard, n_shards = shard
    mine = lambda items: shard_items(items, shard)  # noqa: E731
    t0 = time.time()
    active = [c for c in conditions if c.enabled()]
    for name in ("reward", "prompts") + (("length/reward", "length/prompts") if any(c.folder == "length" for c in active) else ()):
        ensure_artifact(name)
    plan = rloo_plan(regularizers, lrs, seeds, low_lr, coef_sweep)
    off = offline_plan(simpo_gammas, simpo_lrs)
    reused = reused_runs(plan, off, active)
    extra_jobs = condition_jobs(active, online, offline, reused)
    if write_meta:  # the plan, written first: a report made before the sweep ends lists what is missing
        meta = {
            "regularizers": list(regularizers), "lrs": list(lrs), "seeds": list(seeds), "iterations": iterations,
            "low_lr": low_lr, "low_lr_regularizers": [r for r in LOW_LR_REGULARIZERS if r in regularizers] if low_lr else [],
            "coef_sweep": {k: list(v) for k, v in (COEF_SWEEP if coef_sweep is None else coef_sweep).items()},
            "rloo_runs": [rloo_run_name(*p) for p in plan], "offline_runs": [p[0] for p in off],
            "simpo_gammas": list(simpo_gammas), "simpo_lrs": list(simpo_lrs), "eval_n": eval_n,
            "conditions": {c.name: {"kind": c.kind, "config": c.config, "folder": c.folder, "lrs": list(c.lrs),
                                    "seeds": list(c.seeds), "options": c.options, "runs": [r[0] for r in c.runs()]}
                           for c in active},
            "disabled_conditions": [c.name for c in conditions if not c.enabled()],
            "reused_runs": reused,  # condition run -> the identical main-grid run that stands for it
            "estimate_minutes": estimate_minutes(len(plan), len(off), conditions, reused=reused),
            **provenance(),
        }
        tmp = out / f".sweep.json.{i_shard}"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(out / "sweep.json")  # atomic: shards writing the same plan at once leave one whole file
    todo = mine(job_list(plan, off, extra_jobs, online, offline))
    for i, (kind, job) in enumerate(todo):
        t = time.time()
        if kind == "rloo":
            reg, lr, seed, coef = job
            run = out / "rloo" / rloo_run_name(reg, lr, seed, coef)
            print(f"[toylab sweep] ({i + 1}/{len(todo)}) RLOO {run.name} -> {run}", flush=True)
            run_rloo(run, reg, lr, seed, iterations, extra=None if coef is None else {"entropy_coef": coef})
            evaluate_run(run, eval_n)
        elif kind == "offline":
            name, config, lr, extra = job
            run = out / "offline" / name
            print(f"[toylab sweep] ({i + 1}/{len(todo)}) offline {name} -> {run}", flush=True)
            # the proxy too: "overoptimised" (rules.py) needs it for every run, offline ones included
            evaluate_run(run_offline(run, config, lr, extra=extra), eval_n)
        else:
            c, name, lr, seed = job
            run = out / c.folder / c.kind / name
            print(f"[toylab sweep] ({i + 1}/{len(todo)}) {c.kind} {name} -> {run}", flush=True)
            if c.kind == "rloo":
                run_rloo(run, c.config, lr, seed, iterations, extra=c.options)
            elif c.kind == "online":
                run_online(run, c.config, lr, seed, iterations, extra=c.options)
            else:
                run_offline(run, c.config, lr, seed, extra=c.options)
            evaluate_run(run, eval_n, options=c.eval_options)
        print(f"[toylab sweep] done in {time.time() - t:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
    print(f"[toylab sweep] finished in {time.time() - t0:.0f}s: {out}", flush=True)
    return out
