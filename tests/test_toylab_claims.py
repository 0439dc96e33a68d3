"""The toy-lab report's verdict rules (maxent_rlhf/toylab/claims.py, thresholds in rules.py) on small
synthetic series: for each rule a series for every verdict it can give (agrees, partly, disagrees, not
testable here, n/a); then the claim table that wires the rules to a sweep's run statistics."""
from __future__ import annotations

import math

import pytest

from maxent_rlhf.toylab import claims, rules
from maxent_rlhf.toylab.claims import AGREES, DISAGREES, NA, NOT_TESTABLE, PARTLY, Outcome
from helpers.toylab_runs import fake_sweep_run


def run(sft, peak, final, name="r", proxy=(1.0, 1.3)):
    """A run; by default its proxy rises from the gold peak to the end (the overoptimisation signature)."""
    return Outcome(name, sft, peak, final, *proxy)


STABLE = run(0.30, 0.85, 0.84)  # gains 54 points, keeps them
DECLINES = run(0.30, 0.85, 0.60)  # peaks, falls 25 points, still 30 above SFT
COLLAPSES = run(0.30, 0.85, 0.02)  # peaks, loses everything
FLAT = run(0.30, 0.33, 0.31)  # never gains
CEILING = 0.85


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


def test_one_definition_of_overoptimised_for_tables_and_rules():
    assert COLLAPSES.overoptimised and DECLINES.overoptimised and not STABLE.overoptimised
    # the proxy falls with the gold win rate: a collapse, not overoptimisation (the run table said so, now the rules too)
    assert run(0.30, 0.85, 0.02, proxy=(1.05, 0.85)).overoptimised is False
    # ends below SFT by less than DROP: not overoptimised (no threshold-free "below SFT" any more)
    assert not run(0.30, 0.31, 0.25).overoptimised
    # never gains, but falls >= DROP below SFT while the proxy rises: overoptimised from the start
    assert run(0.32, 0.32, 0.0).overoptimised and not FLAT.overoptimised
    assert run(0.30, 0.85, 0.02, proxy=(None, None)).overoptimised is None  # unknown without a proxy
    assert rules.overoptimised(0.85, 0.75, 1.0, 1.1) and not rules.overoptimised(0.85, 0.751, 1.0, 1.1)


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
    # SimPO at a high lr that never gained and whose proxy fell: not counted (point: "ends below SFT" had no threshold)
    assert claims.rule_all_overoptimise([run(0.32, 0.40, 0.0, proxy=(0.2, -1.0))]).level == DISAGREES
    assert claims.rule_all_overoptimise([]).level == NA
    v = claims.rule_all_overoptimise([run(0.3, 0.85, 0.0, proxy=(None, None))])
    assert v.level == NA and "proxy" in v.reason


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
    assert v.level == PARTLY and "2/4 runs" in v.reason
    # the toy run maxent_c1_lr1e-3_s2: gold falls but the proxy falls too -> not overoptimised
    sweep[0.1] = [COLLAPSES, run(0.32, 0.73, 0.0, proxy=(1.05, 0.85))]
    assert claims.rule_overoptimise_regardless_of_coef(sweep).level == PARTLY
    calm = {c: [STABLE] for c in (0.0, 0.1, 0.5, 1.0)}
    assert claims.rule_overoptimise_regardless_of_coef(calm).level == DISAGREES
    unknown = {c: [run(0.3, 0.8, 0.0, proxy=(None, None))] for c in (0.0, 0.1, 0.5, 1.0)}
    assert claims.rule_overoptimise_regardless_of_coef(unknown).level == NA


def test_gain_attribution_is_tested_only_where_entropy_runs_keep_gains():
    # lr 1e-4: entropy runs collapse (no gain to attribute); lr 2e-5: they keep it and coefficient 0 matches
    by_lr = {1e-4: ([COLLAPSES] * 3, [run(0.30, 0.85, 0.64)]), 2e-5: ([run(0.3, 0.7, 0.7)] * 2, [run(0.30, 0.72, 0.68)])}
    v = claims.rule_gain_not_from_entropy(by_lr, CEILING)
    assert v.level == AGREES and "lr 2e-05" in v.evidence and "lr 0.0001" not in v.evidence
    # the entropy term helps: coefficient 0 ends 26 points lower where the entropy runs keep their gain
    by_lr[2e-5] = ([run(0.3, 0.7, 0.7)] * 2, [run(0.30, 0.60, 0.44)])
    assert claims.rule_gain_not_from_entropy(by_lr, CEILING).level == DISAGREES
    # one rate each way
    both = {2e-5: by_lr[2e-5], 5e-5: ([run(0.3, 0.7, 0.7)], [run(0.3, 0.7, 0.69)])}
    assert claims.rule_gain_not_from_entropy(both, CEILING).level == PARTLY
    # no lr where entropy runs keep a gain -> n/a, even though coefficient 0 beats them at 1e-4
    v = claims.rule_gain_not_from_entropy({1e-4: by_lr[1e-4]}, CEILING)
    assert v.level == NA and "no gain to attribute" in v.reason and "-28 points" in v.evidence
    # a gain without coefficient-0 runs beside it cannot be attributed either
    assert claims.rule_gain_not_from_entropy({2e-5: ([STABLE], [])}).level == NA
    # both at the task's ceiling (the old sweep's 84-85%): could not have disagreed -> not testable here
    v = claims.rule_gain_not_from_entropy({2e-5: ([STABLE] * 2, [run(0.3, 0.85, 0.85)])}, CEILING)
    assert v.level == NOT_TESTABLE and "ceiling" in v.reason


def test_entropy_trend():
    assert claims.rule_entropy_trend([-0.05, -0.02], [0.2, 0.3]).level == AGREES
    assert claims.rule_entropy_trend([0.05, 0.02], [-0.2, -0.3]).level == DISAGREES
    # the old sweep's case: the stable half 0/6 (flat), the overoptimised half 18/18 -> disagrees, not partly
    assert claims.rule_entropy_trend([0.001] * 6, [0.3] * 18).level == DISAGREES
    v = claims.rule_entropy_trend([], [0.2, 0.3])
    assert v.level == PARTLY and "only half" in v.reason
    assert claims.rule_entropy_trend([], [-0.2]).level == DISAGREES
    assert claims.rule_entropy_trend([], []).level == NA


def test_kl_ref_bounded():
    assert claims.rule_kl_ref_bounded([1.0, 1.1], [2.0], [1.0], [30.0]).level == AGREES
    v = claims.rule_kl_ref_bounded([1.0], [1.05])  # the entropy runs' KL_ref stops growing (a collapsed policy)
    assert v.level == PARTLY and "stops growing" in v.reason
    assert claims.rule_kl_ref_bounded([2.0], [3.0]).level == PARTLY  # both drift
    assert claims.rule_kl_ref_bounded([2.0], [1.0]).level == DISAGREES
    assert claims.rule_kl_ref_bounded([], [1.0]).level == NA


def _est(growth: float, **other) -> dict:
    out = {n: [growth] for n in rules.KL_PREV_ESTIMATES}
    out.update({n: [g] for n, g in other.items()})
    return out


def test_kl_prev_growth_under_every_estimate_and_the_ess():
    assert claims.rule_kl_prev_growth(_est(0.2), _est(4.0), ess=0.9).level == AGREES
    assert claims.rule_kl_prev_growth(_est(1.0), _est(0.4), ess=0.9).level == DISAGREES  # entropy updates shrink
    v = claims.rule_kl_prev_growth(_est(5.0), _est(2.0), ess=0.9)
    assert v.level == PARTLY and "as much" in v.reason
    assert claims.rule_kl_prev_growth({}, _est(2.0)).level == NA
    # high ESS: the verdict rests on the paper's direction (k1)
    v = claims.rule_kl_prev_growth(_est(0.2), _est(4.0), ess=0.9)
    assert "KL(pi_t||pi_t-1) k1: KL 0.20, entropy 4.00 (verdict rests on this)" in v.evidence
    # low ESS: on the reverse direction's k3; here it does not grow -> disagrees, whatever the weighted one says
    ent = _est(4.0, **{"KL(pi_t-1||pi_t) k3": 0.8})
    v = claims.rule_kl_prev_growth(_est(0.2), ent, ess=0.12)
    assert v.level == DISAGREES and "KL(pi_t-1||pi_t) k3: KL 0.20, entropy 0.80 (verdict rests on this)" in v.evidence
    # the primary agrees, another estimate does not: partly, naming it
    v = claims.rule_kl_prev_growth(_est(0.2), ent, ess=0.9)
    assert v.level == PARTLY and "other estimates: disagrees" in v.reason


def test_ref_logratio_band_sign_and_width_per_example():
    negative_narrow = [-0.1 + 0.02 * math.sin(i) for i in range(40)]  # batch sd 0.014 -> per example 0.08
    v = claims.rule_ref_logratio_band(negative_narrow, 32)
    assert v.level == AGREES and "0% of batches above 0" in v.evidence
    # the old sweep's case: batch sd 0.53 of 32-example means = ~3 nats per example: not narrow, not negative
    positive = [0.06 + 0.53 * (1 if i % 2 else -1) for i in range(60)]
    v = claims.rule_ref_logratio_band(positive, 32)
    assert v.level == DISAGREES and "per-example sd 3.0" in v.evidence
    v = claims.rule_ref_logratio_band(positive, 32, per_example_sd=0.4)  # a logged per-example sd wins
    assert v.level == PARTLY and "not typically negative" in v.reason and "(logged)" in v.evidence
    wide_negative = [-0.2 + 0.5 * (1 if i % 3 == 0 else -0.5) for i in range(40)]
    v = claims.rule_ref_logratio_band(wide_negative, 32)
    assert v.level == PARTLY and "not narrow" in v.reason
    assert claims.rule_ref_logratio_band([-0.1] * 5, 32).level == NA


def test_ref_logratio_width_scales_with_the_batch_size():
    series = [-0.2 + 0.15 * (i % 3 - 1) for i in range(42)]  # batch sd 0.12, 2/3 below 0
    assert claims.rule_ref_logratio_band(series, 8).level == AGREES  # 0.35 per example
    v = claims.rule_ref_logratio_band(series, 128)  # 1.4 per example
    assert v.level == PARTLY and "not narrow" in v.reason


def test_margin_helps_on_the_peak():
    assert claims.rule_margin_helps(0.70, {0.5: 0.78, 1.0: 0.60}, CEILING).level == AGREES
    assert claims.rule_margin_helps(0.73, {0.5: 0.66, 2.0: 0.52}, CEILING).level == DISAGREES
    assert claims.rule_margin_helps(0.70, {0.5: 0.72}, CEILING).level == PARTLY
    assert claims.rule_margin_helps(None, {0.5: 0.72}).level == NA
    v = claims.rule_margin_helps(0.85, {0.5: 0.85}, CEILING)  # every gamma peaks at the ceiling
    assert v.level == NOT_TESTABLE and "ceiling" in v.reason


def test_larger_margin_worse_on_the_drop():
    worse = {0.0: run(0.3, 0.85, 0.73), 1.0: run(0.3, 0.85, 0.61), 2.0: run(0.3, 0.85, 0.52)}
    v = claims.rule_larger_margin_worse(worse)
    assert v.level == AGREES and "0: 12 points" in v.evidence
    better = {0.0: run(0.3, 0.85, 0.52), 2.0: run(0.3, 0.85, 0.73)}
    assert claims.rule_larger_margin_worse(better).level == DISAGREES
    same = {0.0: run(0.3, 0.85, 0.70), 2.0: run(0.3, 0.83, 0.66)}
    assert claims.rule_larger_margin_worse(same).level == PARTLY
    zeros = {0.0: run(0.3, 0.40, 0.0), 2.0: run(0.3, 0.35, 0.01)}
    v = claims.rule_larger_margin_worse(zeros)
    assert v.level == NA and "~0" in v.reason
    calm = {0.0: run(0.3, 0.85, 0.84), 2.0: run(0.3, 0.85, 0.80)}
    assert claims.rule_larger_margin_worse(calm).level == NA  # nothing overoptimises
    assert claims.rule_larger_margin_worse({1.0: worse[1.0], 2.0: worse[2.0]}).level == NA  # no gamma 0


def test_claims_12_and_13_read_different_observations():
    """The old rules read one number (the final win rate) with opposite signs; now 12 reads the peak and 13
    the drop, so a margin that lifts the peak and loses more afterwards agrees with both."""
    g = {0.0: run(0.3, 0.70, 0.65), 1.0: run(0.3, 0.80, 0.62)}
    assert claims.rule_margin_helps(g[0.0].peak, {1.0: g[1.0].peak}, CEILING).level == AGREES
    assert claims.rule_larger_margin_worse(g).level == AGREES


def test_entropy_exacerbates():
    by_lr = {1e-4: ([run(0.3, 0.85, 0.12)] * 2, [run(0.3, 0.85, 0.58)]), 1e-3: ([COLLAPSES], [COLLAPSES])}
    v = claims.rule_entropy_exacerbates(by_lr)
    assert v.level == AGREES and "lr 0.0001: final win entropy 12%" in v.evidence
    assert claims.rule_entropy_exacerbates({1e-3: ([COLLAPSES], [COLLAPSES])}).level == DISAGREES
    assert claims.rule_entropy_exacerbates({1e-3: ([COLLAPSES], [])}).level == NA


def test_length_normalisation_curbs_length_growth_online():
    rule = claims.rule_length_normalisation_curbs
    assert rule([4.0, 5.0], [0.5, 1.0], 0.8, 0.4).level == AGREES
    assert rule([3.0], [3.5], 0.8, 0.4).level == DISAGREES
    v = rule([3.0], [2.5], 0.8, 0.4)
    assert v.level == PARTLY and "within a token" in v.reason
    v = rule([4.0], [0.0], 0.45, 0.40)  # the proxy has no length channel: nothing to exploit
    assert v.level == NOT_TESTABLE and "no length channel" in v.reason
    v = rule([0.2], [0.1], 0.8, 0.4)  # nobody grows length
    assert v.level == NOT_TESTABLE and "do not grow length" in v.reason
    assert rule([], [1.0], 0.8, 0.4).level == NA
    assert rule([4.0], [0.0], None, None).level == NOT_TESTABLE


def test_simpo_length_exploitation_without_normalisation():
    rule = claims.rule_simpo_length_exploitation
    assert rule([0.2], [3.0], 0.8, 0.4).level == AGREES
    assert rule([2.0], [1.5], 0.8, 0.4).level == DISAGREES
    v = rule([0.2], [0.7], 0.8, 0.4)
    assert v.level == PARTLY
    assert rule([0.2], [3.0], 0.41, 0.40).level == NOT_TESTABLE
    assert rule([0.2], [], 0.8, 0.4).level == NA


def test_every_rule_text_says_what_would_make_it_disagree():
    texts = [v for k, v in vars(claims).items() if k.endswith("_RULE") and isinstance(v, str)]
    assert len(texts) == 17 and all("disagree" in t for t in texts)  # 13 claims + H1-H3 + LoRA


def test_claim_2_is_decided_at_a_rate_fixed_by_rule():
    assert rules.low_lr(1e-3) == pytest.approx(1e-4)
    assert rules.low_lr() == pytest.approx(rules.HIGH_LR / 10)


# --------------------------------------------------------------------------------------------------
# the claim table wires the rules to run statistics
# --------------------------------------------------------------------------------------------------
def _stat(variant, lr, seed, o: Outcome, coef=None, default=True, **extra):
    return {"name": f"{variant}_lr{lr:g}_s{seed}", "variant": variant, "lr": lr, "coef": coef, "default_coef": default,
            "sft": o.sft, "peak": o.peak, "final": o.final, "drop": o.drop, "proxy_at_peak": o.proxy_at_peak,
            "proxy_final": o.proxy_final, "overoptimised": o.overoptimised, **extra}


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
    v = dict(_verdicts(claims_table(stats, {}, [1e-4, 1e-3], ceiling=CEILING)))
    assert v["1"].startswith("n/a (the sweep has no coefficient sweep")
    assert v["2"] == "disagrees" and v["5"] == "agrees"
    assert v["3"].startswith("n/a (at no learning rate")
    assert v["14"] == "agrees"  # at 1e-4 the entropy runs end 58 points below coefficient 0

    stats += [_stat("maxent", 1e-3, s, COLLAPSES, coef=c, default=False) for c in (0.1, 1.0) for s in (1, 2)]
    stats += [_stat("maxent", 2e-5, s, STABLE, coef=0.5) for s in (1, 2)]
    stats += [_stat("none", 2e-5, s, STABLE, coef=0.0) for s in (1, 2)]
    v = _verdicts(claims_table(stats, {}, [1e-4, 1e-3], extra_lrs=[2e-5], ceiling=CEILING))
    d = dict(v)
    assert d["1"] == "agrees"
    assert d["3"].startswith("not testable here (both groups end at the task's ceiling")  # 84% vs 84%, ceiling 85%
    # claim 2: the pre-registered rate (1e-3 / 10) decides; 2e-5 is reported beside and decides nothing
    assert [x for k, x in v if k == "2"] == ["disagrees", "agrees (reported beside the pre-registered rate; decides nothing)"]
    # a sweep without the pre-registered rate says so instead of promoting another rate
    no_low = [x for x in stats if x["lr"] != 1e-4]
    rows2 = [x for k, x in _verdicts(claims_table(no_low, {}, [1e-3], extra_lrs=[2e-5])) if k == "2"]
    assert rows2 == ["agrees (reported beside the pre-registered rate; decides nothing)",
                     "n/a (no runs of this configuration in the sweep)"]
    # without a ceiling claim 3 is compared as before
    assert dict(_verdicts(claims_table(stats, {}, [1e-4, 1e-3], extra_lrs=[2e-5])))["3"] == "agrees"


_fake_run = fake_sweep_run


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
    lora_cfg = {**{k: v for k, v in load_yaml(sweep.toy_config("lora_r2_maxent")).items() if k != "output_dir"},
                "learning_rate": 1e-3, "seed": 1}
    _fake_run(sw / "lora" / "rloo", "lora_r2_maxent_lr1e-3_s1", lora_cfg, [0.3, 0.8, 0.8], ent,
              {"regularizer": "lora_r2_maxent", "seconds": 40.0, "eval_seconds": 10.0})
    dpo = [{"step": s, "ref/logratio": -0.1 - 0.01 * (s % 3)} for s in range(1, 21)]
    _fake_run(sw / "offline", "dpo", {"loss_type": "dpo", "learning_rate": 1e-3, "beta": 0.1, "global_batch_size": 32},
              [0.3, 0.85, 0.3], dpo, {"seconds": 30.0, "eval_seconds": 10.0})
    (sw / "sweep.json").write_text(json.dumps({"lrs": [1e-4, 1e-3], "rloo_runs": ["maxent_lr1e-3_s1", "maxent_lr1e-4_s1", "kl_lr1e-3_s1"],
                                               "offline_runs": ["dpo"],
                                               "conditions": {"lora_r2_maxent": {"runs": ["lora_r2_maxent_lr1e-3_s1"]},
                                                              "pairwise_offline_simpo": {"runs": ["pairwise_offline_simpo_lr1e-4_s1"]}},
                                               "reused_runs": {"pairwise/offline/pairwise_offline_simpo_lr1e-4_s1": "offline/simpo_lr1e-4_g0.5"}}))
    text = write_report(sw, tmp_path / "report").read_text()
    # 330 s of training + 60 s of evaluation over the 5 sweep runs (the LoRA condition's included); the extra run is
    # named, not counted; the reused pairwise run is neither counted nor missing
    assert "training 5.5 min + evaluation 1.0 min = **6 min** for 5 runs (3 RLOO, 1 offline, 1 of further conditions)" in text
    assert "Not finished" not in text
    # LoRA vs full fine-tuning: the full-fine-tuning maxent run at lr 1e-3 collapses, the rank-2 LoRA one keeps its gain
    assert "| LoRA r=2 lora_r2_maxent_lr1e-3_s1 | 30% | 80% (10) | 80% | stable |" in text
    assert "| full fine-tuning maxent_lr1e-3_s1 | 30% | 80% (10) | 0% | collapses |" in text
    assert 'Verdict on "LoRA prevents the collapse": **agrees**' in text
    assert (tmp_path / "report" / "fig_lora_gold.png").exists()
    assert "outside the sweep, also in the tables: kl_lr9e-3_s1" in text
    # the README main job is a run of the tables, with the numbers the README may quote (no proxy measured here)
    assert f"| configs/toy/maxent.yaml | {main.name} | 30.0% -> 80.0% (10) -> 80.0% | - -> - |" in text
    assert "| configs/toy/kl.yaml | not in this sweep | - | - |" in text
    assert "| configs/toy/lora_r2_maxent.yaml | lora_r2_maxent_lr1e-3_s1 |" in text  # LoRA runs are matched too
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


# --------------------------------------------------------------------------------------------------
# the online pairwise experiment: H1-H3 (rules.py), every verdict each can give
# --------------------------------------------------------------------------------------------------
NO_FALL = run(0.30, 0.35, 0.33, proxy=(1.0, 1.1))  # never gains, never falls: neither stable nor overoptimised


def test_h1_dataset_constraint_stabilises():
    rule = claims.rule_dataset_constraint_stabilises
    # online SimPO collapses at both cells; offline stays stable at both / neither / one
    assert rule({(1e-3, 0.5): ([STABLE] * 3, [COLLAPSES] * 3), (1e-3, 0.0): ([STABLE] * 3, [DECLINES] * 3)}).level == AGREES
    assert rule({(1e-3, 0.5): ([COLLAPSES] * 3, [COLLAPSES] * 3), (1e-3, 0.0): ([NO_FALL] * 3, [COLLAPSES] * 3)}).level == DISAGREES
    v = rule({(1e-3, 0.5): ([STABLE] * 3, [COLLAPSES] * 3), (1e-4, 0.5): ([COLLAPSES, COLLAPSES, STABLE], [COLLAPSES] * 3)})
    assert v.level == PARTLY and "1/2" in v.reason
    # a cell where online SimPO is fine is not tested: offline failing there says nothing about H1
    assert rule({(1e-3, 0.5): ([STABLE] * 3, [COLLAPSES] * 3), (1e-4, 0.5): ([COLLAPSES] * 3, [STABLE] * 3)}).level == AGREES
    v = rule({(1e-3, 0.5): ([STABLE] * 3, [STABLE, STABLE, COLLAPSES])})  # online fails in 1 of 3 seeds: not a failure
    assert v.level == NOT_TESTABLE and "does not fail" in v.reason
    assert rule({(1e-3, 0.5): ([], [COLLAPSES])}).level == NA
    assert rule({(1e-3, 0.5): ([STABLE], [run(0.3, 0.85, 0.0, proxy=(None, None))])}).level == NA


def test_h2_margin_stabilises():
    rule = claims.rule_margin_stabilises
    assert rule({1e-3: ([STABLE] * 3, [COLLAPSES] * 3)}).level == AGREES  # the margin keeps what gamma 0 loses
    assert rule({1e-3: ([COLLAPSES] * 3, [STABLE] * 3)}).level == DISAGREES  # the margin makes it worse
    assert rule({1e-3: ([COLLAPSES] * 3, [COLLAPSES] * 3)}).level == DISAGREES  # the same loss: no stabilisation
    v = rule({1e-3: ([run(0.30, 0.85, 0.05)] * 3, [run(0.30, 0.85, 0.02)] * 3)})  # 3 points less drop: within noise
    assert v.level == PARTLY and "noise" in v.reason
    v = rule({1e-3: ([STABLE] * 3, [COLLAPSES] * 3), 1e-4: ([COLLAPSES] * 3, [STABLE] * 3)})
    assert v.level == PARTLY and "rates disagree" in v.reason
    assert rule({1e-4: ([STABLE] * 3, [STABLE] * 3), 1e-3: ([STABLE] * 3, [COLLAPSES] * 3)}).level == AGREES  # 1e-4 untested
    assert rule({1e-4: ([STABLE] * 3, [NO_FALL] * 3)}).level == NOT_TESTABLE
    assert rule({1e-4: ([STABLE] * 3, [])}).level == NA


def test_h3_online_simpo_fails_like_maxent():
    rule = claims.rule_online_simpo_fails_like_maxent
    assert rule({1e-3: ([COLLAPSES] * 3, [COLLAPSES] * 3), 1e-4: ([STABLE] * 3, [STABLE] * 3)}).level == AGREES
    assert rule({1e-3: ([STABLE] * 3, [COLLAPSES] * 3), 1e-4: ([STABLE] * 3, [STABLE] * 3)}).level == DISAGREES
    assert rule({1e-3: ([COLLAPSES] * 3, [STABLE] * 3)}).level == DISAGREES  # SimPO fails where MaxEnt does not
    v = rule({1e-3: ([COLLAPSES] * 3, [COLLAPSES] * 3), 1e-4: ([STABLE] * 3, [COLLAPSES] * 3)})
    assert v.level == PARTLY and "1/2" in v.reason
    assert rule({1e-3: ([STABLE] * 3, [NO_FALL] * 3)}).level == NOT_TESTABLE
    assert rule({1e-3: ([], [COLLAPSES])}).level == NA
    assert rule({1e-3: ([run(0.3, 0.85, 0.0, proxy=(None, None))], [COLLAPSES])}).level == NA


def test_the_pairwise_experiment_runs_every_condition_at_the_rules_rates_and_seeds():
    from maxent_rlhf.toylab import sweep

    by_name = {c.name: c for c in sweep.CONDITIONS}
    for name in ("pairwise_offline_simpo", "pairwise_offline_simpo_gamma0", "online_simpo", "online_simpo_gamma0", "online_dpo"):
        c = by_name[name]
        assert c.enabled() and tuple(c.lrs) == rules.PAIRWISE_LRS and tuple(c.seeds) == sweep.SEEDS
    # the main grid's MaxEnt and KL RLOO runs sit at the same rates and seeds
    assert set(rules.PAIRWISE_LRS) <= set(sweep.LEARNING_RATES) and {"maxent", "kl"} <= set(sweep.REGULARIZERS)
    assert by_name["pairwise_offline_simpo"].options["simpo_gamma"] == rules.PAIRWISE_GAMMA
    assert by_name["pairwise_offline_simpo_gamma0"].options["simpo_gamma"] == 0.0
    from maxent_rlhf.config import load_yaml

    assert load_yaml(sweep.toy_config("online_simpo"))["simpo_gamma"] == rules.PAIRWISE_GAMMA
    assert load_yaml(sweep.toy_config("online_simpo_gamma0"))["simpo_gamma"] == 0.0
    assert {c.kind for c in sweep.CONDITIONS if c.name.startswith("online_")} == {"online"}


# --------------------------------------------------------------------------------------------------
# LoRA vs full fine-tuning: "LoRA prevents the collapse", every verdict it can give
# --------------------------------------------------------------------------------------------------
def test_lora_prevents_collapse():
    rule = claims.rule_lora_prevents_collapse
    full = [COLLAPSES] * 3
    assert rule(full, {2: [STABLE] * 3, 8: [STABLE, STABLE, COLLAPSES]}).level == AGREES
    assert rule(full, {2: [COLLAPSES] * 3, 8: [COLLAPSES, COLLAPSES, STABLE]}).level == DISAGREES
    # overoptimised without losing the whole gain still counts as failing too
    assert rule(full, {2: [run(0.30, 0.85, 0.60)] * 3}).level == DISAGREES
    v = rule(full, {2: [STABLE] * 3, 8: [COLLAPSES] * 3})  # the ranks differ
    assert v.level == PARTLY and "r=2: agrees" in v.reason and "r=8: disagrees" in v.reason
    # improves, then declines while the proxy falls too: neither kept nor lost
    assert rule(full, {2: [run(0.30, 0.85, 0.60, proxy=(1.0, 0.9))] * 3}).level == PARTLY
    # a rank that never gains is not tested; the other decides
    assert rule(full, {2: [FLAT] * 3, 8: [STABLE] * 3}).level == AGREES
    v = rule(full, {2: [FLAT] * 3, 8: [FLAT, FLAT, STABLE]})
    assert v.level == NOT_TESTABLE and "no LoRA rank gains" in v.reason
    v = rule([STABLE, STABLE, COLLAPSES], {2: [STABLE] * 3})  # full fine-tuning does not collapse: nothing to prevent
    assert v.level == NOT_TESTABLE and "nothing to prevent" in v.reason
    assert rule([], {2: [STABLE]}).level == NA
    assert rule(full, {2: []}).level == NA


def test_lora_configs_are_the_maxent_config_plus_lora_at_the_rules_ranks():
    from maxent_rlhf.config import load_yaml
    from maxent_rlhf.toylab import sweep

    base = load_yaml(sweep.toy_config("maxent"))
    by_name = {c.name: c for c in sweep.CONDITIONS}
    for r in rules.LORA_RANKS:
        cfg = load_yaml(sweep.toy_config(f"lora_r{r}_maxent"))
        assert cfg["use_peft"] is True and cfg["lora_r"] == r and cfg["lora_alpha"] == rules.LORA_ALPHA_PER_RANK * r
        lora_keys = {"use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
        # everything else is the full-fine-tuning config's (the sweep sets lr and seed on the command line)
        assert {k: v for k, v in cfg.items() if k not in lora_keys | {"output_dir", "learning_rate"}} == \
            {k: v for k, v in base.items() if k not in {"output_dir", "learning_rate"}}
        c = by_name[f"lora_r{r}_maxent"]
        assert c.enabled() and c.kind == "rloo" and not c.options and tuple(c.lrs) == rules.LORA_LRS
        assert tuple(c.seeds) == sweep.SEEDS
    # the full-fine-tuning baseline is in the main grid at the same rates and seeds
    plan = sweep.rloo_plan()
    assert {(lr, s) for lr in rules.LORA_LRS for s in sweep.SEEDS} <= {(lr, s) for reg, lr, s, c in plan
                                                                        if reg == "maxent" and c is None}


def test_the_sweep_fits_its_budget_and_runs_nothing_twice():
    from maxent_rlhf.toylab import sweep

    plan, off = sweep.rloo_plan(), sweep.offline_plan()
    assert not [c.name for c in sweep.CONDITIONS if not c.enabled()]  # no hook left: every condition is real
    reused = sweep.reused_runs(plan, off)
    est = sweep.estimate_minutes(len(plan), len(off), enabled_only=True, reused=reused)
    assert est["total"] <= sweep.BUDGET_MINUTES == 240, est
    # the pairwise experiment's offline SimPO at the main SimPO grid's lr, seed and gammas reuses those runs
    assert reused == {"pairwise/offline/pairwise_offline_simpo_lr1e-4_s1": "offline/simpo_lr1e-4_g0.5",
                      "pairwise/offline/pairwise_offline_simpo_gamma0_lr1e-4_s1": "offline/simpo_lr1e-4_g0"}
    jobs = sweep.condition_jobs(reused=reused)
    grid = sweep.main_grid_runs(plan, off)
    assert len(grid) == len(plan) + len(off)  # the grid itself has no duplicate
    signatures = [sweep._signature(c.kind, c.config, lr, seed, c.options) for _, (c, _, lr, seed) in jobs
                  if not c.eval_options]
    assert not set(signatures) & set(grid) and len(set(signatures)) == len(signatures)
    assert len(jobs) == sum(len(c.runs()) for c in sweep.CONDITIONS) - len(reused)


def test_every_rule_finds_its_runs_in_the_plan():
    """The runs each pre-registered rule reads (rules.CLAIM_INPUTS, HYPOTHESES, LORA_CLAIM) exist in the plan."""
    from maxent_rlhf.toylab import sweep

    plan, off = sweep.rloo_plan(), sweep.offline_plan()
    hi, low, seeds = rules.HIGH_LR, rules.low_lr(), set(sweep.SEEDS)
    online = {(reg, lr): {s for r, l_, s, c in plan if r == reg and l_ == lr and c is None} for reg, lr, _, _ in plan}
    coefs = {c for reg, lr, _, c in plan if reg == "maxent" and lr == hi and c is not None}
    conds = {c.name: c for c in sweep.CONDITIONS if c.enabled()}
    # 1: maxent at the high lr, >= 3 coefficients spanning 10x, plus coefficient 0
    assert len(coefs | {sweep.default_entropy_coef("maxent")}) >= 3 and online[("none", hi)] == seeds
    # 2, 3, 14: entropy runs and coefficient 0 at low_lr() and at the scan's rates, 3 seeds (means over seeds)
    for lr in (low, *rules.LOW_LR_SCAN):
        assert online[("maxent", lr)] == online[("entropy", lr)] == online[("none", lr)] == seeds
    # 4, 6, 7: kl and entropy runs at each main rate; 5, 8: kl and minent at the high lr
    for lr in sweep.LEARNING_RATES:
        assert online[("kl", lr)] == online[("maxent", lr)] == online[("entropy", lr)] == seeds
    assert online[("minent", hi)] == seeds
    # 9: the DPO run; 10-13: SimPO at >= 2 rates, gamma 0 and >= 2 gammas > 0 at each
    assert any(name == "dpo" for name, *_ in off)
    simpo = {(lr, x["simpo_gamma"]) for name, cfg, lr, x in off if cfg == "simpo"}
    assert len(sweep.SIMPO_LRS) >= 2 and all({(lr, g) for g in sweep.SIMPO_GAMMAS} <= simpo for lr in sweep.SIMPO_LRS)
    assert 0.0 in sweep.SIMPO_GAMMAS and sum(g > 0 for g in sweep.SIMPO_GAMMAS) >= 2
    # 15-16: the length channel, 3 seeds each
    for name, lr in (("length_maxent", rules.LENGTH_LR), ("length_entropy", rules.LENGTH_LR),
                     ("length_simpo_norm", rules.LENGTH_SIMPO_LR), ("length_simpo_plain", rules.LENGTH_SIMPO_LR)):
        assert conds[name].lrs == (lr,) and set(conds[name].seeds) == seeds
    # H1-H3: offline and online SimPO (both gammas) at every pairwise rate and seed (run or reused), MaxEnt in the grid
    for name in ("pairwise_offline_simpo", "pairwise_offline_simpo_gamma0", "online_simpo", "online_simpo_gamma0"):
        assert tuple(conds[name].lrs) == rules.PAIRWISE_LRS and set(conds[name].seeds) == seeds
    assert all(online[("maxent", lr)] == seeds for lr in rules.PAIRWISE_LRS)
    # LoRA: every rank at every LoRA rate and seed, full fine-tuning beside it
    for r in rules.LORA_RANKS:
        assert tuple(conds[f"lora_r{r}_maxent"].lrs) == rules.LORA_LRS and set(conds[f"lora_r{r}_maxent"].seeds) == seeds
    assert all(online[("maxent", lr)] == seeds for lr in rules.LORA_LRS)
