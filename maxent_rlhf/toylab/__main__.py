"""python -m maxent_rlhf.toylab {build,sweep,report}

    build [NAME ...] [--cache-dir DIR]     build (or verify) artifacts; default: all of the profile
    sweep [--out runs/toylab] [--seeds 1,2,3] [--lrs 1e-4,1e-3] [--regularizers kl,maxent,entropy,minent,none]
          [--iterations N] [--no-offline] [--no-rloo] [--shard I/N]
                                           run the sweep through the scripts, then write the report
    report [--out runs/toylab] [--report-dir report]   figures + report.md from a sweep directory
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x)


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x)


def _shard(s):
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {s!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {s!r}: I must be in 0..N-1")
    return i, n


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="python -m maxent_rlhf.toylab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or verify artifacts")
    b.add_argument("names", nargs="*", help="artifact names (NAME or PROFILE/NAME); default: all")
    b.add_argument("--cache-dir", default=None,
                   help="artifact cache (default: $MAXENT_RLHF_CACHE, else ~/.cache/maxent_rlhf/toylab)")
    s = sub.add_parser("sweep", help="run the regulariser x lr x seed sweep and the offline runs, then report")
    s.add_argument("--out", default="runs/toylab",
                   help="sweep directory: sweep.json (the plan), rloo/ and offline/ run directories; finished runs "
                        "(DONE.json) are skipped, so rerunning the command continues a cut-short sweep")
    s.add_argument("--report-dir", default="report", help="where the report (report.md + figures) is written")
    s.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds (default: 1,2,3)")
    s.add_argument("--lrs", type=_floats, default=None,
                   help="comma-separated RLOO learning rates (default: 1e-4,1e-3; the low-lr runs at 2e-5 are added)")
    s.add_argument("--regularizers", default=None,
                   help="comma-separated subset of kl,maxent,entropy,minent,none (each is configs/toy/NAME.yaml)")
    s.add_argument("--iterations", type=int, default=None, help="RLOO iterations per run (default: the toy configs')")
    s.add_argument("--no-offline", action="store_true", help="skip the offline (DPO, SimPO) runs")
    s.add_argument("--no-rloo", action="store_true", help="skip the online (RLOO) runs")
    s.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="run every N-th run starting at I (0-based), e.g. 0/2 and 1/2 in two processes; a shard "
                        "writes no report: a plain `sweep` afterwards skips the finished runs and writes it")
    s.add_argument("--eval-n", type=int, default=None,
                   help="test posts judged per checkpoint (toy-gold and the proxy reward model; default: 200)")
    s.add_argument("--extra", action="store_true",
                   help="add runs (e.g. another --lrs) to an existing sweep directory without rewriting sweep.json")
    r = sub.add_parser("report", help="figures and report.md from a sweep directory")
    r.add_argument("--out", default="runs/toylab", help="the sweep directory (`sweep --out`)")
    r.add_argument("--report-dir", default="report", help="where report.md and its figures are written")
    a = p.parse_args(argv)

    if a.cmd == "build":
        from .build import ARTIFACTS, ensure_artifact

        names = a.names or list(ARTIFACTS)
        t0 = time.time()
        for n in names:
            print(ensure_artifact(n, a.cache_dir))
        print(f"[toylab] {len(names)} artifact(s) ready in {time.time() - t0:.1f}s")
        return 0
    if a.cmd == "sweep":
        from . import sweep as sw

        kw = {}
        if a.seeds:
            kw["seeds"] = a.seeds
        if a.lrs:
            kw["lrs"] = a.lrs
        if a.regularizers:
            kw["regularizers"] = tuple(a.regularizers.split(","))
        if a.eval_n:
            kw["eval_n"] = a.eval_n
        sw.sweep(a.out, iterations=a.iterations, offline=not (a.no_offline or a.extra), online=not a.no_rloo,
                 write_meta=not a.extra, shard=a.shard, **kw)
        if a.shard[1] > 1:
            return 0
        a.cmd = "report"
    if a.cmd == "report":
        from .report import write_report

        print(write_report(a.out, a.report_dir))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
