"""The verdict rules of the report's claim table: one small, pure function per claim of the paper.

Every rule takes plain numbers (win rates as fractions, metric values in nats, lengths in tokens) and
returns a `Verdict` on one scale, so that each is unit-tested on synthetic series for every verdict it can
give (tests/test_toylab_claims.py):

    agrees             the toy shows what the claim says, by the rule stated in the row
    partly             part of the claim holds (the rule text says which part)
    disagrees          the toy shows the opposite
    not testable here  the data exist but cannot come out the other way on this toy (e.g. every run sits
                       at the task's win-rate ceiling, or the proxy has no length channel)
    n/a                the sweep lacks the data; the reason says which

Thresholds, terms (gain, overoptimised, trajectory) and run selections are in `rules.py`, fixed before the
sweep. Each rule's text says what would have made it disagree.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from . import rules as R
from .rules import DROP, GAIN, NOISE

AGREES, PARTLY, DISAGREES, NA, NOT_TESTABLE = "agrees", "partly", "disagrees", "n/a", "not testable here"
LEVELS = (AGREES, PARTLY, DISAGREES, NOT_TESTABLE, NA)


@dataclass(frozen=True)
class Verdict:
    level: str  # one of LEVELS
    evidence: str  # the numbers the rule looked at
    rule: str  # the rule, in words, including what would have made it disagree
    reason: str = ""  # why n/a or not testable (required then), or what made it partly

    def cell(self) -> str:
        return f"{self.level} ({self.reason})" if self.reason else self.level


@dataclass(frozen=True)
class Outcome:
    """One run's gold win-rate trajectory (SFT = step 0, in-run peak, final checkpoint) and the proxy
    reward at the gold peak and at the end (None where not measured)."""

    name: str
    sft: float
    peak: float
    final: float
    proxy_at_peak: Optional[float] = None
    proxy_final: Optional[float] = None

    @property
    def drop(self) -> float:
        return self.peak - self.final

    @property
    def trajectory(self) -> str:
        return R.trajectory(self.sft, self.peak, self.final)

    @property
    def overoptimised(self) -> Optional[bool]:
        return R.overoptimised(self.peak, self.final, self.proxy_at_peak, self.proxy_final)

    def describe(self) -> str:
        proxy = (f", proxy {self.proxy_at_peak:.2f}->{self.proxy_final:.2f}"
                 if self.proxy_at_peak is not None and self.proxy_final is not None else "")
        return f"{self.name}: {self.sft:.0%}->peak {self.peak:.0%}->final {self.final:.0%}{proxy}"


def _count(items, pred) -> int:
    return sum(1 for x in items if pred(x))


def _trajectory_counts(outcomes: Sequence[Outcome]) -> str:
    kinds = ("stable", "improves, then declines", "collapses", "no gain")
    return ", ".join(f"{k} {_count(outcomes, lambda o: o.trajectory == k)}" for k in kinds
                     if _count(outcomes, lambda o: o.trajectory == k))


# --------------------------------------------------------------------------------------------------
# shared scales
# --------------------------------------------------------------------------------------------------
TRAJECTORY_RULE = ("trajectory per run (rules.py: gain >= 10 points over SFT, decline >= 10 points from the peak); "
                   "agrees if every run is stable; disagrees if more than half collapse or never gain; partly otherwise "
                   "(e.g. runs that improve, then decline but stay >= 10 points above SFT)")


def rule_stable_and_improving(outcomes: Sequence[Outcome]) -> Verdict:
    """Claims 2, 5, 8, 11: 'X is stable and improves on SFT'."""
    if not outcomes:
        return Verdict(NA, "", TRAJECTORY_RULE, "no runs of this configuration in the sweep")
    ev = "; ".join(o.describe() for o in outcomes) + f" ({_trajectory_counts(outcomes)})"
    stable = _count(outcomes, lambda o: o.trajectory == "stable")
    failed = _count(outcomes, lambda o: o.trajectory in ("collapses", "no gain"))
    if stable == len(outcomes):
        return Verdict(AGREES, ev, TRAJECTORY_RULE)
    if failed > len(outcomes) / 2:
        return Verdict(DISAGREES, ev, TRAJECTORY_RULE)
    return Verdict(PARTLY, ev, TRAJECTORY_RULE, f"{stable}/{len(outcomes)} stable, {failed} collapse or never gain")


OVEROPT_RULE = ("overoptimised per run (rules.py: gold ends >= 10 points below its peak, SFT included, while the "
                "proxy ends above its value there); agrees if every run is, partly if some, disagrees if none; "
                "n/a if the proxy was not measured")


def _known(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.overoptimised is not None]


def rule_all_overoptimise(outcomes: Sequence[Outcome]) -> Verdict:
    """Claim 10 (and claim 1 per coefficient): every run of the configuration overoptimises."""
    if not outcomes:
        return Verdict(NA, "", OVEROPT_RULE, "no runs of this configuration in the sweep")
    known = _known(outcomes)
    if len(known) < len(outcomes):
        return Verdict(NA, "; ".join(o.describe() for o in outcomes), OVEROPT_RULE,
                       f"{len(outcomes) - len(known)} run(s) without a proxy series")
    n = _count(known, lambda o: o.overoptimised)
    ev = "; ".join(o.describe() for o in outcomes) + f" ({n}/{len(outcomes)} overoptimise)"
    level = AGREES if n == len(outcomes) else PARTLY if n else DISAGREES
    return Verdict(level, ev, OVEROPT_RULE, "" if level != PARTLY else f"{n}/{len(outcomes)} overoptimise")


# --------------------------------------------------------------------------------------------------
# one rule per claim
# --------------------------------------------------------------------------------------------------
COEF_RULE = ("needs >= 3 entropy coefficients > 0 spanning >= 10x, plus coefficient 0, at the high lr; agrees if "
             "every run at every coefficient > 0 is overoptimised (rules.py), partly if some are, disagrees if none "
             "is (coefficient 0 is shown as the control)")


def rule_overoptimise_regardless_of_coef(by_coef: Mapping[float, Sequence[Outcome]]) -> Verdict:
    """Claim 1: at the lr where KL works, MaxEnt overoptimises regardless of the entropy coefficient."""
    coefs = sorted(c for c, runs in by_coef.items() if c > 0 and runs)
    have_zero = bool(by_coef.get(0.0))
    if len(coefs) < 3 or coefs[-1] < 10 * coefs[0] - 1e-12 or not have_zero:
        got = ", ".join(f"{c:g}" for c in sorted(c for c, r in by_coef.items() if r)) or "none"
        return Verdict(NA, f"coefficients in the sweep: {got}", COEF_RULE, "the sweep has no coefficient sweep at the high lr")
    runs = [o for c in coefs for o in by_coef[c]]
    if len(_known(runs)) < len(runs):
        return Verdict(NA, "", COEF_RULE, "runs without a proxy series")

    def part(c, rs):
        return (f"coef {c:g}: {_count(rs, lambda o: o.overoptimised)}/{len(rs)} overoptimise (trajectories "
                + ", ".join(o.trajectory for o in rs) + ")")

    ev = "; ".join(part(c, by_coef[c]) for c in coefs) + "; control " + part(0.0, by_coef[0.0])
    n = _count(runs, lambda o: o.overoptimised)
    level = AGREES if n == len(runs) else PARTLY if n else DISAGREES
    return Verdict(level, ev, COEF_RULE, "" if level == AGREES else f"{n}/{len(runs)} runs overoptimise")


GAIN_ATTRIBUTION_RULE = ("tested at every lr below the high one where the entropy runs keep a gain (mean final >= 10 "
                         "points above SFT); there agrees if coefficient 0 ends no more than 10 points below them, "
                         "disagrees if the entropy runs end > 10 points higher (the entropy term helped); not testable "
                         "here where both groups end within 5 points of the task's win-rate ceiling (no room for a "
                         "difference)")


def rule_gain_not_from_entropy(by_lr: Mapping[float, tuple[Sequence[Outcome], Sequence[Outcome]]],
                               ceiling: Optional[float] = None) -> Verdict:
    """Claim 3: the low-lr gains are not due to the entropy term (coefficient 0 does as well).
    by_lr: lr -> (entropy-regularised runs, coefficient-0 runs); ceiling: the best win rate the task allows."""
    kept, tested, capped = [], [], []
    for lr in sorted(by_lr):
        ent, zero = by_lr[lr]
        if not ent:
            continue
        gain = statistics.mean(o.final - o.sft for o in ent)
        kept.append(f"lr {lr:g}: entropy runs end {gain * 100:+.0f} points vs SFT")
        if gain >= GAIN - 1e-9 and zero:
            fe, fz = statistics.mean(o.final for o in ent), statistics.mean(o.final for o in zero)
            at_cap = ceiling is not None and min(fe, fz) >= ceiling - R.CEILING_MARGIN - 1e-9
            (capped if at_cap else tested).append((lr, fe, fz, len(ent), len(zero)))
    ev_of = lambda rows: "; ".join(f"lr {lr:g}: final win entropy {fe:.0%} (n={ne}) vs coefficient 0 {fz:.0%} (n={nz})"  # noqa: E731
                                   for lr, fe, fz, ne, nz in rows)
    if not tested and not capped:
        return Verdict(NA, "; ".join(kept), GAIN_ATTRIBUTION_RULE,
                       "at no learning rate below the high one do the entropy runs keep a gain over SFT (with coefficient-0 "
                       "runs beside them): there is no gain to attribute")
    if not tested:
        return Verdict(NOT_TESTABLE, ev_of(capped) + f"; ceiling {ceiling:.0%}", GAIN_ATTRIBUTION_RULE,
                       "both groups end at the task's ceiling: the entropy term has no room to add anything")
    ev = ev_of(tested) + (f"; at the ceiling ({ceiling:.0%}), not compared: {ev_of(capped)}" if capped else "")
    ok = [fz >= fe - GAIN + 1e-9 for _, fe, fz, _, _ in tested]
    level = AGREES if all(ok) else DISAGREES if not any(ok) else PARTLY
    return Verdict(level, ev, GAIN_ATTRIBUTION_RULE)


TREND_RULE = ("the entropy-bonus trend is the mean of the last third minus the first third (|trend| < 0.01 nats: flat); "
              "each half of the claim holds when more than half of its runs follow it: stable runs decay (< 0), "
              "overoptimised runs increase (> 0); agrees if both halves hold, disagrees if a half with runs fails, "
              "partly if one half holds and the other has no runs")


def rule_entropy_trend(stable_trends: Sequence[float], overopt_trends: Sequence[float]) -> Verdict:
    """Claim 4: stable runs show decaying entropy bonuses, overoptimised runs increasing ones."""
    if not stable_trends and not overopt_trends:
        return Verdict(NA, "", TREND_RULE, "no entropy-regularised runs with an entropy-bonus series")
    ok_s = _count(stable_trends, lambda t: t < -R.TREND_FLAT)
    ok_o = _count(overopt_trends, lambda t: t > R.TREND_FLAT)
    flat = _count(list(stable_trends) + list(overopt_trends), lambda t: abs(t) <= R.TREND_FLAT)
    ev = (f"stable runs with a decaying bonus {ok_s}/{len(stable_trends)}; overoptimised runs with an increasing "
          f"bonus {ok_o}/{len(overopt_trends)}; flat {flat}")
    halves = [(name, ok, len(ts)) for name, ok, ts in (("stable", ok_s, stable_trends), ("overoptimised", ok_o, overopt_trends))]
    failed = [name for name, ok, n in halves if n and ok <= n / 2]
    if failed:
        return Verdict(DISAGREES, ev, TREND_RULE)
    empty = [name for name, _, n in halves if not n]
    if empty:
        return Verdict(PARTLY, ev, TREND_RULE, f"no {empty[0]} runs: only half the claim is testable")
    return Verdict(AGREES, ev, TREND_RULE)


KL_REF_RULE = (f"growth of KL(pi||pi_ref) = mean of the last third / mean of the middle third of the run; bounded if "
               f"<= {R.BOUND_RATIO}; agrees if the KL runs' growth is bounded and the entropy runs' is not (they keep "
               "drifting), partly if only one of the two holds, disagrees if the KL runs keep growing and the entropy "
               "runs are bounded")


def rule_kl_ref_bounded(kl_growth: Sequence[float], entropy_growth: Sequence[float],
                        kl_late: Sequence[float] = (), entropy_late: Sequence[float] = ()) -> Verdict:
    """Claim 6: KL-constrained runs keep KL(pi || pi_ref) bounded; reference-free runs drift further.
    *_growth: per run, last-third / middle-third mean; *_late: the last-third means (evidence only)."""
    if not kl_growth or not entropy_growth:
        return Verdict(NA, "", KL_REF_RULE, "needs KL-constrained and entropy runs with a KL_ref series at one lr")
    gk, ge = statistics.mean(kl_growth), statistics.mean(entropy_growth)
    ev = f"last/middle third, mean over runs: KL runs {gk:.2f} (n={len(kl_growth)}), entropy runs {ge:.2f} (n={len(entropy_growth)})"
    if kl_late and entropy_late:
        ev += f"; late KL_ref: KL runs {statistics.mean(kl_late):.2f}, entropy runs {statistics.mean(entropy_late):.2f}"
    bounded, drifts = gk <= R.BOUND_RATIO, ge > R.BOUND_RATIO
    if bounded and drifts:
        return Verdict(AGREES, ev, KL_REF_RULE)
    if not bounded and not drifts:
        return Verdict(DISAGREES, ev, KL_REF_RULE)
    return Verdict(PARTLY, ev, KL_REF_RULE, "KL runs bounded, but the entropy runs' KL_ref stops growing" if bounded
                   else "entropy runs drift, but so do the KL runs")


KL_PREV_RULE = (f"growth = mean of the last third / mean of the first third of KL between consecutive policies, under "
                f"each of five estimates; the verdict rests on the paper's direction KL(pi_t||pi_t-1) k1 when its median "
                f"effective sample fraction is >= {R.ESS_MIN}, else on KL(pi_t-1||pi_t) k3 (no weights); agrees if the "
                "entropy runs' growth is > 1 and above the KL runs', partly if both grow and KL's grows as much, or if "
                "another estimate gives a different verdict; disagrees if the entropy runs' does not grow")


def _kl_prev_level(gk: float, ge: float) -> str:
    return DISAGREES if ge <= 1 else AGREES if ge > gk else PARTLY


def rule_kl_prev_growth(kl_growth: Mapping[str, Sequence[float]], entropy_growth: Mapping[str, Sequence[float]],
                        ess: Optional[float] = None) -> Verdict:
    """Claim 7: KL between consecutive policies stays bounded under KL, grows under MaxEnt.
    *_growth: estimate name (rules.KL_PREV_ESTIMATES) -> per-run growth; ess: median of objective/kl_prev_ess
    over the runs' compared windows (None: not logged)."""
    names = [n for n in R.KL_PREV_ESTIMATES if kl_growth.get(n) and entropy_growth.get(n)]
    if not names:
        return Verdict(NA, "", KL_PREV_RULE, "needs KL-constrained and entropy runs with a consecutive-policy KL series")
    primary = R.KL_PREV_PRIMARY if ess is not None and ess >= R.ESS_MIN else R.KL_PREV_FALLBACK
    if primary not in names:
        primary = names[0]
    levels = {n: _kl_prev_level(statistics.mean(kl_growth[n]), statistics.mean(entropy_growth[n])) for n in names}
    ev = "; ".join(f"{n}: KL {statistics.mean(kl_growth[n]):.2f}, entropy {statistics.mean(entropy_growth[n]):.2f}"
                   + (" (verdict rests on this)" if n == primary else "") for n in names)
    ev = "late/early ratio, mean over runs: " + ev + (f"; median ESS {ess:.2f}" if ess is not None else "; ESS not logged")
    level = levels[primary]
    others = sorted({lv for n, lv in levels.items() if n != primary and n != "policy/approxkl"} - {level})
    if level == AGREES and others:
        return Verdict(PARTLY, ev, KL_PREV_RULE, f"{primary} agrees, other estimates: {', '.join(others)}")
    reason = "the KL runs' updates grow as much" if level == PARTLY else ""
    return Verdict(level, ev, KL_PREV_RULE, reason)


BAND_RULE = (f"narrow: the per-example sd of the reference log-ratio is < {R.NARROW_SD} nat (per-example values when "
             "logged, else the sd of batch means x sqrt(batch size), which treats examples as independent); sign: "
             "'typically negative' holds when more than half of the batch means are < 0; agrees if both hold, partly "
             "if one, disagrees if neither")


def rule_ref_logratio_band(batch_means: Sequence[float], batch_size: int,
                           per_example_sd: Optional[float] = None) -> Verdict:
    """Claim 9 (Sec. 4.3, Fig. 4): the DPO reference log-ratio log pi_ref(y_w)/pi_ref(y_l) is 'typically
    negative but small' and lies in a narrow range (judged per example: a batch mean's sd shrinks like
    1/sqrt(B) whatever the spread of the margins a pair actually gets)."""
    if len(batch_means) < 10 or batch_size < 1:
        return Verdict(NA, f"{len(batch_means)} batches", BAND_RULE, "fewer than 10 logged batches of the DPO run")
    sd = statistics.pstdev(batch_means)
    est = per_example_sd if per_example_sd is not None else sd * math.sqrt(batch_size)
    below = _count(batch_means, lambda v: v < 0) / len(batch_means)
    above = _count(batch_means, lambda v: v > 0) / len(batch_means)
    narrow, negative = est < R.NARROW_SD, below > 0.5
    ev = (f"{len(batch_means)} batches of {batch_size}: mean {statistics.mean(batch_means):+.2f} nats, batch sd {sd:.2f}, "
          f"per-example sd {est:.1f} ({'logged' if per_example_sd is not None else 'batch sd x sqrt(batch)'}), range of "
          f"batch means [{min(batch_means):.2f}, {max(batch_means):.2f}]; {above:.0%} of batches above 0, {below:.0%} below")
    if narrow and negative:
        return Verdict(AGREES, ev, BAND_RULE)
    if narrow or negative:
        return Verdict(PARTLY, ev, BAND_RULE, "narrow, but not typically negative" if narrow else "negative, but not narrow")
    return Verdict(DISAGREES, ev, BAND_RULE)


MARGIN_RULE = ("on the PEAK gold win rate (what the margin buys): agrees if the best gamma > 0 peaks >= 5 points above "
               "gamma 0, disagrees if no gamma > 0 peaks above gamma 0, partly in between; not testable here when gamma "
               "0 already peaks within 5 points of the task's ceiling")


def rule_margin_helps(peak_gamma0: Optional[float], peaks_positive: Mapping[float, float],
                      ceiling: Optional[float] = None) -> Verdict:
    """Claim 12: an appropriate margin gamma > 0 improves on gamma = 0 (at a low lr)."""
    if peak_gamma0 is None or not peaks_positive:
        return Verdict(NA, "", MARGIN_RULE, "needs SimPO runs with gamma 0 and some gamma > 0 at one lr")
    g, best = max(peaks_positive.items(), key=lambda kv: kv[1])
    ev = f"peak win: gamma 0 {peak_gamma0:.1%}, best gamma > 0 ({g:g}) {best:.1%}"
    if ceiling is not None and peak_gamma0 >= ceiling - R.CEILING_MARGIN - 1e-9:
        return Verdict(NOT_TESTABLE, ev + f"; ceiling {ceiling:.0%}", MARGIN_RULE,
                       "gamma 0 already peaks at the task's ceiling: no room for a margin to improve on it")
    diff = best - peak_gamma0
    level = AGREES if diff >= NOISE - 1e-9 else DISAGREES if diff <= 0 else PARTLY
    return Verdict(level, ev, MARGIN_RULE, "better, but within noise" if level == PARTLY else "")


LARGER_MARGIN_RULE = ("on the DROP from the peak (how much is lost): tested where some gamma drops >= 10 points; agrees "
                      "if the largest gamma drops >= 5 points more than gamma 0, disagrees if it drops >= 5 points less, "
                      "partly (within noise) otherwise; n/a where every gamma ends at ~0")


def rule_larger_margin_worse(outcomes_by_gamma: Mapping[float, Outcome]) -> Verdict:
    """Claim 13 (App. B): a larger margin makes SimPO's overoptimisation worse."""
    gammas = sorted(outcomes_by_gamma)
    if len(gammas) < 2 or gammas[0] != 0.0:
        return Verdict(NA, "", LARGER_MARGIN_RULE, "needs gamma 0 and at least one gamma > 0")
    drops = [outcomes_by_gamma[g].drop for g in gammas]
    ev = "drop from the peak by gamma: " + ", ".join(f"{g:g}: {d * 100:.0f} points" for g, d in zip(gammas, drops))
    if max(drops) < DROP - 1e-9:
        return Verdict(NA, ev, LARGER_MARGIN_RULE, "no gamma overoptimises at this lr: nothing to make worse")
    if max(outcomes_by_gamma[g].final for g in gammas) < 0.05:
        return Verdict(NA, ev, LARGER_MARGIN_RULE, "every gamma ends at ~0: no order to compare")
    diff = drops[-1] - drops[0]
    level = AGREES if diff >= NOISE - 1e-9 else DISAGREES if diff <= -NOISE + 1e-9 else PARTLY
    return Verdict(level, ev, LARGER_MARGIN_RULE, "within noise" if level == PARTLY else "")


EXACERBATE_RULE = ("at each lr with entropy and coefficient-0 runs: the entropy runs' mean final gold win rate minus "
                   "coefficient 0's; agrees if at some lr the entropy runs end >= 10 points lower ('may, in some cases, "
                   "exacerbate it'), disagrees if at no lr they do")


def rule_entropy_exacerbates(by_lr: Mapping[float, tuple[Sequence[Outcome], Sequence[Outcome]]]) -> Verdict:
    """Claim 14 (abstract, Sec. 1): entropy regularisation may, in some cases, exacerbate overoptimisation."""
    rows = [(lr, statistics.mean(o.final for o in e), statistics.mean(o.final for o in z), len(e), len(z))
            for lr, (e, z) in sorted(by_lr.items()) if e and z]
    if not rows:
        return Verdict(NA, "", EXACERBATE_RULE, "needs entropy and coefficient-0 runs at one lr")
    ev = "; ".join(f"lr {lr:g}: final win entropy {fe:.0%} (n={ne}) vs coefficient 0 {fz:.0%} (n={nz})"
                   for lr, fe, fz, ne, nz in rows)
    worse = [lr for lr, fe, fz, _, _ in rows if fe <= fz - GAIN + 1e-9]
    return Verdict(AGREES if worse else DISAGREES, ev, EXACERBATE_RULE)


def _length_channel(proxy_longer: Optional[float], gold_longer: Optional[float]) -> Optional[str]:
    """Why the length claims cannot be tested (None when the proxy has a length channel)."""
    if proxy_longer is None or gold_longer is None:
        return "the proxy's length preference was not measured"
    if proxy_longer < gold_longer + R.PROXY_LENGTH_BIAS_MIN - 1e-9:
        return (f"the proxy prefers the longer summary in {proxy_longer:.0%} of held-out pairs, the gold judge in "
                f"{gold_longer:.0%}: no length channel to exploit")
    return None


LENGTH_ONLINE_RULE = (f"length growth = greedy summary length at the final checkpoint minus the longer of SFT's and the "
                      f"ideal summary's ({R.IDEAL_TOKENS} tokens), mean over seeds, on the length-channel toy; not testable here unless the proxy prefers longer summaries >= "
                      f"{R.PROXY_LENGTH_BIAS_MIN:.0%} more often than gold and Eq. 6 grows length by >= {R.LEN_GROWTH:g} "
                      f"token; then agrees if Eq. 7 grows >= {R.LEN_MARGIN:g} token less than Eq. 6, disagrees if it grows "
                      "as much or more, partly in between")


def rule_length_normalisation_curbs(growth_eq6: Sequence[float], growth_eq7: Sequence[float],
                                    proxy_longer: Optional[float], gold_longer: Optional[float]) -> Verdict:
    """Claim 15 (Sec. 3.3, Eq. 7): length normalisation of the entropy term prevents length exploitation online."""
    if not growth_eq6 or not growth_eq7:
        return Verdict(NA, "", LENGTH_ONLINE_RULE, "needs length-channel runs of Eq. 6 and Eq. 7")
    g6, g7 = statistics.mean(growth_eq6), statistics.mean(growth_eq7)
    ev = f"length growth (tokens), mean: Eq. 6 {g6:+.1f} (n={len(growth_eq6)}), Eq. 7 {g7:+.1f} (n={len(growth_eq7)})"
    if proxy_longer is not None and gold_longer is not None:
        ev += f"; proxy prefers the longer summary {proxy_longer:.0%}, gold {gold_longer:.0%}"
    why = _length_channel(proxy_longer, gold_longer)
    if why:
        return Verdict(NOT_TESTABLE, ev, LENGTH_ONLINE_RULE, why)
    if g6 < R.LEN_GROWTH - 1e-9:
        return Verdict(NOT_TESTABLE, ev, LENGTH_ONLINE_RULE, "the unnormalised entropy runs do not grow length either")
    diff = g6 - g7
    level = AGREES if diff >= R.LEN_MARGIN - 1e-9 else DISAGREES if diff <= 0 else PARTLY
    return Verdict(level, ev, LENGTH_ONLINE_RULE, "less growth, but within a token" if level == PARTLY else "")


LENGTH_SIMPO_RULE = (f"length growth as for the online rule, SimPO runs of the length-channel toy; not testable here "
                     f"without the proxy's length channel (the labels carry it); agrees if SimPO without length "
                     f"normalisation grows length by >= {R.LEN_GROWTH:g} token and >= {R.LEN_MARGIN:g} token more than "
                     "with it, disagrees if it grows no more than with it, partly in between")


def rule_simpo_length_exploitation(growth_norm: Sequence[float], growth_plain: Sequence[float],
                                   proxy_longer: Optional[float], gold_longer: Optional[float]) -> Verdict:
    """Claim 16 (Sec. 3.2): SimPO without length normalisation is prone to severe length exploitation."""
    if not growth_norm or not growth_plain:
        return Verdict(NA, "", LENGTH_SIMPO_RULE, "needs length-channel SimPO runs with and without length normalisation")
    gn, gp = statistics.mean(growth_norm), statistics.mean(growth_plain)
    ev = f"length growth (tokens): normalised {gn:+.1f} (n={len(growth_norm)}), unnormalised {gp:+.1f} (n={len(growth_plain)})"
    why = _length_channel(proxy_longer, gold_longer)
    if why:
        return Verdict(NOT_TESTABLE, ev, LENGTH_SIMPO_RULE, why)
    if gp >= R.LEN_GROWTH - 1e-9 and gp - gn >= R.LEN_MARGIN - 1e-9:
        return Verdict(AGREES, ev, LENGTH_SIMPO_RULE)
    if gp <= gn:
        return Verdict(DISAGREES, ev, LENGTH_SIMPO_RULE)
    return Verdict(PARTLY, ev, LENGTH_SIMPO_RULE, "longer without normalisation, but by less than the thresholds")


# --------------------------------------------------------------------------------------------------
# the online pairwise experiment: hypotheses H1-H3 (rules.py)
# --------------------------------------------------------------------------------------------------
def _fails(outcomes: Sequence[Outcome]) -> bool:
    """More than half of the runs are overoptimised (rules.py: a group FAILS)."""
    return _count(outcomes, lambda o: o.overoptimised) > len(outcomes) / 2


def _holds_stable(outcomes: Sequence[Outcome]) -> bool:
    """More than half of the runs have trajectory 'stable' (rules.py: a group HOLDS STABLE)."""
    return _count(outcomes, lambda o: o.trajectory == "stable") > len(outcomes) / 2


def _group(outcomes: Sequence[Outcome]) -> str:
    return (f"{_count(outcomes, lambda o: o.overoptimised)}/{len(outcomes)} overoptimised, "
            f"{_count(outcomes, lambda o: o.trajectory == 'stable')} stable")


def _unknown_proxy(groups) -> int:
    return sum(len(g) - len(_known(g)) for g in groups)


H1_RULE = ("per (rate, gamma) with offline and online SimPO runs: a group fails when more than half of its runs are "
           "overoptimised, holds stable when more than half are 'stable' (rules.py); tested where online SimPO fails; "
           "agrees if offline SimPO holds stable at every tested cell, disagrees if at none, partly otherwise; not "
           "testable here if online SimPO fails nowhere")


def rule_dataset_constraint_stabilises(by_cell: Mapping[tuple[float, float], tuple[Sequence[Outcome], Sequence[Outcome]]]
                                       ) -> Verdict:
    """H1: offline SimPO stays stable where online SimPO at the same rate (and gamma) overoptimises.
    by_cell: (lr, gamma) -> (offline SimPO runs, online SimPO runs)."""
    cells = {k: v for k, v in sorted(by_cell.items()) if v[0] and v[1]}
    if not cells:
        return Verdict(NA, "", H1_RULE, "needs offline and online SimPO runs at one rate and gamma")
    if _unknown_proxy(g for pair in cells.values() for g in pair):
        return Verdict(NA, "", H1_RULE, "runs without a proxy series")
    ev = "; ".join(f"lr {lr:g} gamma {g:g}: offline {_group(off)}, online {_group(on)}" for (lr, g), (off, on) in cells.items())
    tested = [(k, _holds_stable(off)) for k, (off, on) in cells.items() if _fails(on)]
    if not tested:
        return Verdict(NOT_TESTABLE, ev, H1_RULE, "online SimPO does not fail at any rate: nothing for the dataset to stabilise")
    held = _count(tested, lambda t: t[1])
    level = AGREES if held == len(tested) else DISAGREES if held == 0 else PARTLY
    return Verdict(level, ev, H1_RULE, f"offline holds stable at {held}/{len(tested)} cells where online fails" if level == PARTLY else "")


H2_RULE = (f"per rate with online SimPO runs at gamma {R.PAIRWISE_GAMMA:g} and gamma 0: tested where some run drops >= 10 "
           "points from its gold peak; there the mean drop of gamma 0 minus that of the margin: >= 5 points agrees, <= 0 "
           "disagrees (the margin loses as much or more), in between partly; the verdict is the tested rates' common "
           "level, else partly; not testable here if no run drops >= 10 points")


def rule_margin_stabilises(by_lr: Mapping[float, tuple[Sequence[Outcome], Sequence[Outcome]]]) -> Verdict:
    """H2: online SimPO with a margin is more stable than with gamma 0.
    by_lr: lr -> (online SimPO runs with the margin, online SimPO runs with gamma 0)."""
    rows = {lr: v for lr, v in sorted(by_lr.items()) if v[0] and v[1]}
    if not rows:
        return Verdict(NA, "", H2_RULE, "needs online SimPO runs with the margin and with gamma 0 at one rate")

    def mean_drop(rs):
        return statistics.mean(o.drop for o in rs)

    ev = "; ".join(f"lr {lr:g}: mean drop from the peak, margin {mean_drop(m) * 100:.0f} points (n={len(m)}), gamma 0 "
                   f"{mean_drop(z) * 100:.0f} points (n={len(z)})" for lr, (m, z) in rows.items())
    levels = []
    for lr, (m, z) in rows.items():
        if max(o.drop for o in list(m) + list(z)) < DROP - 1e-9:
            continue
        diff = mean_drop(z) - mean_drop(m)
        levels.append(AGREES if diff >= NOISE - 1e-9 else DISAGREES if diff <= 0 else PARTLY)
    if not levels:
        return Verdict(NOT_TESTABLE, ev, H2_RULE, "no online SimPO run drops >= 10 points at any rate: nothing to stabilise")
    level = levels[0] if len(set(levels)) == 1 else PARTLY
    reason = "" if level != PARTLY else ("less drop, but within noise" if set(levels) == {PARTLY} else "the rates disagree")
    return Verdict(level, ev, H2_RULE, reason)


H3_RULE = ("per rate with online SimPO (the default gamma) and online MaxEnt RLOO (Eq. 7) runs: each group fails when more "
           "than half of its runs are overoptimised (rules.py); agrees if they fail at exactly the same rates, disagrees "
           "if they differ at every rate where either fails, partly otherwise; not testable here if neither fails at any rate")


def rule_online_simpo_fails_like_maxent(by_lr: Mapping[float, tuple[Sequence[Outcome], Sequence[Outcome]]]) -> Verdict:
    """H3: online SimPO fails like online maximum-entropy RLOO.
    by_lr: lr -> (online SimPO runs, online MaxEnt RLOO runs)."""
    rows = {lr: v for lr, v in sorted(by_lr.items()) if v[0] and v[1]}
    if not rows:
        return Verdict(NA, "", H3_RULE, "needs online SimPO and online MaxEnt RLOO runs at one rate")
    if _unknown_proxy(g for pair in rows.values() for g in pair):
        return Verdict(NA, "", H3_RULE, "runs without a proxy series")
    ev = "; ".join(f"lr {lr:g}: online SimPO {_group(s)}, MaxEnt RLOO {_group(m)}" for lr, (s, m) in rows.items())
    flags = {lr: (_fails(s), _fails(m)) for lr, (s, m) in rows.items()}
    failing = [lr for lr, (fs, fm) in flags.items() if fs or fm]
    if not failing:
        return Verdict(NOT_TESTABLE, ev, H3_RULE, "neither fails at any rate: no failure to compare")
    same = [lr for lr in flags if flags[lr][0] == flags[lr][1]]
    if len(same) == len(flags):
        return Verdict(AGREES, ev, H3_RULE)
    if not any(lr in same for lr in failing):
        return Verdict(DISAGREES, ev, H3_RULE)
    return Verdict(PARTLY, ev, H3_RULE, f"the same at {len(same)}/{len(flags)} rates")
