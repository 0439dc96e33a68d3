"""bench/gpu_smoke.sh --tiny: the GPU acceptance run end to end on CPU processes (slow group, ~2 minutes).

Every check of the GPU run executes here with a tiny model in float32: one-process RLOO (KL, maxent) and
DPO / SimPO, the SIGKILL + `resume: latest` check, FSDP2 and ZeRO-3 with one process. Asserted: exit 0,
the table file it names with one PASS row per check (ZeRO-3 SKIP only without deepspeed), finite
figures, an exact resume on CPU (weights differ by 0), and a non-zero exit naming the failed checks
when the checks cannot pass (a 1-second worker timeout).
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["rloo kl (float32, 1 process)", "rloo maxent (float32, 1 process)", "dpo (float32, 1 process)",
          "simpo (float32, 1 process)", "rloo maxent lora (float32, 1 process)", "save, kill, resume (rloo maxent)",
          "fsdp2 (1 process): rloo maxent + resume, dpo", "zero3 (1 process): rloo maxent + resume, dpo",
          "whole run under 480 s (H100-class GPUs)"]


def _smoke(tmp_path, *flags, timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--tiny", "--out", str(tmp_path / "work"), *flags],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_smoke_tiny_runs_every_check(tmp_path):
    table = tmp_path / "smoke.md"
    run = _smoke(tmp_path, "--table", str(table), "--peak_tflops", "1")
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert f"table written to {table}" in run.stdout
    text = table.read_text()
    assert text.splitlines()[0].startswith("# gpu_smoke on CPU (--tiny): ")
    rows = {r["check"]: r for r in json.loads(table.with_suffix(".json").read_text())["rows"]}
    assert list(rows) == CHECKS
    try:
        import deepspeed  # noqa: F401

        expected_zero3 = "PASS"
    except Exception:
        expected_zero3 = "SKIP"
    for name, row in rows.items():
        expected = expected_zero3 if name.startswith("zero3") else "SKIP" if name.startswith("whole run") else "PASS"
        assert row["status"] == expected, row
        assert f"| {name} | {row['status']} |" in text
    for name in CHECKS[:4]:  # the figures of the table: finite rates, an MFU against the given 1 TFLOPS
        assert rows[name]["episodes_s"] > 0 and rows[name]["tokens_s"] > 0 and 0 < rows[name]["mfu"] < 1, rows[name]
    assert "differ by 0.00e+00 from the uninterrupted run" in rows["save, kill, resume (rloo maxent)"]["note"]
    assert "FSDP; resumed from the sharded step-2 checkpoint: 0.00e+00" in rows["fsdp2 (1 process): rloo maxent + resume, dpo"]["note"]


@pytest.mark.slow
def test_gpu_smoke_exits_non_zero_and_names_the_failed_checks(tmp_path):
    run = _smoke(tmp_path, "--timeout", "1", timeout=300)
    assert run.returncode == 1, (run.stdout + run.stderr)[-3000:]
    assert "FAILED: rloo kl (float32, 1 process); rloo maxent (float32, 1 process)" in run.stderr
    assert "| rloo kl (float32, 1 process) | FAIL |" in run.stdout
