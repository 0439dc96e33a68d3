"""Run directories (maxent_rlhf.runs): metrics and JSONL logs, non-finite checks, the saved config; and
nothing is ever overwritten or silently mixed: the output_dir policy of the scripts (`runs.open_run_dir`)."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from maxent_rlhf import checkpoints, runs
from maxent_rlhf.checkpoints import save_checkpoint
from maxent_rlhf.config import ConfigError
from maxent_rlhf.models import build_tiny_policy
from maxent_rlhf.runs import NonFiniteError, RunDir, check_finite, read_metrics


def test_metrics_jsonl_and_truncation_on_resume(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 6):
        run.log_metrics({"train/loss": torch.tensor(1.0 / step), "train/lr": 0.1}, step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut by a kill
    run.truncate_logs_after(3)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["train/loss"] == pytest.approx(0.5)


def test_check_finite_names_the_quantity_and_the_checkpoint(tmp_path, tiny_tokenizer):
    run = RunDir(tmp_path)
    save_checkpoint(run, 4, build_tiny_policy(tiny_tokenizer, seed=0))
    check_finite("train/loss", torch.tensor(1.0), 5, run)
    with pytest.raises(NonFiniteError, match=r"train/loss is nan at step 5.*step_00000004"):
        check_finite("train/loss", torch.tensor(float("nan")), 5, run)


def test_jsonl_after_a_torn_line_keeps_every_later_record(tmp_path):
    """A kill mid-write leaves a torn last line; the next append starts a line of its own, so only the
    fragment is lost (evaluate_judge's generations and the judgment cache append this way)."""
    from maxent_rlhf.runs import open_jsonl_for_append, read_jsonl

    path = tmp_path / "sub" / "g.jsonl"
    with open_jsonl_for_append(path) as f:  # creates the folder
        f.write('{"id": "a"}\n')
    with open(path, "a") as f:
        f.write('{"id": "b", "gen')  # killed here
    with open_jsonl_for_append(path) as f:
        f.write('{"id": "c"}\n')
    torn = []
    assert read_jsonl(path, torn=torn) == [{"id": "a"}, {"id": "c"}] and torn == [2]
    assert read_jsonl(path, numbered=True) == [(1, {"id": "a"}), (3, {"id": "c"})]
    with open(path, "a") as f:  # the naive append glues the next record to the fragment: it is lost
        f.write('{"id": "b", "gen')
    with open(path, "a") as f:
        f.write('{"id": "d"}\n')
    assert {"id": "d"} not in read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_the_saved_config_records_the_precision_that_ran(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from maxent_rlhf.config import TrainConfig, load_yaml
    from maxent_rlhf.distributed import precision_that_ran

    def acc(mp, device):
        return SimpleNamespace(mixed_precision=mp, device=torch.device(device), is_main_process=True, num_processes=1,
                               wait_for_everyone=lambda: None)

    assert precision_that_ran("fp16", acc("fp16", "cpu")) == "no"  # accelerate has no fp16 autocast on CPU
    assert precision_that_ran("bf16", acc("bf16", "cpu")) == "bf16"
    assert precision_that_ran("fp16", acc("fp16", "cuda")) == "fp16"
    assert precision_that_ran("auto", acc("bf16", "cuda")) == "bf16"  # what the Accelerator applied
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_that_ran("auto") == "no"
    run = RunDir(tmp_path / "run", acc("fp16", "cpu"))
    run.save_config(TrainConfig(output_dir=str(tmp_path / "run"), mixed_precision="fp16"))
    assert load_yaml(tmp_path / "run" / "config.yaml")["mixed_precision"] == "no"


# --------------------------------------------------------------------------------------------------
# runs.open_run_dir: the trainers' policy
# --------------------------------------------------------------------------------------------------
def fake_checkpoint(run: Path, step: int) -> Path:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    return d


def old_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("learning_rate: 0.1\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    fake_checkpoint(path, 2)
    return path


def test_fresh_run_into_another_run_is_refused_and_nothing_is_touched(tmp_path):
    run = old_run(tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as e:
        runs.open_run_dir(run)
    msg = str(e.value)
    assert "already holds a run (metrics.jsonl, 1 checkpoint(s), the newest step_00000002)" in msg
    assert "--resume latest" in msg and "--overwrite_output_dir" in msg and "another output_dir" in msg
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_overwrite_moves_the_old_run_aside_whole(tmp_path, capsys):
    run = old_run(tmp_path / "run")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    run_dir, ckpt = runs.open_run_dir(run, overwrite_output_dir=True)
    assert ckpt is None and run_dir.path == run
    assert [p for p in run.rglob("*") if p.is_file()] == []  # the new run starts empty: nothing mixes
    (moved,) = tmp_path.glob("run.replaced-*")
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == before
    assert f"moved to {moved}" in capsys.readouterr().out
    run_dir.log_metrics({"loss": 0.5}, 1)  # a second overwrite keeps both earlier runs
    runs.open_run_dir(run, overwrite_output_dir=True)
    assert len(list(tmp_path.glob("run.replaced-*"))) == 2


def test_a_config_left_by_an_attempt_that_failed_early_is_not_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("learning_rate: 0.1\n")
    run_dir, ckpt = runs.open_run_dir(tmp_path / "run")  # fixing a typo never needs a new output_dir
    assert ckpt is None and (tmp_path / "run" / "config.yaml").exists()


def test_resume_latest_without_checkpoint_says_so_and_starts_fresh(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # killed before its first checkpoint
    run_dir, ckpt = runs.open_run_dir(run, resume="latest")
    assert ckpt is None
    assert f"no checkpoint in {run}: starting fresh" in capsys.readouterr().out
    assert runs.read_metrics(run) == []  # its steps are redone, not appended to


def test_resume_latest_drops_log_lines_past_the_checkpoint(tmp_path):
    run = old_run(tmp_path / "run")
    run_dir, ckpt = runs.open_run_dir(run, resume="latest")
    assert ckpt.name == "step_00000002" and [r["step"] for r in runs.read_metrics(run)] == [1, 2]


def test_non_finite_names_the_last_good_checkpoint(tmp_path):
    run = old_run(tmp_path / "run")
    run_dir = runs.RunDir(run)
    with pytest.raises(runs.NonFiniteError, match=r"last good checkpoint is \S+step_00000002 \(step 2\): continue from it with --resume"):
        runs.check_finite("train/loss", float("nan"), 3, run_dir)
    empty = runs.RunDir(tmp_path / "empty")
    with pytest.raises(runs.NonFiniteError, match="no checkpoint was saved in .*empty yet"):
        runs.check_finite("policy loss", float("inf"), 1, empty)


# --------------------------------------------------------------------------------------------------
# the same policy through the training scripts (tiny models, one step)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def sft_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"POST: my cat sat on the mat {w} TL;DR:", "completion": f" the cat sat {w}"}
            for w in ("today", "yesterday", "far", "home")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_offline_resume_latest_in_an_empty_dir_and_overwrite(tmp_path, capsys, tiny_policy_dir, sft_data):
    import train_offline

    c = train_offline.OfflineConfig(
        output_dir=str(tmp_path / "run"), model_name_or_path=tiny_policy_dir, dataset_name=sft_data, loss_type="sft",
        report_to="none", global_batch_size=2, per_device_train_batch_size=2, max_steps=1, max_prompt_length=16,
        max_completion_length=8, resume="latest",
    )
    train_offline.main(c)
    assert f"no checkpoint in {c.output_dir}: starting fresh" in capsys.readouterr().out
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_offline.main(replace(c, resume=None))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first
    train_offline.main(replace(c, resume=None, overwrite_output_dir=True))
    (moved,) = tmp_path.glob("run.replaced-*")
    assert (moved / "metrics.jsonl").read_text() == first and checkpoints.list_checkpoints(moved)
    assert [r["step"] for r in runs.read_metrics(tmp_path / "run")] == [1]


def test_train_rloo_resume_latest_in_an_empty_dir_starts_fresh(tmp_path, capsys, tiny_policy_dir, tiny_reward_dir):
    import train_rloo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"POST: my {w} sat TL;DR:"}) + "\n" for w in ("cat", "dog")))
    c = train_rloo.RLOOConfig(
        output_dir=str(tmp_path / "run"), model_name_or_path=tiny_policy_dir, reward_model_name_or_path=tiny_reward_dir,
        dataset_name=str(prompts), global_batch_size=4, rloo_k=2, per_device_train_batch_size=2, num_ppo_epochs=1,
        num_iterations=1, response_length=4, max_prompt_length=16, report_to="none", sample_every=0, resume="latest",
    )
    train_rloo.main(c)
    assert f"no checkpoint in {c.output_dir}: starting fresh" in capsys.readouterr().out
    assert [r["step"] for r in runs.read_metrics(tmp_path / "run")] == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is a real precision on a GPU")
def test_fp16_on_cpu_runs_float32_and_the_run_records_it(tmp_path, tiny_policy_dir, tiny_reward_dir):
    """accelerate has no fp16 autocast on CPU: the run is the float32 run (frozen models included), and
    config.yaml and the closing summary say so. Each run is a process of its own (accelerate keeps one
    precision per process)."""
    from helpers.scripts import run_script

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"POST: my {w} sat TL;DR:"}) + "\n" for w in ("cat", "dog")))
    args = ["--model_name_or_path", tiny_policy_dir, "--reward_model_name_or_path", tiny_reward_dir, "--dataset_name",
            str(prompts), "--global_batch_size", "4", "--rloo_k", "2", "--per_device_train_batch_size", "2",
            "--num_ppo_epochs", "1", "--num_iterations", "2", "--response_length", "4", "--max_prompt_length", "16",
            "--report_to", "none", "--sample_every", "0"]
    done = {p: run_script("train_rloo.py", [*args, "--mixed_precision", p, "--output_dir", str(tmp_path / p)], tmp_path)
            for p in ("fp16", "no")}
    assert all(proc.returncode == 0 for proc in done.values()), done["fp16"].stderr[-3000:]
    assert "precision: float32 (mixed_precision: no)" in done["fp16"].stdout.splitlines()
    assert yaml.safe_load((tmp_path / "fp16" / "config.yaml").read_text())["mixed_precision"] == "no"

    def values(run):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in runs.read_metrics(run)]

    assert values(tmp_path / "fp16") == values(tmp_path / "no") and len(values(tmp_path / "no")) == 2
