"""Paper-style figures from run directories (toy-lab or real runs alike), evaluate_judge's win_rate.png,
and the figure each training run writes into its run directory (`plot_rloo_run`, `plot_offline_run`).

A run directory is what train_rloo.py / train_offline.py write (config.yaml, metrics.jsonl,
checkpoints/), optionally with evaluate_judge.py outputs below it (`eval_gold/summary.json`: win rate
per checkpoint; `eval_proxy/summary.json`: reward-model score per checkpoint) or passed explicitly.

    from maxent_rlhf import plotting
    runs = [plotting.load_run(d) for d in dirs]
    plotting.plot_reward_and_entropy(runs, "fig1.png")                  # one line per plotting.regularizer_of(run)
    plotting.plot_kl(runs, "fig3.png", group=lambda r: r.config["regularizer"])
    plotting.plot_ref_logratio(dpo_run, "fig4.png")
    plotting.plot_winrate_per_checkpoint(simpo_runs, "fig6.png", label=lambda r: f"gamma {r.config['simpo_gamma']}",
                                         panel=lambda r: f"lr {r.config['learning_rate']:g}")
    plotting.plot_curves(runs, "lr.png", [(("train/lr",), "learning rate")])   # any logged metric
    plotting.plot_rloo_run(run_dir)      # <run_dir>/curves.png, Fig. 10 layout (+ win rate); plot_offline_run: Fig. 7

Every function takes `Run`s, so a real run (GPU, gpt-4o-mini judge) plots the same way: point
`gold_summary` at its evaluate_judge summary.json.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import load_yaml
from .runs import read_metrics


@dataclass
class Run:
    path: Path
    config: dict
    metrics: list[dict]
    gold: Optional[dict] = None  # evaluate_judge summary.json (judge of record: win rates)
    proxy: Optional[dict] = None  # evaluate_judge summary.json with the reward-model judge
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for m in self.metrics:
            v = m.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(int(m["step"]))
                ys.append(float(v))
        return xs, ys

    def winrate_curve(self, include_baseline: bool = True) -> tuple[list[int], list[float]]:
        """Gold win rate per checkpoint (step 0 = the SFT baseline when evaluated)."""
        return _curve(self.gold, "win_rate", include_baseline)

    def proxy_curve(self, include_baseline: bool = True) -> tuple[list[int], list[float]]:
        """Mean reward-model score of the greedy summaries per checkpoint."""
        return _curve(self.proxy, "mean_policy_score", include_baseline)

    def final_winrate(self) -> Optional[float]:
        xs, ys = self.winrate_curve(include_baseline=False)
        return ys[-1] if ys else None


def _curve(summary: Optional[dict], key: str, include_baseline: bool) -> tuple[list[int], list[float]]:
    if not summary:
        return [], []
    pts = []
    base = summary.get("baseline")
    if include_baseline and base and base.get(key) is not None:
        pts.append((0, float(base[key])))
    for r in summary.get("checkpoints", []):
        if r.get(key) is not None and r.get("step") is not None:
            pts.append((int(r["step"]), float(r[key])))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def load_run(path: str | Path, gold_summary: Optional[str | Path] = None, proxy_summary: Optional[str | Path] = None) -> Run:
    path = Path(path)
    cfg_path = path / "config.yaml"
    config = load_yaml(cfg_path) if cfg_path.exists() else {}

    def read(p):
        p = Path(p) if p else None
        return json.loads(p.read_text()) if p and p.exists() else None

    info = read(path / "DONE.json") or {}
    return Run(path, config or {}, read_metrics(path),
               read(gold_summary or path / "eval_gold" / "summary.json"),
               read(proxy_summary or path / "eval_proxy" / "summary.json"), info)


def regularizer_of(run: Run) -> str:
    """A readable regulariser label from a train_rloo config."""
    c = run.config
    reg = c.get("regularizer", "?")
    if reg == "entropy":
        coef = float(c.get("entropy_coef", 0.0))
        if coef < 0:  # a negative entropy_coef is minimum entropy
            return "minimum entropy"
        return "entropy, length-normalised" if c.get("length_normalize") else "entropy"
    return {"kl": "KL", "none": "none"}.get(reg, reg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: Sequence[tuple[list, list]]) -> tuple[list, list]:
    """Mean over runs at the steps all of them logged."""
    if not curves:
        return [], []
    common = set(curves[0][0])
    for xs, _ in curves[1:]:
        common &= set(xs)
    steps = sorted(common)
    out = []
    for s in steps:
        vals = [ys[xs.index(s)] for xs, ys in curves]
        out.append(sum(vals) / len(vals))
    return steps, out


def _smooth(ys: list[float], k: int = 5) -> list[float]:
    if k <= 1 or len(ys) < k:
        return ys
    out = []
    for i in range(len(ys)):
        w = ys[max(0, i - k + 1) : i + 1]
        out.append(sum(w) / len(w))
    return out


def _groups(runs: Sequence[Run], key: Callable[[Run], str]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def _winrate_label(name: str, runs: Sequence[Run]) -> str:
    finals = [r.final_winrate() for r in runs if r.final_winrate() is not None]
    if not finals:
        return name
    mean = sum(finals) / len(finals)
    return f"{name} (win {mean:.0%}" + (f", n={len(finals)} seeds)" if len(finals) > 1 else ")")


# panels (metric keys, y label) shared by the multi-run figures and the single-run figures
RLHF_REWARD_PANEL = (("objective/rlhf_reward",), "RLHF reward")
ENTROPY_PANEL = (("objective/entropy",), "entropy, sum_t -log pi (unweighted)")
KL_REF_PANEL = (("objective/kl_ref",), "KL(pi_t || pi_ref)")
KL_PREV_PANEL = (("objective/kl_prev",), "KL(pi_t || pi_t-1)")


def panel_data(runs: Sequence[Run], panels: Sequence[tuple[Sequence[str], str]], smooth: int = 5,
               group: Callable[[Run], str] = regularizer_of) -> list[dict[str, tuple[list, list]]]:
    """What `plot_curves` draws, per panel: {group name: (steps, values)}. A panel's values are the
    first of its keys that any run of a group logged, the mean over the group's runs at the steps all of
    them logged, then a moving mean over `smooth` points (1: the logged values)."""
    out: list[dict[str, tuple[list, list]]] = [{} for _ in panels]
    for name, rs in sorted(_groups(runs, group).items()):
        for i, (keys, _) in enumerate(panels):
            curves = []
            for key in keys:
                curves = [r.series(key) for r in rs]
                if any(xs for xs, _ in curves):
                    break
            xs, ys = _mean_curve(curves)
            if xs:
                out[i][name] = (xs, _smooth(ys, smooth))
    return out


def _draw_curves(axes, runs: Sequence[Run], panels: Sequence[tuple[Sequence[str], str]], smooth: int,
                 group: Callable[[Run], str], log: bool, legend_title: Optional[str]) -> None:
    data = panel_data(runs, panels, smooth, group)
    names = sorted(_groups(runs, group))
    by_name = _groups(runs, group)
    for i, (ax, (_, ylabel), series) in enumerate(zip(axes, panels, data)):
        for g, name in enumerate(names):  # one colour per group in every panel, its label once (top panel)
            if name in series:
                xs, ys = series[name]
                ax.plot(xs, ys, color=f"C{g}", label=_winrate_label(name, by_name[name]) if i == 0 else None)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=7, title=legend_title, title_fontsize=7)


def plot_curves(runs: Sequence[Run], path: str | Path, panels: Sequence[tuple[Sequence[str], str]], title: str = "",
                smooth: int = 5, group: Callable[[Run], str] = regularizer_of, log: bool = False,
                legend_title: Optional[str] = None) -> Path:
    """Logged metrics against the iteration, one panel per (metric keys, y label), one line per group
    (mean over its seeds at the steps all of them logged, moving mean over `smooth` points), final gold
    win rate in the legend. A panel plots the first of its keys that any run of a group logged, so
    `("objective/kl_ref_k3", "objective/kl_ref")` falls back to k1 for runs without k3. `log`: symlog y.
    The drawn values are `panel_data(runs, panels, smooth, group)`."""
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 3.0 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    _draw_curves(axes, runs, panels, smooth, group, log, legend_title)
    axes[-1].set_xlabel("iteration")
    if title:
        axes[0].set_title(title, fontsize=9)
    return _save(fig, path)


def plot_reward_and_entropy(runs: Sequence[Run], path: str | Path, title: str = "", smooth: int = 5,
                            group: Callable[[Run], str] = regularizer_of) -> Path:
    """Figures 1-2: RLHF reward (top) and the policy's entropy (bottom) per iteration: the unweighted
    sequence quantity `objective/entropy` (batch mean of sum_t -log pi), logged for every regulariser, not
    the regulariser's weighted contribution `objective/entropy_bonus` (0 for KL runs and alpha = 0)."""
    panels = [RLHF_REWARD_PANEL, ENTROPY_PANEL]
    return plot_curves(runs, path, panels, title, smooth, group, legend_title="final gold win rate")


def plot_kl(runs: Sequence[Run], path: str | Path, title: str = "", smooth: int = 5,
            group: Callable[[Run], str] = regularizer_of, log: bool = True) -> Path:
    """Figure 3: KL(pi_t || pi_ref) (top; the non-negative k3 estimate, k1 for runs that logged no k3)
    and KL(pi_t || pi_t-1) between consecutive policies in the paper's direction (bottom, `objective/kl_prev`)."""
    panels = [(("objective/kl_ref_k3", "objective/kl_ref"), "KL(pi_t || pi_ref)"), KL_PREV_PANEL]
    return plot_curves(runs, path, panels, title, smooth, group, log=log)


def plot_ref_logratio(run: Run, path: str | Path, title: str = "DPO: batch mean of log pi_ref(y_w|x) - log pi_ref(y_l|x)") -> Path:
    """Figure 4: the reference log-ratio (`ref/logratio` of train_offline.py) per step of DPO."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    xs, ys = run.series("ref/logratio")
    ax.plot(xs, ys, lw=1, alpha=0.5, label="per batch")
    ax.plot(xs, _smooth(ys, 10), lw=2, label="moving mean (10)")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("ref log-ratio")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_winrate_per_checkpoint(runs: Sequence[Run], path: str | Path, label: Callable[[Run], str],
                                panel: Callable[[Run], str], title: str = "", proxy: bool = False) -> Path:
    """Figure 6 (and the overoptimisation figure): gold win rate per checkpoint, one line per `label`,
    one panel per `panel` (e.g. gamma x learning rate for SimPO); SFT baseline dashed. With proxy=True
    the proxy reward of the same checkpoints is drawn on a second axis (dotted)."""
    plt = _plt()
    panels = _groups(runs, panel)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (pname, rs) in zip(axes[0], sorted(panels.items())):
        ax2 = ax.twinx() if proxy else None
        base = None
        for i, (lname, group) in enumerate(sorted(_groups(rs, label).items())):
            color = f"C{i}"
            xs, ys = _mean_curve([r.winrate_curve(include_baseline=True) for r in group])
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, color=color, label=lname)
            b = group[0].gold.get("baseline") if group[0].gold else None
            if b and b.get("win_rate") is not None:
                base = b["win_rate"]
            if ax2 is not None:
                px, py = _mean_curve([r.proxy_curve(include_baseline=True) for r in group])
                if px:
                    ax2.plot(px, py, ls=":", color=color)
        if base is not None:
            ax.axhline(base, color="gray", ls="--", lw=1, label=f"SFT ({base:.0%})")
        ax.set_title(f"{pname}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("gold win rate vs reference")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if ax2 is not None:
            ax2.set_ylabel("proxy reward (dotted)")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def interval_error_bars(rows: Sequence[dict]) -> list[list[float]]:
    """matplotlib's `yerr` ([below], [above]) of each row's win rate and interval, clamped at 0: at a
    0% or 100% win rate the Wilson bound lands a rounding error past the estimate (e.g. -7e-18 at 0/40),
    and a negative length is an error in matplotlib ("'yerr' must not contain negative values")."""
    below = [max(0.0, r["win_rate"] - r["ci_low"]) for r in rows]
    above = [max(0.0, r["ci_high"] - r["win_rate"]) for r in rows]
    return [below, above]


def plot_win_rates(rows: Sequence[dict], path: str | Path, judge_desc: str, confidence_level: float) -> Path:
    """evaluate_judge.py's win_rate.png: win rate per checkpoint (against the training step when every
    checkpoint has one, else one tick per checkpoint) with its Wilson interval as error bars; an SFT
    baseline as a dashed line over its interval. `rows` are summary.json's per-model rows."""
    plt = _plt()
    curve = [r for r in rows if not r["baseline"] and r["win_rate"] is not None]
    base = [r for r in rows if r["baseline"] and r["win_rate"] is not None]
    with_steps = all(r["step"] is not None for r in curve)
    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        xs = [r["step"] if with_steps else i for i, r in enumerate(curve)]
        ys = [r["win_rate"] for r in curve]
        ax.errorbar(xs, ys, yerr=interval_error_bars(curve), marker="o", capsize=3, label="policy")
        if not with_steps:
            ax.set_xticks(xs, [r["label"] for r in curve], rotation=30, ha="right")
    for r in base:
        ax.axhline(r["win_rate"], color="gray", linestyle="--", label=f"SFT baseline ({r['win_rate']:.2f})")
        ax.axhspan(r["ci_low"], r["ci_high"], color="gray", alpha=0.15)
    ax.set_xlabel("training step" if with_steps else "checkpoint")
    ax.set_ylabel("win rate vs reference")
    ax.set_ylim(0, 1)
    ax.set_title(f"win rate ({judge_desc}); bars: {int(round(confidence_level * 100))}% Wilson CI", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi=100)


# --------------------------------------------------------------------------------------------------
# the figure every run writes into its run directory at the end (train_rloo.py, train_offline.py)
# --------------------------------------------------------------------------------------------------
RUN_FIGURE = "curves.png"  # <run_dir>/curves.png
# one panel: (y label, [(metric key, line label), ...])
RLOO_RUN_PANELS = [(label, [(keys[0], None)]) for keys, label in
                   (RLHF_REWARD_PANEL, ENTROPY_PANEL, KL_REF_PANEL, KL_PREV_PANEL)]  # Fig. 10's four panels
OFFLINE_RUN_PANELS = [  # Fig. 7's panels, then DPO's reference log-ratio (Fig. 4's quantity)
    ("loss", [("train/loss", "train"), ("eval/loss", "eval")]),
    ("reward margin", [("rewards/margins", None)]),
    ("log-prob", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("grad norm", [("train/grad_norm", None)]),
    ("ref log-ratio", [("ref/logratio", None)]),
]
WIN_RATE_KEYS = ("eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high")


def run_figure_data(run: Run, panels: Sequence[tuple[str, Sequence[tuple[str, Optional[str]]]]]) -> list[dict]:
    """The panels of a single-run figure with the numbers they show: one dict per panel that has data,
    {"ylabel", "series": {key: (steps, values)}, "labels": {key: line label}}, then (when the run logged
    `eval/win_rate`) {"ylabel": "win rate", "win_rate": (steps, rates, ci_low, ci_high), "missing": steps}.
    The values are the logged ones, unsmoothed."""
    out = []
    for ylabel, lines in panels:
        series = {key: run.series(key) for key, _ in lines}
        series = {k: v for k, v in series.items() if v[0]}
        if series:
            out.append({"ylabel": ylabel, "series": series, "labels": {k: l for k, l in lines if k in series}})
    win = [m for m in run.metrics if all(isinstance(m.get(k), (int, float)) for k in WIN_RATE_KEYS)]
    if win:
        by_step = {int(m["step"]): m for m in win}  # a resumed run's re-logged step: the later record wins
        steps = sorted(by_step)
        rates, lows, highs = ([float(by_step[s][k]) for s in steps] for k in WIN_RATE_KEYS)
        missing = sorted({int(m["step"]) for m in run.metrics if m.get("eval/missing")})
        out.append({"ylabel": "win rate", "win_rate": (steps, rates, lows, highs), "missing": missing})
    return out


def plot_run_figure(run: Run, path: str | Path, panels, title: str) -> Path:
    """Draw `run_figure_data(run, panels)`: one panel per entry, the win rate with its interval as a band
    and failed evaluations (`eval/missing`) as crosses at the bottom."""
    data = run_figure_data(run, panels)
    if not data:
        raise ValueError(f"{run.path}: metrics.jsonl has none of the figure's metrics")
    plt = _plt()
    fig, axes = plt.subplots(len(data), 1, figsize=(6.4, 2.4 * len(data)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, panel in zip(axes, data):
        if "win_rate" in panel:
            xs, ys, lo, hi = panel["win_rate"]
            ax.fill_between(xs, lo, hi, color="C1", alpha=0.2, lw=0, label="Wilson interval")
            ax.plot(xs, ys, color="C1", marker="o", ms=3, label="win rate vs reference")
            if panel["missing"]:
                ax.plot(panel["missing"], [0.03] * len(panel["missing"]), "x", color="gray", label="evaluation missing")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        else:
            for i, (key, (xs, ys)) in enumerate(panel["series"].items()):
                ax.plot(xs, ys, color=f"C{i}", lw=1, label=panel["labels"][key])
            if any(panel["labels"].values()):
                ax.legend(fontsize=7)
        ax.set_ylabel(panel["ylabel"], fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title, fontsize=9)
    return _save(fig, path)


def draw_run_figure(run_dir: str | Path, panels, title: str, name: str) -> Optional[Path]:
    """Draw a run's figure into the run directory; a drawing failure is one line, never an exception
    (the numbers stay in metrics.jsonl)."""
    run_dir = Path(run_dir)
    try:
        run = load_run(run_dir)
        return plot_run_figure(run, run_dir / name, panels, f"{run_dir.name}: {title}")
    except Exception as e:  # noqa: BLE001  (a figure is a convenience; the run's numbers are already written)
        print(f"[plotting] {run_dir / name} not drawn ({type(e).__name__}: {e}); the numbers are in "
              f"{run_dir / 'metrics.jsonl'}")
        return None


def plot_rloo_run(run_dir: str | Path, name: str = RUN_FIGURE) -> Optional[Path]:
    """<run_dir>/curves.png for a train_rloo run, the paper's Fig. 10 layout: RLHF reward, entropy
    (unweighted), KL to the reference, KL between consecutive policies (paper direction), and the win
    rate with its interval when the run evaluated one. Returns the path, or None if it could not be drawn."""
    return draw_run_figure(run_dir, RLOO_RUN_PANELS, "RLOO (Fig. 10 layout)", name)


def plot_offline_run(run_dir: str | Path, name: str = RUN_FIGURE) -> Optional[Path]:
    """<run_dir>/curves.png for a train_offline run, the paper's Fig. 7 layout: loss (train, and eval
    when logged), reward margin, chosen / rejected log-probs, grad norm; `ref/logratio` for DPO-style
    losses; the win rate with its interval when evaluated. Panels a loss does not log are left out."""
    return draw_run_figure(run_dir, OFFLINE_RUN_PANELS, "offline (Fig. 7 layout)", name)


def _save(fig, path: str | Path, dpi: int = 80) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
