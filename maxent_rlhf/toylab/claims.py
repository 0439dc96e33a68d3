"""The verdict rules of the report's claim table: one small, pure function per claim of the paper.

Every rule takes plain numbers (win rates as fractions, metric values in nats) and returns a `Verdict`
on one scale, so that each can be unit-tested on synthetic series (tests/test_report_rules.py) and
each could come out either way on real data:

    agrees     the toy shows what the claim says, by the rule stated in the row
    partly     part of the claim holds (e.g. the runs improve, then decline, but do not collapse)
    disagrees  the toy shows the opposite
    n/a        the data cannot test the claim; the reason says which data is missing and why

Thresholds are fixed here, once, before looking at any particular sweep:
  GAIN  a run "improves on SFT" when its gold win rate is >= 10 points above the SFT policy's;
  DROP  a run "declines" when its final win rate is >= 10 points below its in-run peak.
With 200 test posts a win rate near 50% has a standard error of ~3.5 points, so 10 points is ~3 SE.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..story import OVEROPTIMISATION_DROP as DROP  # the runs' closing summaries use the same 10 points

GAIN = 0.10
AGREES, PARTLY, DISAGREES, NA = "agrees", "partly", "disagrees", "n/a"


@dataclass(frozen=True)
class Verdict:
    level: str  # AGREES, PARTLY, DISAGREES or NA
    evidence: str  # the numbers the rule looked at
    rule: str  # the rule, in words
    reason: str = ""  # why n/a (required then), or what made it partly

    def cell(self) -> str:
        return f"{self.level} ({self.reason})" if self.reason else self.level


@dataclass(frozen=True)
class Outcome:
    """One run's gold win-rate trajectory: SFT (step 0), in-run peak, final checkpoint."""

    name: str
    sft: float
    peak: float
    final: float

    @property
    def drop(self) -> float:
        return self.peak - self.final

    @property
    def overoptimised(self) -> bool:
        """Falls >= DROP below its peak, or ends below SFT (claims 1 and 10)."""
        return self.drop >= DROP - 1e-9 or self.final < self.sft

    @property
    def trajectory(self) -> str:
        """'no gain' (never >= GAIN above SFT), 'stable' (no DROP from the peak), 'improves, then
        declines' (drops >= DROP but still ends >= GAIN above SFT) or 'collapses' (loses the gain)."""
        if self.peak < self.sft + GAIN - 1e-9:
            return "no gain"
        if self.drop < DROP - 1e-9:
            return "stable"
        if self.final >= self.sft + GAIN - 1e-9:
            return "improves, then declines"
        return "collapses"

    def describe(self) -> str:
        return f"{self.name}: {self.sft:.0%}->peak {self.peak:.0%}->final {self.final:.0%}"


def _count(items, pred) -> int:
    return sum(1 for x in items if pred(x))


def _trajectory_counts(outcomes: Sequence[Outcome]) -> str:
    kinds = ("stable", "improves, then declines", "collapses", "no gain")
    return ", ".join(f"{k} {_count(outcomes, lambda o: o.trajectory == k)}" for k in kinds
                     if _count(outcomes, lambda o: o.trajectory == k))


# --------------------------------------------------------------------------------------------------
# shared scales
# --------------------------------------------------------------------------------------------------
TRAJECTORY_RULE = ("agrees if every run is stable (ends >= 10 points above SFT, no 10-point drop from its peak); "
                   "disagrees if more than half collapse (lose the gain) or never gain; partly otherwise, "
                   "e.g. runs that improve, then decline but stay >= 10 points above SFT")


def rule_stable_and_improving(outcomes: Sequence[Outcome]) -> Verdict:
    """Claims 2, 5, 8, 11: 'X is stable and improves on SFT', separating 'improves, then declines'
    (partly) from 'collapses' (disagrees)."""
    if not outcomes:
        return Verdict(NA, "", TRAJECTORY_RULE, "no runs of this configuration in the sweep")
    ev = "; ".join(o.describe() for o in outcomes) + f" ({_trajectory_counts(outcomes)})"
    stable = _count(outcomes, lambda o: o.trajectory == "stable")
    failed = _count(outcomes, lambda o: o.trajectory in ("collapses", "no gain"))
    if stable == len(outcomes):
        return Verdict(AGREES, ev, TRAJECTORY_RULE)
    if failed > len(outcomes) / 2:
        return Verdict(DISAGREES, ev, TRAJECTORY_RULE)
    return Verdict(PARTLY, ev, TRAJECTORY_RULE, f"{stable}/{len(outcomes)} stable, {failed} collapse")


OVEROPT_RULE = "each run overoptimises if it ends >= 10 points below its peak or below SFT; agrees if all do, partly if some, disagrees if none"


def rule_all_overoptimise(outcomes: Sequence[Outcome]) -> Verdict:
    """Claim 10 (and claim 1 per coefficient): every run of the configuration overoptimises."""
    if not outcomes:
        return Verdict(NA, "", OVEROPT_RULE, "no runs of this configuration in the sweep")
    n = _count(outcomes, lambda o: o.overoptimised)
    ev = "; ".join(o.describe() for o in outcomes) + f" ({n}/{len(outcomes)} overoptimise)"
    level = AGREES if n == len(outcomes) else PARTLY if n else DISAGREES
    return Verdict(level, ev, OVEROPT_RULE)


# --------------------------------------------------------------------------------------------------
# one rule per claim
# --------------------------------------------------------------------------------------------------
COEF_RULE = ("needs >= 3 entropy coefficients > 0 spanning >= 10x, plus coefficient 0, at the high lr; "
             "agrees if every run at every coefficient > 0 overoptimises, partly if at some coefficients, "
             "disagrees if at none (coefficient 0 is shown as the control)")


def rule_overoptimise_regardless_of_coef(by_coef: Mapping[float, Sequence[Outcome]]) -> Verdict:
    """Claim 1: at the lr where KL works, MaxEnt overoptimises regardless of the entropy coefficient."""
    coefs = sorted(c for c, runs in by_coef.items() if c > 0 and runs)
    have_zero = bool(by_coef.get(0.0))
    if len(coefs) < 3 or coefs[-1] < 10 * coefs[0] - 1e-12 or not have_zero:
        got = ", ".join(f"{c:g}" for c in sorted(c for c, r in by_coef.items() if r)) or "none"
        return Verdict(NA, f"coefficients in the sweep: {got}", COEF_RULE,
                       "the sweep has no coefficient sweep at the high lr")
    per = {c: rule_all_overoptimise(by_coef[c]) for c in coefs}
    over = {c: _count(by_coef[c], lambda o: o.overoptimised) for c in coefs}
    ev = "; ".join(f"coef {c:g}: {over[c]}/{len(by_coef[c])} overoptimise (finals "
                   + ", ".join(f"{o.final:.0%}" for o in by_coef[c]) + ")" for c in coefs)
    zero = by_coef[0.0]
    ev += (f"; control coef 0: {_count(zero, lambda o: o.overoptimised)}/{len(zero)} overoptimise (finals "
           + ", ".join(f"{o.final:.0%}" for o in zero) + ")")
    n_all = sum(1 for v in per.values() if v.level == AGREES)
    level = AGREES if n_all == len(coefs) else PARTLY if any(over.values()) else DISAGREES
    return Verdict(level, ev, COEF_RULE, "" if level == AGREES else f"{n_all}/{len(coefs)} coefficients overoptimise in every run")


GAIN_ATTRIBUTION_RULE = ("tested only at learning rates where the entropy runs keep a gain (mean final >= 10 points "
                         "above SFT); agrees if there coefficient 0 ends within 10 points of them or higher, "
                         "disagrees if the entropy runs end > 10 points higher (the entropy term helped)")


def rule_gain_not_from_entropy(by_lr: Mapping[float, tuple[Sequence[Outcome], Sequence[Outcome]]]) -> Verdict:
    """Claim 3: the low-lr gains are not due to the entropy term (coefficient 0 does as well).
    by_lr: lr -> (entropy-regularised runs, coefficient-0 runs)."""
    kept, tested = [], []
    for lr in sorted(by_lr):
        ent, zero = by_lr[lr]
        if not ent:
            continue
        gain = statistics.mean(o.final - o.sft for o in ent)
        kept.append(f"lr {lr:g}: entropy runs end {gain * 100:+.0f} points vs SFT")
        if gain >= GAIN - 1e-9 and zero:
            fe, fz = statistics.mean(o.final for o in ent), statistics.mean(o.final for o in zero)
            tested.append((lr, fe, fz, len(ent), len(zero)))
    if not tested:
        return Verdict(NA, "; ".join(kept), GAIN_ATTRIBUTION_RULE,
                       "at no learning rate of the sweep do the entropy runs keep a gain over SFT (with coefficient-0 "
                       "runs beside them): there is no gain to attribute")
    ev = "; ".join(f"lr {lr:g}: final win entropy {fe:.0%} (n={ne}) vs coefficient 0 {fz:.0%} (n={nz})"
                   for lr, fe, fz, ne, nz in tested)
    ok = [fz >= fe - GAIN + 1e-9 for _, fe, fz, _, _ in tested]
    level = AGREES if all(ok) else DISAGREES if not any(ok) else PARTLY
    return Verdict(level, ev, GAIN_ATTRIBUTION_RULE)


TREND_RULE = ("the entropy-bonus trend is the mean of the last third minus the first third; agrees if every stable "
              "run's trend is < 0 and every overoptimised run's > 0, disagrees if fewer than half of the runs "
              "follow that pattern, partly otherwise or when one of the two groups is empty")


def rule_entropy_trend(stable_trends: Sequence[float], overopt_trends: Sequence[float]) -> Verdict:
    """Claim 4: stable runs show decaying entropy bonuses, overoptimised runs increasing ones."""
    n = len(stable_trends) + len(overopt_trends)
    if not n:
        return Verdict(NA, "", TREND_RULE, "no entropy-regularised runs with an entropy-bonus series")
    ok_s = _count(stable_trends, lambda t: t < 0)
    ok_o = _count(overopt_trends, lambda t: t > 0)
    ev = (f"stable runs with a decaying bonus {ok_s}/{len(stable_trends)}; overoptimised runs with an increasing "
          f"bonus {ok_o}/{len(overopt_trends)}")
    if ok_s + ok_o < n / 2:
        return Verdict(DISAGREES, ev, TREND_RULE)
    if not stable_trends or not overopt_trends:
        return Verdict(PARTLY, ev, TREND_RULE, f"no {'stable' if not stable_trends else 'overoptimised'} runs: only half the claim is testable")
    if ok_s + ok_o == n:
        return Verdict(AGREES, ev, TREND_RULE)
    return Verdict(PARTLY, ev, TREND_RULE)


KL_REF_RULE = "agrees if the KL-constrained runs' mean late KL(pi || pi_ref) is below the entropy runs' at the same lr"


def rule_kl_ref_bounded(kl_late: Sequence[float], entropy_late: Sequence[float]) -> Verdict:
    """Claim 6: KL-constrained runs keep KL(pi || pi_ref) bounded; reference-free runs drift further."""
    if not kl_late or not entropy_late:
        return Verdict(NA, "", KL_REF_RULE, "needs KL-constrained and entropy runs with a KL_ref series at one lr")
    k, e = statistics.mean(kl_late), statistics.mean(entropy_late)
    ev = f"late KL_ref, mean: KL runs {k:.2f} (n={len(kl_late)}), entropy runs {e:.2f} (n={len(entropy_late)})"
    return Verdict(AGREES if k < e else DISAGREES, ev, KL_REF_RULE)


KL_PREV_RULE = ("growth = late / early mean KL between consecutive policies (thirds of the run); agrees if the entropy "
                "runs' growth > 1 and above the KL runs', partly if both grow and KL's grows as much, disagrees if the "
                "entropy runs' does not grow")


def rule_kl_prev_growth(kl_growth: Sequence[float], entropy_growth: Sequence[float]) -> Verdict:
    """Claim 7: KL between consecutive policies stays bounded under KL, grows under MaxEnt."""
    if not kl_growth or not entropy_growth:
        return Verdict(NA, "", KL_PREV_RULE, "needs KL-constrained and entropy runs with a consecutive-policy KL series")
    gk, ge = statistics.mean(kl_growth), statistics.mean(entropy_growth)
    ev = f"late/early ratio, mean over runs: KL {gk:.2f}, entropy runs {ge:.2f}"
    if ge <= 1:
        return Verdict(DISAGREES, ev, KL_PREV_RULE)
    if ge > gk:
        return Verdict(AGREES, ev, KL_PREV_RULE)
    return Verdict(PARTLY, ev, KL_PREV_RULE, "the KL runs' updates grow as much")


BAND_BATCH = 32  # the rule's fixed batch size (the toy's DPO global batch)
BAND_RULE = (f"narrow: the sd of {BAND_BATCH}-example batch means < 1 nat (a run with batch size B is rescaled by "
             f"sqrt(B/{BAND_BATCH}), treating examples as independent); sign: 'typically negative' holds when more than "
             "half of the batch means are < 0; agrees if both hold, partly if one, disagrees if neither")


def rule_ref_logratio_band(batch_means: Sequence[float], batch_size: int) -> Verdict:
    """Claim 9 (Sec. 4.3, Fig. 4): the DPO reference log-ratio log pi_ref(y_w)/pi_ref(y_l) is 'typically
    negative but small' and lies in a narrow range. The sd of a batch mean shrinks like 1/sqrt(B), so the
    width is judged at a fixed batch size; per example the sd is estimated as sd_batch * sqrt(B)."""
    if len(batch_means) < 10 or batch_size < 1:
        return Verdict(NA, f"{len(batch_means)} batches", BAND_RULE, "fewer than 10 logged batches of the DPO run")
    sd = statistics.pstdev(batch_means)
    sd_ref = sd * math.sqrt(batch_size / BAND_BATCH)
    below = _count(batch_means, lambda v: v < 0) / len(batch_means)
    above = _count(batch_means, lambda v: v > 0) / len(batch_means)
    narrow, negative = sd_ref < 1.0, below > 0.5
    ev = (f"{len(batch_means)} batches of {batch_size}: mean {statistics.mean(batch_means):+.2f} nats, sd {sd:.2f} "
          f"(at batch {BAND_BATCH}: {sd_ref:.2f}; per example ~{sd * math.sqrt(batch_size):.1f}), range "
          f"[{min(batch_means):.2f}, {max(batch_means):.2f}]; {above:.0%} of batches above 0, {below:.0%} below")
    if narrow and negative:
        return Verdict(AGREES, ev, BAND_RULE)
    if narrow or negative:
        return Verdict(PARTLY, ev, BAND_RULE, "narrow, but not typically negative" if narrow else "negative, but not narrow")
    return Verdict(DISAGREES, ev, BAND_RULE)


MARGIN_RULE = "agrees if the best gamma > 0 ends >= 5 points above gamma 0, disagrees if no gamma > 0 ends above gamma 0, partly in between (within noise)"


def rule_margin_helps(final_gamma0: float, finals_positive: Mapping[float, float]) -> Verdict:
    """Claim 12: an appropriate margin gamma > 0 improves on gamma = 0 (at a low lr)."""
    if final_gamma0 is None or not finals_positive:
        return Verdict(NA, "", MARGIN_RULE, "needs SimPO runs with gamma 0 and some gamma > 0 at one lr")
    g, best = max(finals_positive.items(), key=lambda kv: kv[1])
    ev = f"final win: gamma 0 {final_gamma0:.1%}, best gamma > 0 ({g:g}) {best:.1%}"
    diff = best - final_gamma0
    level = AGREES if diff >= 0.05 - 1e-9 else DISAGREES if diff <= 0 else PARTLY
    return Verdict(level, ev, MARGIN_RULE, "better, but within noise" if level == PARTLY else "")


LARGER_MARGIN_RULE = ("tested where some gamma drops >= 10 points from its peak; agrees if the largest gamma ends >= 5 "
                      "points below gamma 0, disagrees otherwise")


def rule_larger_margin_worse(outcomes_by_gamma: Mapping[float, Outcome]) -> Verdict:
    """Claim 13 (App. B): a larger margin makes SimPO's overoptimisation worse."""
    gammas = sorted(outcomes_by_gamma)
    if len(gammas) < 2 or gammas[0] != 0.0:
        return Verdict(NA, "", LARGER_MARGIN_RULE, "needs gamma 0 and at least one gamma > 0")
    finals = [outcomes_by_gamma[g].final for g in gammas]
    ev = "final win by gamma: " + ", ".join(f"{g:g}: {f:.0%}" for g, f in zip(gammas, finals))
    if not any(outcomes_by_gamma[g].drop >= DROP - 1e-9 for g in gammas):
        return Verdict(NA, ev, LARGER_MARGIN_RULE, "no gamma overoptimises at this lr: nothing to make worse")
    if max(finals) < 0.05:
        return Verdict(NA, ev, LARGER_MARGIN_RULE, "every gamma ends at ~0: no order to compare")
    return Verdict(AGREES if finals[-1] <= finals[0] - 0.05 + 1e-9 else DISAGREES, ev, LARGER_MARGIN_RULE)
