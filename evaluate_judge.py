"""Win rates of checkpoints against the dataset's reference summaries, judged pairwise.

    python evaluate_judge.py --checkpoints runs/maxent_1b --dataset_name trl-lib/tldr --dataset_test_split test --n 500
    accelerate launch evaluate_judge.py --config eval.yaml          # generation split over GPUs

1. Generation: every checkpoint (a checkpoint directory, a run directory = all its checkpoints by step,
   or a list of them; optionally an SFT baseline; a LoRA checkpoint is judged as its merged model) decodes the prompts greedily (max_new_tokens 53,
   batched, left-padded, truncated after EOS) into <out>/generations/<label>.jsonl; a rerun generates
   only what is missing.
2. Judging: each (policy, reference) pair goes to a judge from `maxent_rlhf.judges` (openai,
   reward-model, or a plugin's such as the toy lab's toy-gold). A/B order comes from a hash of
   (seed, example id); with --both_orders every pair is judged in both orders, each counting half a
   judgment, and the position statistics of the judge are reported. Judgments are appended and flushed
   to a JSONL cache as they complete, keyed by
   (judge, template version, post, both summaries, order): a rerun sends no request for a judged pair.
   Before sending anything the number of requests and an estimate of tokens are printed; --max_requests
   caps them and --dry_run stops there.
3. Output: per checkpoint the win rate, its 95% Wilson score interval, n, invalid answers and the mean
   token lengths of policy and reference summaries (with --both_orders also the position-consistency
   rate and the first-position preference rate, with intervals): a table, <out>/summary.json (with
   everything needed to reproduce the number: judge, template version, orders, seed, data, decoding)
   and <out>/win_rate.png.

The machinery (data, generation records, pairs and cache, judging, statistics) is `maxent_rlhf.evaluation`,
which the training scripts call for their in-training win rate: one implementation.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from maxent_rlhf.config import BaseConfig, ConfigError, cfg, save_config
from maxent_rlhf.evaluation import (Example, JudgeArgs, JudgingPlan, examples_hash, generate_records, judge_decoding,
                                    judge_plan, judge_settings, load_reference_examples, print_table, prompt_hash,
                                    summarise)
from maxent_rlhf.judges import TEMPLATE_VERSION, JudgmentCache, get_judge


@dataclass
class EvalConfig(JudgeArgs, BaseConfig):
    """Win rates of checkpoints against reference summaries, judged by an LLM or a reward model."""

    output_dir: str = cfg("eval/default", "output directory: generations/, judgments.jsonl, summary.json, win_rate.png")
    checkpoints: list[str] = cfg(
        [], "checkpoints to evaluate (comma-separated): checkpoint dirs, model dirs / hub ids, LoRA adapter dirs (judged "
        "merged onto the base their adapter_config.json names), or run dirs (all their checkpoints, by step)"
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
    max_prompt_length: int = cfg(512, "prompts longer than this many tokens keep their last tokens")
    judge: str = cfg("openai", "judge: 'openai', 'reward-model', or a plugin's (e.g. 'toy-gold')")
    reward_model_name_or_path: Optional[str] = cfg(None, "reward model (hub id or dir) for --judge reward-model")
    cache_path: Optional[str] = cfg(
        None, "judgment cache (JSONL file; an existing directory: judgments.jsonl in it); default <output_dir>/judgments.jsonl")
    dry_run: bool = cfg(False, "generate, then print the number of judge requests and the token estimate, and stop")
    use_vllm: bool = cfg(
        False, "decode the greedy generations with vLLM (an engine per checkpoint and process; the same "
        "max_new_tokens / EOS semantics); needs the `vllm` extra")
    plot: bool = cfg(True, "write win_rate.png (win rate against training step)")

    def range_checks(self) -> list:  # the judge options' ranges are JudgeArgs'
        return super().range_checks() + [
            (self.n >= 0, f"`n` = {self.n} must be >= 0 (the first n examples of the split; 0: all)"),
            (self.max_prompt_length >= 1, f"`max_prompt_length` = {self.max_prompt_length} must be >= 1"),
        ]


@dataclass
class Target:
    label: str  # file name under generations/
    path: str
    step: Optional[int]
    baseline: bool = False


# --------------------------------------------------------------------------------------------------
# what to evaluate
# --------------------------------------------------------------------------------------------------
def _is_model_dir(p: Path) -> bool:
    """A full model (config.json) or a LoRA adapter (adapter_config.json, judged merged onto its base)."""
    from maxent_rlhf.lora import is_adapter_dir

    return (p / "config.json").exists() or is_adapter_dir(p)


def resolve_targets(config: EvalConfig) -> list[Target]:
    from maxent_rlhf.checkpoints import checkpoint_step, list_checkpoints

    found: list[tuple[str, Optional[int]]] = []
    for entry in config.checkpoints:
        p = Path(entry)
        ckpts = list_checkpoints(p) if p.is_dir() and not _is_model_dir(p) else []
        if ckpts:
            found.extend((str(c), checkpoint_step(c)) for c in ckpts)
        elif p.is_dir() and not _is_model_dir(p):
            raise ConfigError(f"checkpoints: {entry} has no model (config.json), no adapter (adapter_config.json) and "
                              "no complete checkpoints (step_*/)")
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


def cache_file(config: EvalConfig) -> Path:
    """The judgment cache: --cache_path (judgments.jsonl inside it when it is a directory), else <output_dir>/judgments.jsonl."""
    path = Path(config.cache_path) if config.cache_path else Path(config.output_dir) / "judgments.jsonl"
    return path / "judgments.jsonl" if path.is_dir() else path


def dataset_revision(config: EvalConfig) -> Optional[str]:
    """The hub revision behind the number (None for a local dataset; examples_sha256 pins the content)."""
    from maxent_rlhf.data import is_hub_dataset

    if not is_hub_dataset(config.dataset_name):
        return None
    return config.dataset_revision or "unpinned (the default branch when this ran; pass --dataset_revision)"


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
def read_generations(path: Path, examples: list[Example], config: EvalConfig) -> dict[str, dict]:
    """Existing generations by example id; a line torn by a kill is dropped (regenerated)."""
    from maxent_rlhf.runs import read_jsonl

    by_id = {e.id: e for e in examples}
    out = {}
    for lineno, rec in read_jsonl(path, numbered=True):
        ex = by_id.get(rec.get("id"))
        if ex is None:
            continue  # from a larger --n: harmless
        if rec.get("prompt_sha") != prompt_hash(ex.prompt) or rec.get("max_new_tokens") != config.max_new_tokens:
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

    from maxent_rlhf.artifacts import is_local_path
    from maxent_rlhf.lora import is_adapter_dir, load_merged_from_adapter, read_adapter_config
    from maxent_rlhf.models import TOKENIZER_FILES, load_policy, load_tokenizer, resolve_dtype

    path = out_dir / "generations" / f"{target.label}.jsonl"
    existing = read_generations(path, examples, config)
    missing = [e for e in examples if e.id not in existing]
    if not missing:
        if state.is_main_process:
            print(f"[evaluate_judge] {path} complete ({len(existing)} generations): skipping generation")
        return
    dtype = resolve_dtype(config.mixed_precision, state.device)
    tok_path = config.tokenizer_name_or_path or target.path
    adapter = is_local_path(target.path) and is_adapter_dir(target.path)
    if adapter and not any((Path(target.path) / f).exists() for f in TOKENIZER_FILES):
        tok_path = config.tokenizer_name_or_path or read_adapter_config(target.path)["base_model_name_or_path"]
    tok = load_tokenizer(tok_path, padding_side="left", trust_remote_code=config.trust_remote_code)
    if config.use_vllm:  # this process's share on an engine serving the checkpoint (closed before the next)
        from maxent_rlhf.artifacts import resolve_path
        from maxent_rlhf.vllm_engine import VLLMEngine, engine_dtype, only_this_device

        serve = read_adapter_config(target.path)["base_model_name_or_path"] if adapter else target.path
        with only_this_device(state):
            engine = VLLMEngine(resolve_path(serve), tokenizer=resolve_path(tok_path),
                                dtype=engine_dtype(config.mixed_precision, state.device), seed=config.seed)
        with engine:
            if adapter:  # the base with the adapter merged in float32, as the plain path judges it
                engine.load_weights(load_merged_from_adapter(target.path, torch.float32,
                                                             config.trust_remote_code).state_dict().items())
            records = generate_records(None, tok, missing, config, target.path, state, engine=engine)
        _append_generations(path, records, state)
        return
    if adapter:
        # a LoRA checkpoint: its base (adapter_config.json) with the adapter merged in float32, then cast, the
        # very weights `python -m maxent_rlhf.lora merge` writes and load_policy would cast
        model = load_merged_from_adapter(target.path, torch.float32, config.trust_remote_code).to(dtype)
    else:
        model = load_policy(target.path, dtype=dtype, trust_remote_code=config.trust_remote_code)
    model = model.to(state.device).eval()
    # each process holds the whole model (no sharding): no synced_gpus
    records = generate_records(model, tok, missing, config, target.path, state, progress=f"generate {target.label}")
    _append_generations(path, records, state)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _append_generations(path: Path, records, state) -> None:
    from maxent_rlhf.runs import open_jsonl_for_append

    if state.is_main_process:
        with open_jsonl_for_append(path) as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    state.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
# settings that make the generations in an output_dir what they are; the judge, its model and template may
# change between runs (judgments are keyed by them), these may not
SAME_EVALUATION_KEYS = ("dataset_name", "dataset_test_split", "dataset_revision", "prompt_column", "reference_column", "id_column",
                        "max_prompt_length", "max_new_tokens", "tokenizer_name_or_path")


def main(config: EvalConfig) -> dict:
    """Generate, judge and summarise. Returns the summary dict (an empty dict on non-main processes)."""
    from maxent_rlhf.distributed import process_state
    from maxent_rlhf.runs import check_same_evaluation

    state = process_state()
    out_dir = Path(config.output_dir)
    # a rerun continues (generations and judgments are keyed); outputs made for other prompts or decoding
    # settings would mix with this run's: refused (runs.check_same_evaluation)
    check_same_evaluation(out_dir, config, SAME_EVALUATION_KEYS, "eval_config.yaml",
                          holds=("generations", "judgments.jsonl", "summary.json"))
    if state.is_main_process:
        (out_dir / "generations").mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "eval_config.yaml")
    state.wait_for_everyone()

    targets = resolve_targets(config)
    examples = load_reference_examples(config.dataset_name, config.dataset_test_split, config.n, config.prompt_column,
                                       config.reference_column, config.id_column, config.dataset_revision)
    # the judge is built first, so a missing key or model fails before any generation work
    if state.is_main_process:
        judge = get_judge(config.judge, judge_settings(config, config.reward_model_name_or_path,
                                                       config.tokenizer_name_or_path))
    for target in targets:
        generate_missing(target, examples, config, state, out_dir)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}  # judging and statistics run on the main process only

    # ---- pairs, cache look-up, pre-flight --------------------------------------------------------
    cache = None
    if judge.cacheable:
        cache = JudgmentCache(cache_file(config))
        print(f"[evaluate_judge] judgment cache: {cache.path}")
    gens = {t.label: read_generations(out_dir / "generations" / f"{t.label}.jsonl", examples, config) for t in targets}
    plan = JudgingPlan(judge, examples, gens, config.seed, config.both_orders, cache)
    line, send, tokens = plan.preflight(config.max_requests)
    print(f"[evaluate_judge] {line}")
    if config.dry_run:
        return {"dry_run": True, "pairs": len(plan.pairs), "cached": plan.n_cached, "requests": len(send),
                "estimated_tokens": tokens}

    # ---- judge and statistics -------------------------------------------------------------------
    fresh = judge_plan(plan, send)
    rows = [{"label": t.label, "path": t.path, "step": t.step, "baseline": t.baseline,
             **summarise(plan, t.label, fresh, config.confidence_level)} for t in targets]
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
        "cached": plan.n_cached,
        "incomplete": any(r["unjudged"] for r in rows),
        "checkpoints": [r for r in rows if not r["baseline"]],
        "baseline": next((r for r in rows if r["baseline"]), None),
    }
    print_table(rows, config.confidence_level)
    if summary["incomplete"]:
        print("[evaluate_judge] WARNING: some pairs are not judged yet (--max_requests); rerun to complete")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if config.plot:  # after the numbers are printed and saved: a figure that fails to draw costs a warning
        from maxent_rlhf import plotting

        try:
            plotting.plot_win_rates(rows, out_dir / "win_rate.png", judge.describe(), config.confidence_level)
        except Exception as e:  # noqa: BLE001 - matplotlib missing, no display backend, a bad value
            print(f"[evaluate_judge] WARNING: {out_dir / 'win_rate.png'} was not drawn ({type(e).__name__}: "
                  f"{' '.join(str(e).split())}); the numbers are in {out_dir / 'summary.json'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    from maxent_rlhf.cli import run_script

    run_script(main, EvalConfig)
