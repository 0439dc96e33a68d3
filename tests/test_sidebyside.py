"""The side-by-side benches' `--ours LABEL=SCRIPT[:VAR=VALUE,...]` rows: upper-case VARs go to the worker's
environment, lower-case ones override that field of our config, typed like the field."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import sidebyside  # noqa: E402
import train_rloo  # noqa: E402


def test_ours_rows_split_environment_and_config_overrides(monkeypatch):
    (label, script, env), = sidebyside.parse_ours(
        ["cheap=train_rloo.py:kl_prev_per_prompt=1,PROTO=a,b,shared_prefix=false,temperature=0.9"])
    assert (label, script, env["PROTO"]) == ("cheap", "train_rloo.py", "a,b")  # a part without "=" continues PROTO
    overrides = json.loads(env[sidebyside.OVERRIDES_ENV])
    assert overrides == {"kl_prev_per_prompt": "1", "shared_prefix": "false", "temperature": "0.9"}
    monkeypatch.setenv(sidebyside.OVERRIDES_ENV, env[sidebyside.OVERRIDES_ENV])
    c = sidebyside.apply_config_overrides(train_rloo.RLOOConfig(rloo_k=4))
    assert (c.kl_prev_per_prompt, c.shared_prefix, c.temperature, c.rloo_k) == (1, False, 0.9, 4)
    assert isinstance(c.kl_prev_per_prompt, int) and isinstance(c.temperature, float)


def test_a_row_without_overrides_leaves_the_config_alone_and_a_wrong_field_stops(monkeypatch):
    (_, _, env), = sidebyside.parse_ours(["ours=train_rloo.py"])
    assert env == {}
    monkeypatch.delenv(sidebyside.OVERRIDES_ENV, raising=False)
    base = train_rloo.RLOOConfig()
    assert sidebyside.apply_config_overrides(base) == base
    monkeypatch.setenv(sidebyside.OVERRIDES_ENV, json.dumps({"kl_prev_per_promt": "1"}))
    with pytest.raises(SystemExit, match="kl_prev_per_promt is not a field of RLOOConfig"):
        sidebyside.apply_config_overrides(base)
