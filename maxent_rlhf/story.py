"""Every run ends with its story: the closing summary a script prints, computed from its metrics records.

Pure Python (no torch): `run_story(records)` reads the list of dicts of a run's metrics.jsonl (each with
"step") and returns a `RunStory`, whose `.text()` is the few lines printed at the end of a run:

    run dir: runs/toy/entropy
    precision: float32 (mixed_precision: no)
    proxy score (objective/scores): 0.120 (step 1) -> 1.419 (step 80), rose: last-quarter mean 1.380 > first-quarter mean 0.200
    KL to reference (objective/kl_ref): 12.3 at step 80
    win rate: 32.0% SFT (step 0) -> peak 84.5% (step 10) -> final 0.0% (step 80), CI [0.0%, 1.9%], n = 200, 0 invalid
    verdict: overoptimised (final win rate 84.5 points below its peak while the proxy rose)

The precision line comes from the run directory's config.yaml (`mixed_precision` as the run applied it,
see `runs.RunDir.save_config`); without a run directory, or without that file, the line is left out.

Keys read (absent keys simply leave their line out or say so):
    objective/scores        proxy reward-model score (any other key via `proxy_key`, e.g. rewards/margins offline)
    objective/kl_ref        KL(pi_t || pi_ref) (logged every `kl_ref_every` iterations: the last logged value)
    eval/win_rate           win rate against the references, in [0, 1]; step 0 = the SFT policy before training
    eval/win_rate_ci_low, eval/win_rate_ci_high, eval/n, eval/invalid   its Wilson interval, count, invalid answers
    eval/missing            1 on a step whose evaluation failed (judge outage): counted, never a win rate

The verdict (Sec. 4's failure mode: the proxy goes up, true quality goes down):
    "overoptimised"        final win rate <= peak win rate - `drop` (0.10 = 10 points; the peak may be the
                           SFT evaluation at step 0) AND the proxy rose, i.e. the mean of the last quarter of
                           its logged values (at least one value) exceeds the mean of the first quarter;
    "no overoptimisation"  otherwise (a smaller drop, or a drop while the proxy did not rise);
    "n/a (no evaluation)", "n/a (a single evaluation)", "n/a (no proxy score)"  when it cannot be decided.
The rule compares point estimates; with n = 200 the Wilson half-width near 50% is ~7 points, so read a
drop close to 10 points against the printed interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

PROXY_KEY = "objective/scores"
KL_REF_KEY = "objective/kl_ref"
WIN_RATE_KEY = "eval/win_rate"
WIN_RATE_CI_LOW_KEY = "eval/win_rate_ci_low"
WIN_RATE_CI_HIGH_KEY = "eval/win_rate_ci_high"
EVAL_N_KEY = "eval/n"
EVAL_INVALID_KEY = "eval/invalid"
EVAL_MISSING_KEY = "eval/missing"

OVEROPTIMISATION_DROP = 0.10  # win-rate points (as a fraction) below the peak that count as overoptimised
_EPS = 1e-9  # so that a drop of exactly `drop` (0.30 -> 0.20) counts despite binary rounding

OVEROPTIMISED = "overoptimised"
NOT_OVEROPTIMISED = "no overoptimisation"
NO_EVALUATION = "n/a (no evaluation)"
SINGLE_EVALUATION = "n/a (a single evaluation)"
NO_PROXY = "n/a (no proxy score)"

# accelerate's `mixed_precision` values, in words ('auto' is resolved before config.yaml is written)
PRECISION_WORDS = {"no": "float32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision",
                   "fp8": "fp8 mixed precision"}


@dataclass(frozen=True)
class Point:
    step: int
    value: float


@dataclass
class RunStory:
    run_dir: Optional[str]
    precision: Optional[str]  # accelerate's `mixed_precision` that ran ('no', 'bf16', ...); None: not recorded
    proxy_key: str
    proxy_first: Optional[Point]
    proxy_last: Optional[Point]
    proxy_first_quarter_mean: Optional[float]
    proxy_last_quarter_mean: Optional[float]
    proxy_rose: bool
    kl_ref_last: Optional[Point]
    win_rate_sft: Optional[Point]  # the evaluation at step 0, if any
    win_rate_peak: Optional[Point]  # the highest (earliest on ties), step 0 included
    win_rate_final: Optional[Point]  # the last evaluated step
    final_ci: Optional[tuple[float, float]]
    final_n: Optional[int]
    final_invalid: Optional[int]
    evaluations: int
    missing_evaluations: int
    verdict: str
    reason: str

    @property
    def drop_from_peak(self) -> Optional[float]:
        if self.win_rate_peak is None or self.win_rate_final is None:
            return None
        return self.win_rate_peak.value - self.win_rate_final.value

    def text(self) -> str:
        lines = []
        if self.run_dir:
            lines.append(f"run dir: {self.run_dir}")
        if self.precision is not None:
            lines.append(f"precision: {PRECISION_WORDS.get(self.precision, self.precision)} "
                         f"(mixed_precision: {self.precision})")
        if self.proxy_first is not None and self.proxy_last is not None:
            trend = "rose" if self.proxy_rose else "did not rise"
            cmp = ">" if self.proxy_rose else "<="
            lines.append(
                f"proxy score ({self.proxy_key}): {self.proxy_first.value:.3f} (step {self.proxy_first.step}) -> "
                f"{self.proxy_last.value:.3f} (step {self.proxy_last.step}), {trend}: last-quarter mean "
                f"{self.proxy_last_quarter_mean:.3f} {cmp} first-quarter mean {self.proxy_first_quarter_mean:.3f}"
            )
        else:
            lines.append(f"proxy score ({self.proxy_key}): not logged")
        if self.kl_ref_last is not None:
            lines.append(f"KL to reference ({KL_REF_KEY}): {self.kl_ref_last.value:.3g} at step {self.kl_ref_last.step}")
        if self.win_rate_final is not None:
            sft = (f"{_pct(self.win_rate_sft.value)} SFT (step 0)" if self.win_rate_sft is not None
                   else "SFT not evaluated")
            line = (f"win rate: {sft} -> peak {_pct(self.win_rate_peak.value)} (step {self.win_rate_peak.step}) -> "
                    f"final {_pct(self.win_rate_final.value)} (step {self.win_rate_final.step})")
            if self.final_ci is not None:
                line += f", CI [{_pct(self.final_ci[0])}, {_pct(self.final_ci[1])}]"
            if self.final_n is not None:
                line += f", n = {self.final_n}"
            if self.final_invalid is not None:
                line += f", {self.final_invalid} invalid"
            lines.append(line)
        else:
            lines.append("win rate: no evaluation in this run")
        if self.missing_evaluations:
            lines.append(f"  ({self.missing_evaluations} evaluation(s) failed and are missing from the curve)")
        lines.append(f"verdict: {self.verdict}" + (f" ({self.reason})" if self.reason else ""))
        return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _series(by_step: dict[int, Mapping], key: str) -> list[Point]:
    out = []
    for step in sorted(by_step):
        v = _number(by_step[step].get(key))
        if v is not None:
            out.append(Point(step, v))
    return out


def _merge_by_step(records: Iterable[Mapping]) -> dict[int, dict]:
    """{step: merged record}; several records of one step (training metrics, then its evaluation) merge,
    a later value of a key wins (what a resumed run re-logged)."""
    by_step: dict[int, dict] = {}
    for r in records:
        if not isinstance(r, Mapping):
            continue
        step = _number(r.get("step"))
        if step is None:
            continue
        by_step.setdefault(int(step), {}).update(r)
    return by_step


def recorded_precision(run_dir: str | Path) -> Optional[str]:
    """`mixed_precision` of the run's config.yaml (the precision that ran); None when it is not there."""
    import yaml

    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = saved.get("mixed_precision") if isinstance(saved, dict) else None
    return str(value) if value is not None else None


def last_quarter_above_first(values: list[float]) -> tuple[bool, Optional[float], Optional[float]]:
    """(rose, first-quarter mean, last-quarter mean): quarters of the logged values, at least one value each."""
    if not values:
        return False, None, None
    q = max(1, len(values) // 4)
    first, last = sum(values[:q]) / q, sum(values[-q:]) / q
    return last > first, first, last


def run_story(
    records: Iterable[Mapping],
    run_dir: Optional[str] = None,
    proxy_key: str = PROXY_KEY,
    drop: float = OVEROPTIMISATION_DROP,
) -> RunStory:
    """The closing summary of one run from its metrics records and, when `run_dir` is given, the
    precision its config.yaml records (see the module docstring)."""
    if not 0 < drop < 1:
        raise ValueError(f"`drop` is a win-rate difference in (0, 1) (0.10 = 10 points), got {drop}")
    by_step = _merge_by_step(records)
    proxy = _series(by_step, proxy_key)
    rose, first_q, last_q = last_quarter_above_first([p.value for p in proxy])
    kl_ref = _series(by_step, KL_REF_KEY)
    wins = _series(by_step, WIN_RATE_KEY)
    missing = sum(1 for r in by_step.values() if _number(r.get(EVAL_MISSING_KEY)))

    sft = next((p for p in wins if p.step == 0), None)
    peak = max(wins, key=lambda p: (p.value, -p.step)) if wins else None
    final = wins[-1] if wins else None
    ci = n = invalid = None
    if final is not None:
        rec = by_step[final.step]
        lo, hi = _number(rec.get(WIN_RATE_CI_LOW_KEY)), _number(rec.get(WIN_RATE_CI_HIGH_KEY))
        ci = (lo, hi) if lo is not None and hi is not None else None
        n = None if _number(rec.get(EVAL_N_KEY)) is None else int(rec[EVAL_N_KEY])
        invalid = None if _number(rec.get(EVAL_INVALID_KEY)) is None else int(rec[EVAL_INVALID_KEY])

    if not wins:
        verdict, reason = NO_EVALUATION, ""
    elif len(wins) < 2:
        verdict, reason = SINGLE_EVALUATION, "a drop from a peak needs two evaluated steps"
    elif not proxy:
        verdict, reason = NO_PROXY, f"{proxy_key} was not logged"
    else:
        fell = final.value <= peak.value - drop + _EPS
        points = 100.0 * (peak.value - final.value)
        if fell and rose:
            verdict, reason = OVEROPTIMISED, f"final win rate {points:.1f} points below its peak while the proxy rose"
        elif fell:
            verdict, reason = NOT_OVEROPTIMISED, f"win rate {points:.1f} points below its peak, but the proxy did not rise"
        else:
            verdict, reason = NOT_OVEROPTIMISED, (
                f"final win rate {points:.1f} points below its peak (< {100.0 * drop:.0f})" if points > 0
                else "the final win rate is the peak"
            )
    return RunStory(
        run_dir=None if run_dir is None else str(run_dir),
        precision=None if run_dir is None else recorded_precision(run_dir), proxy_key=proxy_key,
        proxy_first=proxy[0] if proxy else None, proxy_last=proxy[-1] if proxy else None,
        proxy_first_quarter_mean=first_q, proxy_last_quarter_mean=last_q, proxy_rose=rose,
        kl_ref_last=kl_ref[-1] if kl_ref else None,
        win_rate_sft=sft, win_rate_peak=peak, win_rate_final=final, final_ci=ci, final_n=n, final_invalid=invalid,
        evaluations=len(wins), missing_evaluations=missing, verdict=verdict, reason=reason,
    )
