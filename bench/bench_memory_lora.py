"""Peak memory of one RLOO iteration: full fine-tuning with a reference copy vs a LoRA policy whose reference
is its own adapter switched off.

    python bench/bench_memory_lora.py                 # 25.5M on CPU: peak RSS of each variant's process
    python bench/bench_memory_lora.py --size 0.87M    # the small model (seconds)

Each variant runs train_rloo.main for ONE iteration in a fresh process (bench_rloo.py's models, batch and
settings: 16 prompts x 4 completions, 32-token prompts, 24 new tokens, float32, kl regulariser, one PPO
epoch of one mini-batch, AdamW); the peak RSS is the kernel's accounting of that process (wait4), so
imports, the reward model and allocator slack are in every row. Rows:
  imports only   the worker imports torch, transformers, peft and train_rloo and exits (the floor)
  full + ref     all weights train (float32 weights, gradients, two AdamW moments) and a frozen reference
                 copy is loaded (train_rloo's default)
  lora + off     use_peft, r 16 on query_key_value (peft's GPT-NeoX default): the base is frozen, the adapter
                 trains, the reference forward is the policy with the adapter disabled (no copy)
On a machine with a GPU the runs go to the GPU (bf16 frozen models, as train_rloo does there) and the
table adds the peak allocated GPU memory (torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rloo import SIZES, build, ours_config  # noqa: E402
from sidebyside import REPO, clean_env, load_script, run_process  # noqa: E402

VARIANTS = {"imports only": None, "full + ref": {}, "lora + off": {"use_peft": True}}


def worker(variant: str, root: Path) -> None:
    import dataclasses

    import torch

    mod = load_script(str(REPO / "train_rloo.py"))
    import peft  # noqa: F401  (every row pays the same imports)

    out = {"trainable": 0, "gpu_peak_mib": None}
    overrides = VARIANTS[variant]
    if overrides is not None:
        config = dataclasses.replace(ours_config(mod, root, 1), **overrides)
        counted = {}
        real_prepare = mod.rollout.load_models

        def load_and_count(*a, **k):  # the number of trained parameters, read off the loaded policy
            m = real_prepare(*a, **k)
            counted["n"] = sum(p.numel() for p in m.policy.parameters() if p.requires_grad)
            counted["ref_copy"] = m.ref_policy is not None
            return m

        mod.rollout.load_models = load_and_count
        mod.main(config)
        out.update(trainable=counted["n"], ref_copy=counted["ref_copy"])
        if torch.cuda.is_available():
            out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="25.5M", choices=list(SIZES), help="model size (bench_rloo.py's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker(args.worker, Path(args.dir))
        return
    with tempfile.TemporaryDirectory(prefix="bench_memory_lora_") as d:
        info = build(args.size, Path(d))
        rows = []
        for variant in VARIANTS:
            r = run_process([sys.executable, __file__, "--worker", variant, "--dir", d, "--threads", str(args.threads)],
                            clean_env(args.threads))
            if "error" in r:
                sys.exit(f"{variant}: worker failed (exit {r['rc']}):\n{r['error']}")
            rows.append((variant, r))
    gpu = any(r.get("gpu_peak_mib") is not None for _, r in rows)
    print(f"peak memory of one RLOO iteration, {args.size} policy ({info['params'] / 1e6:.1f}M parameters), "
          f"reward model of the same shape, {args.threads} threads")
    print(f"{'variant':<14} {'trained params':>15} {'ref copy':>9} {'peak RSS MiB':>13}" + (f" {'GPU peak MiB':>13}" if gpu else ""))
    floor = rows[0][1]["peak_rss_mib"]
    for variant, r in rows:
        ref = "-" if "ref_copy" not in r else ("yes" if r["ref_copy"] else "no")
        line = f"{variant:<14} {r['trainable']:>15,} {ref:>9} {r['peak_rss_mib']:>13.0f}"
        if gpu:
            line += f" {r['gpu_peak_mib']:>13.0f}" if r.get("gpu_peak_mib") is not None else f" {'-':>13}"
        print(line)
    full, lora = rows[1][1]["peak_rss_mib"], rows[2][1]["peak_rss_mib"]
    print(f"above the imports floor: full + ref {full - floor:.0f} MiB, lora + off {lora - floor:.0f} MiB "
          f"({(lora - floor) / (full - floor):.0%})")


if __name__ == "__main__":
    main()
