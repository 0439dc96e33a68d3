"""Benchmark of train_offline.py: samples/s, tokens/s and peak memory of one training step.

    python bench/bench_offline.py                 # CPU (or the GPU when one is visible)
    python bench/bench_offline.py --steps 4 --json bench/offline_results.json

Cases (each in a fresh subprocess, so that peak memory is the case's own):
  step/tiny, step/tiny+precompute     DPO step, tiny GPT-NeoX (hidden 32, 2 layers, word vocab of 64)
  step/25M, step/25M+precompute       DPO step, ~25M-parameter GPT-NeoX (vocab 50,304, hidden 224, 4 layers)
  step/25M+naive-logprobs             as step/25M with a naive full log_softmax in place of the lean log-probs
  logprobs/lean, logprobs/naive       forward + backward of response log-probs on [16, 192, 50,304] logits
                                      (3,072 rows: three of objectives' 1,024-row chunks)
  logprobs/*-nograd                   the same, forward only (reference / precompute passes)

Every step case runs `train_offline.main` itself (global batch 8 pairs, prompt 64 + response 32 tokens);
the first step is a warm-up and is not counted; speeds are medians over the other steps. Peak memory: on GPU torch.cuda.max_memory_allocated
over the measured region; on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs when the region starts) and its increase over the resident set at that point.
Speed and memory figures belong in bench output and notes, never in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB_25M = 50_304
CASES = {
    "step/tiny": dict(kind="step", size="tiny", precompute=False),
    "step/tiny+precompute": dict(kind="step", size="tiny", precompute=True),
    "step/25M": dict(kind="step", size="25M", precompute=False),
    "step/25M+precompute": dict(kind="step", size="25M", precompute=True),
    "step/25M+naive-logprobs": dict(kind="step", size="25M", precompute=False, naive=True),
    "logprobs/lean": dict(kind="logprobs", naive=False, grad=True),
    "logprobs/naive": dict(kind="logprobs", naive=True, grad=True),
    "logprobs/lean-nograd": dict(kind="logprobs", naive=False, grad=False),
    "logprobs/naive-nograd": dict(kind="logprobs", naive=True, grad=False),
}


# --------------------------------------------------------------------------------------------------
# memory probes
# --------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


class MemoryRegion:
    """Peak memory from `start()` on: CUDA allocator peak, or CPU peak RSS (VmHWM after a reset)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_kib("VmRSS") * 1024
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                pass

    def stop(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"peak_mib": peak / 2**20, "base_mib": self.base / 2**20, "increase_mib": (peak - self.base) / 2**20,
                    "memory": "cuda allocated"}
        peak = _status_kib("VmHWM") * 1024
        return {"peak_mib": peak / 2**20, "base_mib": self.base / 2**20, "increase_mib": (peak - self.base) / 2**20,
                "memory": "cpu rss"}


def naive_token_logprobs(logits, labels, temperature=1.0, chunk_size=None):
    """The textbook version: a full [.., V] log_softmax kept for backward."""
    import torch

    z = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, labels[..., None].long()).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# cases (run inside the subprocess)
# --------------------------------------------------------------------------------------------------
def build_assets(size: str, root: Path) -> tuple[str, str]:
    """A saved GPT-NeoX policy + word tokenizer and a pairwise JSONL dataset; reused across cases."""
    import random

    from maxent_rlhf import models

    model_dir, data_path = root / f"model_{size}", root / f"pairs_{size}.jsonl"
    if (model_dir / "config.json").exists() and data_path.exists():
        return str(model_dir), str(data_path)
    if size == "tiny":
        words = [f"w{i}" for i in range(61)]
        shape = dict(hidden_size=32, num_layers=2, num_heads=2)
    else:
        words = [f"w{i}" for i in range(VOCAB_25M - 3)]
        shape = dict(hidden_size=224, num_layers=4, num_heads=4)
    tok = models.build_word_tokenizer(words)
    models.build_tiny_policy(tok, seed=0, save_dir=model_dir, max_position_embeddings=256, **shape)
    rng = random.Random(0)
    with open(data_path, "w") as f:
        for _ in range(32):
            sent = lambda n: " ".join(rng.choice(words) for _ in range(n))
            f.write(json.dumps({"prompt": sent(64), "chosen": sent(31), "rejected": sent(31)}) + "\n")
    return str(model_dir), str(data_path)


def run_step_case(spec: dict, steps: int, root: Path, cuda: bool) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    import train_offline
    from maxent_rlhf import models, objectives

    model_dir, data_path = build_assets(spec["size"], root)
    if spec.get("naive"):
        objectives.token_logprobs = naive_token_logprobs  # sequence_logprobs looks it up at call time
    region = MemoryRegion(cuda)
    marks = {"calls": 0}
    real_batch_loss = train_offline.batch_loss
    micro_per_step = 2  # global 8 = micro 4 x 2 accumulation

    def timed_batch_loss(*a, **k):
        if marks["calls"] == micro_per_step:  # first micro-batch of step 2: the measured region starts
            region.start()
            marks["cpu0"] = time.process_time()
        marks["calls"] += 1
        return real_batch_loss(*a, **k)

    train_offline.batch_loss = timed_batch_loss
    timing = {}
    real_pre = train_offline.precompute_ref_logprobs

    def timed_pre(*a, **k):
        t0 = time.perf_counter()
        out = real_pre(*a, **k)
        timing["precompute_s"] = timing.get("precompute_s", 0.0) + time.perf_counter() - t0
        return out

    train_offline.precompute_ref_logprobs = timed_pre
    out_dir = root / f"run_{os.getpid()}"
    c = train_offline.OfflineConfig(
        loss_type="dpo", model_name_or_path=model_dir, dataset_name=data_path, output_dir=str(out_dir), report_to="none",
        global_batch_size=8, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-5, warmup_ratio=0.0,
        max_prompt_length=64, max_completion_length=32, per_device_eval_batch_size=8,
        precompute_ref_logprobs=spec["precompute"], save_steps=10**9,
    )
    from maxent_rlhf import runs

    real_check = runs.check_finite

    def check_and_stop(name, value, step, run_dir=None):  # called once per step, after the update
        real_check(name, value, step, run_dir)
        if step == steps:
            marks["cpu_s"] = time.process_time() - marks["cpu0"]
            marks["mem"] = region.stop()  # before the final checkpoint is written

    runs.check_finite = check_and_stop
    train_offline.main(c)
    mem = marks["mem"]

    ms = [m for m in runs.read_metrics(out_dir) if "perf/tokens_per_s" in m][1:]  # drop the warm-up step
    params = models.count_parameters(models.load_policy(model_dir))
    return {
        "params": params,
        "samples_per_s": statistics.median(m["perf/samples_per_s"] for m in ms),  # median: robust to a busy machine
        "tokens_per_s": statistics.median(m["perf/tokens_per_s"] for m in ms),
        "measured_steps": len(ms),
        # CPU seconds of this process over the measured steps: far less sensitive to other processes
        # than wall time (with one torch thread it is the compute time itself)
        "samples_per_cpu_s": len(ms) * c.global_batch_size / marks["cpu_s"],
        "tokens_per_cpu_s": sum(m["perf/tokens_per_s"] * c.global_batch_size / m["perf/samples_per_s"] for m in ms)
        / marks["cpu_s"],
        **timing,
        **mem,
    }


def run_logprobs_case(spec: dict, cuda: bool) -> dict:
    import torch

    from maxent_rlhf import objectives

    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    b, t, v = 16, 192, VOCAB_25M
    logits = torch.randn(b, t, v, device=device, requires_grad=spec["grad"])
    labels = torch.randint(0, v, (b, t), device=device)
    fn = naive_token_logprobs if spec["naive"] else objectives.token_logprobs
    out = fn(logits[:1, :4], labels[:1, :4]).sum()  # warm-up
    if spec["grad"]:
        out.backward()
        logits.grad = None
    region = MemoryRegion(cuda)
    region.start()
    t0 = time.perf_counter()
    if spec["grad"]:
        fn(logits, labels).sum().backward()
    else:
        with torch.no_grad():
            fn(logits, labels).sum()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    mem = region.stop()
    return {"shape": [b, t, v], "logits_mib": logits.numel() * 4 / 2**20, "fwd_bwd_s": elapsed, **mem}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="training steps per case (the first is a warm-up; median of the rest)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--workdir", default=None, help="where models / data are built (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads in each case (0: torch's default)")
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if args._case:  # child process: one case, result as the last line of stdout
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        spec = CASES[args._case]
        root = Path(args.workdir)
        res = run_step_case(spec, args.steps, root, cuda) if spec["kind"] == "step" else run_logprobs_case(spec, cuda)
        print("RESULT " + json.dumps(res))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_offline_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    threads = args.threads or torch.get_num_threads()
    device_name = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores, torch threads {threads})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {device_name}; torch {torch.__version__}; steps per case {args.steps} (first = warm-up); "
          f"load average {load:.1f} (a shared machine makes CPU timings noisy)")
    results = {}
    for name in [c for c in args.cases.split(",") if c]:
        cmd = [sys.executable, __file__, "--_case", name, "--steps", str(args.steps), "--workdir", str(workdir),
               "--device", "cuda" if cuda else "cpu", "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: FAILED\n{proc.stderr[-3000:]}")
            results[name] = {"error": proc.stderr[-1000:]}
            continue
        res = json.loads(lines[-1][len("RESULT "):])
        res["wall_s"] = time.perf_counter() - t0
        results[name] = res
        if name.startswith("step/"):
            extra = f", precompute {res['precompute_s']:.2f} s once" if "precompute_s" in res else ""
            print(f"{name:26s} params {res['params'] / 1e6:6.2f}M  {res['samples_per_s']:8.2f} samples/s  "
                  f"{res['tokens_per_s']:8.0f} tokens/s  ({res['samples_per_cpu_s']:.2f} samples, "
                  f"{res['tokens_per_cpu_s']:.0f} tokens per CPU-s)  peak {res['peak_mib']:7.1f} MiB "
                  f"(+{res['increase_mib']:.1f} over {res['base_mib']:.1f} at step start, {res['memory']}){extra}")
        else:
            print(f"{name:26s} logits {res['logits_mib']:.0f} MiB  {'fwd+bwd' if 'nograd' not in name else 'fwd'} "
                  f"{res['fwd_bwd_s']:.2f} s  "
                  f"peak +{res['increase_mib']:.1f} MiB over the logits ({res['memory']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "results": results}, indent=1))


if __name__ == "__main__":
    main()
