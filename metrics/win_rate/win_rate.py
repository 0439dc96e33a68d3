"""Win rate of a policy against reference summaries, with a Wilson score confidence interval.

A local `evaluate` metric module: load it by path, it needs no network (works with HF_HUB_OFFLINE=1):

    import evaluate
    win_rate = evaluate.load("metrics/win_rate")
    win_rate.compute(predictions=["policy", "reference", "tie", "invalid"], confidence_level=0.95)
    # each example judged in both orders (A = policy, then A = reference): each order counts half
    win_rate.compute(predictions=["policy", "reference"], example_ids=["ex0", "ex0"], shown_first=["policy", "reference"])
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
With `example_ids`, the judgments of one example share one unit of weight: an example judged in both
orders counts each order as half a judgment, so the win rate is debiased for the judge's position
preference and `n` counts examples, not requests. With `shown_first` too (which summary the judge saw
as A), the position statistics of the examples judged validly in both orders are added: the
position-consistency rate (both orders pick the same summary, or both tie) and the first-position
preference rate (share of judgments preferring what was shown first; a tie counts half), each with
its Wilson interval over those examples.
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
    example_ids (`list` of `str`, optional): the example of each prediction; its judgments share weight 1.
    shown_first (`list` of `str`, optional): "policy" or "reference" per prediction (needs example_ids). Gives
        position_consistency, position_consistency_ci_low/high, first_position_rate,
        first_position_ci_low/high and n_both_orders (examples judged validly in both orders).
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

    def _compute(self, predictions, confidence_level=0.95, probabilities=None, example_ids=None, shown_first=None):
        if not 0 < confidence_level < 1:
            raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level}")
        counts = {o: 0 for o in OUTCOMES}
        for i, p in enumerate(predictions):
            if p not in counts:
                raise ValueError(f"prediction {i} is {p!r}; expected one of {list(OUTCOMES)}")
            counts[p] += 1
        for name, extra in (("example_ids", example_ids), ("shown_first", shown_first)):
            if extra is not None and len(extra) != len(predictions):
                raise ValueError(f"{name} has {len(extra)} entries, predictions {len(predictions)}")
        if shown_first is not None and example_ids is None:
            raise ValueError("shown_first needs example_ids (the position statistics pair up the orders of an example)")
        weights = _weights(example_ids, len(predictions))
        valid = [(p, w) for p, w in zip(predictions, weights) if p != "invalid"]
        n = sum(w for _, w in valid)
        n = int(n) if float(n).is_integer() else n  # fractional only when one order of an example is invalid
        wins = sum(w * (1.0 if p == "policy" else 0.5 if p == "tie" else 0.0) for p, w in valid)
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
            soft = [(float(q), w) for q, p, w in zip(probabilities, predictions, weights) if q is not None and p != "invalid"]
            total = sum(w for _, w in soft)
            out["soft_win_rate"] = sum(q * w for q, w in soft) / total if total else None
            out["n_soft"] = len(soft)
        if shown_first is not None:
            out.update(position_statistics(predictions, example_ids, shown_first, confidence_level))
        return out


def _weights(example_ids, n: int) -> list[float]:
    """1 per prediction, or 1 / (predictions of its example) with example ids (both orders: 1/2 each)."""
    if example_ids is None:
        return [1.0] * n
    per = {}
    for e in example_ids:
        per[e] = per.get(e, 0) + 1
    return [1.0 / per[e] for e in example_ids]


def position_statistics(predictions, example_ids, shown_first, confidence_level: float = 0.95) -> dict:
    """Position consistency and first-position preference over the examples judged validly in both
    orders (one judgment with the policy shown first, one with the reference shown first)."""
    by_example = {}
    for p, e, f in zip(predictions, example_ids, shown_first):
        if f not in ("policy", "reference"):
            raise ValueError(f"shown_first entries must be 'policy' or 'reference', got {f!r}")
        by_example.setdefault(e, []).append((p, f))
    consistent, first, n = 0, 0.0, 0
    for judged in by_example.values():
        if len(judged) != 2 or {f for _, f in judged} != {"policy", "reference"} or any(p == "invalid" for p, _ in judged):
            continue
        n += 1
        consistent += judged[0][0] == judged[1][0]
        first += sum(1.0 if p == f else 0.5 if p == "tie" else 0.0 for p, f in judged) / 2
    c_low, c_high = wilson_interval(consistent, n, confidence_level)
    f_low, f_high = wilson_interval(first, n, confidence_level)
    return {
        "n_both_orders": n,
        "position_consistency": consistent / n if n else None,
        "position_consistency_ci_low": c_low,
        "position_consistency_ci_high": c_high,
        "first_position_rate": first / n if n else None,
        "first_position_ci_low": f_low,
        "first_position_ci_high": f_high,
    }
