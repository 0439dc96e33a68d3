"""Peak memory and time of the memory-lean `token_logprobs` against the naive `log_softmax + gather`.

Default problem: batch 8, length 512, vocabulary 50,304, float32 logits (824 MB of logits).
Each variant runs in a fresh subprocess so that peaks do not leak between variants:
  - CPU: peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) during the first call minus the RSS
    measured after the logits (and labels) were allocated and written;
  - CUDA (when available, or --device cuda): `torch.cuda.max_memory_allocated()` minus the allocated
    bytes after the logits exist.
"forward" runs under torch.no_grad(); "forward+backward" makes the logits a leaf that requires grad and
backpropagates `out.sum()`. The gradient of the logits is itself logits-sized (824 MB) and is unavoidable
for both variants; it is included in the forward+backward peak.
Time per call is the median over the measured call and --repeats further calls (on CPU every call
pays its own page faults: large blocks go back to the OS when freed).

    python bench/bench_logprobs.py                 # full size, about 1.5 minutes on 2 CPU cores
    python bench/bench_logprobs.py --vocab 5000    # quicker smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ["naive", "lean", "lean_shifted", "naive_shifted"]  # the last one only on request (--variants)
MODES = ["forward", "forward+backward"]


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(args) -> None:
    import torch

    from maxent_rlhf.objectives import token_logprobs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shifted = args.variant.endswith("_shifted")
    # "shifted": the caller's usual logits[:, :-1] slice of a [B, T + 1, V] tensor (not viewable as [-1, V])
    time_len = args.length + 1 if shifted else args.length
    logits = torch.randn(args.batch, time_len, args.vocab, device=device, dtype=torch.float32)
    labels = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    backward = args.mode == "forward+backward"
    if backward:
        logits.requires_grad_(True)

    def call():
        x = logits[:, :-1] if shifted else logits
        with torch.set_grad_enabled(backward):
            if args.variant.startswith("lean"):
                out = token_logprobs(x, labels, chunk_size=args.chunk_size)
            else:
                out = torch.log_softmax(x, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
            if backward:
                out.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if backward:
            logits.grad = None
        return out

    if cuda:  # warm up kernels and the caching allocator's bookkeeping first
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak_bytes()  # the logits were just written: the peak so far is the current RSS
    start = time.perf_counter()
    call()
    times = [time.perf_counter() - start]
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()) - base
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    print(json.dumps({"peak_bytes": peak, "seconds": statistics.median(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: objectives' default)")
    p.add_argument("--repeats", type=int, default=0, help="extra timed calls after the measured one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--variants", default="naive,lean,lean_shifted", help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.chunk_size is None:
        from maxent_rlhf.objectives import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        _child(args)
        return

    logits_mb = args.batch * args.length * args.vocab * 4 / 2**20
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (ru_maxrss)"
    print(
        f"token_logprobs peak memory: batch {args.batch}, length {args.length}, vocab {args.vocab}, float32, "
        f"device {args.device}, chunk_size {args.chunk_size} rows; logits = {logits_mb:.0f} MiB\n"
        f"peak = {how} during one call minus the level after allocating the logits "
        f"(fresh subprocess per row); time = median of {1 + args.repeats} call(s)\n"
    )
    print(f"{'variant':<15}{'mode':<18}{'peak extra MiB':>15}{'x logits':>10}{'s / call':>10}")
    # a fixed mmap threshold makes glibc hand every large freed block back at once, so that RSS tracks
    # the live tensors (the dynamic threshold would keep blocks of up to 32 MiB on the heap)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="1048576")
    for mode in MODES:
        for variant in args.variants.split(","):
            cmd = [
                sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--mode", mode,
                "--batch", str(args.batch), "--length", str(args.length), "--vocab", str(args.vocab),
                "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
                "--threads", str(args.threads), "--device", args.device,
            ]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"{variant:<15}{mode:<18} FAILED:\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            mb = r["peak_bytes"] / 2**20
            print(f"{variant:<15}{mode:<18}{mb:>15.0f}{mb / logits_mb:>10.2f}{r['seconds']:>10.3f}")
    print(
        "\nnaive = log_softmax(logits).gather(labels) on the whole tensor; lean = objectives.token_logprobs "
        "(chunk_size rows at a time, hand-written chunked backward); *_shifted = the same on logits[:, :-1] "
        "of a [B, T+1, V] tensor (its forward+backward includes the slice's own logits-sized gradient)."
    )


if __name__ == "__main__":
    main()
