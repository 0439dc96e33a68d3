"""Where an RLOO iteration of train_rloo.py spends its time, at bench_rloo.py's settings.

    python bench/profile_rloo.py --size 0.87M                       # phase table (time/* metrics)
    python bench/profile_rloo.py --size 25.5M --cprofile 25         # + the 25 costliest functions
    python bench/profile_rloo.py --set shared_prefix=false --set kl_prev_per_prompt=1   # config fields
    python bench/profile_rloo.py --script /tmp/train_rloo_before.py                      # another copy

Runs `--iterations` iterations in this process (models built as in bench_rloo.py) and prints, per phase,
the median wall and the share of the iteration over iterations 2..N (the first pays warm-up). With
`--cprofile N` the run is profiled and the N functions with the most cumulative time are printed. The
generation phase is split further: one forward of the 64-row decode batch with a KV cache vs HF
`generate`'s time per new token, so the Python overhead per generated token is visible.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rloo  # noqa: E402
from sidebyside import OVERRIDES_ENV, REPO, apply_config_overrides, load_average  # noqa: E402


def decode_step_cost(root: Path, batch: int, prompt: int, new: int, threads: int) -> dict:
    """Seconds per new token: HF generate vs the bare cached forwards it runs (same model, same batch)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from maxent_rlhf import generation

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(root / "policy").eval()
    ids = torch.randint(3, 300, (batch, prompt))
    mask = torch.ones_like(ids)
    for _ in range(2):
        generation.hf_generate(model, ids, mask, new, 0, 1, temperature=0.7)
    t0 = time.perf_counter()
    generation.hf_generate(model, ids, mask, new, 0, 1, temperature=0.7)
    gen_s = time.perf_counter() - t0
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        t0 = time.perf_counter()
        step_ids, m = out.logits[:, -1].argmax(-1, keepdim=True), mask
        for _ in range(new):
            m = torch.cat([m, m.new_ones(batch, 1)], 1)
            out = model(input_ids=step_ids, attention_mask=m, past_key_values=out.past_key_values, use_cache=True)
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        bare_s = time.perf_counter() - t0
    return {"generate_per_token_ms": 1e3 * gen_s / new, "bare_forward_per_token_ms": 1e3 * bare_s / new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.87M", choices=list(bench_rloo.SIZES))
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--script", default="train_rloo.py")
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE set before the script is imported")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a field of the script's RLOOConfig (repeatable), e.g. kl_prev_per_prompt=1")
    ap.add_argument("--cprofile", type=int, default=0, help="profile and print this many functions (0: no profile)")
    ap.add_argument("--decode", action="store_true", help="also time HF generate vs bare cached forwards")
    args = ap.parse_args()
    for kv in args.env:
        k, v = kv.split("=", 1)
        os.environ[k] = v
    os.environ[OVERRIDES_ENV] = json.dumps(dict(kv.split("=", 1) for kv in args.set))
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile_rloo_") as d:
        root = Path(d)
        info = bench_rloo.build(args.size, root)
        print(f"{args.size}: {info['params'] / 1e6:.2f}M params, {args.iterations} iterations, {args.threads} threads, "
              f"script {args.script} {' '.join(args.env + args.set)}; load average {load_average()}")
        prof = cProfile.Profile() if args.cprofile else None
        cpu0, t0 = time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        mod = bench_rloo.load_script(args.script)
        from maxent_rlhf.runs import read_metrics

        recs = read_metrics(mod.main(apply_config_overrides(bench_rloo.ours_config(mod, root, args.iterations))))
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        recs = recs[1:] or recs
        keys = [k for k in recs[0] if k.startswith("time/")]
        it = statistics.median(r["time/iteration"] for r in recs)
        print(f"whole run {wall:.1f} s wall / {cpu:.1f} s CPU; iteration median {it:.3f} s "
              f"({bench_rloo.BATCH / it:.1f} episodes/s) over iterations 2..{args.iterations}")
        print("| phase | s (median) | share |\n|---|---|---|")
        for k in keys:
            v = statistics.median(r[k] for r in recs)
            print(f"| {k.split('/', 1)[1]} | {v:.3f} | {v / it:.0%} |")
        named = sum(statistics.median(r[k] for r in recs) for k in keys if k not in ("time/iteration", "time/iteration_cpu"))
        print(f"| (rest: prompts, rewards, advantages, metrics, logging) | {it - named:.3f} | {(it - named) / it:.0%} |")
        if args.decode:
            dc = decode_step_cost(root, bench_rloo.BATCH, bench_rloo.PROMPT_TOKENS, bench_rloo.NEW_TOKENS, args.threads)
            print(f"generation per new token (64 rows): HF generate {dc['generate_per_token_ms']:.2f} ms vs bare cached "
                  f"forward {dc['bare_forward_per_token_ms']:.2f} ms -> overhead "
                  f"{dc['generate_per_token_ms'] - dc['bare_forward_per_token_ms']:.2f} ms/token")
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.cprofile)
            print(s.getvalue()[-12000:])


if __name__ == "__main__":
    main()
