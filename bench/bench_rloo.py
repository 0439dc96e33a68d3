"""Benchmark one RLOO iteration of train_rloo.py (and, side by side, TRL's 2024 RLOOTrainer if given).

    python bench/bench_rloo.py                                   # tiny and ~25M GPT-NeoX, ours only
    python bench/bench_rloo.py --trl-path /tmp/trl_target        # + TRL 0.11.x RLOOTrainer, same models/batch

Setting (issue 4): 64 completions per iteration (32 prompts x rloo_k 2), 24 new tokens, prompts of
`--prompt-tokens` tokens, 4 PPO epochs, 1 mini-batch, micro-batch 16 (accumulation 4), KL regulariser,
temperature 0.7. Models are built locally (word-level tokenizer, GPT-NeoX), policy and reward model of the
same size. Each run is a fresh subprocess (so its peak RSS is its own) doing `--iterations` iterations;
the figures are of the last iteration (the first one pays warm-up costs).

TRL is not a dependency: install it for the benchmark only, outside the environment, e.g.
    pip download trl==0.11.4 --no-deps -d /tmp/trlpkg && pip install --no-deps --target /tmp/trl_target /tmp/trlpkg/trl-*.whl
TRL 0.11's RLOOTrainer is the PPO-style trainer the paper used (sequence-level ratio, k1 KL in the reward).
Its iteration time is measured between consecutive `on_log` callbacks (it logs once per iteration).

FLOP/s fraction (~25M model): FLOPs of one iteration counted analytically (2 x params per token per
forward; backward 2x forward; attention score/value products included) for generation (prefill + KV-cached
decode), reward model, policy old log-probs, reference, PPO epochs (forward + backward) and the
post-update KL forward, divided by the iteration time and by the measured fp32 matmul FLOP/s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {
    # name: (vocab words, hidden, layers, heads)
    "tiny": (60, 32, 2, 2),
    "25m": (5000, 512, 6, 8),
}
# iterations per run when --iterations is not given: the timed one is the last (the first pays warm-up)
DEFAULT_ITERATIONS = {"tiny": 2, "25m": 2}
THREADS = 1
BATCH, K, NEW_TOKENS, MICRO, EPOCHS, TEMP = 64, 2, 24, 16, 4, 0.7


def build(size: str, root: Path, prompt_tokens: int) -> dict:
    import random

    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model, build_word_tokenizer, count_parameters

    vocab, hidden, layers, heads = SIZES[size]
    words = [f"w{i}" for i in range(vocab)]
    tok = build_word_tokenizer(words)
    kw = dict(hidden_size=hidden, num_layers=layers, num_heads=heads)
    pol = build_tiny_policy(tok, seed=0, save_dir=root / "policy", **kw)
    build_tiny_reward_model(tok, seed=1, save_dir=root / "reward", **kw)
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(BATCH // K * 4):
            f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(prompt_tokens))}) + "\n")
    return {"params": count_parameters(pol), "vocab": len(tok), "hidden": hidden, "layers": layers}


def iteration_flops(info: dict, prompt_tokens: int, resp_tokens: float) -> dict:
    """Analytic FLOPs of one iteration (both models the same size). resp_tokens: mean real response length."""
    v, h, nl = info["vocab"], info["hidden"], info["layers"]
    body = info["params"] - 2 * v * h  # transformer blocks (+ final norm): embeddings and LM head apart
    head = v * h
    lq, t = prompt_tokens, NEW_TOKENS
    ctx = lq + t

    def attn(q_len, kv_len):  # QK^T and AV products, all layers, one sequence
        return 2 * 2 * nl * h * q_len * kv_len

    # generation: prefill the prompt, then t cached decode steps (each: body + head + attention over the cache)
    gen = 2 * body * lq + attn(lq, lq) / 2 + sum(2 * (body + head) + attn(1, lq + i) for i in range(t))
    full_fwd = 2 * body * ctx + attn(ctx, ctx) / 2  # one forward over prompt + response (causal: half)
    logp_fwd = full_fwd + 2 * head * (t + 1)  # logits only at the response positions
    per_seq = {
        "generate": gen,
        "reward": full_fwd,
        "policy_logprobs": logp_fwd,
        "reference": logp_fwd,
        "update": EPOCHS * 3 * logp_fwd,
        "kl_prev": logp_fwd,
    }
    return {k: v_ * BATCH for k, v_ in per_seq.items()}


def measure_matmul_flops(n: int = 1024, repeats: int = 20) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------------------
# workers (one subprocess each)
# ----------------------------------------------------------------------------------------------------
def run_ours(root: Path, iterations: int) -> dict:
    import train_rloo
    from maxent_rlhf.runs import read_metrics

    c = train_rloo.RLOOConfig(
        model_name_or_path=str(root / "policy"), reward_model_name_or_path=str(root / "reward"),
        dataset_name=str(root / "prompts.jsonl"), output_dir=str(root / "run_ours"), global_batch_size=BATCH, rloo_k=K,
        response_length=NEW_TOKENS, temperature=TEMP, num_ppo_epochs=EPOCHS, num_mini_batches=1,
        per_device_train_batch_size=MICRO, local_rollout_forward_batch_size=BATCH, num_iterations=iterations,
        regularizer="kl", kl_coef=0.05, learning_rate=3e-6, max_prompt_length=4096, report_to="none", sample_every=0,
        save_steps=0,
    )
    rec = read_metrics(train_rloo.main(c))[-1]
    return {
        "iteration_s": rec["time/iteration"],
        "iteration_cpu_s": rec["time/iteration_cpu"],
        "episodes_per_s": rec["perf/episodes_per_s"],
        "tokens_per_s": rec["perf/tokens_per_s"],
        "response_length": rec["response/length"],
        "phases_s": {k.split("/")[1]: rec[k] for k in rec if k.startswith("time/") and k != "time/iteration"},
    }


def run_trl(root: Path, iterations: int) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(root / "policy", padding_side="left")
    ds = load_dataset("json", data_files=str(root / "prompts.jsonl"), split="train")
    ds = ds.map(lambda r: {"input_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"]}, remove_columns=["prompt"])
    stamps = []

    class Stamp(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            stamps.append((time.perf_counter(), time.process_time(), dict(logs or {})))

    cfg = RLOOConfig(
        output_dir=str(root / "run_trl"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=BATCH // MICRO,
        num_mini_batches=1, rloo_k=K, total_episodes=BATCH * iterations, response_length=NEW_TOKENS, temperature=TEMP,
        num_ppo_epochs=EPOCHS, kl_coef=0.05, learning_rate=3e-6, local_rollout_forward_batch_size=BATCH,
        stop_token="eos", missing_eos_penalty=1.0, report_to=[], save_strategy="no", logging_steps=1,
        num_sample_generations=0, use_cpu=True, seed=1,
    )
    # transformers 5 shims for TRL 0.11 (it predates them; nothing here changes what an iteration computes)
    RLOOTrainer.optimizer_cls_and_kwargs = None
    trainer = RLOOTrainer(
        config=cfg, tokenizer=tok,
        policy=AutoModelForCausalLM.from_pretrained(root / "policy"),
        ref_policy=AutoModelForCausalLM.from_pretrained(root / "policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(root / "reward"),
        train_dataset=ds,
    )
    trainer.add_callback(Stamp())
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    times = [(t0, c0)] + [(t, c) for t, c, _ in stamps]
    it_s = times[-1][0] - times[-2][0]
    cpu_s = times[-1][1] - times[-2][1]
    logs = stamps[-1][2]
    return {"iteration_s": it_s, "iteration_cpu_s": cpu_s, "episodes_per_s": BATCH / it_s,
            "last_log": {k: logs[k] for k in list(logs)[:12]}, "n_logs": len(stamps)}


def worker(args) -> None:
    import torch

    torch.manual_seed(0)
    root = Path(args.dir)
    t0 = time.perf_counter()
    out = run_ours(root, args.iterations) if args.worker == "ours" else run_trl(root, args.iterations)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def spawn(kind: str, root: Path, iterations: int, trl_path: str | None) -> dict:
    env = dict(os.environ)
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    if kind == "trl" and trl_path:
        env["PYTHONPATH"] = trl_path + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--dir", str(root), "--iterations", str(iterations),
         "--threads", str(THREADS), "--ppo-epochs", str(EPOCHS)],
        env=env, capture_output=True, text=True,
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout)[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,25m")
    ap.add_argument("--iterations", type=int, default=0, help="iterations per run (0: 2 for tiny, 1 for 25m)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each trainer, alternating; best is reported")
    ap.add_argument("--ppo-epochs", type=int, default=4, help="PPO epochs per iteration (TRL's default 4)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt")
    ap.add_argument("--trl-path", default=None, help="directory where trl (0.11.x) was pip-installed with --target")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for every run (default 1: on a shared, loaded 2-core machine two "
                    "threads per process oversubscribe the cores and run tiny models 10-80x slower; 0 = torch default)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global THREADS, EPOCHS
    THREADS, EPOCHS = args.threads, args.ppo_epochs
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    matmul = measure_matmul_flops()
    print(f"measured fp32 matmul (1024^3): {matmul / 1e9:.1f} GFLOP/s")
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            info = build(size, root, args.prompt_tokens)
            iters = args.iterations or DEFAULT_ITERATIONS[size]
            print(f"\n== {size}: {info['params'] / 1e6:.2f}M params (policy; reward model the same size), "
                  f"{BATCH} completions x {NEW_TOKENS} new tokens, prompts {args.prompt_tokens} tokens, {EPOCHS} PPO epochs, "
                  f"{iters} iteration(s) per run, {THREADS or 'default'} thread(s), {args.repeats} repeat(s) alternating")
            runs = {"ours": [], "trl": []}
            for _ in range(args.repeats):  # alternate, so both see the same (shared, noisy) machine
                for kind in ("ours", "trl") if args.trl_path else ("ours",):
                    r = spawn(kind, root, iters, args.trl_path if kind == "trl" else None)
                    print(f"{kind}: " + json.dumps(r)[:1200])
                    if "error" not in r:
                        runs[kind].append(r)
            if not runs["ours"]:
                continue
            ours = min(runs["ours"], key=lambda r: r["iteration_s"])  # best of the repeats
            fl = iteration_flops(info, args.prompt_tokens, ours["response_length"])
            total = sum(fl.values())
            achieved = total / ours["iteration_s"]
            print(f"ours (best): {ours['episodes_per_s']:.2f} episodes/s, {ours['tokens_per_s']:.1f} tokens/s, "
                  f"iteration {ours['iteration_s']:.2f}s wall / {ours['iteration_cpu_s']:.2f}s CPU, peak RSS {ours['peak_rss_mib']:.0f} MiB")
            print("ours phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in ours["phases_s"].items()))
            print(f"FLOPs/iteration {total / 1e9:.1f} G ({', '.join(f'{k} {v / 1e9:.1f}' for k, v in fl.items())}); "
                  f"achieved {achieved / 1e9:.1f} GFLOP/s = {achieved / matmul:.1%} of measured matmul")
            if runs["trl"]:
                trl = min(runs["trl"], key=lambda r: r["iteration_s"])
                print(f"side by side (best of {args.repeats}): ours {ours['episodes_per_s']:.2f} vs TRL {trl['episodes_per_s']:.2f} "
                      f"episodes/s (x{ours['episodes_per_s'] / trl['episodes_per_s']:.2f}); all runs ours "
                      f"{[round(r['episodes_per_s'], 2) for r in runs['ours']]} TRL {[round(r['episodes_per_s'], 2) for r in runs['trl']]}; "
                      f"peak RSS ours {ours['peak_rss_mib']:.0f} vs TRL {trl['peak_rss_mib']:.0f} MiB")
                # CPU seconds per iteration (1 thread) are far less sensitive to other users of the machine
                oc = min(r["iteration_cpu_s"] for r in runs["ours"])
                tc = min(r["iteration_cpu_s"] for r in runs["trl"])
                okl = min(r["phases_s"]["kl_prev"] for r in runs["ours"])
                print(f"CPU-time per iteration (best): ours {oc:.2f}s vs TRL {tc:.2f}s -> episodes per CPU-second "
                      f"ours {BATCH / oc:.2f} vs TRL {BATCH / tc:.2f} (x{tc / oc:.2f}); ours includes the KL(pi_old||pi_new) "
                      f"forward TRL does not compute (~{okl:.2f}s wall)")
    matmul_after = measure_matmul_flops()
    print(f"\nmeasured fp32 matmul again at the end: {matmul_after / 1e9:.1f} GFLOP/s (machine load varies)")

if __name__ == "__main__":
    main()
