"""Comparing two runs of the same config (1 process vs N, sharded vs not, resumed vs uninterrupted).

Tolerances: metrics 1e-4 relative / 1e-5 absolute, weights 1e-4 absolute. Differences come from float
reduction order over processes, amplified by Adam on near-zero gradients; wall-clock rates are not compared.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

RTOL, ATOL, WEIGHT_ATOL = 1e-4, 1e-5, 1e-4
NOT_COMPARED = ("perf/", "time/")  # wall-clock rates


def run_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(run, step: int = 4) -> dict:
    return load_file(str(Path(run) / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def assert_metrics_close(a: list[dict], b: list[dict], rtol: float = RTOL, atol: float = ATOL, exact: bool = False) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(NOT_COMPARED)}
        assert keys == {k for k in y if not k.startswith(NOT_COMPARED)}, x["step"]
        for k in sorted(keys):
            if exact:
                assert x[k] == y[k], (x["step"], k, x[k], y[k])
            else:
                assert x[k] == pytest.approx(y[k], rel=rtol, abs=atol), (x["step"], k, x[k], y[k])


def max_weight_diff(wa: dict, wb: dict) -> float:
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
