"""GPU smoke benchmark: train_rloo.py and train_offline.py on a ~160M-parameter GPT-NeoX built locally.

    bash bench/gpu_smoke.sh                 # one GPU (configs/accelerate/single_gpu.yaml), < 5 minutes on an H100
    bash bench/gpu_smoke.sh --tiny          # CPU dry run of the same path with a tiny model (~1 minute)

No download: the policy and reward model are randomly initialised GPT-NeoX models with Pythia-160M's
shape (12 layers, width 768, 12 heads, vocabulary 50,304), over a word-level tokenizer of 50,301 made-up
words (models.build_word_tokenizer); prompts and preference pairs are random word sequences of TL;DR-like
lengths. Both scripts run through their `main(cfg)` with bf16 (mixed_precision auto on a GPU) and
gradient checkpointing:

- train_rloo.py, maxent recipe shape (entropy regulariser, length-normalised, reference for kl_ref):
  `--iterations` iterations of 64 completions (32 prompts x k = 2), 53 new tokens, 4 PPO epochs;
- train_offline.py DPO with a live reference model: `--steps` steps of a global batch of 32 pairs.

Printed: response tokens/s and episodes/s (RLOO), tokens/s and samples/s (offline), per-phase times, and
peak GPU memory (torch.cuda.max_memory_allocated) per script. Rates are medians over the iterations after
the first (which includes CUDA warm-up). The figures are not a test: nothing is asserted beyond the runs
finishing with finite losses.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_offline  # noqa: E402
import train_rloo  # noqa: E402
from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model, build_word_tokenizer, count_parameters  # noqa: E402
from maxent_rlhf.runs import read_metrics  # noqa: E402

PYTHIA_160M = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_position_embeddings=2048)
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, max_position_embeddings=1024)
BASE_WORDS = ("SUBREDDIT: r/relationships r/AskReddit TITLE: POST: TL;DR: the a my we i you it is was and but not "
              "very good bad help cat dog home work friend today yesterday long short happy sad big small").split()


def build_assets(out: Path, size: dict, vocab_size: int, seed: int = 0) -> dict:
    words = list(BASE_WORDS) + [f"w{i}" for i in range(vocab_size - 3 - len(BASE_WORDS))]
    tok = build_word_tokenizer(words)
    assert len(tok) == vocab_size, len(tok)
    t0 = time.perf_counter()
    policy = build_tiny_policy(tok, seed=seed, save_dir=out / "policy", **size)
    n_params = count_parameters(policy)
    del policy
    build_tiny_reward_model(tok, seed=seed + 1, save_dir=out / "reward", **size)
    rng = random.Random(seed)
    content = BASE_WORDS[8:] + words[len(BASE_WORDS) : len(BASE_WORDS) + 2000]

    def text(lo, hi):
        return " ".join(rng.choice(content) for _ in range(rng.randint(lo, hi)))

    with open(out / "prompts.jsonl", "w") as f:  # TL;DR-like prompts: ~100-300 tokens
        for _ in range(256):
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/relationships TITLE: {text(5, 15)} POST: {text(90, 280)} TL;DR:"}) + "\n")
    with open(out / "pairs.jsonl", "w") as f:
        for _ in range(512):
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/AskReddit POST: {text(90, 280)} TL;DR:",
                                "chosen": text(15, 50), "rejected": text(15, 50)}) + "\n")
    return {"params": n_params, "build_s": time.perf_counter() - t0}


def _median(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else float("nan")


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: check the path end to end")
    ap.add_argument("--out", default=None, help="work directory (default: a fresh temporary one)")
    ap.add_argument("--iterations", type=int, default=None, help="RLOO iterations (default 6; tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="offline DPO steps (default 12; tiny 2)")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_smoke: no GPU visible; run `bash bench/gpu_smoke.sh --tiny` for the CPU dry run")
    import tempfile

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_smoke_"))
    out.mkdir(parents=True, exist_ok=True)
    size, vocab = (TINY, 512) if args.tiny else (PYTHIA_160M, 50_304)
    iterations = args.iterations or (2 if args.tiny else 6)
    steps = args.steps or (2 if args.tiny else 12)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    assets = build_assets(out, size, vocab)
    print(f"[gpu_smoke] {device}: GPT-NeoX {assets['params'] / 1e6:.1f}M parameters, vocabulary {vocab}, "
          f"built in {assets['build_s']:.1f}s under {out}", flush=True)

    rloo = train_rloo.RLOOConfig(
        model_name_or_path=str(out / "policy"), reward_model_name_or_path=str(out / "reward"),
        dataset_name=str(out / "prompts.jsonl"), output_dir=str(out / "rloo"), report_to="none",
        max_prompt_length=512, response_length=53, temperature=0.7, rloo_k=2,
        global_batch_size=8 if args.tiny else 64, per_device_train_batch_size=4 if args.tiny else 16,
        local_rollout_forward_batch_size=8 if args.tiny else 64, num_ppo_epochs=4, num_mini_batches=1,
        num_iterations=iterations, learning_rate=1e-6, regularizer="entropy", entropy_coef=0.05,
        length_normalize=True, kl_ref_every=1, gradient_checkpointing=True, sample_every=0, save_steps=0,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_rloo.main(rloo)
    rloo_s = time.perf_counter() - t0
    rloo_peak = _peak_gib()
    rows = [m for m in read_metrics(out / "rloo") if "perf/tokens_per_s" in m]
    steady = rows[1:] or rows
    print(f"[gpu_smoke] train_rloo: {len(rows)} iterations x {rloo.global_batch_size} completions x {rloo.response_length} "
          f"new tokens in {rloo_s:.1f}s (with model loading)", flush=True)
    print(f"[gpu_smoke]   episodes/s {_median(steady, 'perf/episodes_per_s'):.2f}   response tokens/s "
          f"{_median(steady, 'perf/tokens_per_s'):.0f}   peak GPU memory {rloo_peak:.2f} GiB", flush=True)
    phases = ["time/generate", "time/score", "time/logprobs", "time/update", "time/kl_prev", "time/iteration"]
    print("[gpu_smoke]   seconds per iteration: " + "  ".join(
        f"{p.split('/')[1]} {_median(steady, p):.2f}" for p in phases if any(p in r for r in steady)), flush=True)

    offline = train_offline.OfflineConfig(
        loss_type="dpo", beta=0.05, model_name_or_path=str(out / "policy"), dataset_name=str(out / "pairs.jsonl"),
        output_dir=str(out / "dpo"), report_to="none", max_prompt_length=512, max_completion_length=64,
        global_batch_size=8 if args.tiny else 32, per_device_train_batch_size=4 if args.tiny else 8, max_steps=steps,
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_ratio=0.0, gradient_checkpointing=True, save_steps=0,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_offline.main(offline)
    offline_s = time.perf_counter() - t0
    offline_peak = _peak_gib()
    rows = [m for m in read_metrics(out / "dpo") if "perf/tokens_per_s" in m]
    steady = rows[1:] or rows
    print(f"[gpu_smoke] train_offline (dpo, live reference): {len(rows)} steps x {offline.global_batch_size} pairs "
          f"in {offline_s:.1f}s (with model loading)", flush=True)
    print(f"[gpu_smoke]   samples/s {_median(steady, 'perf/samples_per_s'):.1f}   tokens/s "
          f"{_median(steady, 'perf/tokens_per_s'):.0f}   peak GPU memory {offline_peak:.2f} GiB", flush=True)
    losses = [m["train/loss"] for m in rows]
    if not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
        sys.exit(f"gpu_smoke: non-finite offline loss {losses}")
    print("[gpu_smoke] done", flush=True)


if __name__ == "__main__":
    main()
