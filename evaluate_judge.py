"""Win rates of checkpoints against the dataset's reference summaries, judged pairwise.

    python evaluate_judge.py --checkpoints runs/maxent_1b --dataset_name trl-lib/tldr --dataset_test_split test --n 500
    accelerate launch evaluate_judge.py --config eval.yaml          # generation split over GPUs

1. Generation: every checkpoint (a checkpoint directory, a run directory = all its checkpoints by step,
   or a list of them; optionally an SFT baseline) decodes the prompts greedily (max_new_tokens 53,
   batched, left-padded, truncated after EOS) into <out>/generations/<label>.jsonl; a rerun generates
   only what is missing.
2. Judging: each (policy, reference) pair goes to a judge from `maxent_rlhf.judges` (openai,
   reward-model, or a registered one such as the toy lab's toy-gold). A/B order comes from a hash of
   (seed, example id); with --both_orders every pair is judged in both orders, each counting half a
   judgment, and the position statistics of the judge are reported. Judgments are appended and flushed to a JSONL cache as they complete, keyed by
   (judge, template version, post, both summaries, order): a rerun sends no request for a judged pair.
   Before sending anything the number of requests and an estimate of tokens are printed; --max_requests
   caps them and --dry_run stops there.
3. Output: per checkpoint the win rate, its 95% Wilson score interval, n, invalid answers and the mean
   token lengths of policy and reference summaries (with --both_orders also the position-consistency
   rate and the first-position preference rate, with intervals): a table, <out>/summary.json (with
   everything needed to reproduce the number: judge, template version, orders, seed, data, decoding)
   and <out>/win_rate.png.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import maxent_rlhf.toylab  # noqa: F401  (registers the toylab:// locations and the toy-gold judge)
from maxent_rlhf.config import BaseConfig, ConfigError, cfg, parse_config, save_config
from maxent_rlhf.judges import (
    TEMPLATE_VERSION,
    JudgeError,
    JudgmentCache,
    Pair,
    Verdict,
    cache_key,
    get_judge,
    post_from_prompt,
)

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "win_rate"


@dataclass
class EvalConfig(BaseConfig):
    """Win rates of checkpoints against reference summaries, judged by an LLM or a reward model."""

    output_dir: str = cfg("eval/default", "output directory: generations/, judgments.jsonl, summary.json, win_rate.png")
    checkpoints: list[str] = cfg(
        [], "checkpoints to evaluate (comma-separated): checkpoint dirs, model dirs / hub ids, or run dirs (all their checkpoints, by step)"
    )
    sft_model_name_or_path: Optional[str] = cfg(
        None, "SFT baseline model (hub id or dir): evaluated too and drawn as a horizontal line"
    )
    tokenizer_name_or_path: Optional[str] = cfg(None, "tokenizer (hub id or dir); default: each model's own")
    dataset_name: str = cfg(
        "trl-lib/tldr", "dataset: hub id, local json/jsonl/parquet file, or a directory with <split>.jsonl"
    )
    dataset_test_split: str = cfg("test", "split of dataset_name to evaluate on")
    dataset_revision: Optional[str] = cfg(
        None, "hub revision (branch, tag or commit) of dataset_name; recorded in summary.json: pin it to reproduce a number")
    n: int = cfg(500, "number of examples (the first n of the split; 0: all)")
    prompt_column: str = cfg("prompt", "column with the policy prompt (`SUBREDDIT: ... TL;DR:`)")
    reference_column: str = cfg("completion", "column with the reference summary the policy is compared with")
    id_column: str = cfg("id", "column with a stable example id (falls back to the row index when absent)")
    max_prompt_length: int = cfg(512, "prompts longer than this many tokens keep their last tokens")
    max_new_tokens: int = cfg(53, "greedy decoding length limit (the TL;DR recipe's 53)")
    per_device_eval_batch_size: int = cfg(16, "prompts per generation batch on one process")
    judge: str = cfg("openai", "judge: 'openai', 'reward-model', or a registered one (e.g. 'toy-gold')")
    judge_model: str = cfg("gpt-4o-mini", "model name sent to the OpenAI-compatible server")
    base_url: Optional[str] = cfg(None, "OpenAI-compatible server URL (e.g. http://localhost:8000/v1 for vLLM); key only from OPENAI_API_KEY")
    concurrency: int = cfg(8, "judge requests in flight at most")
    request_timeout: float = cfg(60.0, "seconds before one judge request times out (then it is retried)")
    max_retries: int = cfg(6, "retries of a request on 429/5xx/timeouts/connection errors before stopping with an error")
    backoff_base: float = cfg(1.0, "first retry delay in seconds (doubled per retry, with jitter), unless the server sends Retry-After")
    backoff_max: float = cfg(60.0, "longest back-off delay in seconds")
    parse_retries: int = cfg(2, "re-asks after an answer without `Preferred: A|B`; then the pair counts as invalid")
    logprobs: bool = cfg(False, "also read P(A), P(B) from the answer token's top logprobs: a soft win rate")
    judge_kwargs: str = cfg("", "extra keyword arguments for the judge, as a JSON object (e.g. for a registered judge)")
    reward_model_name_or_path: Optional[str] = cfg(None, "reward model (hub id or dir) for --judge reward-model")
    judge_batch_size: int = cfg(16, "batch size of local judges (reward-model)")
    cache_path: Optional[str] = cfg(None, "judgment cache (JSONL); default <output_dir>/judgments.jsonl")
    both_orders: bool = cfg(
        False, "judge every pair twice, policy shown as A and as B; each order counts half a judgment (debiases the "
        "judge's position preference) and the table adds position consistency and first-position preference; "
        "twice the requests")
    max_requests: int = cfg(0, "send at most this many judge requests (pairs) in this run (0: no cap)")
    dry_run: bool = cfg(False, "generate, then print the number of judge requests and the token estimate, and stop")
    confidence_level: float = cfg(0.95, "coverage of the Wilson score interval of the win rate")
    plot: bool = cfg(True, "write win_rate.png (win rate against training step)")


@dataclass
class Target:
    label: str  # file name under generations/
    path: str
    step: Optional[int]
    baseline: bool = False


@dataclass
class Example:
    id: str
    prompt: str
    reference: str


# --------------------------------------------------------------------------------------------------
# what to evaluate
# --------------------------------------------------------------------------------------------------
def resolve_targets(config: EvalConfig) -> list[Target]:
    from maxent_rlhf.runs import checkpoint_step, list_checkpoints

    found: list[tuple[str, Optional[int]]] = []
    for entry in config.checkpoints:
        p = Path(entry)
        ckpts = list_checkpoints(p) if p.is_dir() and not (p / "config.json").exists() else []
        if ckpts:
            found.extend((str(c), checkpoint_step(c)) for c in ckpts)
        elif p.is_dir() and not (p / "config.json").exists():
            raise ConfigError(f"checkpoints: {entry} has no model (config.json) and no complete checkpoints (step_*/)")
        else:
            try:
                step = checkpoint_step(p)
            except ValueError:
                step = None
            found.append((entry, step))
    targets: list[Target] = []
    used: set[str] = set()
    for path, step in found:
        p = Path(path)
        label = _safe(p.name) or _safe(path)
        if label in used:  # the same step of two runs: prefix the run name
            run = p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name
            label = _safe(f"{run}__{p.name}")
        k, base = 2, label
        while label in used:
            label, k = f"{base}_{k}", k + 1
        used.add(label)
        targets.append(Target(label, path, step))
    if config.sft_model_name_or_path:
        targets.append(Target("sft_baseline", config.sft_model_name_or_path, None, baseline=True))
    if not targets:
        raise ConfigError("nothing to evaluate: give --checkpoints (and/or --sft_model_name_or_path)")
    return targets


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")


def load_examples(config: EvalConfig) -> list[Example]:
    from maxent_rlhf.data import as_text, load_any_dataset, require_columns

    source = f"{config.dataset_name} [{config.dataset_test_split}]"
    ds = load_any_dataset(config.dataset_name, config.dataset_test_split, config.dataset_revision)
    require_columns(ds, [config.prompt_column, config.reference_column], source)
    if config.n and config.n < len(ds):
        ds = ds.select(range(config.n))
    has_id = config.id_column in ds.column_names
    examples, seen = [], set()
    for i, row in enumerate(ds):
        ex_id = str(row[config.id_column]) if has_id else str(i)
        if ex_id in seen:
            raise ConfigError(f"{source}: row {i} repeats example id {ex_id!r} (column `{config.id_column}`)")
        seen.add(ex_id)
        prompt = as_text(row[config.prompt_column], source, i, config.prompt_column)
        reference = as_text(row[config.reference_column], source, i, config.reference_column)
        examples.append(Example(ex_id, prompt, reference.strip()))
    return examples


def policy_first(seed: int, example_id: str) -> bool:
    """Whether the policy's summary is shown as A: a hash of (seed, example id), ~half each way."""
    return hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[0] % 2 == 0


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
def _prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def read_generations(path: Path, examples: list[Example], config: EvalConfig) -> dict[str, dict]:
    """Existing generations by example id; a line torn by a kill is dropped (regenerated)."""
    from maxent_rlhf.runs import read_jsonl

    by_id = {e.id: e for e in examples}
    out = {}
    for lineno, rec in read_jsonl(path, numbered=True):
        ex = by_id.get(rec.get("id"))
        if ex is None:
            continue  # from a larger --n: harmless
        if rec.get("prompt_sha") != _prompt_hash(ex.prompt) or rec.get("max_new_tokens") != config.max_new_tokens:
            raise ConfigError(
                f"{path}, line {lineno}: generation of example {ex.id!r} was made for another prompt or "
                f"max_new_tokens ({rec.get('max_new_tokens')} vs {config.max_new_tokens}); use another "
                "--output_dir or delete the file"
            )
        out[ex.id] = rec
    return out


def generate_missing(target: Target, examples: list[Example], config: EvalConfig, state, out_dir: Path) -> None:
    """Greedy generations for the examples of `target` not yet in its file (split over processes)."""
    import torch
    from tqdm.auto import tqdm

    from maxent_rlhf.generation import complete_prompts
    from maxent_rlhf.models import load_policy, load_tokenizer, resolve_dtype
    from maxent_rlhf.runs import open_jsonl_for_append

    path = out_dir / "generations" / f"{target.label}.jsonl"
    existing = read_generations(path, examples, config)
    missing = [e for e in examples if e.id not in existing]
    if not missing:
        if state.is_main_process:
            print(f"[evaluate_judge] {path} complete ({len(existing)} generations): skipping generation")
        return
    mine = missing[state.process_index :: state.num_processes]
    device = state.device
    tok = load_tokenizer(config.tokenizer_name_or_path or target.path, padding_side="left", trust_remote_code=config.trust_remote_code)
    model = load_policy(
        target.path, dtype=resolve_dtype(config.mixed_precision, device), trust_remote_code=config.trust_remote_code
    ).to(device).eval()
    records = []
    sink = open_jsonl_for_append(path) if state.num_processes == 1 else None
    bar = tqdm(total=len(missing), desc=f"generate {target.label}", disable=not state.is_main_process)
    batches = complete_prompts(model, tok, [e.prompt for e in mine], config.max_new_tokens,
                               config.per_device_eval_batch_size, max_prompt_length=config.max_prompt_length, device=device)
    try:
        for s, completions in zip(range(0, len(mine), config.per_device_eval_batch_size), batches):
            batch = mine[s : s + config.per_device_eval_batch_size]
            for e, completion in zip(batch, completions):
                rec = {
                    "id": e.id,
                    "generation": completion.text,
                    "n_tokens": completion.num_tokens,
                    "reference_tokens": len(tok(" " + e.reference, add_special_tokens=False).input_ids),
                    "prompt_sha": _prompt_hash(e.prompt),
                    "max_new_tokens": config.max_new_tokens,
                    "model": target.path,
                }
                if sink is not None:
                    sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                else:
                    records.append(rec)
            if sink is not None:
                sink.flush()
            bar.update(len(batch) * state.num_processes)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object(records)
        if state.is_main_process:
            with open_jsonl_for_append(path) as f:
                for rec in gathered:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        state.wait_for_everyone()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# judging and statistics
# --------------------------------------------------------------------------------------------------
def _outcome(verdict: Verdict, pol_first: bool) -> tuple[str, Optional[float]]:
    """('policy' | 'reference' | 'tie' | 'invalid', P(policy preferred) or None)."""
    p_pol = None
    if verdict.p_a is not None:
        p_pol = verdict.p_a if pol_first else 1.0 - verdict.p_a
    if verdict.preferred in ("tie", "invalid"):
        return verdict.preferred, p_pol
    policy_won = (verdict.preferred == "A") == pol_first
    return ("policy" if policy_won else "reference"), p_pol


def examples_hash(examples: list[Example]) -> str:
    """sha256 of the evaluated examples (ids, prompts, references): the data behind the number, whatever its source."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.prompt, e.reference], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def dataset_revision(config: EvalConfig) -> Optional[str]:
    """The hub revision behind the number (None for a local dataset; examples_sha256 pins the content)."""
    from maxent_rlhf.data import is_hub_dataset

    if not is_hub_dataset(config.dataset_name):
        return None
    return config.dataset_revision or "unpinned (the default branch when this ran; pass --dataset_revision)"


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
    head = ["checkpoint", "step", "win rate", f"{pct}% CI (Wilson)", "n", "invalid", "len policy", "len ref"]
    both = any(r.get("position_consistency") is not None for r in rows)
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


# Options of the judges: one set (away from its default, on the command line or in the YAML file) goes to
# the judge, which must take it (an error names the option and the judge otherwise); unset ones are
# offered with their defaults, like the settings the judge shares with generation.
# The names are the judges' constructor parameters too (`judges.RewardModelJudge(reward_model_name_or_path=...)`).
JUDGE_OPTIONS = ("judge_model", "base_url", "concurrency", "request_timeout", "max_retries", "backoff_base",
                 "backoff_max", "parse_retries", "logprobs", "reward_model_name_or_path", "judge_batch_size")
SHARED_SETTINGS = ("tokenizer_name_or_path", "max_prompt_length", "mixed_precision", "trust_remote_code", "seed",
                   "dataset_name", "dataset_test_split")


def judge_arguments(config: EvalConfig) -> tuple[dict, dict]:
    """(options, context) for `judges.get_judge`: the judge options the user set plus the --judge_kwargs
    object (the judge must take every one), and everything else it may take."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    options = {k: getattr(config, k) for k in JUDGE_OPTIONS if getattr(config, k) != defaults[k]}
    context = {k: getattr(config, k) for k in SHARED_SETTINGS + JUDGE_OPTIONS if k not in options}
    if config.judge_kwargs:
        try:
            extra = json.loads(config.judge_kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"judge_kwargs: not valid JSON ({e}): {config.judge_kwargs!r}") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"judge_kwargs: expected a JSON object, got {config.judge_kwargs!r}")
        options.update(extra)
    return options, context


def main(config: EvalConfig) -> dict:
    """Generate, judge and summarise. Returns the summary dict (an empty dict on non-main processes)."""
    from maxent_rlhf.distributed import process_state

    state = process_state()
    out_dir = Path(config.output_dir)
    if state.is_main_process:
        (out_dir / "generations").mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "eval_config.yaml")
    state.wait_for_everyone()

    targets = resolve_targets(config)
    examples = load_examples(config)
    if not examples:
        raise ConfigError(f"{config.dataset_name} [{config.dataset_test_split}] has no examples")
    # the judge is built first, so a missing key or model fails before any generation work
    if state.is_main_process:
        options, context = judge_arguments(config)
        judge = get_judge(config.judge, context=context, **options)
    for target in targets:
        generate_missing(target, examples, config, state, out_dir)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}  # judging and statistics run on the main process only

    # ---- pairs, cache look-up, pre-flight --------------------------------------------------------
    cache = JudgmentCache(config.cache_path or out_dir / "judgments.jsonl") if judge.cacheable else None
    gens = {t.label: read_generations(out_dir / "generations" / f"{t.label}.jsonl", examples, config) for t in targets}
    plan = []  # (target, example, pol_first, key)
    todo: dict[str, Pair] = {}
    todo_meta: dict[str, dict] = {}
    for ex in examples:  # example-major: a --max_requests cap leaves every checkpoint the same examples
        post = post_from_prompt(ex.prompt)
        for first in (True, False) if config.both_orders else (policy_first(config.seed, ex.id),):
            order = "policy_A" if first else "policy_B"
            for t in targets:
                g = gens[t.label].get(ex.id)
                if g is None:
                    raise RuntimeError(f"generation of example {ex.id!r} missing for {t.label} after generation")
                a, b = (g["generation"], ex.reference) if first else (ex.reference, g["generation"])
                key = cache_key(judge.cache_id, TEMPLATE_VERSION, post, a, b, order)
                plan.append((t, ex, first, key))
                if (cache is None or key not in cache) and key not in todo:
                    todo[key] = Pair(ex.id, ex.prompt, post, a, b)
                    todo_meta[key] = {"example_id": ex.id, "order": order, "summary_a": a, "summary_b": b}
    n_pairs = len(plan)
    n_cached = sum(1 for _, _, _, k in plan if cache is not None and k in cache)
    keys = list(todo)
    capped = bool(config.max_requests) and len(keys) > config.max_requests
    send = keys[: config.max_requests] if capped else keys
    tokens = judge.estimate_tokens([todo[k] for k in send])
    print(
        f"[evaluate_judge] judge {judge.describe()}: {n_pairs} pairs ({len(targets)} models x {len(examples)} "
        f"examples" + (" x 2 orders" if config.both_orders else "") + f"), {n_cached} cached, {len(keys)} to judge"
        + (f", capped at --max_requests {config.max_requests}" if capped else "")
        + f": {len(send)} requests" + (f", ~{tokens:,} tokens (estimate; retries extra)" if tokens else "")
    )
    if config.dry_run:
        return {"dry_run": True, "pairs": n_pairs, "cached": n_cached, "requests": len(send), "estimated_tokens": tokens}

    # ---- judge --------------------------------------------------------------------------------------
    fresh: dict[str, Verdict] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(send), desc="judge")

    def on_result(i: int, verdict: Verdict) -> None:
        key = send[i]
        fresh[key] = verdict
        if cache is not None:
            cache.put(key, verdict, judge=judge.cache_id, template_version=TEMPLATE_VERSION, **todo_meta[key])
        bar.update(1)

    try:
        judge.judge_many([todo[k] for k in send], on_result)
    except JudgeError as e:
        where = f"; the {len(fresh)} judgments made in this run are saved in {cache.path}, a rerun continues" if cache else ""
        raise type(e)(f"{e}{where}") from None
    finally:
        bar.close()
        if cache is not None:
            cache.close()

    # ---- statistics -----------------------------------------------------------------------------
    import evaluate

    metric = evaluate.load(str(METRIC_PATH))
    rows = []
    for t in targets:
        preds, probs, scores_p, scores_r, unjudged, ids, shown_first = [], [], [], [], 0, [], []
        for tt, ex, first, key in plan:
            if tt is not t:
                continue
            v = fresh.get(key) or (cache.get(key) if cache is not None else None)
            if v is None:
                unjudged += 1
                continue
            outcome, p_pol = _outcome(v, first)
            preds.append(outcome)
            probs.append(p_pol)
            ids.append(ex.id)
            shown_first.append("policy" if first else "reference")
            if v.scores is not None:
                scores_p.append(v.scores[0] if first else v.scores[1])
                scores_r.append(v.scores[1] if first else v.scores[0])
        stats = metric.compute(
            predictions=preds, confidence_level=config.confidence_level,
            probabilities=probs if any(p is not None for p in probs) else None,
            **(dict(example_ids=ids, shown_first=shown_first) if config.both_orders else {}),
        )
        g = gens[t.label]
        rows.append({
            "label": t.label, "path": t.path, "step": t.step, "baseline": t.baseline, **stats,
            "unjudged": unjudged,
            "mean_policy_tokens": sum(g[e.id]["n_tokens"] for e in examples) / len(examples),
            "mean_reference_tokens": sum(g[e.id]["reference_tokens"] for e in examples) / len(examples),
            "mean_policy_score": sum(scores_p) / len(scores_p) if scores_p else None,
            "mean_reference_score": sum(scores_r) / len(scores_r) if scores_r else None,
        })
    summary = {
        "judge": config.judge,
        "judge_id": judge.cache_id,
        "judge_model": config.judge_model if judge.remote else None,
        "template_version": TEMPLATE_VERSION,
        "both_orders": config.both_orders,
        "order": "both (each counts half)" if config.both_orders else "one per example, from a hash of (seed, example id)",
        "ci_method": "wilson",
        "confidence_level": config.confidence_level,
        "dataset": config.dataset_name,
        "split": config.dataset_test_split,
        "dataset_revision": dataset_revision(config),
        "n_examples": len(examples),
        "examples_sha256": examples_hash(examples),
        "seed": config.seed,
        "decoding": {"policy": "greedy", "max_new_tokens": config.max_new_tokens,
                     "max_prompt_length": config.max_prompt_length},
        "judge_decoding": judge_decoding(judge),
        "requests_sent": getattr(judge, "requests_sent", len(send)),
        "judged_now": len(fresh),
        "cached": n_cached,
        "incomplete": any(r["unjudged"] for r in rows),
        "checkpoints": [r for r in rows if not r["baseline"]],
        "baseline": next((r for r in rows if r["baseline"]), None),
    }
    print_table(rows, config.confidence_level)
    if summary["incomplete"]:
        print("[evaluate_judge] WARNING: some pairs are not judged yet (--max_requests); rerun to complete")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if config.plot:
        from maxent_rlhf.plotting import plot_win_rates

        plot_win_rates(rows, out_dir / "win_rate.png", judge.describe(), config.confidence_level)
    return summary


if __name__ == "__main__":
    from maxent_rlhf.data import DataError

    try:
        main(parse_config(EvalConfig))
    except (JudgeError, ConfigError, DataError) as err:
        sys.exit(f"evaluate_judge.py: error: {err}")
