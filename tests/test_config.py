"""The shared config system: precedence, types, unknown keys, help, batch-size derivation, and one
vocabulary across the three scripts (their --help outputs, closest-key suggestions)."""
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import yaml

from maxent_rlhf.config import (
    ConfigError,
    TrainConfig,
    build_parser,
    cfg,
    config_from_dict,
    derive_batch_sizes,
    parse_config,
    save_config,
)


@dataclass
class DemoConfig(TrainConfig):
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
    with pytest.raises(ConfigError, match=r"gives 8 per process, which `per_device_train_batch_size` = 3 does not divide"):
        derive_batch_sizes(16, 2, 3)


# --------------------------------------------------------------------------------------------------
# one vocabulary in all three scripts (transformers / TRL names where they have one)
# --------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_rloo.py", "train_offline.py", "evaluate_judge.py")


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def help_texts():
    """`--help` of each script, as a user runs it (a subprocess)."""
    out = {}
    for script in SCRIPTS:
        proc = _run_script(script, "--help")
        assert proc.returncode == 0, proc.stderr
        out[script] = set(tok for tok in proc.stdout.split() if tok.startswith("--"))
    return out

TRAINING_ONLY = ("--model_name_or_path", "--dataset_train_split", "--prompt_column", "--max_prompt_length",
                 "--global_batch_size", "--per_device_train_batch_size", "--learning_rate", "--lr_scheduler_type",
                 "--warmup_ratio", "--weight_decay", "--adam_beta1", "--adam_beta2", "--adam_epsilon",
                 "--max_grad_norm", "--gradient_checkpointing", "--resume", "--overwrite_output_dir", "--save_steps",
                 "--save_total_limit", "--logging_steps", "--report_to", "--tracker_project_name")
OLD_NAMES = ("--save_every", "--keep_last", "--log_every", "--wandb_project", "--dataset", "--dataset_split",
             "--train_split", "--eval_split", "--split", "--eval_dataset", "--batch_size", "--micro_batch_size",
             "--eval_batch_size", "--lr_schedule", "--lr_scheduler", "--num_epochs", "--eval_every", "--loss",
             "--gamma", "--cpo_nll_coef", "--max_response_length", "--sft_model", "--tokenizer", "--reward_model")


def test_the_three_scripts_share_names_for_shared_concepts(help_texts):
    rloo, offline, judge = (help_texts[s] for s in SCRIPTS)
    for flag in ("--output_dir", "--seed", "--mixed_precision", "--trust_remote_code", "--dataset_name",
                 "--prompt_column", "--max_prompt_length"):
        assert flag in rloo and flag in offline and flag in judge, flag
    for flag in TRAINING_ONLY:
        assert flag in rloo and flag in offline, flag
    # evaluation data and batch: offline and judge say it the same way
    for flag in ("--dataset_test_split", "--per_device_eval_batch_size", "--tokenizer_name_or_path"):
        assert flag in offline and flag in judge, flag
    assert "--reward_model_name_or_path" in rloo and "--reward_model_name_or_path" in judge
    assert {"--loss_type", "--simpo_gamma", "--cpo_alpha", "--max_completion_length", "--num_train_epochs",
            "--eval_steps", "--eval_dataset_name"} <= offline
    assert "--sft_model_name_or_path" in judge
    for script, flags in help_texts.items():
        assert not flags & set(OLD_NAMES), (script, sorted(flags & set(OLD_NAMES)))


def test_judge_help_lists_no_training_options(help_texts):
    judge = help_texts["evaluate_judge.py"]
    for flag in ("--save_steps", "--save_total_limit", "--resume", "--report_to", "--logging_steps",
                 "--tracker_project_name", "--overwrite_output_dir", "--learning_rate", "--lr_scheduler_type",
                 "--per_device_train_batch_size", "--dataset_train_split"):
        assert flag not in judge, flag


@pytest.mark.parametrize("script,key,closest", [
    ("train_rloo.py", "lr_scheduler", "lr_scheduler_type"),
    ("train_rloo.py", "num_epochs", "num_ppo_epochs"),
    ("train_offline.py", "num_epochs", "num_train_epochs"),
    ("train_offline.py", "save_every", "save_steps"),
    ("evaluate_judge.py", "dataset", "dataset_name"),
])
def test_an_unknown_key_on_the_command_line_suggests_the_closest_valid_key_of_that_script(script, key, closest):
    proc = _run_script(script, f"--{key}", "1")
    assert proc.returncode == 2
    assert f"command line: unknown key `{key}`; did you mean `{closest}`?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unknown_key_in_a_yaml_file_suggests_the_closest_valid_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("learning_rate: 1.0e-6\nlr_scheduler: cosine\n")
    proc = _run_script("train_offline.py", "--config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}: unknown key `lr_scheduler`; did you mean `lr_scheduler_type`?" in proc.stderr


def test_an_unknown_key_without_a_close_one_lists_the_valid_keys():
    from maxent_rlhf.config import _fields

    with pytest.raises(ConfigError) as e:
        config_from_dict(DemoConfig, {"zzz": 1})
    assert str(e.value) == f"config: unknown key `zzz`; valid keys: {', '.join(sorted(_fields(DemoConfig)))}"
