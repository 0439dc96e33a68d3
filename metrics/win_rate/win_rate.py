"""Win rate of a policy against reference summaries, with a Wilson score confidence interval.

A local `evaluate` metric module: load it by path, it needs no network (works with HF_HUB_OFFLINE=1):

    import evaluate
    win_rate = evaluate.load("metrics/win_rate")
    win_rate.compute(predictions=["policy", "reference", "tie", "invalid"], confidence_level=0.95)
"""
import math
from statistics import NormalDist

import datasets
import evaluate

OUTCOMES = ("policy", "reference", "tie", "invalid")

_DESCRIPTION = """
Pairwise win rate of a policy against reference answers, as judged by a (LLM or programmatic) judge.
Each prediction is the judge's outcome for one example: "policy" (the policy's answer preferred),
"reference" (the reference preferred), "tie" (counted as half a win) or "invalid" (the judge's answer
could not be parsed: reported in `invalid`, excluded from `n`, never turned into a coin flip or a loss).
The confidence interval is the Wilson score interval for a binomial proportion (ties count as half).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one of "policy", "reference", "tie", "invalid" per example.
    confidence_level (`float`, default 0.95): coverage of the Wilson score interval.
    probabilities (`list` of `float` or None, optional): the judge's soft preference P(policy preferred)
        per example (e.g. from the answer token's logprobs); None entries are skipped. Gives `soft_win_rate`.
Returns:
    win_rate (`float` or None): (wins + ties / 2) / n, None when n == 0.
    ci_low, ci_high (`float` or None): Wilson score interval at `confidence_level`.
    ci_method (`str`): "wilson".
    n (`int`): valid judgments (wins + losses + ties); wins, losses, ties, invalid (`int`).
    soft_win_rate (`float` or None), n_soft (`int`): when `probabilities` is given.
Examples:
    >>> m = evaluate.load("metrics/win_rate")
    >>> m.compute(predictions=["policy", "policy", "reference", "invalid"])["win_rate"]
    0.6666666666666666
"""


def wilson_interval(successes: float, n: int, confidence_level: float = 0.95):
    """Wilson score interval for a proportion successes / n (successes may be fractional: ties)."""
    if n <= 0:
        return None, None
    z = NormalDist().inv_cdf(0.5 + confidence_level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, confidence_level=0.95, probabilities=None):
        if not 0 < confidence_level < 1:
            raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level}")
        counts = {o: 0 for o in OUTCOMES}
        for i, p in enumerate(predictions):
            if p not in counts:
                raise ValueError(f"prediction {i} is {p!r}; expected one of {list(OUTCOMES)}")
            counts[p] += 1
        n = counts["policy"] + counts["reference"] + counts["tie"]
        wins = counts["policy"] + 0.5 * counts["tie"]
        low, high = wilson_interval(wins, n, confidence_level)
        out = {
            "win_rate": wins / n if n else None,
            "ci_low": low,
            "ci_high": high,
            "ci_method": "wilson",
            "confidence_level": confidence_level,
            "n": n,
            "wins": counts["policy"],
            "losses": counts["reference"],
            "ties": counts["tie"],
            "invalid": counts["invalid"],
        }
        if probabilities is not None:
            if len(probabilities) != len(predictions):
                raise ValueError(f"probabilities has {len(probabilities)} entries, predictions {len(predictions)}")
            soft = [float(q) for q, p in zip(probabilities, predictions) if q is not None and p != "invalid"]
            out["soft_win_rate"] = sum(soft) / len(soft) if soft else None
            out["n_soft"] = len(soft)
        return out
