"""maxent_rlhf.evaluation in training (TrainingEvaluator) against evaluate_judge.py, and the judge outage path."""
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
from helpers.fake_openai_server import FakeJudgeServer  # noqa: E402
from helpers.jsonl import write_jsonl  # noqa: E402
from maxent_rlhf import checkpoints, evaluation, plotting, runs  # noqa: E402
from maxent_rlhf.story import run_story  # noqa: E402

WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it is was and not very good bad help".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))



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
    assert checkpoints.latest_checkpoint(run).name == "step_00000004"  # training went on to the end
    assert out.count("evaluation missing") == 3
    assert "at most 18 requests" in out  # the cost guard, once at the start: 3 evaluations x 6 examples
    assert out.count("at most 18 requests") == 1
    story = run_story(read_metrics(run), run, proxy_key="rewards/margins")
    assert story.missing_evaluations == 3 and story.evaluations == 0


def test_resumed_run_resends_nothing_and_the_request_cap_holds_over_the_run(tmp_path, data, tiny_policy_dir, monkeypatch,
                                                                            capsys):
    import shutil

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-resume")
    judge = dict(eval_steps=2, judge="openai", judge_model="fake-judge", max_retries=1, backoff_base=0.01,
                 backoff_max=0.02, request_timeout=5.0)
    with FakeJudgeServer(marker="good", api_key="sk-test-resume") as srv:
        run = train_offline.main(offline_cfg(tmp_path, tiny_policy_dir, data, base_url=srv.base_url, **judge))
        assert srv.requests == 18  # 3 evaluations (steps 0, 2, 4) x 6 examples, none cached
        first = eval_records(run)
        # a run killed after its step-2 checkpoint: resuming evaluates step 4 again, from the cache
        shutil.rmtree(Path(run) / "checkpoints" / "step_00000004")
        train_offline.main(offline_cfg(tmp_path, tiny_policy_dir, data, base_url=srv.base_url, resume="latest", **judge))
        assert srv.requests == 18
        assert eval_records(run) == first
        # a fresh run with a cap of 10 requests over the run: step 0 costs 6, steps 2 and 4 cannot be afforded
        capped = train_offline.main(offline_cfg(tmp_path, tiny_policy_dir, data, base_url=srv.base_url, max_requests=10,
                                                output_dir=str(tmp_path / "capped"), **judge))
        assert srv.requests == 18 + 6
    evals = eval_records(capped)
    assert evals[0]["eval/n"] == 6 and evals[0]["eval/judge_requests"] == 6
    assert evals[2] == {"step": 2, "eval/missing": 1} and evals[4] == {"step": 4, "eval/missing": 1}
    assert "6 judge requests and 4 of max_requests 10 are left" in capsys.readouterr().out


def test_evaluation_steps_and_disabled_evaluator(tmp_path):
    assert evaluation.evaluation_steps(2, 5) == [0, 2, 4, 5]
    assert evaluation.evaluation_steps(2, 6, start_step=2) == [4, 6]  # a resumed run: its earlier ones are logged
    assert evaluation.evaluation_steps(0, 6) == [0, 6]  # eval_steps 0: none in between
    c = train_offline.OfflineConfig(judge=None, eval_steps=2)  # no judge: no win rate
    ev = evaluation.TrainingEvaluator(c, None, tmp_path, total_steps=6)
    assert not ev.enabled and not ev.due(0) and ev.evaluate(None, None, 0) == {}
    assert not (tmp_path / "eval").exists()


def test_training_judge_options_use_the_training_names(tmp_path, monkeypatch):
    """The reward-model judge reads judge_reward_model_name_or_path, never RLOO's proxy reward model field;
    the judge's data are judge_dataset_*, not the training data."""
    c = train_offline.OfflineConfig(judge="reward-model", judge_reward_model_name_or_path="rm/judge", eval_steps=5,
                                    judge_dataset_name="judge/data", dataset_name="train/data", concurrency=3)
    loaded, built = [], []
    monkeypatch.setattr(evaluation, "load_reference_examples", lambda name, *a: loaded.append(name) or [])
    monkeypatch.setattr(evaluation, "get_judge", lambda name, s: built.append((name, s)) or toy_judge())
    evaluation.TrainingEvaluator(c, None, tmp_path, total_steps=5)
    (name, s), = built
    assert loaded == ["judge/data"] and name == "reward-model"
    assert (s.reward_model_name_or_path, s.tokenizer_name_or_path, s.concurrency) == ("rm/judge", None, 3)
    # one definition of the shared fields: same defaults and help in both configs
    import dataclasses

    ef = {f.name: f for f in dataclasses.fields(ej.EvalConfig)}
    for f in dataclasses.fields(evaluation.JudgeArgs):
        if f.name != "per_device_eval_batch_size":  # train_offline's also sizes its loss-based eval
            assert (ef[f.name].default, ef[f.name].metadata) == (f.default, f.metadata), f.name


def toy_judge():
    from maxent_rlhf import judges

    j = judges.Judge()
    j.cacheable = False
    return j


def test_reward_loss_with_a_judge_is_one_clear_error():
    from maxent_rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="loss_type `reward`"):
        train_offline.OfflineConfig(loss_type="reward", judge="toy-gold", eval_steps=5)


# --------------------------------------------------------------------------------------------------
# the run figures: written from a metrics.jsonl, panels hold exactly the logged series
# --------------------------------------------------------------------------------------------------

def test_both_orders_in_training_debiases_a_position_biased_judge(tmp_path, data, tiny_policy_dir, monkeypatch):
    """A judge that always answers "A", every pair judged in both orders: 50% win rate and 100%
    first-position preference at every evaluation, twice the requests (as evaluate_judge --both_orders)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-orders")
    with FakeJudgeServer(api_key="sk-test-orders", prefer="A") as srv:
        run = train_offline.main(offline_cfg(tmp_path, tiny_policy_dir, data, eval_steps=4, judge="openai", both_orders=True,
                                             judge_model="fake-judge", base_url=srv.base_url, max_retries=1))
        assert srv.requests == 2 * 2 * 6  # evaluations at steps 0 and 4, 6 examples, 2 orders
    for m in eval_records(run).values():
        assert m["eval/win_rate"] == 0.5 and m["eval/n"] == 6 and m["eval/first_position_rate"] == 1.0
        assert m["eval/position_consistency"] == 0.0
