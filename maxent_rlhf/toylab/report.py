"""report.md and its figures from a sweep directory (`python -m maxent_rlhf.toylab report`).

Everything in the report is computed from the run directories (metrics.jsonl, eval_*/summary.json,
DONE.json) and the cached artifacts' build records; the claim table's verdicts follow stated rules.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from .. import plotting
from .sweep import REGULARIZER_LABELS

DROP = 0.10  # "falls at least 10 points below its in-run peak"


def _reg_key(run: plotting.Run) -> str:
    return run.name.split("_lr")[0]


def _lr(run: plotting.Run) -> float:
    return float(run.config.get("learning_rate", run.info.get("learning_rate", float("nan"))))


def analyse(run: plotting.Run) -> dict:
    xs, ys = run.winrate_curve(include_baseline=True)
    px, py = run.proxy_curve(include_baseline=True)
    out = {"name": run.name, "lr": _lr(run), "steps": xs, "win": ys, "proxy": dict(zip(px, py))}
    if not ys:
        return out
    i_peak = max(range(len(ys)), key=lambda i: ys[i])
    out.update(sft=ys[0] if xs and xs[0] == 0 else None, peak=ys[i_peak], peak_step=xs[i_peak], final=ys[-1],
               final_step=xs[-1], drop=ys[i_peak] - ys[-1])
    p_peak, p_final = out["proxy"].get(xs[i_peak]), out["proxy"].get(xs[-1])
    out.update(proxy_at_peak=p_peak, proxy_final=p_final)
    out["overoptimised"] = bool(out["drop"] >= DROP - 1e-9 and p_peak is not None and p_final is not None and p_final > p_peak)
    eb = run.series("objective/entropy_bonus")[1]
    if len(eb) >= 6:
        third = len(eb) // 3
        out["entropy_bonus_trend"] = statistics.mean(eb[-third:]) - statistics.mean(eb[:third])
    for key in ("objective/kl_ref_k3", "objective/kl_prev_k3"):
        v = run.series(key)[1]
        if v:
            third = max(1, len(v) // 3)
            out[key.split("/")[1] + "_early"] = statistics.mean(v[:third])
            out[key.split("/")[1] + "_late"] = statistics.mean(v[-third:])
    return out


def _fmt(x, spec=".0%"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def write_report(sweep_dir: str | Path, report_dir: str | Path = "report") -> Path:
    sweep_dir, report_dir = Path(sweep_dir), Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").exists() else {}
    rloo = [plotting.load_run(d) for d in sorted((sweep_dir / "rloo").glob("*")) if (d / "DONE.json").exists()]
    offline = {d.name: plotting.load_run(d) for d in sorted((sweep_dir / "offline").glob("*")) if (d / "DONE.json").exists()}
    stats = [analyse(r) for r in rloo]
    by_name = {s["name"]: s for s in stats}
    lrs = sorted({_lr(r) for r in rloo})
    figs = {}

    # ---- figures ------------------------------------------------------------------------------------
    label = lambda r: REGULARIZER_LABELS.get(_reg_key(r), _reg_key(r))  # noqa: E731
    captions = []
    for i, lr in enumerate(lrs):
        rs = [r for r in rloo if _lr(r) == lr]
        seeds = sorted({r.config.get("seed") for r in rs})
        key = f"reward_{i}"
        figs[key] = plotting.plot_reward_and_entropy(
            rs, report_dir / f"fig1_2_reward_entropy_lr{lr:g}.png", title=f"RLOO, lr {lr:g}", group=label)
        captions.append((key, f"Figures 1-2 analogue, lr {lr:g} (seeds {seeds}, mean): RLHF reward and entropy bonus "
                              "per regulariser; final gold win rate in the legend."))
    for i, lr in enumerate(lrs):
        rs = [r for r in rloo if _lr(r) == lr]
        key = f"kl_{i}"
        figs[key] = plotting.plot_kl(rs, report_dir / f"fig3_kl_lr{lr:g}.png", title=f"KL metrics, lr {lr:g}", group=label)
        captions.append((key, f"Figure 3 analogue, lr {lr:g}: KL(pi_t || pi_ref) (top) and KL between consecutive "
                              "policies (bottom), k3 estimates, symlog scale."))
    if rloo:
        figs["overopt"] = plotting.plot_winrate_per_checkpoint(
            rloo, report_dir / "fig_overopt_gold_vs_proxy.png", label=label, panel=lambda r: f"lr {_lr(r):g}",
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
    best_overopt = max(overopt, key=lambda s: s["drop"], default=None)
    rloo_secs = [r.info.get("seconds") for r in rloo if r.info.get("seconds")]

    L = []
    L.append("# Toy lab report\n")
    L.append("Generated by `python -m maxent_rlhf.toylab report` from the run directories of "
             f"`{sweep_dir}`. Every number below is computed from `metrics.jsonl` and the `evaluate_judge.py` "
             "summaries (judge `toy-gold` for win rates against the references, judge `reward-model` with "
             "`toylab://reward` for the proxy reward of the same greedy summaries).\n")
    if meta:
        L.append(f"Sweep: regularisers {meta.get('regularizers')}, learning rates {meta.get('lrs')}, seeds "
                 f"{meta.get('seeds')}, iterations {meta.get('iterations') or 'as configs/toy'}, "
                 f"{meta.get('eval_n')} test posts per checkpoint; SimPO gammas {meta.get('simpo_gammas')} at lrs "
                 f"{meta.get('simpo_lrs')}. Wall time of the last `sweep` invocation (runs finished earlier are skipped, "
                 "so this can be much less than the sweep's cost; see the training-time line and notes): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in meta.get("timings", {}).items()) + ".\n")
    secs_main = [r.info.get("seconds", 0) for r in rloo if meta.get("lrs") is None or _lr(r) in meta.get("lrs", [])]
    secs_off = [r.info.get("seconds", 0) for r in offline.values()]
    L.append(f"Training time summed over runs (excluding evaluation): {len(secs_main)} RLOO runs of the sweep "
             f"{sum(secs_main) / 60:.1f} min, {len(secs_off)} offline runs {sum(secs_off) / 60:.1f} min"
             + (f"; {len(rloo) - len(secs_main)} extra RLOO runs outside the sweep's learning rates" if len(rloo) > len(secs_main) else "")
             + ".\n")
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
    if build_s is not None:
        L.append(f"| first-use build of all artifacts | <= 5 min | {build_s:.0f} s | {'yes' if build_s <= 300 else 'NO'} |")
    if rloo_secs:
        L.append(f"| one toy RLOO run (incl. model loading; sweep runs) | <= 5 min | median {statistics.median(rloo_secs):.0f} s | "
                 f"{'yes' if statistics.median(rloo_secs) <= 300 else 'NO'} |")
    if pair_stats:
        L.append(f"\nPreference data: {pair_stats['pairs']} pairs of SFT samples (temperature 1) labelled by the gold "
                 f"judge with Bradley-Terry noise (labels agree with the noiseless gold preference on "
                 f"{pair_stats['label_gold_agreement']:.1%}); {pair_stats['gold_ties_dropped']} gold ties dropped.\n")

    if best_overopt:
        L += exploit_section(sweep_dir, best_overopt)

    L.append("## Every RLOO run\n")
    L.append("Gold win rate against the references per checkpoint (step 0 = SFT); peak and final; proxy reward "
             "(mean RM score of the greedy summaries) at the peak and final checkpoints; KL(pi||pi_ref) k3 at the end; "
             "trend of the entropy bonus (last third minus first third).\n")
    L.append("| run | lr | SFT | peak (step) | final | drop | proxy peak -> final | overoptimised | KL_ref late | KL_prev early -> late | entropy-bonus trend |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in stats:
        if "final" not in s:
            continue
        L.append(f"| {s['name']} | {s['lr']:g} | {_fmt(s.get('sft'))} | {_fmt(s['peak'])} ({s['peak_step']}) | {_fmt(s['final'])} | "
                 f"{s['drop'] * 100:.0f} | {_fmt(s.get('proxy_at_peak'), '.2f')} -> {_fmt(s.get('proxy_final'), '.2f')} | "
                 f"{'yes' if s.get('overoptimised') else 'no'} | {_fmt(s.get('kl_ref_k3_late'), '.2f')} | "
                 f"{_fmt(s.get('kl_prev_k3_early'), '.3f')} -> {_fmt(s.get('kl_prev_k3_late'), '.3f')} | "
                 f"{_fmt(s.get('entropy_bonus_trend'), '+.3f')} |")
    L.append("")

    L.append("## Figures\n")
    for key, caption in captions + [
        ("overopt", "Overoptimisation: gold win rate (solid) and proxy reward (dotted) of the same checkpoints, mean over seeds."),
        ("fig4", "Figure 4 analogue: batch mean of log pi_ref(y_w|x) - log pi_ref(y_l|x) during DPO (`ref/logratio`)."),
        ("fig6", "Figure 6 analogue: SimPO gold win rate per checkpoint for several gamma at two learning rates."),
    ]:
        if key in figs:
            L.append(f"![{key}]({Path(figs[key]).name})\n\n{caption}\n")

    L += claims_table(stats, offline, main_lrs, extra_lrs=[lr for lr in lrs if lr not in main_lrs])
    notes = report_dir / "notes.md"
    if notes.exists():
        L.append("## Notes (written by whoever ran the sweep; not generated)\n")
        L.append(notes.read_text())
    out = report_dir / "report.md"
    out.write_text("\n".join(L) + "\n")
    return out


def _group_final(stats, prefix, lr):
    sel = [s for s in stats if s["name"].startswith(prefix + "_") and abs(s["lr"] - lr) < 1e-12 and "final" in s]
    return sel


def claims_table(stats: list, offline: dict, lrs: list, extra_lrs=()) -> list[str]:
    L = ["## Claims of the paper (Sections 4.2-4.3, Appendix B) against the toy lab\n",
         "Verdicts follow the rule stated in each row; 'n/a' where the sweep did not run the needed configuration. "
         "A toy model on a synthetic task is not Pythia on TL;DR: agreement here shows the mechanism can appear, "
         "disagreement that it is not universal.\n",
         "| # | paper claim | toy-lab evidence | verdict |", "|---|---|---|---|"]
    lo, hi = (lrs[0], lrs[-1]) if lrs else (None, None)

    def row(i, claim, evidence, verdict):
        L.append(f"| {i} | {claim} | {evidence} | {verdict} |")

    def desc(sel):
        return ", ".join(f"{s['name']}: {_fmt(s['sft'])}->peak {_fmt(s['peak'])}->final {_fmt(s['final'])}" for s in sel)

    # 1. MaxEnt overoptimises at the high lr
    sel = [s for p in ("maxent", "entropy") for s in _group_final(stats, p, hi)] if hi else []
    if sel:
        n_over = sum(1 for s in sel if s["drop"] >= DROP or s["final"] < (s["sft"] or 0))
        row(1, "4.2: at the lr where KL works, MaxEnt runs rapidly overoptimise regardless of the entropy coefficient",
            desc(sel) + f". Rule: drop >= 10 points from peak or final below SFT in all runs ({n_over}/{len(sel)})",
            "agrees" if n_over == len(sel) else "partly" if n_over else "disagrees")
    # 2. low lr MaxEnt improves over SFT
    sel = [s for p in ("maxent", "entropy") for s in _group_final(stats, p, lo)] if lo and lo != hi else []
    if sel:
        n_up = sum(1 for s in sel if s["final"] > (s["sft"] or 1) and s["drop"] < DROP)
        row(2, "4.2: a lower lr stabilises MaxEnt and improves on SFT (1B)", desc(sel) +
            f". Rule: final > SFT and no 10-point drop ({n_up}/{len(sel)})",
            "agrees" if n_up == len(sel) else "partly" if n_up else "disagrees")
    for xlr in extra_lrs:
        sel = [s for p in ("maxent", "entropy") for s in _group_final(stats, p, xlr)]
        if sel:
            n_up = sum(1 for s in sel if s["final"] > (s["sft"] or 1) and s["drop"] < DROP)
            row("2b", f"4.2 (extra lr {xlr:g}, outside the required sweep): an even lower lr stabilises MaxEnt", desc(sel) +
                f". Rule: final > SFT and no 10-point drop ({n_up}/{len(sel)})",
                "agrees" if n_up == len(sel) else "partly" if n_up else "disagrees")
    # 3. gains not driven by entropy: coef 0 matches
    m, n = _group_final(stats, "maxent", lo) if lo else [], _group_final(stats, "none", lo) if lo else []
    if m and n:
        fm, fn = _mean([s["final"] for s in m]), _mean([s["final"] for s in n])
        row(3, "4.2: the low-lr gains are not due to the entropy term: coefficient 0 does as well",
            f"final win, lr {lo:g}: length-normalised entropy {fm:.0%} vs no regulariser {fn:.0%}. Rule: within 10 points or none better",
            "agrees" if fn >= fm - 0.10 else "disagrees")
    # 4. entropy bonus decays in stable runs, grows in overoptimised ones
    ent = [s for s in stats if s["name"].startswith(("maxent_", "entropy_")) and "entropy_bonus_trend" in s and "final" in s]
    if ent:
        stable = [s for s in ent if s["drop"] < DROP and s["final"] >= (s["sft"] or 0)]
        over = [s for s in ent if s not in stable]
        ok_s = sum(1 for s in stable if s["entropy_bonus_trend"] < 0)
        ok_o = sum(1 for s in over if s["entropy_bonus_trend"] > 0)
        row(4, "4.2: stable runs show decaying entropy bonuses, overoptimised runs increasing ones",
            f"stable entropy runs with decaying bonus {ok_s}/{len(stable)}; overoptimised with increasing bonus {ok_o}/{len(over)}",
            "agrees" if ok_s + ok_o == len(ent) else "partly" if ok_s + ok_o else "disagrees")
    # 5. KL stable and effective at the high lr
    sel = _group_final(stats, "kl", hi) if hi else []
    if sel:
        good = sum(1 for s in sel if s["final"] - (s["sft"] or 0) >= 0.10 and s["drop"] < DROP)
        row(5, "4.2: KL-constrained RLHF stays stable and effective at the higher lr", desc(sel) +
            f". Rule: >= +10 points over SFT and no 10-point drop ({good}/{len(sel)})",
            "agrees" if good == len(sel) else "partly" if good else "disagrees")
    # 6. KL budget: KL runs keep KL_ref small; MaxEnt larger
    k = [s.get("kl_ref_k3_late") for s in stats if s["name"].startswith("kl_")]
    e = [s.get("kl_ref_k3_late") for s in stats if s["name"].startswith(("maxent_", "entropy_"))]
    if _mean(k) is not None and _mean(e) is not None:
        row(6, "4.2: KL-constrained runs keep KL(pi||pi_ref) bounded; reference-free runs drift further",
            f"late KL_ref (k3, mean): KL runs {_mean(k):.2f}, entropy runs {_mean(e):.2f}. Rule: KL runs lower",
            "agrees" if _mean(k) < _mean(e) else "disagrees")
    # 7. KL between consecutive policies grows for MaxEnt, bounded for KL (per learning rate)
    def growth(prefix, lr):
        g = [s["kl_prev_k3_late"] / max(s["kl_prev_k3_early"], 1e-8) for s in stats
             if s["name"].startswith(prefix) and "kl_prev_k3_late" in s and abs(s["lr"] - lr) < 1e-12]
        return _mean(g)
    for lr in lrs:
        gk, ge = growth("kl_", lr), growth(("maxent_", "entropy_"), lr)
        if gk is not None and ge is not None:
            row(7, f"4.2: KL between consecutive policies stays bounded under KL but grows over training under MaxEnt (lr {lr:g})",
                f"late/early KL_prev (k3) ratio, mean over runs: KL {gk:.2f}, entropy runs {ge:.2f}. Rule: entropy ratio > 1 and > KL ratio",
                "agrees" if ge > 1 and ge > gk else "disagrees")
    # 8. minimum entropy prevents overoptimisation at the KL lr
    sel = _group_final(stats, "minent", hi) if hi else []
    if sel:
        good = sum(1 for s in sel if s["drop"] < DROP and s["final"] > (s["sft"] or 1))
        better = sum(1 for s in sel if s["final"] >= (s["sft"] or 1) + DROP)
        row(8, "4.2.1: minimum entropy prevents overoptimisation at the KL learning rate (1B)", desc(sel) +
            f". Rule: agrees if final > SFT and no 10-point drop in every run ({good}/{len(sel)}); partly if every "
            f"final stays >= 10 points above SFT ({better}/{len(sel)})",
            "agrees" if good == len(sel) else "partly" if better == len(sel) else "disagrees")
    # 9. DPO reference log-ratio in a narrow range
    dpo = offline.get("dpo")
    if dpo is not None:
        v = dpo.series("ref/logratio")[1]
        if v:
            sd = statistics.pstdev(v)
            row(9, "4.3: during DPO the reference log-ratio log pi_ref(y_w)/pi_ref(y_l) stays in a narrow range, like a fixed margin",
                f"{len(v)} batches: mean {statistics.mean(v):.2f}, sd {sd:.2f}, range [{min(v):.2f}, {max(v):.2f}] nats; "
                f"{'mostly negative' if statistics.mean(v) < 0 else 'mostly positive'}. Rule: sd < 1 nat",
                "agrees" if sd < 1.0 else "disagrees")
    # 10/11. SimPO
    simpo = [analyse_offline(r) for n, r in offline.items() if n.startswith("simpo")]
    if simpo:
        slrs = sorted({s["lr"] for s in simpo})
        shi = [s for s in simpo if s["lr"] == slrs[-1] and "final" in s]
        slo = [s for s in simpo if s["lr"] == slrs[0] and "final" in s]
        if shi and len(slrs) > 1:
            n_over = sum(1 for s in shi if s["drop"] >= DROP or s["final"] < s["sft"])
            row(10, "App. B: at the high lr every SimPO gamma overoptimises",
                "; ".join(f"gamma {s['gamma']}: SFT {_fmt(s['sft'])} peak {_fmt(s['peak'])} final {_fmt(s['final'])}" for s in shi)
                + f". Rule: drop >= 10 points or below SFT for all gamma ({n_over}/{len(shi)})",
                "agrees" if n_over == len(shi) else "partly" if n_over else "disagrees")
        if slo:
            n_up = sum(1 for s in slo if s["final"] > s["sft"] and s["drop"] < DROP)
            row(11, "App. B: at a low lr SimPO performs well (improves on SFT without collapsing)",
                "; ".join(f"gamma {s['gamma']}: SFT {_fmt(s['sft'])} peak {_fmt(s['peak'])} final {_fmt(s['final'])}" for s in slo)
                + f". Rule: final > SFT, no 10-point drop ({n_up}/{len(slo)})",
                "agrees" if n_up == len(slo) else "partly" if n_up else "disagrees")
            g0 = [s["final"] for s in slo if not s["gamma"]]
            gp = [s["final"] for s in slo if s["gamma"]]
            if g0 and gp:
                row(12, f"App. B: an appropriate margin gamma > 0 improves on gamma = 0 (lowest lr, {slrs[0]:g})",
                    f"final win: gamma 0 {g0[0]:.1%}, best gamma > 0 {max(gp):.1%}. Rule: best gamma > 0 at least 2 points higher",
                    "agrees" if max(gp) - g0[0] >= 0.02 else "disagrees")
        for lr in slrs:
            sel = sorted((s for s in simpo if s["lr"] == lr and "final" in s), key=lambda s: s["gamma"] or 0)
            if len(sel) >= 2 and any(s["drop"] >= DROP for s in sel):
                finals = [s["final"] for s in sel]
                worse = finals[-1] < finals[0] - 0.05
                row(13, f"App. B: a larger margin makes SimPO's overoptimisation worse (lr {lr:g})",
                    "final win by gamma: " + ", ".join(f"{s['gamma']}: {s['final']:.0%}" for s in sel)
                    + ". Rule: largest gamma ends >= 5 points below gamma 0",
                    "n/a (every gamma ends at ~0)" if max(finals) < 0.05 else "agrees" if worse else "disagrees")
    L.append("")
    return L


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
    out = {"name": run.name, "lr": _lr(run), "gamma": run.config.get("simpo_gamma")}
    if ys:
        out.update(sft=ys[0], peak=max(ys), final=ys[-1], drop=max(ys) - ys[-1])
    return out


def _read_json(p: Path, default=None):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def _artifact_dir() -> Optional[Path]:
    import os

    from .cache import default_cache_dir

    d = default_cache_dir() / os.environ.get("MAXENT_RLHF_TOYLAB_PROFILE", "default")
    return d if d.is_dir() else None
