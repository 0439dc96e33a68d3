"""Judge throughput against the local fake OpenAI server, and greedy generation speed of a tiny model.

    python bench/bench_judge.py                      # 50 ms server latency, concurrency 1 and 16
    python bench/bench_judge.py --latency 0.05 --seconds 3 --concurrency 1,4,16,64

Judgments/s go through the real `openai` client and `maxent_rlhf.judges.OpenAIJudge` (prompt rendering,
parsing, retries loop); with a fixed server latency L and concurrency C the ideal is C / L.
Generation tokens/s: `generation.hf_generate(do_sample=False)` on the tests' tiny GPT-NeoX, batch 16,
53 new tokens, CPU unless a GPU is present.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers.fake_openai_server import FakeJudgeServer  # noqa: E402
from maxent_rlhf.judges import OpenAIJudge, Pair  # noqa: E402


class ServerProcess:
    """tests/helpers/fake_openai_server.py in its own process, so server and client do not share one GIL."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "helpers" / "fake_openai_server.py"), "--latency", str(latency)],
            stdout=subprocess.PIPE, text=True,
        )
        self.base_url = self.proc.stdout.readline().strip()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


def bench_judge(latency: float, concurrency: int, seconds: float, in_process: bool = False) -> dict:
    n = max(8, int(seconds * concurrency / latency))
    pairs = [Pair(str(i), "p", f"post {i}", f"summary good {i}", f"summary {i}") for i in range(n)]
    server_cm = FakeJudgeServer(marker="good", latency=latency) if in_process else ServerProcess(latency)
    with server_cm as server:
        judge = OpenAIJudge(judge_model="fake", base_url=server.base_url, concurrency=concurrency, max_retries=0)
        done = []
        judge.judge_many(pairs[:2], lambda i, v: None)  # warm-up: imports, first connection
        t0 = time.perf_counter()
        judge.judge_many(pairs, lambda i, v: done.append(v.preferred))
        dt = time.perf_counter() - t0
    assert len(done) == n and all(p == "A" for p in done)
    return {"concurrency": concurrency, "judgments": n, "seconds": round(dt, 3), "judgments_per_s": round(n / dt, 2),
            "ideal_per_s": round(concurrency / latency, 2), "efficiency": round(n / dt / (concurrency / latency), 3)}


def bench_generation(batch: int = 16, new_tokens: int = 53, repeats: int = 3, threads: int = 0) -> dict:
    import torch

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    from maxent_rlhf.generation import hf_generate, left_pad, truncate_after_eos
    from maxent_rlhf.models import build_tiny_policy, build_word_tokenizer

    words = "SUBREDDIT: r/cats TITLE: POST: TL;DR: the a my cat dog ran sat on mat far away home happy sad".split()
    tok = build_word_tokenizer(words)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_tiny_policy(tok, seed=0).to(device).eval()
    # suppress EOS so every row generates exactly `new_tokens` tokens (a fixed amount of work)
    with torch.no_grad():
        head = model.get_output_embeddings()
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tok.eos_token_id] = -1e4
        model.set_output_embeddings(biased.to(device))
    prompts = [tok(f"SUBREDDIT: r/cats TITLE: my cat POST: the cat sat on {' '.join(words[5:5 + i % 8])} TL;DR:",
                   add_special_tokens=False).input_ids for i in range(batch)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    hf_generate(model, ids, mask, 4, tok.eos_token_id, tok.pad_token_id, do_sample=False)  # warm-up
    times, real = [], 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        resp = hf_generate(model, ids, mask, new_tokens, tok.eos_token_id, tok.pad_token_id, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        _, rmask, _ = truncate_after_eos(resp, tok.eos_token_id, tok.pad_token_id)
        real = int(rmask.sum())
    best = min(times)
    used = torch.get_num_threads()
    torch.set_num_threads(default_threads)
    return {"device": str(device), "torch_threads": used, "batch": batch, "new_tokens": new_tokens, "tokens": real,
            "best_seconds": round(best, 4), "tokens_per_s": round(real / best, 1),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels")
    ap.add_argument("--seconds", type=float, default=2.0, help="target duration of each judge run")
    ap.add_argument("--in-process-server", action="store_true", help="run the server in this process (shares the GIL)")
    ap.add_argument("--no-generation", action="store_true", help="skip the generation benchmark")
    args = ap.parse_args()
    results = {"judge": [bench_judge(args.latency, int(c), args.seconds, args.in_process_server)
                         for c in args.concurrency.split(",")]}
    for r in results["judge"]:
        print(f"judge  concurrency {r['concurrency']:>3}: {r['judgments_per_s']:>8.2f} judgments/s "
              f"(ideal {r['ideal_per_s']:.0f}/s at {args.latency * 1000:.0f} ms latency, efficiency {r['efficiency']:.2f})")
    if len(results["judge"]) > 1:
        a, b = results["judge"][0], results["judge"][-1]
        print(f"judge  speed-up x{b['judgments_per_s'] / a['judgments_per_s']:.1f} from concurrency "
              f"{a['concurrency']} to {b['concurrency']}")
    if not args.no_generation:
        results["generation"] = [bench_generation(threads=0), bench_generation(threads=1)]
        for g in results["generation"]:
            print(f"generate  tiny GPT-NeoX ({g['params']:,} params) on {g['device']}, {g['torch_threads']} torch "
                  f"threads: batch {g['batch']} x {g['new_tokens']} greedy tokens: {g['tokens_per_s']:,.0f} tokens/s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
