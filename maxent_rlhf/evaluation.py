"""Win rates against reference summaries: the machinery of `evaluate_judge.py` and of in-training evaluation.

One implementation, two callers:
- `evaluate_judge.py` (checkpoints on disk): `load_reference_examples`, `generate_records`,
  `judge_settings`, `JudgingPlan`, `judge_plan`, `summarise`, `print_table`;
- the training scripts: `TrainingEvaluator(config, accelerator, run_dir, total_steps)`, whose
  `.evaluate(model, tokenizer, step)` generates greedily with the policy's current weights and returns
  the `eval/*` metrics that `maxent_rlhf.story.run_story` reads.

Protocol (both callers): greedy decoding of the prompts, split over processes (`generate_records`); each (policy,
reference) pair goes to a judge from `judges.get_judge` with the policy shown as A or B from a hash of
(seed, example id) (`--both_orders`: both orders, half a judgment each); judgments go to the
crash-safe `judges.JudgmentCache` keyed by (judge, template version, post, both summaries, order), so
nothing judged is sent twice; the win rate and its Wilson interval come from metrics/win_rate.

In training (the config mixes in `EvalArgs`): evaluation runs when `judge` is set, at step 0 (the
initial policy, the "SFT" point of the closing summary), every `eval_steps` (0: none in between) and at
the end. A paid judge prints its planned request count and token estimate once at the start;
`max_requests` caps the requests over the whole run (the cache in <run>/eval/judgments.jsonl counts
toward it on resume, and a resumed run re-sends nothing). An evaluation the cap cannot afford, or one
the judge fails (outage after its retries, network error), is logged as `eval/missing: 1` with a
one-line warning, and training goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError, cfg
from .judges import (TEMPLATE_VERSION, JudgeError, Judgment, JudgmentCache, JudgeSettings, Pair, cache_key, get_judge,
                     post_from_prompt)

# the local `evaluate` metric (Wilson interval, both-orders weighting): the one place the statistics live
METRIC_PATH = Path(__file__).resolve().parent.parent / "metrics" / "win_rate"


# --------------------------------------------------------------------------------------------------
# config fields
# --------------------------------------------------------------------------------------------------
@dataclass
class JudgeArgs:
    """Judge options shared by evaluate_judge.py's EvalConfig and the training configs (via EvalArgs);
    `judge_settings` hands them to the judge's factory."""

    reference_column: str = cfg("completion", "column with the reference summary the policy is compared with")
    id_column: str = cfg("id", "column with a stable example id (falls back to the row index when absent)")
    max_new_tokens: int = cfg(53, "greedy decoding length limit of the judged generations (the TL;DR recipe's 53)")
    per_device_eval_batch_size: int = cfg(16, "prompts per generation batch on one process")
    judge_model: str = cfg("gpt-4o-mini", "openai judge: model name sent to the OpenAI-compatible server")
    base_url: Optional[str] = cfg(
        None, "openai judge: OpenAI-compatible server URL (e.g. http://localhost:8000/v1 for vLLM); key only from "
        "OPENAI_API_KEY"
    )
    concurrency: int = cfg(8, "openai judge: requests in flight at most")
    request_timeout: float = cfg(60.0, "seconds before one judge request times out (then it is retried)")
    max_retries: int = cfg(6, "retries of a request on 429/5xx/timeouts/connection errors before giving up")
    backoff_base: float = cfg(1.0, "first retry delay in seconds (doubled per retry, with jitter), unless the server sends Retry-After")
    backoff_max: float = cfg(60.0, "longest back-off delay in seconds")
    parse_retries: int = cfg(2, "re-asks after an answer without `Preferred: A|B`; then the pair counts as invalid")
    logprobs: bool = cfg(False, "also read P(A), P(B) from the answer token's top logprobs: a soft win rate")
    judge_kwargs: str = cfg(
        "", "options of a plugin judge, as a JSON object (its factory reads them; one it does not read is an error)")
    judge_batch_size: int = cfg(16, "reward-model judge: texts per scoring batch")
    both_orders: bool = cfg(
        False, "judge every pair twice, policy shown as A and as B; each order counts half a judgment (debiases the "
        "judge's position preference) and the table adds position consistency and first-position preference; "
        "twice the requests")
    max_requests: int = cfg(
        0, "send at most this many judge requests (pairs): per evaluate_judge.py invocation, or over a whole training "
        "run, resumes included (0: no cap)")
    confidence_level: float = cfg(0.95, "coverage of the Wilson score interval of the win rate")

    def range_checks(self) -> list:
        """Value ranges of the judge options (config.check_ranges; chained with the other mixed-in configs)."""
        return getattr(super(), "range_checks", list)() + [
            (self.max_new_tokens >= 1, f"`max_new_tokens` = {self.max_new_tokens} must be >= 1"),
            (self.per_device_eval_batch_size >= 1,
             f"`per_device_eval_batch_size` = {self.per_device_eval_batch_size} must be >= 1"),
            (self.concurrency >= 1, f"`concurrency` = {self.concurrency} must be >= 1"),
            (self.request_timeout > 0, f"`request_timeout` = {self.request_timeout} must be > 0 seconds"),
            (self.max_retries >= 0, f"`max_retries` = {self.max_retries} must be >= 0"),
            (0 <= self.backoff_base <= self.backoff_max,
             f"`backoff_base` = {self.backoff_base} must be in [0, backoff_max = {self.backoff_max}]"),
            (self.parse_retries >= 0, f"`parse_retries` = {self.parse_retries} must be >= 0"),
            (self.judge_batch_size >= 1, f"`judge_batch_size` = {self.judge_batch_size} must be >= 1"),
            (self.max_requests >= 0, f"`max_requests` = {self.max_requests} must be >= 0 (0: no cap)"),
            (0 < self.confidence_level < 1, f"`confidence_level` = {self.confidence_level} must be in (0, 1), e.g. 0.95"),
        ]


@dataclass
class EvalArgs(JudgeArgs):
    """Win-rate evaluation during training (mixed into a training config): on when `judge` is set. The judged data are their own fields (`judge_dataset_*`): they are prompts with
    reference summaries, not the training data; `reward_model_name_or_path` of a training config (RLOO's
    proxy) is never the judge: the reward-model judge reads `judge_reward_model_name_or_path`."""

    eval_steps: int = cfg(
        0, "evaluate every N steps/iterations (TRL's eval_steps): the win rate, when `judge` is set, runs at step 0, "
        "every N and at the end (0: at step 0 and the end only)")
    judge: Optional[str] = cfg(
        None, "judge of the in-training win rate: null (no win-rate evaluation), 'toy-gold', 'reward-model', "
        "'openai' (paid: see max_requests) or a plugin's")
    judge_dataset_name: str = cfg(
        "trl-lib/tldr", "prompts with reference summaries for the win rate: hub id, local file/dir, or toylab://NAME")
    judge_dataset_test_split: str = cfg("test", "split of judge_dataset_name to evaluate the win rate on")
    judge_max_samples: int = cfg(500, "win rate over the first N examples of that split (0: all); n per evaluation")
    judge_prompt_column: Optional[str] = cfg(None, "prompt column of judge_dataset_name (default: prompt_column)")
    judge_reward_model_name_or_path: Optional[str] = cfg(
        None, "reward model (hub id or dir) of the `reward-model` judge (not the training reward model)")

    def range_checks(self) -> list:
        return super().range_checks() + [
            (self.eval_steps >= 0, f"`eval_steps` = {self.eval_steps} must be >= 0 (0: no periodic evaluation, only at the end)"),
            (self.judge_max_samples >= 0, f"`judge_max_samples` = {self.judge_max_samples} must be >= 0 (0: all)"),
        ]


def judge_settings(c, reward_model_name_or_path: Optional[str], tokenizer_name_or_path: Optional[str] = None,
                   device: Optional[str] = None) -> JudgeSettings:
    """The judge options of config `c` (JudgeArgs and the run's shared settings) for the judge's factory.
    The reward-model judge's model and tokenizer are passed by the caller: a training config's own
    `reward_model_name_or_path` is RLOO's proxy, never the judge."""
    options = {}
    if c.judge_kwargs:
        try:
            options = json.loads(c.judge_kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"judge_kwargs: not valid JSON ({e}): {c.judge_kwargs!r}") from None
        if not isinstance(options, dict):
            raise ConfigError(f"judge_kwargs: expected a JSON object, got {c.judge_kwargs!r}")
    return JudgeSettings(
        judge_model=c.judge_model, base_url=c.base_url, concurrency=c.concurrency, request_timeout=c.request_timeout,
        max_retries=c.max_retries, backoff_base=c.backoff_base, backoff_max=c.backoff_max,
        parse_retries=c.parse_retries, logprobs=c.logprobs, reward_model_name_or_path=reward_model_name_or_path,
        tokenizer_name_or_path=tokenizer_name_or_path, judge_batch_size=c.judge_batch_size,
        max_prompt_length=c.max_prompt_length, mixed_precision=c.mixed_precision,
        trust_remote_code=c.trust_remote_code, seed=c.seed, device=device, options=options)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
@dataclass
class Example:
    id: str
    prompt: str
    reference: str


def load_reference_examples(dataset_name: str, split: str, n: int, prompt_column: str = "prompt",
                  reference_column: str = "completion", id_column: str = "id",
                  revision: Optional[str] = None) -> list[Example]:
    """The first `n` (0: all) rows of `dataset_name [split]` (at hub `revision`) as Examples; a repeated id
    is an error."""
    from .data import as_text, load_any_dataset, require_columns

    source = f"{dataset_name} [{split}]"
    ds = load_any_dataset(dataset_name, split, revision)
    require_columns(ds, [prompt_column, reference_column], source)
    if n and n < len(ds):
        ds = ds.select(range(n))
    has_id = id_column in ds.column_names
    examples, seen = [], set()
    for i, row in enumerate(ds):
        ex_id = str(row[id_column]) if has_id else str(i)
        if ex_id in seen:
            raise ConfigError(f"{source}: row {i} repeats example id {ex_id!r} (column `{id_column}`)")
        seen.add(ex_id)
        prompt = as_text(row[prompt_column], source, i, prompt_column)
        reference = as_text(row[reference_column], source, i, reference_column)
        examples.append(Example(ex_id, prompt, reference.strip()))
    if not examples:
        raise ConfigError(f"{source} has no examples")
    return examples


def examples_hash(examples: Sequence[Example]) -> str:
    """sha256 of the evaluated examples (ids, prompts, references): the data behind the number, whatever its source."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.prompt, e.reference], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def policy_first(seed: int, example_id: str) -> bool:
    """Whether the policy's summary is shown as A: a hash of (seed, example id), ~half each way."""
    return hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[0] % 2 == 0


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def generation_record(example: Example, completion, tokenizer, max_new_tokens: int, model: str) -> dict:
    """One line of a generations file (evaluate_judge's <out>/generations/<label>.jsonl, training's
    <run>/eval/generations/step_*.jsonl)."""
    return {
        "id": example.id,
        "generation": completion.text,
        "n_tokens": completion.num_tokens,
        "reference_tokens": len(tokenizer(" " + example.reference, add_special_tokens=False).input_ids),
        "prompt_sha": prompt_hash(example.prompt),
        "max_new_tokens": max_new_tokens,
        "model": model,
    }


def generate_records(model, tokenizer, examples: Sequence[Example], c, model_name: str, processes=None,
                     synced_gpus: bool = False, progress: Optional[str] = None, engine=None) -> Optional[list[dict]]:
    """Greedy generation records (`generation_record`) of `examples`, split over `processes` (an
    Accelerator or PartialState; None: this process alone): the main process returns them in the order of
    `examples`, the others None. Every process decodes every world-th example and runs the same number of
    batches (padded with repeats of the first example, dropped): sharded forwards (ZeRO-3, FSDP2, with
    `synced_gpus`) line up. `c` gives max_new_tokens, per_device_eval_batch_size, max_prompt_length;
    `progress`: a progress-bar title on the main process. `engine`: a `vllm_engine.VLLMEngine` holding the
    model's weights decodes instead (`vllm_engine.complete_prompts`, the same semantics; `model` unused)."""
    from tqdm.auto import tqdm

    from .generation import complete_prompts

    world = 1 if processes is None else processes.num_processes
    rank = 0 if processes is None else processes.process_index
    is_main = rank == 0
    mine = list(examples[rank::world])
    padded = mine + [examples[0]] * (math.ceil(len(examples) / world) - len(mine))
    device = None if processes is None else processes.device
    bar = tqdm(total=len(examples), desc=progress, disable=progress is None or not is_main)
    records = []
    try:
        if engine is not None:  # one request batch: the engine schedules it
            from .vllm_engine import complete_prompts as engine_complete

            batches = [engine_complete(engine, tokenizer, [e.prompt for e in padded], c.max_new_tokens, c.max_prompt_length)]
        else:
            batches = complete_prompts(model, tokenizer, [e.prompt for e in padded], c.max_new_tokens,
                                       c.per_device_eval_batch_size, max_prompt_length=c.max_prompt_length,
                                       device=device, synced_gpus=synced_gpus)
        for completions in batches:
            for e, completion in zip(padded[len(records):], completions):
                records.append(generation_record(e, completion, tokenizer, c.max_new_tokens, model_name))
            bar.update(len(completions) * world)
    finally:
        bar.close()
    records = records[: len(mine)]
    if world > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    if not is_main:
        return None
    by_id = {r["id"]: r for r in records}
    return [by_id[e.id] for e in examples]


# --------------------------------------------------------------------------------------------------
# judging
# --------------------------------------------------------------------------------------------------
@dataclass
class PlannedPair:
    policy: str  # label of the policy (checkpoint) whose summary is judged
    example: Example
    policy_first: bool
    key: str  # judgment cache key


class JudgingPlan:
    """Every (policy, example[, order]) pair to judge, example-major (so a request cap leaves every
    policy the same examples), with the cache looked up: `keys` are the pairs still to judge."""

    def __init__(self, judge, examples: Sequence[Example], generations: dict[str, dict[str, dict]], seed: int,
                 both_orders: bool = False, cache: Optional[JudgmentCache] = None):
        self.judge, self.examples, self.generations, self.cache = judge, list(examples), generations, cache
        self.both_orders = both_orders
        self.pairs: list[PlannedPair] = []
        self.todo: dict[str, Pair] = {}
        self.todo_meta: dict[str, dict] = {}
        for ex in self.examples:
            post = post_from_prompt(ex.prompt)
            for first in (True, False) if both_orders else (policy_first(seed, ex.id),):
                order = "policy_A" if first else "policy_B"
                for label, gens in generations.items():
                    g = gens.get(ex.id)
                    if g is None:
                        raise RuntimeError(f"generation of example {ex.id!r} missing for {label} after generation")
                    a, b = (g["generation"], ex.reference) if first else (ex.reference, g["generation"])
                    key = cache_key(judge.cache_id, TEMPLATE_VERSION, post, a, b, order)
                    self.pairs.append(PlannedPair(label, ex, first, key))
                    if (cache is None or key not in cache) and key not in self.todo:
                        self.todo[key] = Pair(ex.id, ex.prompt, post, a, b)
                        self.todo_meta[key] = {"example_id": ex.id, "order": order, "summary_a": a, "summary_b": b}
        self.keys = list(self.todo)
        self.n_cached = sum(1 for p in self.pairs if cache is not None and p.key in cache)

    def capped(self, max_requests: int) -> list[str]:
        return self.keys[:max_requests] if max_requests and len(self.keys) > max_requests else self.keys

    def preflight(self, max_requests: int = 0) -> tuple[str, list[str], int]:
        """(the message printed before anything is sent, the keys to send, the token estimate)."""
        send = self.capped(max_requests)
        tokens = self.judge.estimate_tokens([self.todo[k] for k in send])
        capped = len(send) < len(self.keys)
        line = (
            f"judge {self.judge.describe()}: {len(self.pairs)} pairs ({len(self.generations)} models x "
            f"{len(self.examples)} examples" + (" x 2 orders" if self.both_orders else "") + f"), {self.n_cached} cached, "
            f"{len(self.keys)} to judge" + (f", capped at --max_requests {max_requests}" if capped else "")
            + f": {len(send)} requests" + (f", ~{tokens:,} tokens (estimate; retries extra)" if tokens else "")
        )
        return line, send, tokens


def judge_plan(plan: JudgingPlan, send: Sequence[str], progress: bool = True, desc: str = "judge") -> dict[str, Judgment]:
    """Judge the pairs `send` of `plan`; each verdict goes to the cache as soon as it is known. On a
    judge failure the error says how many judgments were saved (a rerun continues from them)."""
    from tqdm.auto import tqdm

    fresh: dict[str, Judgment] = {}
    cache = plan.cache
    bar = tqdm(total=len(send), desc=desc, disable=not progress)

    def on_result(i: int, verdict: Judgment) -> None:
        key = send[i]
        fresh[key] = verdict
        if cache is not None:
            cache.put(key, verdict, judge=plan.judge.cache_id, template_version=TEMPLATE_VERSION, **plan.todo_meta[key])
        bar.update(1)

    try:
        plan.judge.judge_many([plan.todo[k] for k in send], on_result)
    except JudgeError as e:
        where = f"; the {len(fresh)} judgments made in this run are saved in {cache.path}, a rerun continues" if cache else ""
        err = type(e)(f"{e}{where}")
        err.judged = fresh  # what was judged before the failure (counted against a request cap)
        raise err from None
    finally:
        bar.close()
        if cache is not None:
            cache.close()
    return fresh


def _outcome(verdict: Judgment, pol_first: bool) -> tuple[str, Optional[float]]:
    """('policy' | 'reference' | 'tie' | 'invalid', P(policy preferred) or None)."""
    p_pol = None
    if verdict.p_a is not None:
        p_pol = verdict.p_a if pol_first else 1.0 - verdict.p_a
    if verdict.preferred in ("tie", "invalid"):
        return verdict.preferred, p_pol
    policy_won = (verdict.preferred == "A") == pol_first
    return ("policy" if policy_won else "reference"), p_pol


_METRIC = None


def win_rate_metric():
    """metrics/win_rate, loaded by path once per process (no network)."""
    global _METRIC
    if _METRIC is None:
        import evaluate

        _METRIC = evaluate.load(str(METRIC_PATH))
    return _METRIC


def summarise(plan: JudgingPlan, label: str, fresh: dict[str, Judgment], confidence_level: float = 0.95) -> dict:
    """One summary row of policy `label`: win rate, Wilson interval, n, invalid, ties, (soft win rate,
    position statistics), mean token lengths, mean judge scores, unjudged pairs (a request cap)."""
    preds, probs, scores_p, scores_r, unjudged, ids, shown_first = [], [], [], [], 0, [], []
    for p in plan.pairs:
        if p.policy != label:
            continue
        v = fresh.get(p.key) or (plan.cache.get(p.key) if plan.cache is not None else None)
        if v is None:
            unjudged += 1
            continue
        outcome, p_pol = _outcome(v, p.policy_first)
        preds.append(outcome)
        probs.append(p_pol)
        ids.append(p.example.id)
        shown_first.append("policy" if p.policy_first else "reference")
        if v.scores is not None:
            scores_p.append(v.scores[0] if p.policy_first else v.scores[1])
            scores_r.append(v.scores[1] if p.policy_first else v.scores[0])
    stats = win_rate_metric().compute(
        predictions=preds, confidence_level=confidence_level,
        probabilities=probs if any(q is not None for q in probs) else None,
        **(dict(example_ids=ids, shown_first=shown_first) if plan.both_orders else {}),
    )
    g = plan.generations[label]
    n_ex = len(plan.examples)
    return {
        **stats,
        "unjudged": unjudged,
        "mean_policy_tokens": sum(g[e.id]["n_tokens"] for e in plan.examples) / n_ex,
        "mean_reference_tokens": sum(g[e.id]["reference_tokens"] for e in plan.examples) / n_ex,
        "mean_policy_score": sum(scores_p) / len(scores_p) if scores_p else None,
        "mean_reference_score": sum(scores_r) / len(scores_r) if scores_r else None,
    }


def judge_decoding(judge) -> Optional[dict]:
    """The judge's own sampling settings (LLM judges), for summary.json."""
    names = ("temperature", "reask_temperature", "max_tokens", "parse_retries", "logprobs")
    found = {n: getattr(judge, n) for n in names if hasattr(judge, n)}
    return found or None


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], confidence_level: float) -> None:
    pct = int(round(confidence_level * 100))
    soft = any(r.get("soft_win_rate") is not None for r in rows)
    scored = any(r.get("mean_policy_score") is not None for r in rows)
    both = any(r.get("position_consistency") is not None for r in rows)
    head = ["checkpoint", "step", "win rate", f"{pct}% CI (Wilson)", "n", "invalid", "len policy", "len ref"]
    head += ["soft win"] * soft + ["score pol/ref"] * scored
    head += [f"consistent ({pct}% CI)", f"first pos ({pct}% CI)"] * both
    lines = []
    for r in rows:
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        line = [r["label"], "-" if r["step"] is None else str(r["step"]), _fmt(r["win_rate"]), ci, str(r["n"]),
                str(r["invalid"]), _fmt(r["mean_policy_tokens"], ".1f"), _fmt(r["mean_reference_tokens"], ".1f")]
        if soft:
            line.append(_fmt(r.get("soft_win_rate")))
        if scored:
            line.append(f"{_fmt(r.get('mean_policy_score'))}/{_fmt(r.get('mean_reference_score'))}")
        if both:
            line.append(f"{_fmt(r.get('position_consistency'))} [{_fmt(r.get('position_consistency_ci_low'))}, "
                        f"{_fmt(r.get('position_consistency_ci_high'))}]")
            line.append(f"{_fmt(r.get('first_position_rate'))} [{_fmt(r.get('first_position_ci_low'))}, "
                        f"{_fmt(r.get('first_position_ci_high'))}]")
        lines.append(line)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for l in lines:
        print("  ".join(c.ljust(w) for c, w in zip(l, widths)))


# --------------------------------------------------------------------------------------------------
# in-training evaluation
# --------------------------------------------------------------------------------------------------
# row of `summarise` -> metrics.jsonl key (the `eval/*` names maxent_rlhf.story reads)
METRIC_NAMES = {
    "win_rate": "eval/win_rate", "ci_low": "eval/win_rate_ci_low", "ci_high": "eval/win_rate_ci_high",
    "n": "eval/n", "invalid": "eval/invalid", "ties": "eval/ties",
    "mean_policy_tokens": "eval/policy_length", "mean_reference_tokens": "eval/reference_length",
    "soft_win_rate": "eval/soft_win_rate", "mean_policy_score": "eval/policy_score",
    "mean_reference_score": "eval/reference_score", "position_consistency": "eval/position_consistency",
    "first_position_rate": "eval/first_position_rate",
}
MISSING = {"eval/missing": 1}
# what a judge outage looks like once the judge's own retries are spent (JudgeUnavailableError is a JudgeError)
OUTAGE_ERRORS = (JudgeError, ConnectionError, TimeoutError, OSError)


def evaluation_steps(eval_steps: int, total_steps: int, start_step: int = 0) -> list[int]:
    """Steps at which a run of `total_steps` evaluates: 0 (the initial policy), every `eval_steps` (0: none
    in between), and the last step; those after `start_step` only on a resumed run (its earlier ones are logged)."""
    periodic = range(eval_steps, total_steps + 1, eval_steps) if eval_steps > 0 else ()
    steps = sorted({0, *periodic, total_steps})
    return [s for s in steps if s > start_step or (start_step == 0 and s == 0)]


class TrainingEvaluator:
    """Win rate of the policy being trained, every `eval_steps` (see the module docstring).

        evaluator = TrainingEvaluator(config, accelerator, run_dir, total_steps, start_step)
        if evaluator.due(step):                                   # every process
            run_dir.log_metrics(evaluator.evaluate(model, tokenizer, step), step)

    `config` mixes in `EvalArgs` and has `seed`, `max_prompt_length`, `prompt_column`,
    `mixed_precision`, `trust_remote_code`. Every process calls `evaluate` (generation is split over
    processes and runs on the current weights through `distributed.unwrap_for_generation`: DDP,
    ZeRO-3 (gathered) and FSDP2 alike); the main process judges, and every process returns the same dict.
    A disabled evaluator (`enabled` False) does nothing and costs nothing.
    """

    def __init__(self, config, accelerator, run_dir, total_steps: Optional[int] = None, start_step: int = 0,
                 log_prefix: str = "[eval]"):
        self.config, self.accelerator, self.log_prefix = config, accelerator, log_prefix
        self.enabled = bool(config.judge)
        self.total_steps = total_steps
        if not self.enabled:
            return
        self.run_root = Path(getattr(run_dir, "path", run_dir))
        self.dir = self.run_root / "eval"
        self.cache_path = self.dir / "judgments.jsonl"
        self.is_main = accelerator is None or accelerator.is_main_process
        c = config
        self.examples = load_reference_examples(c.judge_dataset_name, c.judge_dataset_test_split, c.judge_max_samples,
                                      c.judge_prompt_column or c.prompt_column, c.reference_column, c.id_column)
        self.judge = None
        self.requests_spent = 0
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            device = None if accelerator is None else str(accelerator.device)
            settings = judge_settings(c, c.judge_reward_model_name_or_path, device=device)
            self.judge = get_judge(c.judge, settings)  # a bad key / model fails before training
            if self.judge.cacheable:
                self.requests_spent = len(JudgmentCache(self.cache_path).records)  # earlier legs of this run
            self._announce(start_step)

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(f"{self.log_prefix} {msg}", flush=True)

    def due(self, step: int, total_steps: Optional[int] = None) -> bool:
        """Whether `step` is an evaluation step: 0, every eval_steps, and the last one."""
        total = total_steps if total_steps is not None else self.total_steps
        if not self.enabled:
            return False
        every = self.config.eval_steps
        return step == 0 or (every > 0 and step % every == 0) or (total is not None and step == total)

    def _announce(self, start_step: int) -> None:
        """The cost guard, once at the start: planned evaluations, requests and tokens, and the cap."""
        c = self.config
        per_eval = len(self.examples) * (2 if c.both_orders else 1)
        if self.total_steps is not None:
            steps = evaluation_steps(c.eval_steps, self.total_steps, start_step)
            count, where = len(steps), f"at steps {_steps_text(steps)}"
        else:
            count, where = None, f"every {c.eval_steps} steps" if c.eval_steps else "at step 0 and the end"
        line = f"win rate by judge {self.judge.describe()} on {c.judge_dataset_name} [{c.judge_dataset_test_split}], " \
               f"{len(self.examples)} examples" + (" x 2 orders" if c.both_orders else "") + f", {where}"
        if self.judge.remote:
            stand_ins = [Pair(e.id, e.prompt, post_from_prompt(e.prompt), e.reference, e.reference) for e in self.examples]
            tokens = self.judge.estimate_tokens(stand_ins) * (2 if c.both_orders else 1)
            if count is not None:
                line += f": at most {count * per_eval} requests, ~{count * tokens:,} tokens (estimate; retries extra)"
            else:
                line += f": {per_eval} requests, ~{tokens:,} tokens per evaluation (estimate)"
            if c.max_requests:
                line += (f"; capped at max_requests {c.max_requests} over the run ({self.requests_spent} already sent; "
                         "an evaluation the cap cannot afford is logged as missing)")
            line += f"; cache {self.cache_path}"
        self._print(line)

    def evaluate(self, model, tokenizer, step: int, engine=None) -> dict:
        """Greedy generations of the current policy, judged: the `eval/*` metrics of `step`, or
        {"eval/missing": 1} when the judge failed or the request cap is spent (training goes on).
        `engine`: the run's vLLM engine (synced to the policy's weights) generates them instead."""
        if not self.enabled:
            return {}
        records = self._generate(model, tokenizer, step, engine)
        result = None
        if self.is_main:
            result = self._judge(records, step)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result], from_process=0)[0]
        return result

    def _generate(self, model, tokenizer, step: int, engine=None) -> Optional[dict[str, dict]]:
        """{example id: generation record} on the main process (None elsewhere); writes
        <run>/eval/generations/step_XXXXXXXX.jsonl."""
        from . import distributed

        acc = self.accelerator
        if engine is not None:  # the run's vLLM engine, synced to the current weights
            return self._write(generate_records(None, tokenizer, self.examples, self.config, f"step {step}", acc,
                                                engine=engine), step)
        was_training = model.training
        model.eval()
        try:
            synced = acc is not None and distributed.needs_synced_gpus(acc)
            with distributed.unwrap_for_generation(acc, model) as gen_model:
                with acc.autocast() if acc is not None else contextlib.nullcontext():
                    records = generate_records(gen_model, tokenizer, self.examples, self.config, f"step {step}", acc,
                                               synced_gpus=synced)
        finally:
            if was_training:
                model.train()
        return self._write(records, step)

    def _write(self, records: Optional[list[dict]], step: int) -> Optional[dict[str, dict]]:
        if not self.is_main:
            return None
        path = self.dir / "generations" / f"step_{step:08d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:  # whole file: a resumed run regenerates a step (same weights, same text)
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return {r["id"]: r for r in records}

    def _judge(self, generations: dict[str, dict], step: int) -> dict:
        c = self.config
        cache = JudgmentCache(self.cache_path) if self.judge.cacheable else None
        label = f"step_{step:08d}"
        plan = JudgingPlan(self.judge, self.examples, {label: generations}, c.seed, c.both_orders, cache)
        send = plan.keys
        if c.max_requests and self.requests_spent + len(send) > c.max_requests:
            self._print(f"step {step}: evaluation missing: it needs {len(send)} judge requests and "
                        f"{c.max_requests - self.requests_spent} of max_requests {c.max_requests} are left")
            return dict(MISSING)
        try:
            fresh = judge_plan(plan, send, progress=False)
        except OUTAGE_ERRORS as e:
            self.requests_spent += len(getattr(e, "judged", {}))
            self._print(f"step {step}: evaluation missing: {type(e).__name__}: {_one_line(e)}; training goes on")
            return dict(MISSING)
        self.requests_spent += len(fresh)
        row = summarise(plan, label, fresh, c.confidence_level)
        metrics = {name: row[k] for k, name in METRIC_NAMES.items() if row.get(k) is not None}
        if self.judge.remote:
            metrics["eval/judge_requests"] = self.requests_spent  # pairs sent over the run so far
        return metrics


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)})"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."

