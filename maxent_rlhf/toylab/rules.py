"""The toy lab's pre-registration: every threshold, term and run selection the report's verdicts use.

This file is fixed before the sweep that it judges. The sweep writes its sha256 and the git commit of
the code into every run's DONE.json (`sweep.provenance`); the report prints them and refuses to mix runs
whose code or rules differ (unless told to, and then says so). A change here after a sweep is a new
pre-registration: rerun the sweep.

One definition of each term, used by the run tables and by every claim rule (`claims.py`):

  gain           the gold win rate's in-run peak is >= GAIN above the SFT policy's (step 0)
  overoptimised  the proxy reward ends above its value at the gold peak while the gold win rate ends
                 >= DROP below its peak; the peak may be step 0 (SFT), so a run that falls >= DROP below
                 SFT while the proxy rises is overoptimised from the start. Unknown without a proxy series.
  trajectory     'no gain'  (no gain);
                 'stable'   (a gain and the final is < DROP below the peak);
                 'improves, then declines' (a gain, a >= DROP fall, and still >= GAIN above SFT);
                 'collapses' (a gain, then back to < GAIN above SFT: the gain is lost)

With 200 test posts a win rate near 50% has a standard error of ~3.5 points: 10 points is ~3 SE, NOISE
(5 points) is ~1.4 SE of a difference of two runs' win rates.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from ..story import OVEROPTIMISATION_DROP  # the runs' closing summaries use the same 10 points

# ---- thresholds ----------------------------------------------------------------------------------
GAIN = 0.10  # a run gains when its gold win-rate peak is >= 10 points above SFT
DROP = OVEROPTIMISATION_DROP  # a run declines when it ends >= 10 points below its peak
NOISE = 0.05  # two win rates closer than 5 points are "the same" (ordering claims)
CEILING_MARGIN = 0.05  # a win rate within 5 points of the task's ceiling has no room to show a difference
TREND_FLAT = 0.01  # an entropy-bonus trend within +-0.01 nats is flat (neither decays nor grows)
BOUND_RATIO = 1.25  # a KL series is bounded when its last-third mean is <= 1.25 x its middle-third mean
ESS_MIN = 0.5  # the importance-weighted KL_prev is trusted when its median effective sample fraction >= 0.5
NARROW_SD = 1.0  # nats: the per-example sd of the DPO reference log-ratio below which its range is "narrow"
IDEAL_TOKENS = 9  # the ideal summary `my WHO ACTION my OBJECT and i feel FEELING` (task.key_summary)
# length growth = final greedy length - max(SFT's greedy length, IDEAL_TOKENS): the SFT policy writes the
# 5-token short form, and growing to the ideal 9 tokens is a real gain the gold judge shares; only the
# excess over that is length the proxy alone asked for
LEN_GROWTH = 1.0  # tokens: the greedy summaries' length grew when that excess is >= 1 token
LEN_MARGIN = 1.0  # tokens: one condition grows length more than another when >= 1 token more
PROXY_LENGTH_BIAS_MIN = 0.10  # the proxy has a length channel when it prefers the longer summary >= 10 points
#                               more often than the gold judge does (held-out pairs of different lengths)

# ---- which runs ----------------------------------------------------------------------------------
HIGH_LR = 1e-3  # the toy's "KL works" rate (the paper's 1e-6)
LOW_LR_FACTOR = 10  # claim 2's low rate is HIGH_LR / 10, as the paper's 1e-7 is its 1e-6 / 10
LOW_LR_SCAN = (2e-5,)  # further rates below HIGH_LR that the sweep runs; each is reported, none decides claim 2
LENGTH_LR = 1e-4  # the length channel's online rate: HIGH_LR / LOW_LR_FACTOR, the paper's reference-free rate
LENGTH_SIMPO_LR = 1e-4  # the lowest SimPO rate of the sweep (App. B: where SimPO "performs well")


def length_growth(len_sft: float, len_final: float) -> float:
    """Tokens of greedy summary length beyond what the gold judge also asks for (see IDEAL_TOKENS)."""
    return len_final - max(len_sft, IDEAL_TOKENS)


def low_lr(high_lr: float = HIGH_LR) -> float:
    """Claim 2's learning rate, fixed by rule before any run: the KL rate / 10 (the paper's ratio)."""
    return high_lr / LOW_LR_FACTOR


# ---- which metric and which estimator each claim uses (printed in the report) ------------------------
KL_REF_KEYS = {"k1": "objective/kl_ref", "k3": "objective/kl_ref_k3"}
KL_REF_PRIMARY = "k3"  # non-negative, what the KL regulariser's budget is read in
# claim 7: every estimate is computed; the verdict rests on the paper's direction (importance-weighted,
# k1) when its median ESS over the compared windows is >= ESS_MIN, else on the reverse direction (no
# weights, k3, always >= 0). policy/approxkl is the update's own 0.5 E[(log ratio)^2] per token.
KL_PREV_ESTIMATES = {
    "KL(pi_t||pi_t-1) k1": "objective/kl_prev",
    "KL(pi_t||pi_t-1) k3": "objective/kl_prev_k3",
    "KL(pi_t-1||pi_t) k1": "objective/kl_prev_reverse",
    "KL(pi_t-1||pi_t) k3": "objective/kl_prev_reverse_k3",
    "policy/approxkl": "policy/approxkl",
}
KL_PREV_PRIMARY = "KL(pi_t||pi_t-1) k1"
KL_PREV_FALLBACK = "KL(pi_t-1||pi_t) k3"
KL_PREV_ESS = "objective/kl_prev_ess"

CLAIM_INPUTS = {  # claim -> (runs, metric, estimator), in words
    1: ("maxent at HIGH_LR, every entropy coefficient, coefficient 0 = the none runs", "gold win rate + proxy per checkpoint", "overoptimised"),
    2: ("entropy runs (Eqs. 6, 7) at low_lr() = HIGH_LR / 10; LOW_LR_SCAN rates reported beside", "gold win rate per checkpoint", "trajectory"),
    3: ("entropy and none runs at every rate below HIGH_LR where the entropy runs keep a gain", "final gold win rate", "mean over seeds"),
    4: ("every entropy run, every rate and coefficient", "objective/entropy_bonus", "last third - first third"),
    5: ("kl runs at HIGH_LR", "gold win rate per checkpoint", "trajectory"),
    6: ("kl and entropy runs at each rate", "KL(pi||pi_ref) " + KL_REF_PRIMARY, "last third / middle third"),
    7: ("kl and entropy runs at each rate", "KL between consecutive policies, five estimates + ESS", "last third / first third"),
    8: ("minent runs at HIGH_LR", "gold win rate per checkpoint", "trajectory"),
    9: ("the DPO run", "ref/logratio", "per-example sd (logged, else batch sd x sqrt(batch))"),
    10: ("SimPO at its highest rate, every gamma", "gold win rate + proxy per checkpoint", "overoptimised"),
    11: ("SimPO at each lower rate, every gamma", "gold win rate per checkpoint", "trajectory"),
    12: ("SimPO at its lowest rate", "peak gold win rate per gamma", "best gamma > 0 vs gamma 0"),
    13: ("SimPO at each rate", "gold drop from the peak per gamma", "largest gamma vs gamma 0"),
    14: ("entropy and none runs at each rate", "final gold win rate", "mean over seeds"),
    15: ("length channel: maxent (Eq. 7) and entropy (Eq. 6) at LENGTH_LR", "greedy summary length per checkpoint", "final - max(SFT, 9 tokens), mean over seeds"),
    16: ("length channel: SimPO with and without length normalisation at LENGTH_SIMPO_LR", "greedy summary length per checkpoint", "final - max(SFT, 9 tokens)"),
}


# ---- the online pairwise experiment: hypotheses H1-H3 (fixed before its runs) ------------------------
# The paper explains why SimPO stays stable offline while online maximum-entropy RL overoptimises by
# "dataset constraints and target margins" (Sec. 1, 4.3, 5, App. B), a hypothesis it does not test. The
# conditions separate the two: offline SimPO (dataset constraint and margin), online SimPO (margin only,
# train_online.py), online SimPO with gamma 0 (neither), online DPO (the reference instead), beside the main
# grid's online MaxEnt (Eq. 7) and KL RLOO; every condition at each of PAIRWISE_LRS and 3 seeds.
#   a group of runs FAILS        more than half of its runs are overoptimised (the term above)
#   a group HOLDS STABLE         more than half of its runs have trajectory 'stable' (the term above)
#   H1 the dataset constraint stabilises: at each (rate, gamma) where online SimPO fails, offline SimPO at the
#      same rate and gamma holds stable. agrees: at every such cell; disagrees: at none; partly: at some;
#      not testable here: online SimPO fails nowhere (nothing for the dataset to stabilise).
#   H2 the margin stabilises: at each rate where some online SimPO run (either gamma) drops >= DROP from its
#      peak, the default gamma's mean drop is >= NOISE below gamma 0's (agrees there), not below it at all
#      (disagrees there), or below within noise (partly there); the verdict is the rates' common level, else
#      partly; not testable here: no online SimPO run drops >= DROP at any rate.
#   H3 online SimPO fails like online MaxEnt RLOO: at each rate with both, online SimPO (default gamma) fails
#      exactly when MaxEnt (Eq. 7) fails. agrees: at every rate; disagrees: they differ at every rate where
#      either fails; partly otherwise; not testable here: neither fails at any rate (no failure to compare).
PAIRWISE_LRS = (HIGH_LR / LOW_LR_FACTOR, HIGH_LR)  # the main grid's two rates: every condition of H1-H3 runs at both
PAIRWISE_GAMMA = 0.5  # the default margin: configs/toy/simpo.yaml's and configs/toy/online_simpo.yaml's simpo_gamma
HYPOTHESES = {  # hypothesis -> (runs, metric, rule), in words (printed in the report)
    "H1": ("offline vs online SimPO at each rate of PAIRWISE_LRS, gamma 0 and PAIRWISE_GAMMA", "gold win rate + proxy per checkpoint",
           "online fails -> offline holds stable"),
    "H2": ("online SimPO, PAIRWISE_GAMMA vs gamma 0, at each rate", "gold drop from the peak", "mean drop, gamma 0 - margin"),
    "H3": ("online SimPO (PAIRWISE_GAMMA) vs online MaxEnt RLOO (Eq. 7) at each rate", "gold win rate + proxy per checkpoint",
           "fails (majority overoptimised) in both or neither"),
}


def rules_file() -> Path:
    return Path(__file__)


def rules_sha256() -> str:
    """The sha256 of this file: which pre-registration a run was judged under."""
    return hashlib.sha256(rules_file().read_bytes()).hexdigest()


# ---- the terms -------------------------------------------------------------------------------------
def gained(sft: float, peak: float) -> bool:
    return peak >= sft + GAIN - 1e-9


def trajectory(sft: float, peak: float, final: float) -> str:
    if not gained(sft, peak):
        return "no gain"
    if peak - final < DROP - 1e-9:
        return "stable"
    if final >= sft + GAIN - 1e-9:
        return "improves, then declines"
    return "collapses"


def overoptimised(peak: float, final: float, proxy_at_peak: Optional[float], proxy_final: Optional[float]) -> Optional[bool]:
    """Gold ends >= DROP below its peak (SFT included) while the proxy ends above its value there; None
    when the proxy was not measured at both checkpoints."""
    if proxy_at_peak is None or proxy_final is None:
        return None
    return peak - final >= DROP - 1e-9 and proxy_final > proxy_at_peak
