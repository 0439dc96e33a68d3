"""RLOO iterations per second of train_rloo.py side by side with TRL's RLOOTrainer, at equal work.

    python bench/bench_rloo.py                                           # ours only
    python bench/bench_rloo.py --trl --trl-python /tmp/venvs/trl116/bin/python      # + TRL 1.16 (table 1)
    python bench/bench_rloo.py --trl --trl-python ... --trl011-path /tmp/trl011     # + TRL 0.11 (table 2)
    python bench/bench_rloo.py --ours ours=train_rloo.py --ours cheap=train_rloo.py:kl_prev_per_prompt=1   # extra rows
    python bench/bench_rloo.py --ours before=/tmp/train_rloo_before.py --ours after=train_rloo.py  # another copy

Nothing is installed: without `--trl-python` (or with a python that lacks trl 1.16) `--trl` prints how
to put TRL 1.16 in a scratch venv. TRL 0.11 (the paper-era PPO-style trainer) is read from a
`pip install --no-deps --target DIR trl==0.11.4` directory (`--trl011-path DIR`).

Equal work, per iteration (both sides, every size):
- models: one locally built GPT-NeoX policy (reference = a second copy of it) and a GPT-NeoX one-label
  reward model of the same shape; word-level vocabulary of 300 tokens; float32; dropout off; 2 torch
  threads (`--threads`); no gradient checkpointing, no bf16 (TRL's defaults for both are switched off).
- 64 completions = 16 prompts x 4 (ours rloo_k 4 / TRL num_generations 4), prompts of 32 tokens,
  24 new tokens (ours response_length / TRL max_completion_length), pure temperature sampling at 0.7
  (top_k 0, top_p 1), KV-cached HF generation of all 64 rows in one batch.
- forwards: reward model on prompt + completion; policy (old log-probs) and reference, no grad;
  one PPO epoch of one mini-batch (TRL: num_iterations 1, steps_per_generation = gradient_accumulation
  = 4) as 4 micro-batches of 16 with grad, one AdamW step (lr 3e-6, linear decay, clip 1.0, eps 0.2).
- KL: beta 0.05, sequence-level k1 sum subtracted from the reward on both sides.
Differences that remain (by design, each side's own):
- ours runs one more policy forward per iteration (no grad): the post-update pass for objective/kl_prev*
  (KL between consecutive policies, both directions, and the ESS) on the iteration's samples; TRL logs no
  such metric. `--ours cheap=train_rloo.py:kl_prev_per_prompt=1` times it on one completion per prompt.
- ours runs each prompt once per forward for its 4 completions (generation prefill, reward model, reference,
  update, kl_prev: `shared_prefix`, same values), its KV cache repeated; TRL runs every row's prompt.
  `--ours plain=train_rloo.py:shared_prefix=false` times the plain path.
- ours scores the reward model at the last real token (EOS) from token ids; TRL decodes and re-tokenises
  prompt + completion text and pools at the last non-pad token. Ours subtracts the EOS penalty
  (missing_eos_penalty 1.0, a vector op); TRL 1.16 has none.
- no-grad forwards: ours in chunks of `local_rollout_forward_batch_size` 64 rows; TRL in chunks of
  per_device_train_batch_size (16).
- TRL 1.16 computes log-probs with its fused LM head (on CPU: every position, prompt included,
  vocabulary-chunked); ours runs the LM head on the response positions only.
- TRL 0.11 (table 2): the same batch, epochs, mini-batches and KL, its own token-level KL in the
  reward, full-logit forwards, and its own post-processing (stop_token eos, missing_eos_penalty 1.0).

Threads: 2 by default (the issue's setting). On a shared machine whose load average is above its core
count, two OpenMP threads per process wait for each other's descheduled thread and wall times swing 2-10x
from run to run; there run `--threads 1` and read the "per CPU-second" column (user + system seconds of
the same short/long difference), which moves least with other processes' load.

Timing: every run is a whole fresh process of `--short` then `--long` iterations (see sidebyside.py);
time per iteration = (wall_long - wall_short) / (long - short), so loading and the first iteration's
warm-up cancel. Repeats alternate the sides. Reported: episodes (completions) per second, median / min /
max over repeats, the ratio of medians, and the long run's peak RSS. Our phase times are the long
run's last-iteration time/* metrics (medians over repeats).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import (REPO, Side, add_side_by_side_args, apply_config_overrides, load_average, load_script,  # noqa: E402
                        measure, parse_ours, print_table, require_trl)

SIZES = {  # name: (hidden, layers, heads); vocabulary 300 -> 0.87M and 25.5M parameters
    "0.87M": (128, 4, 4),
    "25.5M": (512, 8, 8),
}
VOCAB_WORDS = 297  # + EOS, pad, unk = 300
PROMPTS, K, NEW_TOKENS, PROMPT_TOKENS, TEMP, BETA, MICRO, LR = 16, 4, 24, 32, 0.7, 0.05, 16, 3e-6
BATCH = PROMPTS * K
DEFAULT_LONG = {"0.87M": 8, "25.5M": 5}


def build(size: str, root: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model, build_word_tokenizer, count_parameters

    hidden, layers, heads = SIZES[size]
    words = [f"w{i}" for i in range(VOCAB_WORDS)]
    tok = build_word_tokenizer(words)
    kw = dict(hidden_size=hidden, num_layers=layers, num_heads=heads, max_position_embeddings=128)
    pol = build_tiny_policy(tok, seed=0, save_dir=root / "policy", **kw)
    build_tiny_reward_model(tok, seed=1, save_dir=root / "reward", **kw)
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(PROMPTS * 32):  # more prompts than any run uses: no epoch boundary inside a run
            f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(PROMPT_TOKENS))}) + "\n")
    return {"params": count_parameters(pol)}


# ----------------------------------------------------------------------------------------------------
# workers: one whole process each; the last stdout line "RESULT {json}" goes back to the driver
# ----------------------------------------------------------------------------------------------------
def ours_config(mod, root: Path, iterations: int):
    """Our config at the benchmark's settings (`mod`: train_rloo or a copy of it)."""
    return mod.RLOOConfig(
        model_name_or_path=str(root / "policy"), reward_model_name_or_path=str(root / "reward"),
        dataset_name=str(root / "prompts.jsonl"), output_dir=tempfile.mkdtemp(dir=root, prefix="ours_"),
        global_batch_size=BATCH, rloo_k=K, response_length=NEW_TOKENS, temperature=TEMP, num_ppo_epochs=1,
        num_mini_batches=1, per_device_train_batch_size=MICRO, local_rollout_forward_batch_size=BATCH,
        num_iterations=iterations, regularizer="kl", kl_coef=BETA, learning_rate=LR, max_prompt_length=PROMPT_TOKENS,
        report_to="none", sample_every=0, save_steps=0,
    )


def worker_ours(root: Path, iterations: int, script: str) -> dict:
    mod = load_script(script)
    from maxent_rlhf.runs import read_metrics

    recs = read_metrics(mod.main(apply_config_overrides(ours_config(mod, root, iterations))))
    last = recs[-1]
    return {"phases_s": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("time/")},
            "metrics": {k: last[k] for k in ("objective/kl_ref", "objective/kl_prev", "policy/entropy",
                                             "objective/scores", "response/length") if k in last}}


def worker_trl116(root: Path, iterations: int) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(root / "policy", padding_side="left")
    ds = load_dataset("json", data_files=str(root / "prompts.jsonl"), split="train")
    args = RLOOConfig(
        output_dir=tempfile.mkdtemp(dir=root, prefix="trl116_"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO, steps_per_generation=BATCH // MICRO,  # one generation of 64,
        num_generations=K, max_completion_length=NEW_TOKENS, temperature=TEMP, top_k=0, top_p=1.0,  # one opt. step
        beta=BETA, num_iterations=1, epsilon=0.2, learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0,
        max_steps=iterations, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, disable_dropout=True,
        model_init_kwargs={"dtype": torch.float32}, report_to=[], save_strategy="no", logging_steps=1, seed=1,
        dataloader_num_workers=0,
    )
    trainer = RLOOTrainer(
        model=str(root / "policy"), reward_funcs=AutoModelForSequenceClassification.from_pretrained(root / "reward"),
        args=args, train_dataset=ds, processing_class=tok, reward_processing_classes=tok,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    last = logs[-1] if logs else {}
    return {"trl": trl.__version__, "steps": trainer.state.global_step,
            "metrics": {k: last[k] for k in ("kl", "entropy", "reward", "step_time") if k in last}}


def worker_trl011(root: Path, iterations: int) -> dict:
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(root / "policy", padding_side="left")
    ds = load_dataset("json", data_files=str(root / "prompts.jsonl"), split="train")
    ds = ds.map(lambda r: {"input_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"]}, remove_columns=["prompt"])
    cfg = RLOOConfig(
        output_dir=tempfile.mkdtemp(dir=root, prefix="trl011_"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO, num_mini_batches=1, rloo_k=K, total_episodes=BATCH * iterations,
        response_length=NEW_TOKENS, temperature=TEMP, num_ppo_epochs=1, kl_coef=BETA, learning_rate=LR,
        local_rollout_forward_batch_size=BATCH, stop_token="eos", missing_eos_penalty=1.0, report_to=[],
        save_strategy="no", logging_steps=1, num_sample_generations=0, use_cpu=True, seed=1,
    )
    RLOOTrainer.optimizer_cls_and_kwargs = None  # transformers 5 reads it; TRL 0.11 predates it (no effect on work)
    trainer = RLOOTrainer(
        config=cfg, tokenizer=tok, policy=AutoModelForCausalLM.from_pretrained(root / "policy"),
        ref_policy=AutoModelForCausalLM.from_pretrained(root / "policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(root / "reward"), train_dataset=ds,
    )
    trainer.train()
    return {"trl": trl.__version__, "steps": trainer.state.global_step}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.dir)
    if args.worker == "ours":
        out = worker_ours(root, args.iterations, args.script)
    elif args.worker == "trl116":
        out = worker_trl116(root, args.iterations)
    else:
        out = worker_trl011(root, args.iterations)
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of: " + ", ".join(SIZES))
    add_side_by_side_args(ap, "RLOOTrainer", "iterations", "8 at 0.87M, 5 at 25.5M", "train_rloo.py")
    ap.add_argument("--trl011-path", default=None,
                    help="directory holding trl 0.11.x (pip install --no-deps --target DIR trl==0.11.4): adds table 2")
    ap.add_argument("--iterations", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.trl:
        require_trl(args.trl_python, "1.16.0", "bench/bench_rloo.py")
    if args.trl011_path and not (Path(args.trl011_path) / "trl").is_dir():
        sys.exit(f"--trl011-path {args.trl011_path}: no trl package there; "
                 "pip install --no-deps --target DIR trl==0.11.4")
    ours = parse_ours(args.ours or ["ours=train_rloo.py"])
    me = str(Path(__file__).resolve())
    print(f"bench_rloo: {BATCH} completions/iteration ({PROMPTS} prompts x {K}), {NEW_TOKENS} new tokens, prompts "
          f"{PROMPT_TOKENS} tokens, T {TEMP}, beta {BETA}, 1 epoch x 1 mini-batch ({BATCH // MICRO} x {MICRO}), "
          f"{args.threads} threads, {args.repeats} repeats; load average {load_average()}")
    results = {}
    for size in [s for s in args.sizes.split(",") if s]:
        if size not in SIZES:
            sys.exit(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
        long = args.long or DEFAULT_LONG[size]
        with tempfile.TemporaryDirectory(prefix="bench_rloo_") as d:
            root = Path(d)
            info = build(size, root)
            base = [sys.executable, me, "--dir", d, "--threads", str(args.threads)]
            sides = [Side(label, (lambda n, s=script: base + ["--worker", "ours", "--script", s, "--iterations", str(n)]), env)
                     for label, script, env in ours]
            trl116 = trl011 = None
            if args.trl:
                trl116 = Side("TRL 1.16", lambda n: [args.trl_python, me, "--dir", d, "--threads", str(args.threads),
                                                     "--worker", "trl116", "--iterations", str(n)])
                sides.append(trl116)
            if args.trl011_path:
                trl011 = Side("TRL 0.11", lambda n: base + ["--worker", "trl011", "--iterations", str(n)],
                              {"PYTHONPATH": str(Path(args.trl011_path).resolve())})
                sides.append(trl011)
            print(f"\n== {size}: {info['params'] / 1e6:.2f}M parameters (policy; reference and reward model the same "
                  f"shape); runs of {args.short} and {long} iterations; load average {load_average()}")
            measure(sides, args.short, long, args.repeats, args.threads)
            print(f"load average after: {load_average()}")
            for side in sides[: len(ours)]:
                phases = [r["long"].get("phases_s", {}) for r in side.runs]
                if phases:
                    keys = list(phases[0])
                    med = {k: statistics.median(p[k] for p in phases if k in p) for k in keys}
                    print(f"{side.label} phases of the last iteration (s, median): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
            rows = [(s.label, s) for s in sides]
            if trl116 is not None:
                print_table(f"RLOO {size}, episodes/s vs TRL 1.16 (table 1)", "episodes/s",
                            [r for r in rows if r[1] is not trl011], BATCH, trl116)
            if trl011 is not None:
                print_table(f"RLOO {size}, episodes/s vs TRL 0.11 (table 2, paper era)", "episodes/s",
                            [r for r in rows if r[1] is not trl116], BATCH, trl011)
            if trl116 is None and trl011 is None:
                print_table(f"RLOO {size}, episodes/s", "episodes/s", rows, BATCH, sides[0])
            results[size] = {s.label: s.runs for s in sides}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
