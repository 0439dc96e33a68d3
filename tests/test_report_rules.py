"""The toy-lab report's verdict rules (maxent_rlhf/toylab/claims.py) on small synthetic series: for each
rule a case that should agree, one that should not, and the n/a cases; then the claim table that wires
the rules to a sweep's run statistics."""
from __future__ import annotations

import math

import pytest

from maxent_rlhf.toylab import claims
from maxent_rlhf.toylab.claims import AGREES, DISAGREES, NA, PARTLY, Outcome


def run(sft, peak, final, name="r"):
    return Outcome(name, sft, peak, final)


STABLE = run(0.30, 0.85, 0.84)  # gains 54 points, keeps them
DECLINES = run(0.30, 0.85, 0.60)  # peaks, falls 25 points, still 30 above SFT
COLLAPSES = run(0.30, 0.85, 0.02)  # peaks, loses everything
FLAT = run(0.30, 0.33, 0.31)  # never gains


@pytest.mark.parametrize("o, kind", [(STABLE, "stable"), (DECLINES, "improves, then declines"),
                                     (COLLAPSES, "collapses"), (FLAT, "no gain"),
                                     (run(0.30, 0.45, 0.36), "stable")])  # a 15-point peak, 9-point drop
def test_trajectory_classes(o, kind):
    assert o.trajectory == kind


def test_trajectory_boundaries_are_exact_at_ten_points():
    assert run(0.30, 0.40, 0.40).trajectory == "stable"  # exactly +10: a gain
    assert run(0.30, 0.399, 0.399).trajectory == "no gain"
    assert run(0.30, 0.80, 0.70).trajectory == "improves, then declines"  # exactly a 10-point drop
    assert run(0.30, 0.80, 0.701).trajectory == "stable"
    assert run(0.30, 0.80, 0.39).trajectory == "collapses"  # 9 above SFT after a drop


def test_overoptimised_counts_a_drop_or_ending_below_sft():
    assert COLLAPSES.overoptimised and DECLINES.overoptimised
    assert not STABLE.overoptimised
    assert run(0.30, 0.31, 0.25).overoptimised  # below SFT without a 10-point drop
    assert not FLAT.overoptimised


def test_stable_and_improving_scale():
    assert claims.rule_stable_and_improving([STABLE, STABLE]).level == AGREES
    v = claims.rule_stable_and_improving([DECLINES, DECLINES, DECLINES])
    assert v.level == PARTLY and "improves, then declines 3" in v.evidence  # Appendix B's "can still experience"
    assert claims.rule_stable_and_improving([COLLAPSES, COLLAPSES, STABLE]).level == DISAGREES
    assert claims.rule_stable_and_improving([FLAT, FLAT]).level == DISAGREES
    assert claims.rule_stable_and_improving([COLLAPSES, STABLE]).level == PARTLY  # half, not more than half
    v = claims.rule_stable_and_improving([])
    assert v.level == NA and v.reason and v.cell().startswith("n/a (")


def test_all_overoptimise():
    assert claims.rule_all_overoptimise([COLLAPSES, DECLINES]).level == AGREES
    assert claims.rule_all_overoptimise([COLLAPSES, STABLE]).level == PARTLY
    assert claims.rule_all_overoptimise([STABLE, FLAT]).level == DISAGREES
    assert claims.rule_all_overoptimise([]).level == NA


def test_coefficient_rule_needs_a_real_coefficient_sweep():
    one_coef = {0.5: [COLLAPSES] * 3, 0.0: [COLLAPSES] * 3}
    v = claims.rule_overoptimise_regardless_of_coef(one_coef)
    assert v.level == NA and "coefficient sweep" in v.reason and "0, 0.5" in v.evidence
    narrow = {0.2: [COLLAPSES], 0.5: [COLLAPSES], 1.0: [COLLAPSES], 0.0: [COLLAPSES]}  # spans 5x only
    assert claims.rule_overoptimise_regardless_of_coef(narrow).level == NA
    no_zero = {0.1: [COLLAPSES], 0.5: [COLLAPSES], 1.0: [COLLAPSES]}
    assert claims.rule_overoptimise_regardless_of_coef(no_zero).level == NA

    sweep = {0.1: [COLLAPSES, DECLINES], 0.5: [COLLAPSES], 1.0: [COLLAPSES], 0.0: [STABLE]}
    v = claims.rule_overoptimise_regardless_of_coef(sweep)
    assert v.level == AGREES and "control coef 0: 0/1" in v.evidence
    sweep[0.1] = [STABLE, STABLE]  # the smallest coefficient is stable: not "regardless of the coefficient"
    v = claims.rule_overoptimise_regardless_of_coef(sweep)
    assert v.level == PARTLY and "2/3 coefficients" in v.reason
    calm = {c: [STABLE] for c in (0.0, 0.1, 0.5, 1.0)}
    assert claims.rule_overoptimise_regardless_of_coef(calm).level == DISAGREES


def test_gain_attribution_is_tested_only_where_entropy_runs_keep_gains():
    # lr 1e-4: entropy runs collapse (no gain to attribute); lr 2e-5: they keep it and coefficient 0 matches
    by_lr = {1e-4: ([COLLAPSES] * 3, [run(0.30, 0.85, 0.64)]), 2e-5: ([STABLE] * 2, [run(0.30, 0.85, 0.80)])}
    v = claims.rule_gain_not_from_entropy(by_lr)
    assert v.level == AGREES and "lr 2e-05" in v.evidence and "lr 0.0001" not in v.evidence
    # the entropy term helps: coefficient 0 ends 40 points lower where the entropy runs keep their gain
    by_lr[2e-5] = ([STABLE] * 2, [run(0.30, 0.60, 0.44)])
    assert claims.rule_gain_not_from_entropy(by_lr).level == DISAGREES
    # no lr where entropy runs keep a gain -> n/a, even though coefficient 0 beats them at 1e-4
    v = claims.rule_gain_not_from_entropy({1e-4: by_lr[1e-4]})
    assert v.level == NA and "no gain to attribute" in v.reason and "-28 points" in v.evidence
    # a gain without coefficient-0 runs beside it cannot be attributed either
    assert claims.rule_gain_not_from_entropy({2e-5: ([STABLE], [])}).level == NA


def test_entropy_trend():
    assert claims.rule_entropy_trend([-0.01, -0.02], [0.2, 0.3]).level == AGREES
    assert claims.rule_entropy_trend([0.01, 0.02], [-0.2, -0.3]).level == DISAGREES
    assert claims.rule_entropy_trend([-0.01, 0.02], [0.2, 0.3]).level == PARTLY
    v = claims.rule_entropy_trend([], [0.2, 0.3])
    assert v.level == PARTLY and "only half" in v.reason
    assert claims.rule_entropy_trend([], []).level == NA


def test_kl_ref_bounded():
    assert claims.rule_kl_ref_bounded([1.0, 2.0], [30.0]).level == AGREES
    assert claims.rule_kl_ref_bounded([30.0], [1.0, 2.0]).level == DISAGREES
    assert claims.rule_kl_ref_bounded([], [1.0]).level == NA


def test_kl_prev_growth():
    assert claims.rule_kl_prev_growth([0.2, 1.0], [4.0]).level == AGREES
    assert claims.rule_kl_prev_growth([1.0], [0.4]).level == DISAGREES  # entropy runs' updates shrink
    assert claims.rule_kl_prev_growth([5.0], [2.0]).level == PARTLY
    assert claims.rule_kl_prev_growth([1.0], []).level == NA


def test_ref_logratio_band_sign_and_width():
    negative_narrow = [-0.1 + 0.05 * math.sin(i) for i in range(40)]
    v = claims.rule_ref_logratio_band(negative_narrow, 32)
    assert v.level == AGREES and "0% of batches above 0" in v.evidence
    # the case: mean slightly positive, sd 0.56 -> narrow but not "typically negative"
    positive = [0.06 + 0.56 * (1 if i % 2 else -1) * (0.5 + (i % 3) / 2) for i in range(60)]
    v = claims.rule_ref_logratio_band(positive, 32)
    assert v.level == PARTLY and "not typically negative" in v.reason
    wide_negative = [2.5 if i % 4 == 0 else -2.0 for i in range(40)]  # sd 1.95
    assert claims.rule_ref_logratio_band(wide_negative, 32).level == PARTLY  # mostly < 0, but wide
    wide_positive = [-2.5 if i % 4 == 0 else 2.0 for i in range(40)]
    assert claims.rule_ref_logratio_band(wide_positive, 32).level == DISAGREES
    assert claims.rule_ref_logratio_band([-0.1] * 5, 32).level == NA


def test_ref_logratio_width_is_judged_at_a_fixed_batch_size():
    # sd 0.6 of 8-example batch means is sd 0.3 at the rule's batch of 32; of 128-example means, 1.2 (wide)
    series = [-0.2 + 0.6 * math.sqrt(1.5) * (i % 3 - 1) for i in range(42)]  # sd 0.6, 2/3 below 0
    assert claims.rule_ref_logratio_band(series, 8).level == AGREES
    v = claims.rule_ref_logratio_band(series, 128)
    assert v.level == PARTLY and "not narrow" in v.reason and "at batch 32: 1.20" in v.evidence


def test_margin_helps():
    assert claims.rule_margin_helps(0.70, {0.5: 0.78, 1.0: 0.60}).level == AGREES
    assert claims.rule_margin_helps(0.73, {0.5: 0.66, 2.0: 0.52}).level == DISAGREES
    assert claims.rule_margin_helps(0.70, {0.5: 0.72}).level == PARTLY
    assert claims.rule_margin_helps(None, {0.5: 0.72}).level == NA


def test_larger_margin_worse():
    worse = {0.0: run(0.3, 0.85, 0.73), 1.0: run(0.3, 0.85, 0.61), 2.0: run(0.3, 0.85, 0.52)}
    assert claims.rule_larger_margin_worse(worse).level == AGREES
    better = {0.0: run(0.3, 0.85, 0.52), 2.0: run(0.3, 0.85, 0.73)}
    assert claims.rule_larger_margin_worse(better).level == DISAGREES
    zeros = {0.0: run(0.3, 0.40, 0.0), 2.0: run(0.3, 0.35, 0.01)}
    v = claims.rule_larger_margin_worse(zeros)
    assert v.level == NA and "~0" in v.reason
    calm = {0.0: run(0.3, 0.85, 0.84), 2.0: run(0.3, 0.85, 0.80)}
    assert claims.rule_larger_margin_worse(calm).level == NA  # nothing overoptimises
    assert claims.rule_larger_margin_worse({1.0: worse[1.0], 2.0: worse[2.0]}).level == NA  # no gamma 0


# --------------------------------------------------------------------------------------------------
# the claim table wires the rules to run statistics
# --------------------------------------------------------------------------------------------------
def _stat(variant, lr, seed, o: Outcome, coef=None, default=True, **extra):
    return {"name": f"{variant}_lr{lr:g}_s{seed}", "variant": variant, "lr": lr, "coef": coef, "default_coef": default,
            "sft": o.sft, "peak": o.peak, "final": o.final, "drop": o.drop, **extra}


def _verdicts(lines):
    rows = [l.split(" | ") for l in lines if l.startswith("| ") and not l.startswith("| #")]
    return [(r[0].strip("| "), r[-1].strip(" |")) for r in rows]


def test_claim_table_marks_claim_1_na_without_a_coefficient_sweep_and_tests_it_with_one():
    from maxent_rlhf.toylab.report import claims_table

    stats = [_stat("maxent", 1e-3, s, COLLAPSES, coef=0.5) for s in (1, 2)]
    stats += [_stat("none", 1e-3, s, COLLAPSES, coef=0.0) for s in (1, 2)]
    stats += [_stat("kl", 1e-3, s, STABLE) for s in (1, 2)]
    stats += [_stat("maxent", 1e-4, s, COLLAPSES, coef=0.5) for s in (1, 2)]
    stats += [_stat("none", 1e-4, s, DECLINES, coef=0.0) for s in (1, 2)]
    v = dict(_verdicts(claims_table(stats, {}, [1e-4, 1e-3])))
    assert v["1"].startswith("n/a (the sweep has no coefficient sweep")
    assert v["2"] == "disagrees" and v["5"] == "agrees"
    assert v["3"].startswith("n/a (at no learning rate")

    stats += [_stat("maxent", 1e-3, s, COLLAPSES, coef=c, default=False) for c in (0.1, 1.0) for s in (1, 2)]
    stats += [_stat("maxent", 2e-5, s, STABLE, coef=0.5) for s in (1, 2)]
    stats += [_stat("none", 2e-5, s, STABLE, coef=0.0) for s in (1, 2)]
    v = _verdicts(claims_table(stats, {}, [1e-4, 1e-3], extra_lrs=[2e-5]))
    d = dict(v)
    assert d["1"] == "agrees" and d["3"] == "agrees"
    assert [x for k, x in v if k == "2"] == ["agrees", "disagrees"]  # lr 2e-5, then 1e-4


def _fake_run(root, name, config: dict, win: list, metrics=None, info=None):
    """A run directory as the sweep leaves it: config.yaml, metrics.jsonl, eval_gold/summary.json, DONE.json."""
    import json

    import yaml

    d = root / name
    (d / "eval_gold").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    with open(d / "metrics.jsonl", "w") as f:
        for m in metrics or [{"step": s} for s in range(1, 4)]:
            f.write(json.dumps(m) + "\n")
    (d / "eval_gold" / "summary.json").write_text(json.dumps({
        "baseline": {"win_rate": win[0]}, "checkpoints": [{"step": 10 * (i + 1), "win_rate": w} for i, w in enumerate(win[1:])]}))
    (d / "DONE.json").write_text(json.dumps(info or {}))
    return d


def test_report_from_run_directories_adds_up_the_cost_and_matches_the_toy_configs(tmp_path, monkeypatch):
    import json

    from maxent_rlhf.config import load_yaml
    from maxent_rlhf.toylab import sweep
    from maxent_rlhf.toylab.report import write_report

    monkeypatch.setenv("MAXENT_RLHF_CACHE", str(tmp_path / "no-cache"))  # no artifacts: those rows are left out
    sw = tmp_path / "sweep"
    maxent_cfg = {k: v for k, v in load_yaml(sweep.toy_config("maxent")).items() if k != "output_dir"}
    ent = [{"step": s, "objective/entropy_bonus": 0.1 * s, "objective/rlhf_reward": 0.1} for s in range(1, 10)]
    _fake_run(sw / "rloo", "maxent_lr1e-3_s1", {**maxent_cfg, "learning_rate": 1e-3, "seed": 1}, [0.3, 0.8, 0.0],
              ent, {"regularizer": "maxent", "seconds": 100.0, "eval_seconds": 20.0})
    main = _fake_run(sw / "rloo", "maxent_lr1e-4_s1", {**maxent_cfg, "seed": 1}, [0.3, 0.8, 0.8], ent,
                     {"regularizer": "maxent", "seconds": 110.0, "eval_seconds": 10.0})
    _fake_run(sw / "rloo", "kl_lr1e-3_s1", {"regularizer": "kl", "learning_rate": 1e-3, "seed": 1}, [0.3, 0.8, 0.8],
              None, {"regularizer": "kl", "seconds": 50.0, "eval_seconds": 10.0})
    _fake_run(sw / "rloo", "kl_lr9e-3_s1", {"regularizer": "kl", "learning_rate": 9e-3, "seed": 1}, [0.3, 0.3, 0.3],
              None, {"regularizer": "kl", "seconds": 999.0})  # outside sweep.json's runs: not in the cost
    dpo = [{"step": s, "ref/logratio": -0.1 - 0.01 * (s % 3)} for s in range(1, 21)]
    _fake_run(sw / "offline", "dpo", {"loss_type": "dpo", "learning_rate": 1e-3, "beta": 0.1, "global_batch_size": 32},
              [0.3, 0.85, 0.3], dpo, {"seconds": 30.0, "eval_seconds": 10.0})
    (sw / "sweep.json").write_text(json.dumps({"lrs": [1e-4, 1e-3], "rloo_runs": ["maxent_lr1e-3_s1", "maxent_lr1e-4_s1", "kl_lr1e-3_s1"],
                                               "offline_runs": ["dpo"]}))
    text = write_report(sw, tmp_path / "report").read_text()
    # 290 s of training + 50 s of evaluation over the 4 sweep runs; the extra run is named, not counted
    assert "training 4.8 min + evaluation 0.8 min = **6 min** for 4 runs (3 RLOO, 1 offline)" in text
    assert "outside the sweep, also in the tables: kl_lr9e-3_s1" in text
    assert f"| configs/toy/maxent.yaml | {main.name} |" in text  # the README main job is a run of the tables
    assert "| configs/toy/kl.yaml | not in this sweep |" in text
    assert "| dpo | dpo | 0.001 | 0.1 | - | 30% | 85% (10) | 30% | 55 | collapses |" in text
    rows = dict(_verdicts(text.split("## Claims")[1].splitlines()))
    assert rows["1"].startswith("n/a") and rows["9"] == "agrees" and rows["5"] == "agrees"


def test_the_sweep_plans_the_data_the_rules_need_and_shards_split_it():
    from maxent_rlhf.toylab import sweep

    plan = sweep.rloo_plan()
    names = [sweep.rloo_run_name(*p) for p in plan]
    assert len(set(names)) == len(names)
    hi = max(sweep.LEARNING_RATES)
    coefs = {c if c is not None else sweep.default_entropy_coef("maxent")
             for reg, lr, _, c in plan if reg == "maxent" and lr == hi}
    assert len(coefs) >= 3 and max(coefs) >= 10 * min(coefs)  # claim 1's rule, plus coefficient 0:
    assert any(reg == "none" and lr == hi for reg, lr, _, _ in plan)
    assert {reg for reg, lr, _, _ in plan if lr == sweep.LOW_LR} >= {"maxent", "none"}  # claim 3's lr
    # seed-major: every configuration at seed 1 comes before any run at seed 2
    seeds = [seed for _, _, seed, _ in plan]
    assert seeds == sorted(seeds)
    # shards partition the plan
    shards = [sweep.shard_items(plan, (i, 2)) for i in range(2)]
    assert sorted(shards[0] + shards[1], key=plan.index) == plan and not set(shards[0]) & set(shards[1])
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    with pytest.raises(ValueError):
        sweep.shard_items(plan, (2, 2))
    assert sweep.rloo_run_name("maxent", 1e-3, 2, 0.1) == "maxent_c0.1_lr1e-3_s2"
    assert sweep.rloo_run_name("maxent", 1e-3, 2, 0.5) == "maxent_lr1e-3_s2"  # the default coefficient
