"""Nothing is ever overwritten or silently mixed: the output_dir policy of the three scripts
(`runs.open_run_dir`, `runs.check_same_evaluation`), the judge's cache across judges and templates
(against tests/helpers/fake_openai_server.py), and a win-rate figure at 0% and 100% that never costs the numbers."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import evaluate_judge as ej  # noqa: E402
from helpers.fake_openai_server import FakeJudgeServer  # noqa: E402
from maxent_rlhf import checkpoints, evaluation, plotting, runs  # noqa: E402
from maxent_rlhf.config import ConfigError  # noqa: E402

KEY = "sk-test-run-dirs"


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


# --------------------------------------------------------------------------------------------------
# runs.open_run_dir: the trainers' policy
# --------------------------------------------------------------------------------------------------
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
    from test_bad_inputs import run_script

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


# --------------------------------------------------------------------------------------------------
# evaluate_judge: keyed outputs, never mixed
# --------------------------------------------------------------------------------------------------
N = 40  # at 0/40 and 40/40 the Wilson bound lands ~1e-17 past the estimate (the crash seen)
WINNERS = {0, 1, 2}  # examples where the policy's summary has the word "good"; "bad" on the others


@pytest.fixture
def judge_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    data = tmp_path / "test.jsonl"
    rows = [{"id": f"ex{i}", "prompt": f"SUBREDDIT: r/cats\n\nTITLE: t{i}\n\nPOST: my cat sat {i}\n\nTL;DR:",
             "completion": f" reference summary {i}"} for i in range(N)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_checkpoint(tmp_path / "policy_run", 10)
    ckpt = tmp_path / "policy_run"  # a run directory: all its checkpoints
    out = tmp_path / "out"
    gen = out / "generations" / "step_00000010.jsonl"
    gen.parent.mkdir(parents=True)
    with open(gen, "w") as f:
        for i, r in enumerate(rows):
            text = "the cat sat good" if i in WINNERS else "the cat sat bad"
            f.write(json.dumps({"id": r["id"], "generation": text, "n_tokens": 4, "reference_tokens": 3,
                                "prompt_sha": evaluation.prompt_hash(r["prompt"]), "max_new_tokens": 53}) + "\n")
    return data, ckpt, out


def judge_config(data, ckpt, out, server, **kw):
    base = dict(output_dir=str(out), checkpoints=[str(ckpt)], dataset_name=str(data), dataset_test_split="test", n=0,
                judge="openai", judge_model="judge-a", base_url=server.base_url, concurrency=2, request_timeout=5.0,
                max_retries=1, backoff_base=0.01, backoff_max=0.05, plot=False)
    base.update(kw)
    return ej.EvalConfig(**base)


def test_another_judge_model_or_template_never_reuses_judgments(judge_setup, monkeypatch):
    """Judge A prefers summaries with "good", judge B (another server) those with "bad". Sharing one
    output_dir and its cache, each judge's win rate is its own: B is asked every pair again, and A
    afterwards none. A new template version is asked every pair again too."""
    data, ckpt, out = judge_setup
    with FakeJudgeServer(marker="good", anti_marker="bad", api_key=KEY) as a, \
            FakeJudgeServer(marker="bad", anti_marker="good", api_key=KEY) as b:
        first = ej.main(judge_config(data, ckpt, out, a))
        assert first["checkpoints"][0]["win_rate"] == len(WINNERS) / N and first["judged_now"] == N
        second = ej.main(judge_config(data, ckpt, out, b, judge_model="judge-b"))
        assert second["judged_now"] == N and second["cached"] == 0 and len(b.judged) == N
        assert second["checkpoints"][0]["win_rate"] == (N - len(WINNERS)) / N
        requests_a = a.requests
        again = ej.main(judge_config(data, ckpt, out, a))
        assert a.requests == requests_a and again["cached"] == N
        assert again["checkpoints"][0]["win_rate"] == len(WINNERS) / N
        # same judge model name, new template: judged again (here by B's preferences), never read from A's
        from maxent_rlhf import evaluation, judges

        new_version = judges.TEMPLATE_VERSION + "-next"
        for module in (judges, evaluation, ej):  # every module holding the name (the key is built from it)
            if hasattr(module, "TEMPLATE_VERSION"):
                monkeypatch.setattr(module, "TEMPLATE_VERSION", new_version)
        requests_b = b.requests
        new_template = ej.main(judge_config(data, ckpt, out, b))
        assert new_template["judged_now"] == N and b.requests - requests_b == N
        assert new_template["checkpoints"][0]["win_rate"] == (N - len(WINNERS)) / N
    keys = [json.loads(l)["key"] for l in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(keys) == 3 * N == len(set(keys))


def test_judge_refuses_outputs_made_for_other_prompts(judge_setup):
    data, ckpt, out = judge_setup
    with FakeJudgeServer(api_key=KEY) as server:
        ej.main(judge_config(data, ckpt, out, server))
        with pytest.raises(ConfigError, match=r"holds outputs made with `max_prompt_length` = 512 \(this run: 256\).*another output_dir"):
            ej.main(judge_config(data, ckpt, out, server, max_prompt_length=256))
        ej.main(judge_config(data, ckpt, out, server, concurrency=1))  # transport settings may change


# --------------------------------------------------------------------------------------------------
# the figure: 0% and 100% win rates; a failure to draw never costs the numbers
# --------------------------------------------------------------------------------------------------
def wilson_row(label, step, wins, n):
    import importlib.util

    spec = importlib.util.spec_from_file_location("win_rate_metric", evaluation.METRIC_PATH / "win_rate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lo, hi = mod.wilson_interval(wins, n)
    return {"label": label, "step": step, "baseline": False, "win_rate": wins / n, "ci_low": lo, "ci_high": hi}


@pytest.mark.parametrize("wins", [0, 17, 40])
def test_error_bars_are_never_negative_at_the_edges(wins):
    (below,), (above,) = plotting.interval_error_bars([wilson_row("c", 1, wins, 40)])
    assert below >= 0 and above >= 0
    assert (below == 0) == (wins == 0) and (above == 0) == (wins == 40)


def test_figure_draws_0_of_n_and_n_of_n(tmp_path):
    rows = [wilson_row("a", 10, 0, 40), wilson_row("b", 20, 40, 40), wilson_row("c", 30, 23, 40)]
    rows.append({**wilson_row("sft", None, 40, 40), "baseline": True})
    plotting.plot_win_rates(rows, tmp_path / "win_rate.png", "test judge", 0.95)
    assert (tmp_path / "win_rate.png").stat().st_size > 1000


def test_evaluate_judge_at_0_and_100_percent_win_rates_draws_its_figure(judge_setup):
    """The crash seen against a real server: the figure after judging, at a 0% or 100% win rate."""
    data, ckpt, out = judge_setup
    for judge_model, marker, anti, expected in (("judge-all", "cat", "reference", 1.0), ("judge-none", "reference", "cat", 0.0)):
        (out / "win_rate.png").unlink(missing_ok=True)
        with FakeJudgeServer(marker=marker, anti_marker=anti, api_key=KEY) as server:
            summary = ej.main(judge_config(data, ckpt, out, server, judge_model=judge_model, plot=True))
        row = summary["checkpoints"][0]
        assert row["win_rate"] == expected and row["n"] == N
        assert row["ci_low"] <= row["win_rate"] + 1e-12 and row["ci_high"] >= row["win_rate"] - 1e-12
        assert (out / "win_rate.png").stat().st_size > 1000


def test_a_figure_that_fails_keeps_the_numbers(judge_setup, monkeypatch, capsys):
    data, ckpt, out = judge_setup

    def broken(*a, **k):
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(plotting, "plot_win_rates", broken)
    with FakeJudgeServer(marker="reference", anti_marker="cat", api_key=KEY) as server:  # the policy never wins
        summary = ej.main(judge_config(data, ckpt, out, server, plot=True))
    captured = capsys.readouterr()
    assert json.loads((out / "summary.json").read_text())["checkpoints"][0]["win_rate"] == summary["checkpoints"][0]["win_rate"]
    assert "win rate" in captured.out  # the table was printed
    assert "WARNING" in captured.err and "win_rate.png was not drawn" in captured.err and "summary.json" in captured.err
