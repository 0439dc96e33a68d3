"""maxent_rlhf.evaluation in training (TrainingEvaluator) against evaluate_judge.py, the judge outage path,
and the run figures of maxent_rlhf.plotting (panel data = the logged series)."""
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import evaluate_judge as ej  # noqa: E402
import train_offline  # noqa: E402
from fake_openai_server import FakeJudgeServer  # noqa: E402
from maxent_rlhf import evaluation, plotting, runs  # noqa: E402
from maxent_rlhf.story import run_story  # noqa: E402

WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it is was and not very good bad help".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Preference pairs to train on and a prompt/reference set to judge on (tiny vocabulary)."""
    d = tmp_path_factory.mktemp("eval_data")
    rng = random.Random(0)
    prompt = lambda: f"SUBREDDIT: r/cats TITLE: {sentence(rng, 3)} POST: {sentence(rng, 6)} TL;DR:"
    pairs = [{"prompt": prompt(), "chosen": sentence(rng, 2 + i % 3), "rejected": sentence(rng, 4 + i % 2)} for i in range(8)]
    refs = [{"id": f"r{i}", "prompt": prompt(), "completion": sentence(rng, 3)} for i in range(6)]
    return {"pairs": write_jsonl(d / "pairs.jsonl", pairs), "refs_dir": str(d / "refs"),
            "refs": write_jsonl(d / "refs" / "test.jsonl", refs)}


def offline_cfg(tmp_path, model, data, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"), model_name_or_path=model, dataset_name=data["pairs"], report_to="none",
        loss_type="dpo", global_batch_size=4, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_ratio=0.0, max_prompt_length=32, max_completion_length=12,
        per_device_eval_batch_size=4, beta=0.5, simpo_gamma=0.2, save_steps=2,
        judge_dataset_name=data["refs_dir"], judge_dataset_test_split="test", judge_max_samples=0, max_new_tokens=8,
    )
    base.update(kw)
    return train_offline.OfflineConfig(**base)


def read_metrics(run):
    return [json.loads(l) for l in open(Path(run) / "metrics.jsonl")]


def eval_records(run):
    return {r["step"]: r for r in read_metrics(run) if any(k.startswith("eval/") for k in r) and "eval/loss" not in r}


# --------------------------------------------------------------------------------------------------
# in-training win rate == evaluate_judge.py's on the same checkpoint, prompts and judge
# --------------------------------------------------------------------------------------------------
def test_in_training_win_rate_equals_evaluate_judge(tmp_path, data, tiny_policy_dir, tiny_reward_dir, capsys):
    c = offline_cfg(tmp_path, tiny_policy_dir, data, eval_steps=2, judge="reward-model",
                    judge_reward_model_name_or_path=tiny_reward_dir)
    run = train_offline.main(c)
    out = capsys.readouterr().out
    evals = eval_records(run)
    assert sorted(evals) == [0, 2, 4]  # the initial policy, every eval_steps, the end
    assert "verdict:" in out and "win rate:" in out  # the closing story
    assert (Path(run) / plotting.RUN_FIGURE).stat().st_size > 0
    for step in (2, 4):
        ckpt = Path(run) / "checkpoints" / f"step_{step:08d}"
        s = ej.main(ej.EvalConfig(output_dir=str(tmp_path / f"ej{step}"), checkpoints=[str(ckpt)], dataset_name=data["refs_dir"],
                                  dataset_test_split="test", n=0, judge="reward-model", reward_model_name_or_path=tiny_reward_dir,
                                  max_new_tokens=8, max_prompt_length=32, per_device_eval_batch_size=4, plot=False,
                                  mixed_precision=c.mixed_precision, seed=c.seed))
        row, m = s["checkpoints"][0], evals[step]
        assert m["eval/policy_length"] > 0  # real summaries, not empty ones
        assert m["eval/n"] == row["n"] == 6
        assert m["eval/win_rate"] == row["win_rate"]
        assert (m["eval/win_rate_ci_low"], m["eval/win_rate_ci_high"]) == (row["ci_low"], row["ci_high"])
        assert m["eval/invalid"] == row["invalid"]
        assert m["eval/policy_length"] == row["mean_policy_tokens"]
        assert m["eval/reference_length"] == row["mean_reference_tokens"]
        assert m["eval/policy_score"] == pytest.approx(row["mean_policy_score"], abs=1e-6)
        # the very same greedy text, judged by the same judge
        ours = [json.loads(l)["generation"] for l in open(Path(run) / "eval" / "generations" / f"step_{step:08d}.jsonl")]
        theirs = [json.loads(l)["generation"] for l in open(tmp_path / f"ej{step}" / "generations" / f"step_{step:08d}.jsonl")]
        assert ours == theirs
    # the training moved the policy: the evaluations are not all of one model
    gens = [open(Path(run) / "eval" / "generations" / f"step_{s:08d}.jsonl").read() for s in (0, 2, 4)]
    assert len(set(gens)) == 3


# --------------------------------------------------------------------------------------------------
# judge outage during training: logged as missing, training completes
# --------------------------------------------------------------------------------------------------
def test_judge_outage_is_logged_missing_and_training_completes(tmp_path, data, tiny_policy_dir, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-outage")
    with FakeJudgeServer(marker="good", api_key="sk-test-outage", faults=lambda n, body: "503") as srv:
        c = offline_cfg(tmp_path, tiny_policy_dir, data, eval_steps=2, judge="openai", judge_model="fake-judge",
                        base_url=srv.base_url, max_retries=1, backoff_base=0.01, backoff_max=0.02, request_timeout=2.0)
        run = train_offline.main(c)
    out = capsys.readouterr().out
    evals = eval_records(run)
    assert sorted(evals) == [0, 2, 4] and all(r == {"step": r["step"], "eval/missing": 1} for r in evals.values())
    assert srv.requests > 0
    assert runs.latest_checkpoint(run).name == "step_00000004"  # training went on to the end
    assert out.count("evaluation missing") == 3
    assert "at most 18 requests" in out  # the cost guard, once at the start: 3 evaluations x 6 examples
    assert out.count("at most 18 requests") == 1
    story = run_story(read_metrics(run), run, proxy_key="rewards/margins")
    assert story.missing_evaluations == 3 and story.evaluations == 0
