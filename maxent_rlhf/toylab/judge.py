"""The gold judge as a judge of evaluate_judge.py and of the in-training win rate: `--judge toy-gold`,
found through the entry point `toy-gold = maxent_rlhf.toylab.judge:toy_gold` (setup.cfg).

It scores both summaries with `task.gold_score` against the facts recovered from the prompt; the
higher score wins, equal scores tie (half a win). p_a is 1, 0 or 1/2 (a deterministic judge), and the
gold scores are returned as `scores`, so summary.json carries the mean gold score of policy and
reference per checkpoint.
"""
from __future__ import annotations

from maxent_rlhf.judges import Judge, JudgeSettings, Judgment, Pair

from . import task


class ToyGoldJudge(Judge):
    cacheable = False  # free and deterministic: recomputing is cheaper than the cache

    @property
    def cache_id(self) -> str:
        return f"toy-gold/{task.TASK_VERSION}"

    def describe(self) -> str:
        return f"toy-gold ({task.TASK_VERSION}: +1 per key fact, -{task.LENGTH_PENALTY}/token over {task.BUDGET}, " \
               f"-{task.REPEAT_PENALTY}/repeat, -{task.DISTRACTOR_PENALTY}/distractor, -{task.HALLUCINATION_PENALTY}/hallucination)"

    def judge_pair(self, pair: Pair) -> Judgment:
        try:
            facts = task.extract_facts(pair.prompt)
        except ValueError as e:
            return Judgment("invalid", error=str(e))
        a = task.gold_score(pair.summary_a, pair.prompt, facts)
        b = task.gold_score(pair.summary_b, pair.prompt, facts)
        if abs(a - b) < 1e-9:
            return Judgment("tie", p_a=0.5, scores=(a, b))
        return Judgment("A" if a > b else "B", p_a=1.0 if a > b else 0.0, scores=(a, b))


def toy_gold(settings: JudgeSettings) -> ToyGoldJudge:
    """The judge factory of the entry point: the gold judge has no options."""
    return ToyGoldJudge()
