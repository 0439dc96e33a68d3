"""The closing summary of a run on small synthetic metrics series."""
from __future__ import annotations

import json

import pytest

from maxent_rlhf import story


def _records(scores, evals=None, kl_ref=None, extra_eval=None):
    """Training records at steps 1..len(scores); evals {step: win rate} as separate records (step 0 = SFT)."""
    recs = [{"step": i + 1, "objective/scores": s} for i, s in enumerate(scores)]
    for i, kl in enumerate(kl_ref or []):
        if kl is not None:
            recs[i]["objective/kl_ref"] = kl
    for step, w in (evals or {}).items():
        rec = {"step": step, "eval/win_rate": w, "eval/win_rate_ci_low": max(0.0, w - 0.05),
               "eval/win_rate_ci_high": min(1.0, w + 0.05), "eval/n": 200, "eval/invalid": 1}
        rec.update((extra_eval or {}).get(step, {}))
        recs.append(rec)
    return recs


RISING = [0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.2, 1.4]  # first-quarter mean 0.15, last-quarter mean 1.3


def test_proxy_up_win_rate_down_is_overoptimised():
    """A toy run of the lab's sweep: 32% SFT -> 84.5% at iteration 10 -> 0% at 80 while the proxy rose."""
    recs = _records(RISING, {0: 0.32, 2: 0.845, 4: 0.6, 8: 0.0}, kl_ref=[None, 0.5, None, 2.0, None, 5.0, None, 12.25])
    s = story.run_story(recs, run_dir="runs/toy/entropy")
    assert s.verdict == story.OVEROPTIMISED
    assert (s.proxy_first, s.proxy_last) == (story.Point(1, 0.1), story.Point(8, 1.4))
    assert s.proxy_rose and s.proxy_first_quarter_mean == pytest.approx(0.15) and s.proxy_last_quarter_mean == pytest.approx(1.3)
    assert s.kl_ref_last == story.Point(8, 12.25)  # the last logged value (kl_ref is not logged every step)
    assert (s.win_rate_sft, s.win_rate_peak, s.win_rate_final) == (story.Point(0, 0.32), story.Point(2, 0.845), story.Point(8, 0.0))
    assert s.drop_from_peak == pytest.approx(0.845)
    assert (s.final_ci, s.final_n, s.final_invalid, s.evaluations) == ((0.0, 0.05), 200, 1, 4)
    text = s.text()
    assert "run dir: runs/toy/entropy" in text
    assert "0.100 (step 1) -> 1.400 (step 8), rose" in text
    assert "KL to reference (objective/kl_ref): 12.2 at step 8" in text
    assert "32.0% SFT (step 0) -> peak 84.5% (step 2) -> final 0.0% (step 8), CI [0.0%, 5.0%], n = 200, 1 invalid" in text
    assert text.splitlines()[-1] == "verdict: overoptimised (final win rate 84.5 points below its peak while the proxy rose)"


def test_a_drop_of_exactly_ten_points_counts_and_the_peak_may_be_sft():
    """final <= peak - 0.10 despite binary rounding (0.30 - 0.10 != 0.20 in floating point); the SFT
    evaluation at step 0 can be the peak (training made it worse)."""
    assert 0.2 > 0.3 - 0.10  # why the rule needs a tolerance
    s = story.run_story(_records(RISING, {0: 0.3, 4: 0.25, 8: 0.2}))
    assert s.win_rate_peak == story.Point(0, 0.3) and s.verdict == story.OVEROPTIMISED


def test_a_drop_under_ten_points_is_not_overoptimised():
    s = story.run_story(_records(RISING, {0: 0.30, 4: 0.70, 8: 0.61}))
    assert s.proxy_rose and s.verdict == story.NOT_OVEROPTIMISED
    assert "9.0 points below its peak (< 10)" in s.text()


def test_a_falling_proxy_is_not_overoptimised_even_when_the_win_rate_falls():
    falling = list(reversed(RISING))
    s = story.run_story(_records(falling, {0: 0.5, 4: 0.6, 8: 0.1}))
    assert not s.proxy_rose and s.verdict == story.NOT_OVEROPTIMISED
    assert "but the proxy did not rise" in s.text() and "did not rise: last-quarter mean 0.150 <= first-quarter mean 1.300" in s.text()


def test_rose_compares_quarter_means_not_endpoints():
    """A proxy that spikes at the very end but sits lower over its last quarter did not rise."""
    values = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.2, 1.5]  # last > first, but last-quarter mean 0.85 < 1.0
    assert story.last_quarter_above_first(values)[0] is False
    assert story.last_quarter_above_first([0.0, 0.1]) == (True, 0.0, 0.1)  # quarters of at least one value
    assert story.last_quarter_above_first([0.3]) == (False, 0.3, 0.3)
    assert story.last_quarter_above_first([]) == (False, None, None)


def test_no_evaluation_and_undecidable_cases():
    s = story.run_story(_records(RISING))
    assert s.verdict == story.NO_EVALUATION and s.win_rate_final is None
    assert "win rate: no evaluation in this run" in s.text() and s.text().endswith("verdict: n/a (no evaluation)")
    assert "KL to reference" not in s.text()
    assert story.run_story(_records(RISING, {8: 0.4})).verdict == story.SINGLE_EVALUATION
    offline = [{"step": 0, "eval/win_rate": 0.5}, {"step": 10, "eval/win_rate": 0.1}]
    assert story.run_story(offline).verdict == story.NO_PROXY
    margins = offline + [{"step": 5, "rewards/margins": 0.1}, {"step": 10, "rewards/margins": 3.0}]
    assert story.run_story(margins, proxy_key="rewards/margins").verdict == story.OVEROPTIMISED


def test_missing_evaluations_and_messy_records():
    """A failed evaluation (judge outage) is counted, not plotted; non-finite values, records without a
    step and string values are ignored; a record re-logged for the same step replaces the earlier value."""
    recs = _records(RISING, {0: 0.4, 4: 0.9, 8: 0.2}, extra_eval={8: {"eval/win_rate_ci_low": None}})
    recs += [{"step": 6, "eval/missing": 1, "eval/error": "judge unreachable"},
             {"objective/scores": 99.0}, {"step": 3, "objective/scores": float("nan")},
             {"step": "x"}, {"step": 7, "eval/win_rate": "0.99"}]
    recs.append({"step": 8, "objective/scores": 2.0})  # re-logged after a resume
    s = story.run_story(json.loads(json.dumps(recs, allow_nan=True)))
    assert s.missing_evaluations == 1 and s.evaluations == 3
    assert s.proxy_last == story.Point(8, 2.0) and s.final_ci is None
    assert s.verdict == story.OVEROPTIMISED
    assert "1 evaluation(s) failed" in s.text() and "CI [" not in s.text()


def test_bad_drop_is_rejected():
    with pytest.raises(ValueError, match="drop"):
        story.run_story([], drop=10)


def test_the_precision_line_comes_from_the_run_dirs_config(tmp_path):
    """The precision that ran, as the run's config.yaml records it, under the run dir line; a run dir
    without a readable config.yaml (or no run dir) has no such line."""
    recs = _records(RISING)
    (tmp_path / "config.yaml").write_text("seed: 1\nmixed_precision: 'no'\n")
    lines = story.run_story(recs, run_dir=tmp_path).text().splitlines()
    assert lines[:2] == [f"run dir: {tmp_path}", "precision: float32 (mixed_precision: no)"]
    (tmp_path / "config.yaml").write_text("mixed_precision: bf16\n")
    assert "precision: bf16 mixed precision (mixed_precision: bf16)" in story.run_story(recs, run_dir=tmp_path).text()
    (tmp_path / "config.yaml").write_text("mixed_precision: [bf16\n")  # torn by a kill
    assert "precision:" not in story.run_story(recs, run_dir=tmp_path).text()
    assert story.run_story(recs, run_dir=tmp_path / "absent").precision is None
    assert story.run_story(recs).precision is None
