"""DPO steps per second of train_offline.py side by side with TRL's DPOTrainer, at equal work.

    python bench/bench_offline.py                                              # ours only
    python bench/bench_offline.py --trl --trl-python /tmp/venvs/trl116/bin/python   # + TRL 1.16

Nothing is installed: `--trl` with a python that lacks trl 1.16 prints how to put it in a scratch venv.

Equal work, per optimizer step (both sides, every size, every case):
- model: one locally built GPT-NeoX policy (hidden 128 x 4 layers = 0.87M, or 512 x 8 = 25.5M
  parameters, word vocabulary of 300), float32, dropout off, 2 torch threads (`--threads`), no gradient
  checkpointing, no bf16 (TRL's defaults for both are switched off).
- data: 32 preference pairs per step, in one forward of the 64 sequences (ours global_batch_size =
  per_device_train_batch_size 32 / TRL per_device_train_batch_size 32, no accumulation); prompts of 32 tokens,
  chosen / rejected of 20 tokens + EOS: 53-token sequences, no truncation on either side.
- loss: sigmoid DPO, beta 0.1; AdamW lr 1e-6, linear decay, no warm-up, clip 1.0.
- reference: case `live`, a second copy of the policy run without grad in every step; case
  `precompute` (ours precompute_ref_logprobs / TRL precompute_ref_log_probs), the reference log-probs of
  the whole dataset computed once before training (batch 32) and read from a table in each step.
Differences that remain (each side's own design): ours computes logits at response positions only;
TRL 1.16 runs its fused, vocabulary-chunked LM head over every position (prompt included) on CPU. Our
metrics are reduced on the device once per step; TRL logs its usual rewards/* and logps/* metrics.

Threads: 2 by default; on a loaded shared machine use `--threads 1` and the "per CPU-second" column
(see bench_rloo.py).

Timing: whole processes of `--short` and `--long` steps over the same dataset of 32 x long pairs
(see sidebyside.py): start-up, loading, tokenisation, the precomputation pass and the final save cancel,
so a step of the precompute case excludes the reference forward. Reported: pairs per second, median /
min / max over interleaved repeats, the ratio of medians, the long run's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import (REPO, Side, add_side_by_side_args, apply_config_overrides, load_average, load_script,  # noqa: E402
                        measure, parse_ours, print_table, require_trl)

SIZES = {"0.87M": (128, 4, 4), "25.5M": (512, 8, 8)}  # (hidden, layers, heads), vocabulary 300
VOCAB_WORDS = 297
PAIRS, PROMPT_TOKENS, RESPONSE_WORDS, BETA, LR = 32, 32, 20, 0.1, 1e-6
CASES = ("live", "precompute")
DEFAULT_LONG = {"0.87M": 10, "25.5M": 6}


def build(size: str, root: Path, long: int) -> dict:
    sys.path.insert(0, str(REPO))
    from maxent_rlhf.models import build_tiny_policy, build_word_tokenizer, count_parameters

    hidden, layers, heads = SIZES[size]
    words = [f"w{i}" for i in range(VOCAB_WORDS)]
    tok = build_word_tokenizer(words)
    pol = build_tiny_policy(tok, seed=0, save_dir=root / "policy", hidden_size=hidden, num_layers=layers,
                            num_heads=heads, max_position_embeddings=128)
    rng = random.Random(0)
    sent = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(PAIRS * long):  # one epoch = the long run: both runs precompute the same table
            f.write(json.dumps({"prompt": sent(PROMPT_TOKENS), "chosen": " " + sent(RESPONSE_WORDS),
                                "rejected": " " + sent(RESPONSE_WORDS)}) + "\n")
    return {"params": count_parameters(pol)}


# --------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------
def worker_ours(root: Path, steps: int, precompute: bool, script: str = "train_offline.py") -> dict:
    train_offline = load_script(script)
    from maxent_rlhf.runs import read_metrics

    c = train_offline.OfflineConfig(
        loss_type="dpo", model_name_or_path=str(root / "policy"), dataset_name=str(root / "pairs.jsonl"),
        output_dir=tempfile.mkdtemp(dir=root, prefix="ours_"), report_to="none", global_batch_size=PAIRS,
        per_device_train_batch_size=PAIRS, per_device_eval_batch_size=PAIRS, max_steps=steps, learning_rate=LR,
        warmup_ratio=0.0, lr_scheduler_type="linear", beta=BETA, max_prompt_length=64, max_completion_length=32,
        precompute_ref_logprobs=precompute, save_steps=0,
    )
    recs = [m for m in read_metrics(train_offline.main(apply_config_overrides(c))) if "train/loss" in m or "loss" in m]
    last = recs[-1] if recs else {}
    return {"metrics": {k: v for k, v in last.items() if k.startswith(("train/", "rewards/", "perf/"))}}


def worker_trl116(root: Path, steps: int, precompute: bool) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(root / "policy")
    ds = load_dataset("json", data_files=str(root / "pairs.jsonl"), split="train")
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(dir=root, prefix="trl116_"), per_device_train_batch_size=PAIRS,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=PAIRS, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        disable_dropout=True, model_init_kwargs={"dtype": torch.float32}, report_to=[], save_strategy="no",
        logging_steps=1, seed=1, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=str(root / "policy"), args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"trl": trl.__version__, "steps": trainer.state.global_step,
            "metrics": {k: v for k, v in (logs[-1] if logs else {}).items() if k in ("loss", "rewards/margins")}}


def worker(args) -> None:
    root = Path(args.dir)
    # a fresh datasets cache per process: TRL caches tokenised data and precomputed reference log-probs
    # there, and a long run must not find the short run's table
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(dir=root, prefix="hfcache_")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "ours":
        out = worker_ours(root, args.steps, args.case == "precompute", args.script)
    else:
        out = worker_trl116(root, args.steps, args.case == "precompute")
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out, default=str), flush=True)


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of: " + ", ".join(SIZES))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    add_side_by_side_args(ap, "DPOTrainer", "steps", "10 at 0.87M, 6 at 25.5M", "train_offline.py")
    ap.add_argument("--case", default="live", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.trl:
        require_trl(args.trl_python, "1.16.0", "bench/bench_offline.py")
    ours = parse_ours(args.ours or ["ours=train_offline.py"])
    me = str(Path(__file__).resolve())
    print(f"bench_offline: DPO, {PAIRS} pairs/step, {PROMPT_TOKENS}-token prompts + {RESPONSE_WORDS + 1}-token "
          f"responses, beta {BETA}, {args.threads} threads, {args.repeats} repeats; load average {load_average()}")
    results = {}
    for size in [s for s in args.sizes.split(",") if s]:
        if size not in SIZES:
            sys.exit(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
        long = args.long or DEFAULT_LONG[size]
        with tempfile.TemporaryDirectory(prefix="bench_offline_") as d:
            info = build(size, Path(d), long)
            for case in [c for c in args.cases.split(",") if c]:
                if case not in CASES:
                    sys.exit(f"--cases: unknown case {case!r}; choose from {', '.join(CASES)}")

                def cmd(python, who, script="train_offline.py"):
                    return lambda n: [python, me, "--worker", who, "--case", case, "--dir", d, "--steps", str(n),
                                      "--threads", str(args.threads), "--script", script]

                sides = [Side(label, cmd(sys.executable, "ours", script), env) for label, script, env in ours]
                if args.trl:
                    sides.append(Side("TRL 1.16", cmd(args.trl_python, "trl116")))
                print(f"\n== {size} ({info['params'] / 1e6:.2f}M parameters), reference {case}: runs of {args.short} "
                      f"and {long} steps; load average {load_average()}")
                measure(sides, args.short, long, args.repeats, args.threads)
                print_table(f"DPO {size}, reference {case}: pairs/s" + (" vs TRL 1.16" if args.trl else ""),
                            "pairs/s", [(s.label, s) for s in sides], PAIRS, sides[-1])
                results[f"{size}/{case}"] = {s.label: s.runs for s in sides}
    print(f"\nload average at the end: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
