"""The shared config system: precedence, types, unknown keys, help, batch-size derivation."""
from dataclasses import dataclass
from typing import List, Optional

import pytest
import yaml

from maxent_rlhf.config import (
    ConfigError,
    RunConfig,
    build_parser,
    cfg,
    config_from_dict,
    derive_batch_sizes,
    parse_config,
    save_config,
)


@dataclass
class DemoConfig(RunConfig):
    learning_rate: float = cfg(1e-6, "peak learning rate")
    loss: str = cfg("dpo", "which loss", choices=("dpo", "simpo"))
    gammas: List[float] = cfg([0.0, 0.5], "margins to sweep")
    warmup_steps: int = cfg(10, "linear warmup steps")
    gradient_checkpointing: bool = cfg(False, "recompute activations")
    reference: Optional[str] = cfg(None, "reference model")


def test_precedence_defaults_yaml_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nwarmup_steps: 3\nloss: simpo\n")  # YAML 1.1 reads 1e-5 as a string
    c = parse_config(DemoConfig, ["--config", str(path), "--warmup_steps", "7", "--gradient_checkpointing"])
    assert c.learning_rate == pytest.approx(1e-5)
    assert c.warmup_steps == 7  # command line beats YAML
    assert c.loss == "simpo"
    assert c.gradient_checkpointing is True
    assert c.gammas == [0.0, 0.5]  # default kept, and not shared between instances
    c.gammas.append(1.0)
    assert DemoConfig().gammas == [0.0, 0.5]


def test_lists_bools_and_optional_from_cli():
    c = parse_config(DemoConfig, ["--gammas", "0,0.25,1", "--gradient_checkpointing", "false", "--reference", "null"])
    assert c.gammas == [0.0, 0.25, 1.0]
    assert c.gradient_checkpointing is False
    assert c.reference is None


def test_unknown_yaml_key_suggests_close_match(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rte: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"unknown key `learning_rte`; did you mean `learning_rate`"):
        config_from_dict(DemoConfig, yaml.safe_load(path.read_text()), source=str(path))


def test_unknown_cli_key_exits_with_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(DemoConfig, ["--warmup_step", "3"])
    assert e.value.code == 2
    assert "did you mean `warmup_steps`" in capsys.readouterr().err


def test_wrong_type_names_field_and_expected_type(capsys):
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--warmup_steps", "three"])
    err = capsys.readouterr().err
    assert "`warmup_steps`" in err and "expects int" in err


def test_choices_enforced():
    with pytest.raises(ConfigError, match=r"`loss` must be one of \['dpo', 'simpo'\]"):
        config_from_dict(DemoConfig, {"loss": "ipo"})


def test_yaml_top_level_must_be_mapping(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--config", str(path)])
    assert "top level must be a mapping" in capsys.readouterr().err


def test_help_lists_every_field_with_default_and_help():
    text = build_parser(DemoConfig).format_help()
    for name in ("learning_rate", "loss", "gammas", "warmup_steps", "output_dir", "seed", "resume"):
        assert f"--{name}" in text
    assert "peak learning rate" in text and "(default: 1e-06)" in text


def test_resolved_config_round_trips(tmp_path):
    c = parse_config(DemoConfig, ["--learning_rate", "3e-4", "--gammas", "1,2"])
    save_config(c, tmp_path / "config.yaml")
    again = parse_config(DemoConfig, ["--config", str(tmp_path / "config.yaml")])
    assert again == c


@pytest.mark.parametrize(
    "global_bs,procs,micro,expected",
    [(64, 1, 8, (64, 8)), (64, 2, 8, (32, 4)), (64, 4, 16, (16, 1)), (6, 3, 1, (2, 2))],
)
def test_derive_batch_sizes(global_bs, procs, micro, expected):
    per_proc, accum = derive_batch_sizes(global_bs, procs, micro)
    assert (per_proc, accum) == expected
    assert procs * micro * accum == global_bs


def test_batch_sizes_that_do_not_divide_name_the_numbers():
    with pytest.raises(ConfigError, match=r"`global_batch_size` = 10 does not divide over 4 processes"):
        derive_batch_sizes(10, 4, 1)
    with pytest.raises(ConfigError, match=r"gives 8 per process, which the micro-batch size 3 does not divide"):
        derive_batch_sizes(16, 2, 3)
