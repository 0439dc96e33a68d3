"""train_rloo.py end to end on tiny local models: every regulariser, learning signal, KL anchoring, resume.

Known-answer tests of the iteration's steps 2-6 and the bad-input checks are in test_rloo_units.py.
"""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train_rloo
from maxent_rlhf import rollout
from maxent_rlhf.checkpoints import list_checkpoints
from maxent_rlhf.runs import NonFiniteError, read_metrics

EVERY_METRIC = [
    "objective/scores", "objective/rlhf_reward", "objective/non_score_reward", "objective/entropy_bonus",
    "objective/entropy", "objective/entropy_per_token", "objective/kl_ref", "objective/kl_ref_k3",
    "objective/kl_prev", "objective/kl_prev_k3", "objective/kl_prev_reverse", "objective/kl_prev_reverse_k3",
    "objective/kl_prev_ess", "policy/entropy",
    "policy/clipfrac", "policy/approxkl", "val/ratio", "response/length", "response/eos_fraction",
    "time/generate", "time/score", "time/update", "perf/episodes_per_s", "perf/tokens_per_s",
]
PROMPT_WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it".split()


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's 2 cores are shared: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("rloo_data") / "prompts.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            post = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {post} TL;DR:"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def base(tiny_policy_dir, tiny_reward_dir, prompts_file):
    return train_rloo.RLOOConfig(
        model_name_or_path=tiny_policy_dir, reward_model_name_or_path=tiny_reward_dir, dataset_name=prompts_file,
        global_batch_size=8, rloo_k=2, num_mini_batches=2, per_device_train_batch_size=2, num_ppo_epochs=2,
        num_iterations=2, response_length=6, max_prompt_length=16, report_to="none", sample_every=1, num_samples=2,
        learning_rate=1e-3,
    )


def token_reward(tokenizer, word="cat"):
    """Programmatic reward: +1 per occurrence of `word` in the (truncated) response."""
    tid = tokenizer.convert_tokens_to_ids(word)

    def fn(prompts, completions, response_ids, response_mask):
        assert len(prompts) == len(completions) == response_ids.shape[0]
        return ((response_ids == tid) & response_mask.bool()).sum(1).float()

    return fn


@pytest.mark.parametrize(
    "overrides",
    [
        dict(regularizer="kl", kl_coef=0.05),
        dict(regularizer="entropy", entropy_coef=0.1, length_normalize=True, whiten_advantages=True),
        dict(regularizer="entropy", entropy_coef=-0.1, loss_level="token", cliprange=1e-4),  # minimum entropy
        dict(regularizer="entropy", entropy_coef=0.0),
        dict(regularizer="none", kl_ref_every=2),
    ],
    ids=["kl", "maxent-eq7", "minent-token-clip1e-4", "entropy-coef0", "none"],
)
def test_each_regularizer_runs_two_iterations_and_logs_every_metric(base, tmp_path, overrides):
    c = replace(base, output_dir=str(tmp_path / "run"), **overrides)
    run = Path(train_rloo.main(c))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        expected = EVERY_METRIC if ("kl_ref_every" not in overrides or r["step"] % 2 == 0) else [
            m for m in EVERY_METRIC if not m.startswith("objective/kl_ref")]
        missing = [m for m in expected if m not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert all(isinstance(r[m], float) and r[m] == r[m] for m in expected)
        assert r["objective/kl_ref_every"] == overrides.get("kl_ref_every", 1)
        assert r["objective/kl_ref_k3"] >= 0 if "objective/kl_ref_k3" in r else True
        assert r["objective/kl_prev_k3"] >= 0 and r["objective/kl_prev_reverse_k3"] >= 0 and r["policy/entropy"] > 0
        assert 0 < r["objective/kl_prev_ess"] <= 1 + 1e-6
        # the unweighted entropy is logged whatever the regulariser and coefficient (Fig. 1 includes alpha = 0)
        assert r["objective/entropy"] > 0 and 0 < r["objective/entropy_per_token"] <= r["objective/entropy"]
        if overrides["regularizer"] == "entropy":  # the bonus is the coefficient times it (Eq. 7: per token)
            per = "objective/entropy_per_token" if overrides.get("length_normalize") else "objective/entropy"
            coef = overrides["entropy_coef"]
            assert r["objective/entropy_bonus"] == pytest.approx(coef * r[per], rel=1e-4, abs=1e-7)
        assert 1 <= r["response/length"] <= c.response_length
        assert abs(r["objective/rlhf_reward"] - r["objective/scores"] - r["objective/non_score_reward"]) < 1e-5
    first = records[0]
    if overrides["regularizer"] == "entropy":
        assert first["objective/entropy_bonus"] == pytest.approx(first["objective/non_score_reward"])
        # -alpha log pi > 0 for max-entropy; the minimum-entropy variant flips the sign
        assert (first["objective/entropy_bonus"] < 0) == (overrides["entropy_coef"] < 0)
    else:
        assert first["objective/entropy_bonus"] == 0.0
    if overrides["regularizer"] == "kl":  # iteration 1 samples from pi_ref itself: the KL term is exactly 0
        assert first["objective/kl_ref"] == 0.0 and first["objective/non_score_reward"] == 0.0
    assert records[1]["objective/kl_ref_k3"] > 0  # the first update moved the policy
    samples = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert all(s["temperature"] == c.temperature and s["prompt"].endswith("TL;DR:") for s in samples)
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_00000002"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpts[-1])  # the judge loads checkpoints exactly like this


@pytest.fixture(scope="module")
def reward_runs(base, tiny_tokenizer, tmp_path_factory):
    """The same programmatic-reward problem without a regulariser and with a large KL coefficient."""
    out = tmp_path_factory.mktemp("reward_runs")
    fn = token_reward(tiny_tokenizer)
    common = dict(global_batch_size=16, rloo_k=4, num_mini_batches=1, per_device_train_batch_size=16, num_ppo_epochs=2,
                  num_iterations=15, learning_rate=1e-2, lr_scheduler_type="constant", missing_eos_penalty=0.0, sample_every=0)
    runs = {}
    for name, reg in (("none", dict(regularizer="none")), ("kl", dict(regularizer="kl", kl_coef=1.0))):
        c = replace(base, output_dir=str(out / name), **common, **reg)
        runs[name] = read_metrics(train_rloo.main(c, reward_fn=fn))
    return runs


def test_programmatic_reward_without_regularizer_raises_mean_score(reward_runs):
    scores = [r["objective/scores"] for r in reward_runs["none"]]
    early, late = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert early < 1.0  # ~6 tokens from ~50 words: a 'cat' is rare at first
    assert late > early + 2.0, scores


def test_large_kl_coefficient_keeps_policy_near_reference(reward_runs):
    free = [r["objective/kl_ref_k3"] for r in reward_runs["none"]]
    anchored = [r["objective/kl_ref_k3"] for r in reward_runs["kl"]]
    assert max(free[-3:]) > 5.0
    assert max(anchored) < 0.25 * max(free[-3:]), (anchored, free)
    assert max(r["objective/scores"] for r in reward_runs["kl"][-3:]) < min(r["objective/scores"] for r in reward_runs["none"][-3:])


def test_resume_is_exact(base, tmp_path):
    """4 iterations straight == 2 iterations, 'kill', resume for the last 2: identical weights on CPU."""
    c = replace(base, num_iterations=4, save_steps=2, whiten_advantages=True, output_dir=str(tmp_path / "full"))
    full = Path(train_rloo.main(c))
    # the killed run: only what existed on disk after iteration 2 (its checkpoint, its log lines + junk past it)
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000002", killed / "checkpoints" / "step_00000002")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # step 3 was logged, then the kill
    resumed = Path(train_rloo.main(replace(c, output_dir=str(killed), resume="latest")))
    from safetensors.torch import load_file

    a = load_file(full / "checkpoints" / "step_00000004" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert ra["objective/scores"] == rb["objective/scores"] and ra["objective/kl_ref"] == rb["objective/kl_ref"]


def test_non_finite_reward_stops_and_last_checkpoint_stays_usable(base, tmp_path):
    calls = []

    def bad(prompts, completions, response_ids, response_mask):
        calls.append(1)
        return torch.full((len(prompts),), float("nan") if len(calls) == 2 else 1.0)

    c = replace(base, num_iterations=3, save_steps=1, output_dir=str(tmp_path / "nan"))
    with pytest.raises(NonFiniteError, match=r"reward-model score is nan at step 2.*step_00000001"):
        train_rloo.main(c, reward_fn=bad)
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["step_00000001"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(list_checkpoints(tmp_path / "nan")[-1])


def test_reward_model_with_other_tokenizer_is_fed_retokenised_text(base, tmp_path, tiny_tokenizer):
    """A reward model whose vocabulary orders words differently: the text is re-tokenised for it."""
    from maxent_rlhf.models import build_tiny_reward_model, build_word_tokenizer

    words = sorted(tiny_tokenizer.get_vocab(), key=lambda w: (w.startswith("<"), w[::-1]))
    other = build_word_tokenizer([w for w in words if not w.startswith("<")])
    assert not rollout.same_vocabulary(tiny_tokenizer, other)
    rm_dir = tmp_path / "rm_other"
    build_tiny_reward_model(other, seed=3, save_dir=rm_dir)
    c = replace(base, reward_model_name_or_path=str(rm_dir), num_iterations=1, output_dir=str(tmp_path / "x"))
    (rec,) = read_metrics(train_rloo.main(c))
    assert rec["objective/scores"] == rec["objective/scores"]


def test_long_prompts_are_cut_from_the_left_and_counted(base, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = ["POST: cat TL;DR:", "POST: dog TL;DR:", "POST: " + "cat " * 30 + "TL;DR:", "POST: " + "dog " * 40 + "TL;DR:"]
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    c = replace(base, dataset_name=str(data), global_batch_size=8, rloo_k=2, num_iterations=2, output_dir=str(tmp_path / "r"))
    run = Path(train_rloo.main(c))
    assert [r["data/truncated_prompts"] for r in read_metrics(run)] == [2, 4]  # every prompt once per iteration
    samples = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert all(len(s["prompt"].split()) <= c.max_prompt_length and s["prompt"].endswith("TL;DR:") for s in samples)


def test_fresh_start_in_a_used_directory_is_refused_and_overwrite_moves_the_old_run(base, tmp_path):
    from maxent_rlhf.config import ConfigError

    c = replace(base, num_iterations=1, sample_every=0, output_dir=str(tmp_path / "again"))
    train_rloo.main(c)
    before = (tmp_path / "again" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run .*--resume latest.*--overwrite_output_dir"):
        train_rloo.main(c)  # no --resume: a new run must not replace or append to the old one
    assert (tmp_path / "again" / "metrics.jsonl").read_text() == before
    run = Path(train_rloo.main(replace(c, overwrite_output_dir=True)))
    assert [r["step"] for r in read_metrics(run)] == [1]
    (moved,) = tmp_path.glob("again.replaced-*")
    assert (moved / "metrics.jsonl").read_text() == before and list_checkpoints(moved)


# ------------------------------------------------------------------ win rate during training, closing story, figure
@pytest.fixture(scope="module")
def refs_dir(tmp_path_factory):
    """Held-out prompts with reference summaries (test split), the judged set."""
    import random

    rng = random.Random(1)
    d = tmp_path_factory.mktemp("rloo_refs")
    with open(d / "test.jsonl", "w") as f:
        for i in range(6):
            post = " ".join(rng.choice(PROMPT_WORDS) for _ in range(4))
            ref = " ".join(rng.choice(PROMPT_WORDS) for _ in range(3))
            f.write(json.dumps({"id": f"r{i}", "prompt": f"POST: {post} TL;DR:", "completion": ref}) + "\n")
    return str(d)


def judged(c, refs_dir, **kw):
    return replace(c, eval_steps=2, judge_dataset_name=refs_dir, judge_dataset_test_split="test", judge_max_samples=0,
                   max_new_tokens=6, per_device_eval_batch_size=4, **kw)


def without_eval(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in records
            if not any(k.startswith("eval/") for k in r)]


def test_in_training_win_rate_equals_evaluate_judge_and_leaves_training_unchanged(base, tmp_path, refs_dir, tiny_reward_dir,
                                                                                  capsys):
    import evaluate_judge as ej
    from maxent_rlhf import plotting

    c = judged(replace(base, num_iterations=3, save_steps=2, output_dir=str(tmp_path / "run")), refs_dir,
               judge="reward-model", judge_reward_model_name_or_path=tiny_reward_dir)
    run = Path(train_rloo.main(c))
    out = capsys.readouterr().out
    records = read_metrics(run)
    evals = {r["step"]: r for r in records if "eval/win_rate" in r}
    assert sorted(evals) == [0, 2, 3]  # the initial policy, every eval_steps, the end
    assert "[train_rloo] summary" in out and "win rate: " in out and "verdict: " in out  # the closing story
    assert (run / plotting.RUN_FIGURE).read_bytes()[:4] == b"\x89PNG" and f"figure: {run / plotting.RUN_FIGURE}" in out
    for step in (2, 3):  # evaluate_judge.py on the checkpoint of that iteration, same prompts and judge
        s = ej.main(ej.EvalConfig(output_dir=str(tmp_path / f"ej{step}"), checkpoints=[str(run / "checkpoints" / f"step_{step:08d}")],
                                  dataset_name=refs_dir, dataset_test_split="test", n=0, judge="reward-model",
                                  reward_model_name_or_path=tiny_reward_dir, max_new_tokens=6, max_prompt_length=c.max_prompt_length,
                                  per_device_eval_batch_size=4, plot=False, mixed_precision=c.mixed_precision, seed=c.seed))
        row, m = s["checkpoints"][0], evals[step]
        assert m["eval/n"] == row["n"] == 6 and m["eval/invalid"] == row["invalid"]
        assert m["eval/win_rate"] == row["win_rate"]
        assert (m["eval/win_rate_ci_low"], m["eval/win_rate_ci_high"]) == (row["ci_low"], row["ci_high"])
        assert m["eval/policy_score"] == pytest.approx(row["mean_policy_score"], abs=1e-6)
    # a run killed after its iteration-2 checkpoint resumes: step 0 is not evaluated again, step 3 is, identically
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    shutil.rmtree(killed / "checkpoints" / "step_00000003")
    train_rloo.main(replace(c, output_dir=str(killed), resume="latest"))
    assert [r for r in read_metrics(killed) if "eval/win_rate" in r] == [r for r in records if "eval/win_rate" in r]
    # evaluating does not change training: the same run without a judge logs the same training numbers
    plain = Path(train_rloo.main(replace(c, judge=None, eval_steps=0, output_dir=str(tmp_path / "plain"))))
    assert without_eval(read_metrics(plain)) == without_eval(records)
    assert "win rate: no evaluation in this run" in capsys.readouterr().out


def test_judge_outage_is_logged_missing_and_training_goes_on(base, tmp_path, refs_dir, monkeypatch, capsys):
    from helpers.fake_openai_server import FakeJudgeServer
    from maxent_rlhf.story import run_story

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-rloo-outage")
    with FakeJudgeServer(marker="good", api_key="sk-test-rloo-outage", faults=lambda n, body: "503") as srv:
        c = judged(replace(base, num_iterations=3, output_dir=str(tmp_path / "run")), refs_dir, judge="openai",
                   judge_model="fake-judge", base_url=srv.base_url, max_retries=1, backoff_base=0.01, backoff_max=0.02,
                   request_timeout=2.0)
        run = Path(train_rloo.main(c))
    out = capsys.readouterr().out
    records = read_metrics(run)
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [0, 2, 3] and all(set(r) == {"step", "eval/missing"} for r in evals)
    assert srv.requests > 0 and [r["step"] for r in records if "objective/scores" in r] == [1, 2, 3]  # trained to the end
    assert "at most 18 requests" in out and out.count("at most 18 requests") == 1  # the cost guard, once: 3 x 6 examples
    assert run_story(records).missing_evaluations == 3 and "3 evaluation(s) failed" in out
