"""The figures (maxent_rlhf.plotting): run figures whose panels are the logged series, win-rate figures at
0% and 100%, and a figure that fails never costs the numbers."""
import json
import random
from pathlib import Path

import pytest

from helpers.jsonl import write_jsonl
from maxent_rlhf import evaluation, plotting


# --------------------------------------------------------------------------------------------------
# the win-rate figure: 0% and 100% win rates
# --------------------------------------------------------------------------------------------------
def wilson_row(label, step, wins, n):
    import importlib.util

    spec = importlib.util.spec_from_file_location("win_rate_metric", evaluation.METRIC_PATH / "win_rate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lo, hi = mod.wilson_interval(wins, n)
    return {"label": label, "step": step, "baseline": False, "win_rate": wins / n, "ci_low": lo, "ci_high": hi}


@pytest.mark.parametrize("wins", [0, 17, 40])
def test_error_bars_are_never_negative_at_the_edges(wins):
    (below,), (above,) = plotting.interval_error_bars([wilson_row("c", 1, wins, 40)])
    assert below >= 0 and above >= 0
    assert (below == 0) == (wins == 0) and (above == 0) == (wins == 40)


def test_figure_draws_0_of_n_and_n_of_n(tmp_path):
    rows = [wilson_row("a", 10, 0, 40), wilson_row("b", 20, 40, 40), wilson_row("c", 30, 23, 40)]
    rows.append({**wilson_row("sft", None, 40, 40), "baseline": True})
    plotting.plot_win_rates(rows, tmp_path / "win_rate.png", "test judge", 0.95)
    assert (tmp_path / "win_rate.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------------
# the run figures: written from a metrics.jsonl, panels hold exactly the logged series
# --------------------------------------------------------------------------------------------------
def synthetic_run(path: Path, rloo: bool) -> Path:
    rng = random.Random(1)
    recs = []
    for s in range(1, 13):
        if rloo:
            recs.append({"step": s, "objective/rlhf_reward": 0.1 * s + rng.random(), "objective/entropy": 9 - 0.3 * s,
                         "objective/entropy_bonus": 0.0, "objective/kl_ref": 0.05 * s * s, "objective/kl_prev": rng.random()})
        else:
            recs.append({"step": s, "train/loss": 0.7 - 0.03 * s, "rewards/margins": 0.1 * s, "logps/chosen": -20 - s,
                         "logps/rejected": -21 - 2 * s, "train/grad_norm": rng.random(), "ref/logratio": rng.random() - 0.5})
        if s % 4 == 0:
            recs.append({"step": s, "eval/win_rate": 0.5 + 0.02 * s, "eval/win_rate_ci_low": 0.4, "eval/win_rate_ci_high": 0.7,
                         "eval/n": 50, "eval/invalid": 0})
    recs.append({"step": 0, "eval/win_rate": 0.3, "eval/win_rate_ci_low": 0.2, "eval/win_rate_ci_high": 0.45})
    recs.append({"step": 6, "eval/missing": 1})
    write_jsonl(path / "metrics.jsonl", recs)
    return path


def logged(path, key):
    rows = [json.loads(l) for l in open(path / "metrics.jsonl")]
    return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]


@pytest.mark.parametrize("rloo", [True, False])
def test_run_figure_is_written_and_its_panels_are_the_logged_series(tmp_path, rloo):
    run = synthetic_run(tmp_path / "run", rloo)
    png = (plotting.plot_rloo_run if rloo else plotting.plot_offline_run)(run)
    assert png == run / plotting.RUN_FIGURE and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = plotting.run_figure_data(plotting.load_run(run), plotting.RLOO_RUN_PANELS if rloo else plotting.OFFLINE_RUN_PANELS)
    keys = ([["objective/rlhf_reward"], ["objective/entropy"], ["objective/kl_ref"], ["objective/kl_prev"]] if rloo else
            [["train/loss"], ["rewards/margins"], ["logps/chosen", "logps/rejected"], ["train/grad_norm"], ["ref/logratio"]])
    assert [sorted(p["series"]) for p in panels[:-1]] == [sorted(k) for k in keys]  # eval/loss was not logged: left out
    for p in panels[:-1]:
        for key, (xs, ys) in p["series"].items():
            assert (xs, ys) == logged(run, key)
    xs, ys, lo, hi = panels[-1]["win_rate"]
    assert xs == [0, 4, 8, 12] and ys == [0.3, 0.58, 0.66, 0.74] and lo == [0.2, 0.4, 0.4, 0.4] and hi[0] == 0.45
    assert panels[-1]["missing"] == [6]


def test_run_figure_failure_loses_no_numbers(tmp_path, capsys):
    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "perf/tokens_per_s": 3.0}])  # nothing the figure shows
    before = (run / "metrics.jsonl").read_bytes()
    assert plotting.plot_rloo_run(run) is None
    assert "not drawn" in capsys.readouterr().out and (run / "metrics.jsonl").read_bytes() == before
    assert not (run / plotting.RUN_FIGURE).exists()


def test_multi_run_figures_use_the_unweighted_entropy_and_the_paper_kl_direction(tmp_path):
    a = plotting.load_run(synthetic_run(tmp_path / "a", rloo=True))
    entropy, kl_prev = plotting.panel_data([a], [plotting.ENTROPY_PANEL, plotting.KL_PREV_PANEL], smooth=1,
                                         group=lambda r: "run")
    assert entropy["run"] == logged(a.path, "objective/entropy")  # not the weighted bonus (0 here)
    assert kl_prev["run"] == logged(a.path, "objective/kl_prev")


# --------------------------------------------------------------------------------------------------
# the paper's figures from run directories (the toy lab's sweep draws them)
# --------------------------------------------------------------------------------------------------
def test_plotting_reads_run_directories(tmp_path):
    from maxent_rlhf import plotting

    run = tmp_path / "kl_lr1e-3_s1"
    (run / "eval_gold").mkdir(parents=True)
    (run / "config.yaml").write_text("regularizer: kl\nlearning_rate: 0.001\n")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 11):
            f.write(json.dumps({"step": s, "objective/rlhf_reward": s / 10, "objective/entropy_bonus": 0.0,
                                "objective/kl_ref_k3": s / 5, "objective/kl_prev_k3": 0.01, "ref/logratio": -0.1}) + "\n")
    (run / "eval_gold" / "summary.json").write_text(json.dumps({
        "baseline": {"win_rate": 0.3, "step": None},
        "checkpoints": [{"step": 5, "win_rate": 0.5}, {"step": 10, "win_rate": 0.6}]}))
    r = plotting.load_run(run)
    assert r.winrate_curve() == ([0, 5, 10], [0.3, 0.5, 0.6]) and r.final_winrate() == 0.6
    assert plotting.regularizer_of(r) == "KL"
    for p in (plotting.plot_reward_and_entropy([r], tmp_path / "f1.png"), plotting.plot_kl([r], tmp_path / "f3.png"),
              plotting.plot_ref_logratio(r, tmp_path / "f4.png"),
              plotting.plot_winrate_per_checkpoint([r], tmp_path / "f6.png", label=lambda x: "a", panel=lambda x: "b")):
        assert p.exists() and p.stat().st_size > 1000
