"""A toy-lab sweep run directory as the sweep leaves it, for the report and claim tests."""
import json
from pathlib import Path

import yaml


def fake_sweep_run(root: Path, name: str, config: dict, win: list, metrics=None, info=None, tokens=None, proxy=None) -> Path:
    """config.yaml, metrics.jsonl, eval_gold/summary.json (gold win rate at step 0 and every 10 steps, optional
    mean response tokens), optional eval_proxy/summary.json (proxy score) and DONE.json (`info`)."""
    d = root / name
    (d / "eval_gold").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    with open(d / "metrics.jsonl", "w") as f:
        for m in metrics or [{"step": s} for s in range(1, 4)]:
            f.write(json.dumps(m) + "\n")
    tokens = tokens or [None] * len(win)
    (d / "eval_gold" / "summary.json").write_text(json.dumps({
        "baseline": {"win_rate": win[0], "mean_policy_tokens": tokens[0]},
        "checkpoints": [{"step": 10 * (i + 1), "win_rate": w, "mean_policy_tokens": t}
                        for i, (w, t) in enumerate(zip(win[1:], tokens[1:]))]}))
    if proxy:
        (d / "eval_proxy").mkdir()
        (d / "eval_proxy" / "summary.json").write_text(json.dumps({
            "baseline": {"mean_policy_score": proxy[0]},
            "checkpoints": [{"step": 10 * (i + 1), "mean_policy_score": p} for i, p in enumerate(proxy[1:])]}))
    (d / "DONE.json").write_text(json.dumps(info or {}))
    return d
