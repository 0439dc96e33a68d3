"""report.md and its figures from a sweep directory (`python -m maxent_rlhf.toylab report`).

Everything in the report is computed from the run directories (metrics.jsonl, eval_*/summary.json,
DONE.json) and the cached artifacts' build records; the claim table's verdicts follow the rules of
claims.py with the thresholds, terms and run selections pre-registered in rules.py. The runs' DONE.json
name the code commit and the rules' sha256; runs of different code or rules are refused unless
allowed ($MAXENT_RLHF_TOYLAB_ALLOW_MIXED_CODE=1, or write_report(allow_mixed_code=True)), and the report
then says so at the top.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Optional

from .. import plotting
from ..config import ConfigError
from . import claims, rules
from .sweep import REGULARIZER_LABELS

# train_rloo metrics behind the KL claims (6, 7) and the run table: "objective/<key>"
KL_REF = "kl_ref_k3"
KL_PREV = "kl_prev_k3"
ENV_ALLOW_MIXED = "MAXENT_RLHF_TOYLAB_ALLOW_MIXED_CODE"  # 1: report runs of different code or rules together


def _reg_key(run: plotting.Run) -> str:
    """The sweep's regulariser name (kl, maxent, entropy, minent, none) of a run."""
    return run.info.get("regularizer") or run.name.split("_lr")[0].split("_c")[0]


def _coef(run: plotting.Run) -> Optional[float]:
    """The entropy coefficient of an entropy run, 0 for the no-regulariser runs, None otherwise."""
    reg = run.config.get("regularizer")
    if reg == "entropy":
        return float(run.config.get("entropy_coef", float("nan")))
    return 0.0 if reg == "none" else None


def _default_coef(run: plotting.Run) -> bool:
    """Whether the run has its config's coefficient: the sweep names the others `REG_c<coef>_lr...`."""
    return not run.name.startswith(f"{_reg_key(run)}_c")


def _label(run: plotting.Run) -> str:
    """Figure legend: the regulariser, plus the coefficient when it is not the config's."""
    extra = "" if _default_coef(run) else f", coef {_coef(run):g}"
    return REGULARIZER_LABELS.get(_reg_key(run), _reg_key(run)) + extra


def _lr(run: plotting.Run) -> float:
    return float(run.config.get("learning_rate", run.info.get("learning_rate", float("nan"))))


def _thirds(v: list) -> tuple[list, list, list]:
    third = max(1, len(v) // 3)
    return v[:third], v[third:len(v) - third] or v[:third], v[-third:]


def _lengths(run: plotting.Run) -> tuple[Optional[float], Optional[float]]:
    """Mean token length of the greedy summaries: SFT baseline and final checkpoint (eval_gold)."""
    xs, ys = plotting._curve(run.gold, "mean_policy_tokens", include_baseline=True)
    return (ys[0] if xs and xs[0] == 0 else None), (ys[-1] if ys else None)


def analyse(run: plotting.Run) -> dict:
    """One run's numbers for the tables and the claim rules: the gold and proxy trajectories (terms from
    rules.py), KL statistics under every estimate, the entropy-bonus trend, greedy summary lengths."""
    xs, ys = run.winrate_curve(include_baseline=True)
    px, py = run.proxy_curve(include_baseline=True)
    out = {"name": run.name, "lr": _lr(run), "steps": xs, "win": ys, "proxy": dict(zip(px, py)), "variant": _reg_key(run),
           "coef": _coef(run), "default_coef": _default_coef(run)}
    if not ys:
        return out
    i_peak = max(range(len(ys)), key=lambda i: ys[i])
    out.update(sft=ys[0] if xs and xs[0] == 0 else None, peak=ys[i_peak], peak_step=xs[i_peak], final=ys[-1],
               final_step=xs[-1], drop=ys[i_peak] - ys[-1])
    p_peak, p_final = out["proxy"].get(xs[i_peak]), out["proxy"].get(xs[-1])
    out.update(proxy_at_peak=p_peak, proxy_final=p_final)
    out["overoptimised"] = rules.overoptimised(out["peak"], out["final"], p_peak, p_final)
    out["len_sft"], out["len_final"] = _lengths(run)
    eb = run.series("objective/entropy_bonus")[1]
    if len(eb) >= 6:
        third = len(eb) // 3
        out["entropy_bonus_trend"] = statistics.mean(eb[-third:]) - statistics.mean(eb[:third])
    for key in (KL_REF, KL_PREV):
        v = run.series("objective/" + key)[1]
        if v:
            early, _, late = _thirds(v)
            out[key + "_early"] = statistics.mean(early)
            out[key + "_late"] = statistics.mean(late)
    # claim 6: growth of KL_ref from the middle to the last third (the first third starts at 0 for every run)
    v = run.series(rules.KL_REF_KEYS[rules.KL_REF_PRIMARY])[1]
    if len(v) >= 3:
        _, mid, late = _thirds(v)
        out["kl_ref_growth"] = statistics.mean(late) / max(statistics.mean(mid), 1e-8)
    # claim 7: late / early growth under every estimate, and the ESS of the importance weights in those windows
    out["kl_prev_growth"] = {}
    for name, key in rules.KL_PREV_ESTIMATES.items():
        v = run.series(key)[1]
        if len(v) >= 3:
            early, _, late = _thirds(v)
            out["kl_prev_growth"][name] = statistics.mean(late) / max(statistics.mean(early), 1e-8)
    ess = run.series(rules.KL_PREV_ESS)[1]
    if len(ess) >= 3:
        early, _, late = _thirds(ess)
        out["kl_prev_ess"] = statistics.median(early + late)
    return out


def provenance_lines(runs, allow_mixed: Optional[bool] = None) -> list[str]:
    """Which code and which rules made the runs (DONE.json, `sweep.provenance`). Runs of different code or
    rules are refused (ConfigError) unless allow_mixed (default: $MAXENT_RLHF_TOYLAB_ALLOW_MIXED_CODE=1);
    then the report says so, naming the groups."""
    import os

    if allow_mixed is None:
        allow_mixed = os.environ.get(ENV_ALLOW_MIXED, "") == "1"
    groups: dict = {}
    for r in runs:
        key = (r.info.get("code_commit") or "unrecorded", bool(r.info.get("code_dirty")), r.info.get("rules_sha256") or "unrecorded")
        groups.setdefault(key, []).append(r.name)
    here = rules.rules_sha256()
    desc = lambda k: (f"code {k[0][:10]}{' + uncommitted changes' if k[1] else ''}, rules "  # noqa: E731
                      f"{k[2][:12]}{' (this checkout)' if k[2] == here else ''}")
    if len(groups) <= 1:
        k = next(iter(groups), ("unrecorded", False, "unrecorded"))
        return [f"Provenance: every run was made by {desc(k)}; the verdicts below apply the rules of this checkout "
                f"(`maxent_rlhf/toylab/rules.py`, sha256 {here[:12]})"
                + ("" if k[2] in (here, "unrecorded") else " -- NOT the rules the runs were registered under") + ".\n"]
    listing = "; ".join(f"{desc(k)}: {len(v)} runs ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})" for k, v in groups.items())
    if not allow_mixed:
        raise ConfigError(f"the sweep mixes runs of {len(groups)} code/rules versions ({listing}); rerun the odd ones, or "
                          f"set {ENV_ALLOW_MIXED}=1 to report them together (the report then says so)")
    return [f"**Mixed provenance** (reported together on request, {ENV_ALLOW_MIXED}=1): {listing}.\n"]


def _fmt(x, spec=".0%"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def _load(folder: Path) -> list[plotting.Run]:
    return [plotting.load_run(d) for d in sorted(folder.glob("*")) if (d / "DONE.json").exists()]


def write_report(sweep_dir: str | Path, report_dir: str | Path = "report", allow_mixed_code: Optional[bool] = None) -> Path:
    """report.md and its figures. Runs of different code or rules are refused unless allow_mixed_code
    (default: $MAXENT_RLHF_TOYLAB_ALLOW_MIXED_CODE=1), and the report then says so."""
    sweep_dir, report_dir = Path(sweep_dir), Path(report_dir)
    meta = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").exists() else {}
    rloo = _load(sweep_dir / "rloo")
    offline = {r.name: r for r in _load(sweep_dir / "offline")}
    length = {"rloo": _load(sweep_dir / "length" / "rloo"), "offline": _load(sweep_dir / "length" / "offline")}
    main_job = _load(sweep_dir / "main" / "rloo")  # the README main job, a run of no claim
    lora = _load(sweep_dir / "lora" / "rloo")  # LoRA maxent, beside the main grid's full-fine-tuning maxent runs
    pairwise = pairwise_runs(sweep_dir, meta)  # H1-H3: offline / online SimPO, online DPO (main-grid reuses resolved)
    provenance = provenance_lines(list(rloo) + list(offline.values()) + length["rloo"] + length["offline"] + main_job
                                  + lora + pairwise, allow_mixed_code)
    report_dir.mkdir(parents=True, exist_ok=True)
    stats = [analyse(r) for r in rloo]
    lrs = sorted({_lr(r) for r in rloo})
    figs = {}

    # ---- figures ------------------------------------------------------------------------------------
    captions = []
    for i, lr in enumerate(lrs):
        rs = [r for r in rloo if _lr(r) == lr]
        seeds = sorted({r.config.get("seed") for r in rs})
        key = f"reward_{i}"
        figs[key] = plotting.plot_reward_and_entropy(
            rs, report_dir / f"fig1_2_reward_entropy_lr{lr:g}.png", title=f"RLOO, lr {lr:g}", group=_label)
        captions.append((key, f"Figures 1-2 analogue, lr {lr:g} (seeds {seeds}, mean): RLHF reward and the "
                              "policy's unweighted sampled entropy sum_t -log pi (`objective/entropy`, one scale for "
                              "every regulariser and coefficient; the weighted entropy bonus is the run table's "
                              "trend column) per regulariser; final gold win rate in the legend."))
    for i, lr in enumerate(lrs):
        rs = [r for r in rloo if _lr(r) == lr]
        key = f"kl_{i}"
        figs[key] = plot_kl_estimates(rs, report_dir / f"fig3_kl_lr{lr:g}.png", title=f"KL metrics, lr {lr:g}")
        captions.append((key, f"Figure 3 analogue, lr {lr:g}: KL(pi_t || pi_ref) under k1 and k3, KL between "
                              "consecutive policies in both directions (the paper's KL(pi_t || pi_t-1) is importance-"
                              "weighted from pi_t-1's samples), `policy/approxkl`, and the effective sample fraction of "
                              "those weights (`objective/kl_prev_ess`). Thin lines: each seed as logged, no smoothing; "
                              "thick: the median over seeds at each logged iteration; symlog scale."
                              + spike_note(rs)))
    if rloo:
        figs["overopt"] = plotting.plot_winrate_per_checkpoint(
            rloo, report_dir / "fig_overopt_gold_vs_proxy.png", label=_label, panel=lambda r: f"lr {_lr(r):g}",
            title="gold win rate (solid) and proxy reward (dotted) per checkpoint, mean over seeds", proxy=True)
    if "dpo" in offline:
        figs["fig4"] = plotting.plot_ref_logratio(offline["dpo"], report_dir / "fig4_dpo_ref_logratio.png")
    simpo = [r for n, r in offline.items() if n.startswith("simpo")]
    if simpo:
        figs["fig6"] = plotting.plot_winrate_per_checkpoint(
            simpo, report_dir / "fig6_simpo_winrate.png", label=lambda r: f"gamma {r.config.get('simpo_gamma')}",
            panel=lambda r: f"SimPO lr {_lr(r):g}", title="SimPO: gold win rate per checkpoint")

    # ---- headline numbers -------------------------------------------------------------------------
    cache = _artifact_dir()
    rm_acc = _read_json(cache / "reward" / "heldout_accuracy.json") if cache else None
    pair_stats = _read_json(cache / "pairs" / "stats.json") if cache else None
    build_s = sum(_read_json(cache / n / "MANIFEST.json", {}).get("build_seconds", 0.0)
                  for n in ("tokenizer", "sft_data", "prompts", "sft", "pairs", "reward")) if cache else None
    sft_win = _mean([s.get("sft") for s in stats])
    main_lrs = sorted(meta.get("lrs") or lrs)
    kl_by_lr = {lr: _group_final(stats, "kl", lr) for lr in main_lrs}
    overopt = [s for s in stats if s.get("overoptimised")]
    ceiling = task_ceiling(cache)
    length_cache = _artifact_dir("length")
    length_rm = _read_json(length_cache / "reward" / "heldout_accuracy.json") if length_cache else None
    length_pairs = _read_json(length_cache / "pairs" / "stats.json") if length_cache else None
    if build_s is not None and length_cache:  # the length profile builds only its own pairs and reward model
        build_s += sum(_read_json(length_cache / n / "MANIFEST.json", {}).get("build_seconds", 0.0) for n in ("pairs", "reward"))
    best_overopt = max(overopt, key=lambda s: s["drop"], default=None)
    rloo_secs = [r.info.get("seconds") for r in rloo if r.info.get("seconds")]

    L = []
    L.append("# Toy lab report\n")
    L += provenance
    # the sweep folder by its name only: a machine's absolute path means nothing to a reader of the report
    L.append("Generated by `python -m maxent_rlhf.toylab report` from the run directories of the sweep folder "
             f"`{Path(sweep_dir).name}` (`--out`). Every number below is computed from `metrics.jsonl` and the `evaluate_judge.py` "
             "summaries (judge `toy-gold` for win rates against the references, judge `reward-model` with "
             "`toylab://reward` for the proxy reward of the same greedy summaries).\n")
    if meta.get("regularizers"):
        coef = "; ".join(f"{k} at lr {max(meta.get('lrs') or lrs):g} with entropy coefficients {v}" for k, v in (meta.get("coef_sweep") or {}).items())
        L.append(f"Sweep (`sweep.json`): regularisers {meta.get('regularizers')} x learning rates {meta.get('lrs')} x seeds "
                 f"{meta.get('seeds')}; lr {meta.get('low_lr')} for {meta.get('low_lr_regularizers')}; "
                 + (f"coefficient sweep: {coef} (beside the default and coefficient 0 = no regulariser); " if coef else "")
                 + f"iterations {meta.get('iterations') or 'as configs/toy'}, {meta.get('eval_n')} test posts per checkpoint; "
                 f"DPO; SimPO gammas {meta.get('simpo_gammas')} at lrs {meta.get('simpo_lrs')}.\n")
    L += cost_lines(rloo, offline, build_s, meta, length["rloo"] + length["offline"] + main_job + lora
                    + [r for r in pairwise if r.info.get("reused_from") is None])
    L.append("## What the lab must exhibit\n")
    L.append("| requirement | target | measured | holds |")
    L.append("|---|---|---|---|")
    if sft_win is not None:
        L.append(f"| SFT policy gold win rate vs references | 15-50% | {sft_win:.1%} | {'yes' if 0.15 <= sft_win <= 0.5 else 'NO'} |")
    if rm_acc:
        a = rm_acc["accuracy_vs_labels"]
        L.append(f"| proxy RM held-out accuracy (gold-labelled BT-noisy pairs, n={rm_acc['n']}) | 0.65-0.90 | {a:.3f} "
                 f"(vs noiseless gold: {rm_acc['accuracy_vs_gold']:.3f}) | {'yes' if 0.65 <= a <= 0.9 else 'NO'} |")
    for lr, sel in kl_by_lr.items():
        if sel and sel[0].get("sft") is not None:
            sft0, fin = _mean([x["sft"] for x in sel]), _mean([x["final"] for x in sel])
            worst = min(x["final"] - x["sft"] for x in sel)
            L.append(f"| KL-constrained RLOO improves gold win rate over SFT (lr {lr:g}, {len(sel)} seeds) | >= +10 points | "
                     f"{sft0:.0%} -> {fin:.0%} final, mean ({(fin - sft0) * 100:+.0f} points; worst seed {worst * 100:+.0f}) | "
                     f"{'yes' if worst >= 0.10 else 'NO'} |")
    if best_overopt:
        s = best_overopt
        L.append(f"| overoptimisation: proxy up while gold falls >= 10 points below its in-run peak | >= 1 config | "
                 f"{len(overopt)} run(s); strongest {s['name']}: gold peak {s['peak']:.0%} (step {s['peak_step']}) -> "
                 f"{s['final']:.0%}, proxy {s['proxy_at_peak']:.2f} -> {s['proxy_final']:.2f} | yes |")
    else:
        L.append("| overoptimisation: proxy up while gold falls >= 10 points below its in-run peak | >= 1 config | none | NO |")
    if ceiling is not None:
        L.append(f"| the task's win-rate ceiling (the ideal summary against the references) | - | {ceiling:.1%} | - |")
    length_sft = _mean([analyse(r).get("sft") for r in length["rloo"]])
    if length_sft is not None:
        L.append(f"| length channel: SFT policy gold win rate ({length['rloo'][0].config.get('max_new_tokens', '?')} new tokens) "
                 f"| 15-50% | {length_sft:.1%} | {'yes' if 0.15 <= length_sft <= 0.5 else 'NO'} |")
    if length_rm:
        a = length_rm["accuracy_vs_labels"]
        L.append(f"| length channel: proxy RM held-out accuracy (n={length_rm['n']}) | 0.65-0.90 | {a:.3f} "
                 f"(vs noiseless gold: {length_rm['accuracy_vs_gold']:.3f}) | {'yes' if 0.65 <= a <= 0.9 else 'NO'} |")
        L.append(f"| length channel: proxy prefers the longer summary more often than gold (held-out pairs) | >= +10 points | "
                 f"{_fmt(length_rm.get('rm_prefers_longer'))} vs {_fmt(length_rm.get('gold_prefers_longer'))} | "
                 f"{'yes' if claims._length_channel(length_rm.get('rm_prefers_longer'), length_rm.get('gold_prefers_longer')) is None else 'NO'} |")
    if build_s is not None:
        L.append(f"| first-use build of all artifacts (main and length profiles) | <= 5 min | {build_s:.0f} s | {'yes' if build_s <= 300 else 'NO'} |")
    if rloo_secs:
        L.append(f"| one toy RLOO run (incl. model loading; sweep runs) | <= 5 min | median {statistics.median(rloo_secs):.0f} s | "
                 f"{'yes' if statistics.median(rloo_secs) <= 300 else 'NO'} |")
    L.append("")
    if pair_stats:
        L.append(f"\nPreference data: {pair_stats['pairs']} pairs of SFT samples (temperature 1) labelled by the gold "
                 f"judge with Bradley-Terry noise (labels agree with the noiseless gold preference on "
                 f"{pair_stats['label_gold_agreement']:.1%}); {pair_stats['gold_ties_dropped']} gold ties dropped.\n")

    L += position_lines(list(rloo) + list(offline.values()))
    if best_overopt:
        L += exploit_section(sweep_dir, best_overopt)

    L.append("## Every RLOO run\n")
    L.append("Gold win rate against the references per checkpoint (step 0 = SFT); peak and final; proxy reward "
             "(mean RM score of the greedy summaries) at the peak and final checkpoints; KL(pi||pi_ref) k3 at the end; "
             "trend of the entropy bonus (last third minus first third).\n")
    L.append("| run | lr | SFT | peak (step) | final | drop | trajectory | proxy peak -> final | overoptimised | KL_ref late | KL_prev early -> late | entropy-bonus trend |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in stats:
        if "final" not in s:
            continue
        L.append(f"| {s['name']} | {s['lr']:g} | {_fmt(s.get('sft'))} | {_fmt(s['peak'])} ({s['peak_step']}) | {_fmt(s['final'])} | "
                 f"{s['drop'] * 100:.0f} | {_trajectory(s)} | {_fmt(s.get('proxy_at_peak'), '.2f')} -> {_fmt(s.get('proxy_final'), '.2f')} | "
                 f"{_yes(s.get('overoptimised'))} | {_fmt(s.get(KL_REF + '_late'), '.2f')} | "
                 f"{_fmt(s.get(KL_PREV + '_early'), '.3f')} -> {_fmt(s.get(KL_PREV + '_late'), '.3f')} | "
                 f"{_fmt(s.get('entropy_bonus_trend'), '+.3f')} |")
    L.append("")
    L += main_job_lines(rloo + length["rloo"] + main_job + lora)
    L += offline_table(offline)

    L.append("## Figures\n")
    for key, caption in captions + [
        ("overopt", "Overoptimisation: gold win rate (solid) and proxy reward (dotted) of the same checkpoints, mean over seeds."),
        ("fig4", "Figure 4 analogue: batch mean of log pi_ref(y_w|x) - log pi_ref(y_l|x) during DPO (`ref/logratio`)."),
        ("fig6", "Figure 6 analogue: SimPO gold win rate per checkpoint for several gamma, one panel per learning rate."),
    ]:
        if key in figs:
            L.append(f"![{key}]({Path(figs[key]).name})\n\n{caption}\n")

    L += length_section(length, length_rm, length_pairs)
    L += lora_section(lora, rloo, report_dir)
    L += pairwise_section(pairwise, rloo, report_dir)
    L += claims_table(stats, offline, main_lrs, extra_lrs=[lr for lr in lrs if lr not in main_lrs], ceiling=ceiling,
                      length=length, length_rm=length_rm)
    notes = report_dir / "notes.md"
    if notes.exists():
        L.append("## Notes (written by whoever ran the sweep; not generated)\n")
        L.append(notes.read_text())
    out = report_dir / "report.md"
    out.write_text("\n".join(L) + "\n")
    return out


def _trajectory(s: dict) -> str:
    return rules.trajectory(s["sft"], s["peak"], s["final"]) if s.get("sft") is not None else "-"


def cost_lines(rloo, offline: dict, build_s, meta: dict, extra=()) -> list[str]:
    """The sweep's cost in one process on this machine: the artifact build plus every run's training and
    evaluation seconds (DONE.json), whatever number of processes actually ran them; `extra`: the runs of
    the further conditions (sweep.CONDITIONS), beside the estimate written into sweep.json before the sweep."""
    names = set(meta.get("rloo_runs") or [r.name for r in rloo]) | set(meta.get("offline_runs") or offline)
    names |= {n for c in (meta.get("conditions") or {}).values() for n in c.get("runs", [])}
    names -= {Path(k).name for k in meta.get("reused_runs") or {}}  # main-grid runs stand for these: not run twice
    runs = [r for r in list(rloo) + list(offline.values()) + list(extra) if r.name in names]
    outside = [r.name for r in rloo if r.name not in names]
    train = sum(r.info.get("seconds", 0.0) for r in runs)
    ev = sum(r.info.get("eval_seconds", 0.0) for r in runs)
    no_eval = sum(1 for r in runs if "eval_seconds" not in r.info)
    total = (build_s or 0.0) + train + ev
    missing = sorted(names - {r.name for r in list(rloo) + list(offline.values()) + list(extra)})
    out = [f"Cost of the sweep in one process on this machine, added up from the runs' `DONE.json` and the artifacts' "
           f"build records: artifacts {(build_s or 0) / 60:.1f} min + training {train / 60:.1f} min + evaluation "
           f"{ev / 60:.1f} min = **{total / 60:.0f} min** for {len(runs)} runs ({sum(r in rloo for r in runs)} RLOO, "
           f"{sum(r in offline.values() for r in runs)} offline"
           + (f", {sum(r in extra for r in runs)} of further conditions" if any(r in extra for r in runs) else "") + ")"
           + (f"; {no_eval} run(s) have no evaluation time recorded" if no_eval else "")
           + (f". Runs in the directory outside the sweep, also in the tables: {', '.join(outside)}" if outside else "")
           + ".\n"]
    est = meta.get("estimate_minutes")
    if est:
        out.append(f"Estimated before the sweep (`sweep.estimate_minutes`, from measured per-run times): "
                   f"{est['total']:.0f} min, of which " + ", ".join(f"{k} {v:.0f}" for k, v in est.items() if k != "total")
                   + (f"; disabled conditions (no config yet): {', '.join(meta.get('disabled_conditions'))}"
                      if meta.get("disabled_conditions") else "") + ".\n")
    if missing:
        out.append(f"**Not finished** ({len(missing)} planned runs, absent from every table): {', '.join(missing)}.\n")
    return out


def position_lines(runs) -> list[str]:
    """toy-gold's position statistics over every checkpoint judged in both orders (evaluate_judge --both_orders)."""
    rows = [r for run in runs if run.gold and run.gold.get("both_orders")
            for r in run.gold.get("checkpoints", []) + [run.gold.get("baseline") or {}] if r.get("n_both_orders")]
    if not rows:
        return ["Judge position check: no checkpoint was judged in both orders (`evaluate_judge.py --both_orders`).\n"]
    cons = [r["position_consistency"] for r in rows]
    first = [r["first_position_rate"] for r in rows]
    n = sum(r["n_both_orders"] for r in rows)
    return [f"Judge position check: every checkpoint was judged by toy-gold in both orders (`--both_orders`, each order "
            f"half a judgment): {len(rows)} checkpoints, {n} examples judged validly in both orders; position consistency "
            f"{min(cons):.1%} (lowest checkpoint) to {max(cons):.1%}, first-position preference {min(first):.1%} to "
            f"{max(first):.1%}. toy-gold scores each summary on its own and prefers the higher score, so swapping A and "
            "B swaps the scores; only its tie rule (|score A - score B| < 1e-9 is a tie) could depend on the order, and "
            "it is symmetric. So it is consistent by construction and every example contributes exactly one first-position "
            "and one second-position preference (a tie: half each): 100% and 50% are what an order-free judge must show, "
            "and what an LLM judge is measured against with the same flag.\n"]


def main_job_lines(rloo) -> list[str]:
    """Which run of the sweep each configs/toy/*.yaml RLOO config is (same values for every key it sets),
    so numbers quoted for those configs (README, the configs' comments) come from a run in the tables."""
    import dataclasses

    from ..config import load_yaml
    from ..evaluation import EvalArgs
    from .scripts import scripts_dir
    from .sweep import REGULARIZERS

    # keys that only configure the in-training evaluation (training is the same without it)
    evaluation_only = {f.name for f in dataclasses.fields(EvalArgs)}
    rows = []
    for f in sorted((scripts_dir() / "configs" / "toy").glob("*.yaml")):
        want = {k: v for k, v in (load_yaml(f) or {}).items() if k != "output_dir" and k not in evaluation_only}
        if "regularizer" not in want:
            continue
        # a sweep regulariser's config must also be the one the run was made from (minent = maxent with a negative entropy_coef)
        match = [r for r in rloo if all(_same(r.config.get(k), v) for k, v in want.items())
                 and (f.stem not in REGULARIZERS or _reg_key(r) == f.stem)]
        st = analyse(match[0]) if match else {}
        numbers = (f"{_fmt(st.get('sft'), '.1%')} -> {_fmt(st['peak'], '.1%')} ({st['peak_step']}) -> {_fmt(st['final'], '.1%')} | "
                   f"{_fmt(st.get('proxy_at_peak'), '.2f')} -> {_fmt(st.get('proxy_final'), '.2f')}") if "final" in st else "- | -"
        rows.append(f"| configs/toy/{f.name} | {', '.join(r.name for r in match) if match else 'not in this sweep'} | {numbers} |")
    if not rows:
        return []
    return ["## The toy configs in this sweep\n", "Each `configs/toy` RLOO config against the sweep's runs (a run matches "
            "when its resolved config has the same value for every training key the file sets, and, for a "
            "regulariser's own config, was made from it; the in-training evaluation keys are left out), with the first "
            "matching run's gold win rate (SFT -> peak (step) -> final) and proxy reward (at the gold peak -> final): "
            "the numbers the README and the configs' comments may quote.\n",
            "| config | run | gold win rate | proxy reward |", "|---|---|---|---|", *rows, ""]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def offline_table(offline: dict) -> list[str]:
    rows = [analyse_offline(r) | {"run": r} for r in offline.values()]
    rows = [x for x in rows if "final" in x]
    if not rows:
        return []
    L = ["## Every offline run\n", "Gold win rate against the references per checkpoint of DPO and SimPO (step 0 = SFT), and the proxy "
         "reward of the same greedy summaries (overoptimised: rules.py, as for the RLOO runs).\n",
         "| run | loss | lr | beta | gamma | SFT | peak (step) | final | drop | trajectory | proxy peak -> final | overoptimised |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        c = x["run"].config
        L.append(f"| {x['name']} | {x['loss']} | {x['lr']:g} | {c.get('beta', '-')} | {_fmt(x['gamma'], 'g')} | {_fmt(x['sft'])} | "
                 f"{_fmt(x['peak'])} ({x['peak_step']}) | {_fmt(x['final'])} | {x['drop'] * 100:.0f} | {_trajectory(x)} | "
                 f"{_fmt(x.get('proxy_at_peak'), '.2f')} -> {_fmt(x.get('proxy_final'), '.2f')} | {_yes(x.get('overoptimised'))} |")
    L.append("")
    return L


def _group_final(stats, variant, lr, default_coef_only=True):
    """Finished runs of one regulariser variant at one lr (by default at the sweep's default coefficient)."""
    return [s for s in _judged(stats) if s.get("variant") == variant and abs(s["lr"] - lr) < 1e-12
            and (s.get("default_coef", True) or not default_coef_only)]


ENTROPY_VARIANTS = ("maxent", "entropy")  # the reference-free maximum-entropy objectives (Eqs. 7 and 6)


def _judged(stats) -> list[dict]:
    """The analysed runs (`analyse`) with a final checkpoint and an SFT baseline: the ones a rule can judge."""
    return [s for s in stats if "final" in s and s.get("sft") is not None]


def _outcomes(sel) -> list[claims.Outcome]:
    return [claims.Outcome(s["name"], s["sft"], s["peak"], s["final"], s.get("proxy_at_peak"), s.get("proxy_final"))
            for s in sel]


def claims_table(stats: list, offline: dict, lrs: list, extra_lrs=(), ceiling: Optional[float] = None,
                 length: Optional[dict] = None, length_rm: Optional[dict] = None) -> list[str]:
    """The claim table: each row's verdict is one rule of `claims` applied to numbers of the sweep, with
    the runs, metric and estimator that rules.py registers for it."""
    L = ["## Claims of the paper (Sections 3-4, Appendix B) against the toy lab\n",
         "Each verdict is a rule of `maxent_rlhf/toylab/claims.py` with the thresholds, terms and run selections of "
         "`maxent_rlhf/toylab/rules.py`, both fixed before the sweep (provenance above), each rule unit-tested in "
         "`tests/test_toylab_claims.py` on synthetic series for every verdict it can give: **agrees**, **partly**, "
         "**disagrees**, **not testable here** (the data exist but could not have come out the other way on this toy), "
         "or **n/a** (the sweep lacks the data). The rules, below the table, say what would have made each disagree. "
         "A toy model on a synthetic task is not Pythia on TL;DR: agreement shows the mechanism can appear, "
         "disagreement that it is not universal.\n",
         "| # | paper claim | toy-lab evidence | rule | verdict |", "|---|---|---|---|---|"]
    rules_seen: list[str] = []  # each distinct rule once, below the table
    all_lrs = sorted(set(lrs) | set(extra_lrs))
    hi = lrs[-1] if lrs else None
    low = rules.low_lr(hi) if hi is not None else None

    def row(i, claim, v: claims.Verdict):
        if v.rule not in rules_seen:
            rules_seen.append(v.rule)
        L.append(f"| {i} | {claim} | {v.evidence or '-'} | R{rules_seen.index(v.rule) + 1} | {v.cell()} |")

    ent = lambda lr, default=True: [s for p in ENTROPY_VARIANTS for s in _group_final(stats, p, lr, default)]  # noqa: E731
    below = [lr for lr in all_lrs if hi is not None and lr < hi]
    # 1. MaxEnt overoptimises at the high lr for every coefficient (coefficient 0 = the no-regulariser runs)
    if hi is not None:
        by_coef: dict = {}
        for s in _group_final(stats, "maxent", hi, default_coef_only=False):
            by_coef.setdefault(float(s["coef"]), []).append(s)
        by_coef[0.0] = _group_final(stats, "none", hi)
        row(1, f"4.2: at the lr where KL works ({hi:g}), MaxEnt (Eq. 7) runs rapidly overoptimise regardless of the "
               "entropy coefficient", claims.rule_overoptimise_regardless_of_coef(
                   {c: _outcomes(v) for c, v in by_coef.items()}))
    # 2. a lower lr stabilises MaxEnt: decided at rules.low_lr() (the KL lr / 10); other rates reported beside
    for lr in sorted(below, key=lambda x: (abs(x - low) > 1e-12 * max(low, 1e-30), -x)):
        sel = ent(lr)
        decides = abs(lr - low) <= 1e-12 * low
        if sel or decides:
            v = claims.rule_stable_and_improving(_outcomes(sel))
            if not decides:  # reported, never a verdict: the rate was not fixed by rule before the sweep
                v = claims.Verdict(v.level, v.evidence, v.rule, "reported beside the pre-registered rate; decides nothing")
            row(2, f"4.2: a lower lr ({lr:g}{', = the KL lr / 10, pre-registered' if decides else ''}) stabilises MaxEnt "
                   "and improves on SFT (1B)", v)
    if low is not None and not any(abs(lr - low) <= 1e-12 * low for lr in below):
        row(2, f"4.2: a lower lr ({low:g}, = the KL lr / 10, pre-registered) stabilises MaxEnt and improves on SFT (1B)",
            claims.rule_stable_and_improving([]))
    # 3. the gains are not due to the entropy term
    row(3, "4.2: the low-lr gains are not due to the entropy term: coefficient 0 does as well",
        claims.rule_gain_not_from_entropy({lr: (_outcomes(ent(lr)), _outcomes(_group_final(stats, "none", lr)))
                                          for lr in below}, ceiling))
    # 4. entropy bonus decays in stable runs, grows in overoptimised ones (every entropy run, every coefficient)
    e4 = [s for lr in all_lrs for s in ent(lr, default=False) if "entropy_bonus_trend" in s]
    row(4, "4.2: stable runs show decaying entropy bonuses, overoptimised runs increasing ones",
        claims.rule_entropy_trend([s["entropy_bonus_trend"] for s in e4 if _trajectory(s) == "stable"],
                                  [s["entropy_bonus_trend"] for s in e4 if s.get("overoptimised")]))
    # 5. KL stable and effective at the high lr
    if hi is not None:
        row(5, f"4.2: KL-constrained RLHF stays stable and effective at the higher lr ({hi:g})",
            claims.rule_stable_and_improving(_outcomes(_group_final(stats, "kl", hi))))
    # 6. KL budget; 7. KL between consecutive policies (one row per lr with both kinds of runs)
    pairs = [(lr, _group_final(stats, "kl", lr), ent(lr)) for lr in all_lrs]
    pairs = [(lr, k, e) for lr, k, e in pairs if k and e]
    for lr, k, e in pairs:
        row(6, f"4.2: KL-constrained runs keep KL(pi||pi_ref) bounded; reference-free runs drift further (lr {lr:g}, "
               f"{rules.KL_REF_PRIMARY})",
            claims.rule_kl_ref_bounded([s["kl_ref_growth"] for s in k if "kl_ref_growth" in s],
                                       [s["kl_ref_growth"] for s in e if "kl_ref_growth" in s],
                                       [s[KL_REF + "_late"] for s in k if KL_REF + "_late" in s],
                                       [s[KL_REF + "_late"] for s in e if KL_REF + "_late" in s]))
    growth = lambda sel: {n: [s["kl_prev_growth"][n] for s in sel if n in s.get("kl_prev_growth", {})]  # noqa: E731
                          for n in rules.KL_PREV_ESTIMATES}
    for lr, k, e in pairs:
        ess = [s["kl_prev_ess"] for s in k + e if "kl_prev_ess" in s]
        row(7, f"4.2: KL(pi_t||pi_t-1) between consecutive policies stays bounded under KL but grows over training "
               f"under MaxEnt (lr {lr:g})", claims.rule_kl_prev_growth(growth(k), growth(e), statistics.median(ess) if ess else None))
    # 8. minimum entropy prevents overoptimisation at the KL lr
    if hi is not None:
        row(8, f"4.2.1: minimum entropy prevents overoptimisation at the KL learning rate ({hi:g}) (1B)",
            claims.rule_stable_and_improving(_outcomes(_group_final(stats, "minent", hi))))
    # 9. DPO reference log-ratio: typically negative but small, in a narrow range
    dpo = offline.get("dpo")
    if dpo is not None:
        sd = dpo.series("ref/logratio_std")[1]  # per-example spread, where the trainer logs it
        row(9, "4.3: during DPO the reference log-ratio log pi_ref(y_w)/pi_ref(y_l) is typically negative but small and "
               "stays in a narrow range, like a fixed margin",
            claims.rule_ref_logratio_band(dpo.series("ref/logratio")[1], int(dpo.config.get("global_batch_size") or 0),
                                          statistics.median(sd) if sd else None))
    # 10-13. SimPO
    simpo = [s for s in (analyse_offline(r) for n, r in offline.items() if n.startswith("simpo"))
             if "final" in s and s.get("sft") is not None]
    slrs = sorted({s["lr"] for s in simpo})
    at = lambda lr: sorted((s for s in simpo if s["lr"] == lr), key=lambda s: s["gamma"] or 0.0)  # noqa: E731
    so = lambda sel: [claims.Outcome(f"gamma {s['gamma']:g}", s["sft"], s["peak"], s["final"],  # noqa: E731
                                     s.get("proxy_at_peak"), s.get("proxy_final")) for s in sel]
    if len(slrs) > 1:
        row(10, f"App. B: at the high lr ({slrs[-1]:g}) every SimPO gamma overoptimises", claims.rule_all_overoptimise(so(at(slrs[-1]))))
    for lr in slrs[:-1] if len(slrs) > 1 else slrs:
        row(11, f"App. B: at a low lr ({lr:g}) SimPO performs well (improves on SFT; 'can still experience' overoptimisation)",
            claims.rule_stable_and_improving(so(at(lr))))
    if slrs:
        sel = at(slrs[0])
        g0 = [s["peak"] for s in sel if not s["gamma"]]
        row(12, f"App. B: an appropriate margin gamma > 0 improves on gamma = 0 (lowest lr, {slrs[0]:g})",
            claims.rule_margin_helps(g0[0] if g0 else None, {float(s["gamma"]): s["peak"] for s in sel if s["gamma"]}, ceiling))
    for lr in slrs:
        row(13, f"App. B: a larger margin makes SimPO's overoptimisation worse (lr {lr:g})",
            claims.rule_larger_margin_worse({float(s["gamma"] or 0.0): o for s, o in zip(at(lr), so(at(lr)))}))
    # 14. entropy regularisation may exacerbate overoptimisation
    row(14, "Abstract, Sec. 5: entropy regularisation does not reliably prevent reward hacking and may, in some cases, "
            "exacerbate it", claims.rule_entropy_exacerbates(
                {lr: (_outcomes(ent(lr)), _outcomes(_group_final(stats, "none", lr))) for lr in all_lrs}))
    # 15-16. the length channel
    length = length or {}
    rm = length_rm or {}
    lg = lambda rs: [rules.length_growth(s["len_sft"], s["len_final"]) for s in rs if s.get("len_final") is not None  # noqa: E731
                     and s.get("len_sft") is not None]
    ls = [analyse(r) for r in length.get("rloo", [])]
    lo = [analyse_offline(r) | {"length_normalize": r.config.get("length_normalize", True)} for r in length.get("offline", [])]
    row(15, "3.3 (Eq. 7): length normalisation of the entropy term prevents length exploitation (online, length-channel toy)",
        claims.rule_length_normalisation_curbs(lg([s for s in ls if s["variant"] == "length_entropy"]),
                                               lg([s for s in ls if s["variant"] == "length_maxent"]),
                                               rm.get("rm_prefers_longer"), rm.get("gold_prefers_longer")))
    row(16, "3.2: SimPO is prone to severe length exploitation without length normalisation (offline, length-channel toy)",
        claims.rule_simpo_length_exploitation(lg([s for s in lo if s["length_normalize"]]),
                                              lg([s for s in lo if not s["length_normalize"]]),
                                              rm.get("rm_prefers_longer"), rm.get("gold_prefers_longer")))
    L.append("\nRules (thresholds: `rules.py`; what would have made each disagree is in its text):\n")
    L += [f"- R{i + 1}: {r}" for i, r in enumerate(rules_seen)]
    L.append("\nRuns, metric and estimator of each claim (`rules.CLAIM_INPUTS`):\n")
    L += [f"- {i}: {runs}; {metric}; {est}" for i, (runs, metric, est) in rules.CLAIM_INPUTS.items()]
    L.append("")
    return L


def task_ceiling(cache: Optional[Path]) -> Optional[float]:
    """The best gold win rate against the references the task allows: the ideal summary (every key fact,
    nothing else) against each test post's reference (ties count 1/2)."""
    from . import task
    from .build import read_jsonl

    if cache is None or not (cache / "prompts" / "test.jsonl").exists():
        return None
    rows = read_jsonl(cache / "prompts" / "test.jsonl")
    prefs = [task.gold_preference(task.key_summary(r["facts"]), r["completion"], r["prompt"]) for r in rows]
    return sum(prefs) / len(prefs) if prefs else None


KL_PANELS = (  # (metric key, y label) of the robust Figure 3 analogue
    (rules.KL_REF_KEYS["k1"], "KL(pi_t||pi_ref) k1"), (rules.KL_REF_KEYS["k3"], "KL(pi_t||pi_ref) k3"),
    *((key, name) for name, key in rules.KL_PREV_ESTIMATES.items()), (rules.KL_PREV_ESS, "ESS fraction (kl_prev)"),
)


def _seed_lines(runs, key: str) -> tuple[list[tuple[list, list]], tuple[list, list]]:
    """Each run's logged series of `key`, and the median over runs at the iterations every run logged."""
    curves = [r.series(key) for r in runs]
    curves = [c for c in curves if c[0]]
    if not curves:
        return [], ([], [])
    common = sorted(set.intersection(*(set(xs) for xs, _ in curves)))
    med = [statistics.median(ys[xs.index(s)] for xs, ys in curves) for s in common]
    return curves, (common, med)


def plot_kl_estimates(runs, path: Path, title: str = "") -> Path:
    """Figure 3 analogue without averaging artefacts: per panel one estimate, per regulariser a thin line
    per seed (no smoothing) and a thick median over seeds."""
    plt = plotting._plt()
    fig, axes = plt.subplots(4, 2, figsize=(11, 11), sharex=True)
    groups = sorted(plotting._groups(runs, _label).items())
    for ax, (key, ylabel) in zip(axes.flat, KL_PANELS):
        for g, (name, rs) in enumerate(groups):
            curves, (xs, med) = _seed_lines(rs, key)
            for cx, cy in curves:
                ax.plot(cx, cy, color=f"C{g}", lw=0.6, alpha=0.35)
            if xs:
                ax.plot(xs, med, color=f"C{g}", lw=2, label=name)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if key != rules.KL_PREV_ESS:
            ax.set_yscale("symlog", linthresh=1e-3)
    for ax in axes.flat[len(KL_PANELS):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    if title:
        fig.suptitle(title + " (thin: seeds as logged; thick: median over seeds)", fontsize=10)
    return plotting._save(fig, path)


def kl_spikes(runs, key: str = rules.KL_REF_KEYS["k3"], factor: float = 10.0, window: int = 5) -> list[tuple]:
    """(run, iteration, value, median of its +-window neighbours, k1 at that iteration) for each logged
    value > factor x its neighbours' median and > 1 nat: single-batch outliers of the estimate."""
    out = []
    for r in runs:
        xs, ys = r.series(key)
        k1 = dict(zip(*r.series(rules.KL_REF_KEYS["k1"])))
        for i, (x, y) in enumerate(zip(xs, ys)):
            nb = ys[max(0, i - window):i] + ys[i + 1:i + 1 + window]
            if nb and y > 1.0 and y > factor * max(statistics.median(nb), 1e-8):
                out.append((r.name, x, y, statistics.median(nb), k1.get(x)))
    return out


def spike_note(runs) -> str:
    sp = kl_spikes(runs)
    every = sorted({int(r.metrics[-1].get("objective/kl_ref_every", 1)) for r in runs if r.metrics})
    note = f" KL_ref is logged every {', '.join(map(str, every)) or '?'} iteration(s)."
    if not sp:
        return note + " No single-batch k3 outlier (> 10x the median of its 5 neighbours on each side)."
    shown = "; ".join(f"{n} it {x}: k3 {y:.1f} vs {m:.2f} around it (k1 {_fmt(k, '.2f')})" for n, x, y, m, k in sp[:8])
    return note + (f" Single-batch k3 outliers (> 10x the median of their neighbours): {shown}"
                   + (f"; {len(sp) - 8} more" if len(sp) > 8 else "") + ". A moving mean would spread each over "
                   "its window as a flat plateau; the median over seeds does not.")


def lora_rank(run: plotting.Run) -> Optional[int]:
    """The LoRA rank of a run (None for full fine-tuning)."""
    return int(run.config["lora_r"]) if run.config.get("use_peft") else None


def lora_section(lora, rloo, report_dir: Path) -> list[str]:
    """LoRA vs full fine-tuning (rules.py): gold win-rate trajectories and the pre-registered verdict."""
    if not lora:
        return []
    full = [r for r in rloo if _reg_key(r) == "maxent" and _default_coef(r)
            and any(abs(_lr(r) - lr) < 1e-12 for lr in rules.LORA_LRS)]
    seeds = sorted({r.config.get("seed") for r in lora})
    full = [r for r in full if r.config.get("seed") in seeds]  # the same seeds
    name = lambda r: f"LoRA r={lora_rank(r)}" if lora_rank(r) else "full fine-tuning"  # noqa: E731
    fig = plotting.plot_winrate_per_checkpoint(
        full + lora, report_dir / "fig_lora_gold.png", label=name, panel=lambda r: f"maxent (Eq. 7), lr {_lr(r):g}",
        title="LoRA vs full FT: gold (solid), proxy (dotted), mean over seeds", proxy=True)
    by_rank: dict = {}
    for r in lora:
        by_rank.setdefault(lora_rank(r), []).extend(_judged([analyse(r)]))
    v = claims.rule_lora_prevents_collapse(_outcomes(_judged(map(analyse, full))),
                                           {k: _outcomes(rs) for k, rs in by_rank.items()})
    L = ["## LoRA vs full fine-tuning: does the rank constraint alone prevent the collapse?\n",
         f"Maximum-entropy RLOO (Eq. 7) with a LoRA policy (ranks {sorted(by_rank)}, lora_alpha = 2 r, the reference = "
         f"the adapter switched off) against the main grid's full-fine-tuning maxent runs at the same learning rate(s) "
         f"{sorted({_lr(r) for r in lora})} and seeds {seeds}; the same optimiser settings, so LoRA's different effective "
         "step is part of what is compared.\n",
         f"![lora]({Path(fig).name})\n",
         "| runs | SFT | peak (step) | final | trajectory | overoptimised |", "|---|---|---|---|---|---|"]
    for r in full + sorted(lora, key=lambda r: (lora_rank(r), r.name)):
        st = analyse(r)
        if "final" in st:
            L.append(f"| {name(r)} {r.name} | {_fmt(st.get('sft'))} | {_fmt(st['peak'])} ({st['peak_step']}) | "
                     f"{_fmt(st['final'])} | {_trajectory(st)} | {_yes(st.get('overoptimised'))} |")
    L += ["", f"Verdict on \"LoRA prevents the collapse\": **{v.cell()}**. Evidence: {v.evidence or '-'}. Rule: {v.rule}.\n"]
    return L


PAIRWISE_LABELS = {  # condition (sweep.CONDITIONS' name, the run name before _lr) -> what it keeps of SimPO's protections
    "pairwise_offline_simpo": "offline SimPO (dataset + margin)",
    "pairwise_offline_simpo_gamma0": "offline SimPO gamma 0 (dataset only)",
    "online_simpo": "online SimPO (margin only)",
    "online_simpo_gamma0": "online SimPO gamma 0 (neither)",
    "online_dpo": "online DPO (reference)",
    "maxent": "online MaxEnt RLOO (Eq. 7)",
    "kl": "online KL RLOO",
}


def _condition(run: plotting.Run) -> str:
    return run.name.rsplit("_lr", 1)[0]


def pairwise_runs(sweep_dir: Path, meta: dict) -> list[plotting.Run]:
    """The online pairwise experiment's runs (pairwise/offline, pairwise/online), each under its condition's run
    name; a condition run the sweep did not repeat because the main grid has the identical run (sweep.json
    `reused_runs`) is that main-grid run, renamed, with info["reused_from"] saying so."""
    runs = _load(sweep_dir / "pairwise" / "offline") + _load(sweep_dir / "pairwise" / "online")
    have = {r.name for r in runs}
    for key, source in sorted((meta.get("reused_runs") or {}).items()):
        if not key.startswith("pairwise/") or Path(key).name in have:
            continue
        src = [r for r in _load((sweep_dir / source).parent) if r.name == Path(source).name]
        if src:
            runs.append(dataclasses.replace(src[0], path=sweep_dir / key, info={**src[0].info, "reused_from": source}))
    return runs


def _gamma(run: plotting.Run) -> Optional[float]:
    g = run.config.get("simpo_gamma")
    return float(g) if g is not None else None


def pairwise_section(pairwise, rloo, report_dir: Path) -> list[str]:
    """H1-H3 (rules.py): which of SimPO's protections, the dataset constraint or the target margin, keeps it stable;
    trajectories, a per-condition table and the pre-registered verdicts."""
    if not pairwise:
        return []
    lrs = rules.PAIRWISE_LRS
    seeds = sorted({r.config.get("seed") for r in pairwise})
    at = lambda r: any(abs(_lr(r) - lr) < 1e-12 for lr in lrs)  # noqa: E731
    rl = [r for r in rloo if _reg_key(r) in ("maxent", "kl") and _default_coef(r) and at(r) and r.config.get("seed") in seeds]
    runs = [r for r in pairwise if at(r)] + rl
    label = lambda r: PAIRWISE_LABELS.get(_condition(r), _condition(r))  # noqa: E731
    fig = plotting.plot_winrate_per_checkpoint(
        runs, report_dir / "fig_pairwise_gold.png", label=label, panel=lambda r: f"lr {_lr(r):g}",
        title="dataset constraint or margin? gold (solid), proxy (dotted), mean over seeds", proxy=True)
    done = lambda rs: _outcomes(_judged(map(analyse, rs)))  # noqa: E731
    group = lambda cond, lr: [r for r in runs if _condition(r) == cond and abs(_lr(r) - lr) < 1e-12]  # noqa: E731
    g = rules.PAIRWISE_GAMMA
    offline_by_gamma = {g: "pairwise_offline_simpo", 0.0: "pairwise_offline_simpo_gamma0"}
    online_by_gamma = {g: "online_simpo", 0.0: "online_simpo_gamma0"}
    h1 = claims.rule_dataset_constraint_stabilises(
        {(lr, gm): (done(group(offline_by_gamma[gm], lr)), done(group(online_by_gamma[gm], lr))) for lr in lrs for gm in (0.0, g)})
    h2 = claims.rule_margin_stabilises({lr: (done(group("online_simpo", lr)), done(group("online_simpo_gamma0", lr))) for lr in lrs})
    h3 = claims.rule_online_simpo_fails_like_maxent({lr: (done(group("online_simpo", lr)), done(group("maxent", lr))) for lr in lrs})
    reused = sorted(f"{r.name} = {r.info['reused_from']}" for r in pairwise if r.info.get("reused_from"))
    L = ["## Dataset constraint or margin? The online pairwise experiment (H1-H3)\n",
         "The paper explains SimPO's offline stability by \"dataset constraints and target margins\" (Sec. 1, 4.3, 5, "
         "App. B) without testing it. Each condition below keeps a different part of SimPO's protection: offline SimPO "
         "trains on the fixed preference pairs (dataset) with gamma > 0 (margin); online SimPO (`train_online.py`: k "
         "samples of the current policy, chosen = best and rejected = worst by the proxy) keeps only the margin; online "
         f"SimPO with gamma 0 keeps neither; online DPO replaces the margin by the reference. Rates {list(lrs)}, seeds "
         f"{seeds}, gamma {g:g} or 0; online MaxEnt and KL RLOO are the main grid's runs at the same rates and seeds. "
         "Hypotheses and rules were fixed in `maxent_rlhf/toylab/rules.py` before the runs.\n",
         f"![pairwise]({Path(fig).name})\n",
         "| condition | lr | runs | SFT | peak | final | trajectories | overoptimised | final pairwise accuracy / margin |",
         "|---|---|---|---|---|---|---|---|---|"]
    for cond in PAIRWISE_LABELS:
        for lr in lrs:
            rs = group(cond, lr)
            st = [s for s in map(analyse, rs) if "final" in s]
            if not st:
                continue
            trajs = {}
            for s in st:
                t = rules.trajectory(s["sft"], s["peak"], s["final"]) if s.get("sft") is not None else "?"
                trajs[t] = trajs.get(t, 0) + 1
            acc = _mean([r.series("rewards/accuracies")[1][-1] for r in rs if r.series("rewards/accuracies")[1]])
            margin = _mean([r.series("rewards/margins")[1][-1] for r in rs if r.series("rewards/margins")[1]])
            L.append(f"| {label(rs[0])} | {lr:g} | {len(st)} | {_fmt(_mean([s.get('sft') for s in st]))} | "
                     f"{_fmt(_mean([s['peak'] for s in st]))} | {_fmt(_mean([s['final'] for s in st]))} | "
                     + ", ".join(f"{n} {t}" for t, n in sorted(trajs.items())) + " | "
                     f"{sum(1 for s in st if s.get('overoptimised'))}/{len(st)} | "
                     + (f"{acc:.2f} / {margin:.2f}" if acc is not None and margin is not None else "-") + " |")
    L += ["", "Win rates: mean over seeds. Pairwise accuracy / margin: the last logged batch's `rewards/accuracies` and "
          "`rewards/margins` (the loss's own implicit rewards), mean over seeds.\n"]
    if reused:
        L.append("Runs identical to a main-grid run (same script, config, rate, seed and options) were not run twice; "
                 "the condition reads the main grid's run: " + "; ".join(reused) + ".\n")
    verdicts = (("H1", "the dataset constraint stabilises: offline SimPO stays stable where online SimPO at the same rate "
                       "and gamma overoptimises", h1),
                ("H2", "the margin stabilises: online SimPO with gamma > 0 is more stable than with gamma 0", h2),
                ("H3", "online SimPO fails like online maximum-entropy RLOO (Eq. 7)", h3))
    L += ["| # | hypothesis | toy-lab evidence | verdict |", "|---|---|---|---|"]
    L += [f"| {name} | {text} | {v.evidence or '-'} | {v.cell()} |" for name, text, v in verdicts]
    L += ["", "Rules (runs; metric; statistic, from `rules.HYPOTHESES`):", ""]
    L += [f"- {name}: {'; '.join(rules.HYPOTHESES[name])}. {v.rule}" for name, _, v in verdicts]
    L.append("")
    return L


def length_section(length: dict, rm: Optional[dict], pair_stats: Optional[dict]) -> list[str]:
    """The length-channel toy: its requirements and every run's greedy summary length."""
    L = ["## The length channel\n",
         "Build profile `length`: the main toy's SFT policy and prompts, but preference pairs labelled by raters who "
         "add 0.25 gold points per summary token (a taste the gold judge does not share: it is neutral to length up "
         "to 12 tokens and takes 0.5 per token beyond), so the proxy reward model learns to prefer longer summaries; "
         "the length runs may write up to 24 tokens (16 in the main toy).\n"]
    if rm:
        L.append(f"Proxy of the length channel: held-out accuracy {rm['accuracy_vs_labels']:.3f} against its labels "
                 f"({'within' if 0.65 <= rm['accuracy_vs_labels'] <= 0.9 else 'OUTSIDE'} 0.65-0.90), "
                 f"{rm['accuracy_vs_gold']:.3f} against the noiseless gold preference; of {rm.get('n_length_differs', '?')} "
                 f"held-out pairs of different lengths it prefers the longer summary in {_fmt(rm.get('rm_prefers_longer'), '.0%')}, "
                 f"the gold judge in {_fmt(rm.get('gold_prefers_longer'), '.0%')}"
                 + (f"; its labels prefer the longer in {pair_stats['labels_prefer_longer']:.0%}" if pair_stats and
                    "labels_prefer_longer" in pair_stats else "") + ".\n")
    rows = [(analyse(r), r) for r in length.get("rloo", [])] + [(analyse_offline(r), r) for r in length.get("offline", [])]
    rows = [(s, r) for s, r in rows if "final" in s]
    if rows:
        L += ["| run | lr | SFT | peak (step) | final | trajectory | proxy peak -> final | overoptimised | length SFT -> final (tokens) |",
              "|---|---|---|---|---|---|---|---|---|"]
        for s, r in rows:
            oo = rules.overoptimised(s["peak"], s["final"], s.get("proxy_at_peak"), s.get("proxy_final"))
            L.append(f"| {s['name']} | {s['lr']:g} | {_fmt(s.get('sft'))} | {_fmt(s['peak'])} ({s['peak_step']}) | "
                     f"{_fmt(s['final'])} | {_trajectory(s)} | {_fmt(s.get('proxy_at_peak'), '.2f')} -> "
                     f"{_fmt(s.get('proxy_final'), '.2f')} | {_yes(oo)} | {_fmt(s.get('len_sft'), '.1f')} -> "
                     f"{_fmt(s.get('len_final'), '.1f')} |")
        L.append("")
    return L


def _yes(x: Optional[bool]) -> str:
    return "-" if x is None else "yes" if x else "no"


def exploit_section(sweep_dir: Path, s: dict) -> list[str]:
    """What the overoptimised policy does, by the gold judge's breakdown of its greedy summaries."""
    from . import task
    from .build import read_jsonl

    run = sweep_dir / "rloo" / s["name"]
    gens = run / "eval_gold" / "generations"
    cache = _artifact_dir()
    if cache is None or not (cache / "prompts" / "test.jsonl").exists() or not gens.is_dir():
        return []
    posts = {r["id"]: r for r in read_jsonl(cache / "prompts" / "test.jsonl")}
    files = [("SFT", gens / "sft_baseline.jsonl"), (f"peak (step {s['peak_step']})", gens / f"step_{s['peak_step']:08d}.jsonl"),
             (f"final (step {s['final_step']})", gens / f"step_{s['final_step']:08d}.jsonl")]
    L = [f"## What overoptimisation looks like ({s['name']})\n",
         "Means over the test posts of the gold judge's breakdown of the greedy summaries (4 facts is perfect), "
         "and the proxy reward of the same checkpoints:\n",
         "| checkpoint | gold score | facts hit | length | repeats | distractor words | hallucinated words | proxy reward |",
         "|---|---|---|---|---|---|---|---|"]
    examples = {}
    for label, f in files:
        if not f.exists():
            continue
        rows = [r for r in read_jsonl(f) if r["id"] in posts]
        bs = [task.gold_breakdown(r["generation"], posts[r["id"]]["prompt"], posts[r["id"]]["facts"]) for r in rows]
        step = 0 if label == "SFT" else int(label.split("step ")[1].rstrip(")"))
        proxy = s["proxy"].get(step)
        mean = lambda a: statistics.mean(getattr(b, a) for b in bs)  # noqa: E731
        L.append(f"| {label} | {mean('score'):.2f} | {mean('facts_hit'):.2f} | {mean('length'):.1f} | {mean('repeats'):.2f} | "
                 f"{mean('distractor_words'):.2f} | {mean('hallucinated_words'):.2f} | {_fmt(proxy, '.2f')} |")
        examples[label] = {r["id"]: r["generation"] for r in rows}
    L.append("\nThe same three posts at each checkpoint (gold score in brackets):\n")
    for pid in list(posts)[:3]:
        L.append(f"- facts {posts[pid]['facts']}, reference `{posts[pid]['completion'].strip()}`")
        for label, ex in examples.items():
            if pid in ex:
                g = task.gold_score(ex[pid], posts[pid]["prompt"], posts[pid]["facts"])
                L.append(f"  - {label}: `{ex[pid]}` ({g:g})")
    L.append("")
    return L


def analyse_offline(run: plotting.Run) -> dict:
    xs, ys = run.winrate_curve(include_baseline=True)
    proxy = dict(zip(*run.proxy_curve(include_baseline=True)))
    loss = run.config.get("loss_type")
    out = {"name": run.name, "lr": _lr(run), "loss": loss, "gamma": run.config.get("simpo_gamma") if loss == "simpo" else None}
    if ys:
        i = max(range(len(ys)), key=lambda k: ys[k])
        out.update(sft=ys[0] if xs[0] == 0 else None, peak=ys[i], peak_step=xs[i], final=ys[-1], drop=ys[i] - ys[-1],
                   proxy_at_peak=proxy.get(xs[i]), proxy_final=proxy.get(xs[-1]))
        out["overoptimised"] = rules.overoptimised(out["peak"], out["final"], out["proxy_at_peak"], out["proxy_final"])
        out["len_sft"], out["len_final"] = _lengths(run)
    return out


def _read_json(p: Path, default=None):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def _artifact_dir(profile: Optional[str] = None) -> Optional[Path]:
    import os

    from .cache import default_cache_dir

    d = default_cache_dir() / (profile or os.environ.get("MAXENT_RLHF_TOYLAB_PROFILE", "default"))
    return d if d.is_dir() else None
