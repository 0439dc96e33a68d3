"""train_rloo.py on tiny local models: end to end (every regulariser, learning signal, KL anchoring, resume);
known answers for the iteration's steps, each alone on a hand-built `Rollout`, and every bad input; the
cheaper forwards (the shared prompt pass) against the plain ones.
"""
import json
import shutil
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_rloo
from maxent_rlhf import generation, objectives, rollout
from maxent_rlhf.checkpoints import list_checkpoints
from maxent_rlhf.config import ConfigError, parse_config
from maxent_rlhf.data import DataError, PromptStream, tokenize_prompts
from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model
from maxent_rlhf.runs import NonFiniteError, read_metrics
from helpers.resume import assert_same_checkpoint_weights, copy_killed_run

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2-core test machine: one torch thread

EVERY_METRIC = [
    "objective/scores", "objective/rlhf_reward", "objective/non_score_reward", "objective/entropy_bonus",
    "objective/entropy", "objective/entropy_per_token", "objective/kl_ref", "objective/kl_ref_k3",
    "objective/kl_prev", "objective/kl_prev_k3", "objective/kl_prev_reverse", "objective/kl_prev_reverse_k3",
    "objective/kl_prev_ess", "policy/entropy",
    "policy/clipfrac", "policy/approxkl", "val/ratio", "response/length", "response/eos_fraction",
    "time/generate", "time/score", "time/update", "perf/episodes_per_s", "perf/tokens_per_s",
]
PROMPT_WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it".split()






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
    killed = copy_killed_run(full, tmp_path / "killed", checkpoint_step=2, logged_lines=3)  # step 3 logged, then the kill
    resumed = Path(train_rloo.main(replace(c, output_dir=str(killed), resume="latest")))
    assert_same_checkpoint_weights(full, resumed, step=4)
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


# ==================================================================================================
# train_rloo.py: known answers for the iteration's steps, each alone on a hand-built `Rollout`, and every bad input.
# ==================================================================================================
EOS, PAD = 0, 1


# ------------------------------------------------------------------ step 1 + 2: EOS truncation and penalty
def test_step1_truncates_after_first_eos_keeps_it_and_step2_penalises_missing_eos():
    raw = torch.tensor([
        [5, 6, EOS, 7, EOS],  # EOS in the middle: keep it, pad the rest
        [EOS, 5, 6, 7, 8],  # EOS first: a one-token response
        [5, 6, 7, 8, 9],  # never emits EOS: kept whole, penalised
        [5, 6, 7, 8, EOS],  # EOS as the very last sampled token
    ])
    responses, mask, has_eos = generation.truncate_after_eos(raw, EOS, PAD)
    assert responses.tolist() == [[5, 6, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 6, 7, 8, 9], [5, 6, 7, 8, EOS]]
    assert mask.sum(1).tolist() == [3, 1, 5, 5]
    assert has_eos.tolist() == [True, True, False, True]
    scores = objectives.missing_eos_penalty(torch.tensor([0.5, 1.0, 2.0, -1.0]), has_eos, penalty=1.5)
    assert scores.tolist() == [0.5, 1.0, 0.5, -1.0]


def test_step2_reward_is_read_at_last_real_token_and_retokenising_same_vocab_changes_nothing(tiny_tokenizer, tiny_reward_dir):
    from maxent_rlhf.models import load_reward_model

    rm = load_reward_model(tiny_reward_dir).eval()
    tok = tiny_tokenizer
    q_ids, q_mask = generation.left_pad([tok("POST: my cat TL;DR:")["input_ids"], tok("TL;DR:")["input_ids"]], tok.pad_token_id)
    raw = torch.tensor([[tok.convert_tokens_to_ids("cat"), tok.eos_token_id, 5], [6, 7, 8]])
    resp, r_mask, has_eos = generation.truncate_after_eos(raw, tok.eos_token_id, tok.pad_token_id)
    direct = generation.reward_model_scores(rm, torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask], 1))
    ids, mask = rollout.retokenize_for_reward(tok, tok, q_ids, q_mask, resp, r_mask, has_eos)
    assert torch.allclose(direct, generation.reward_model_scores(rm, ids, mask), atol=1e-5)
    # the score of row 0 is the reward model read at its EOS: the same as scoring the unpadded sequence alone
    alone = torch.tensor([tok("POST: my cat TL;DR: cat")["input_ids"] + [tok.eos_token_id]])
    assert torch.allclose(direct[0], generation.reward_model_scores(rm, alone, torch.ones_like(alone))[0], atol=1e-5)


# ------------------------------------------------------------------ the steps alone, on a hand-built Rollout
@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def hand_rollout(tok, k=2):
    """Two prompts x k = 2 (rows p * k + j); row 1 never emits EOS, row 2 emits it first."""
    q_ids, q_mask = generation.left_pad([tok("POST: my cat TL;DR:")["input_ids"], tok("TL;DR:")["input_ids"]], tok.pad_token_id)
    w = tok.convert_tokens_to_ids
    raw = torch.tensor([[w("cat"), w("sat"), tok.eos_token_id], [w("dog"), w("ran"), w("far")],
                        [tok.eos_token_id, w("cat"), w("cat")], [w("happy"), tok.eos_token_id, w("sad")]])
    responses, mask, has_eos = generation.truncate_after_eos(raw, tok.eos_token_id, tok.pad_token_id)
    return rollout.Rollout(q_ids.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0), responses, mask, has_eos)


def test_step2_score_reads_the_reward_model_or_reward_fn_and_subtracts_the_missing_eos_penalty(
        accelerator, tiny_tokenizer, tiny_reward_dir):
    from maxent_rlhf.models import load_reward_model

    tok, rm = tiny_tokenizer, load_reward_model(tiny_reward_dir).eval()
    ro = hand_rollout(tok)
    assert ro.contains_eos.tolist() == [True, False, True, True]
    c = train_rloo.RLOOConfig(missing_eos_penalty=1.5, local_rollout_forward_batch_size=3)  # chunks of 3 + 1 rows
    m = rollout.Models(accelerator, tok, policy=None, reward_model=rm, reward_tokenizer=tok)
    raw = generation.reward_model_scores(rm, ro.query_responses, ro.attention_mask)
    completions, scores = rollout.score(c, m, ro)
    assert torch.allclose(scores, raw - torch.tensor([0.0, 1.5, 0.0, 0.0]), atol=1e-5)
    assert completions == ["cat sat", "dog ran far", "", "happy"]  # decoded, EOS and padding dropped
    assert ro.completions == [] and ro.scores is None  # the step returns its values; the caller assigns them
    m.retokenize = True  # the text route gives the same scores when the vocabularies agree
    assert torch.allclose(rollout.score(c, m, ro)[1], raw - torch.tensor([0.0, 1.5, 0.0, 0.0]), atol=1e-5)
    seen = {}

    def reward_fn(prompts, completions, response_ids, response_mask):
        seen["prompts"] = prompts
        return [float(len(x.split())) for x in completions]

    m = rollout.Models(accelerator, tok, policy=None, reward_fn=reward_fn)
    assert rollout.score(c, m, ro)[1].tolist() == [2.0, 3.0 - 1.5, 0.0, 1.0]
    assert seen["prompts"] == ["POST: my cat TL;DR:"] * 2 + ["TL;DR:"] * 2  # left padding dropped
    m.reward_fn = lambda **kw: [1.0, 2.0]
    with pytest.raises(ValueError, match="returned 2 scores for 4 completions"):
        rollout.score(c, m, ro)


def test_steps4_and_5_regularised_reward_and_advantages_on_a_hand_built_rollout(tiny_tokenizer):
    ro = hand_rollout(tiny_tokenizer)
    ro.scores = torch.tensor([1.0, 0.0, 2.0, 4.0])
    ro.old_logprobs = -torch.tensor([[1.0, 2.0, 1.0], [0.5, 0.5, 0.5], [3.0, 9.0, 9.0], [1.0, 1.0, 7.0]])
    ro.ref_logprobs = ro.old_logprobs - torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # real tokens: 3, 3, 1 (EOS first), 2 -> -log pi(y|x) = 4, 1.5, 3, 2; the padded positions must not count
    c = train_rloo.RLOOConfig(regularizer="entropy", entropy_coef=0.5, length_normalize=True, rloo_k=2)
    reg = train_rloo.regularised_reward(c, ro)
    bonus = 0.5 * torch.tensor([4 / 3, 1.5 / 3, 3.0, 1.0])  # Eq. 7: alpha * (-log pi) / |y|
    assert torch.allclose(reg.non_score_reward, bonus) and torch.allclose(reg.rewards, ro.scores + bonus)
    c = train_rloo.RLOOConfig(regularizer="kl", kl_coef=0.2, rloo_k=2)
    reg = train_rloo.regularised_reward(c, ro)
    kl = torch.tensor([0.5, 0.5, 1.0, 0.0])  # sum_t (log pi - log pi_ref) over real tokens
    assert torch.allclose(reg.rewards, ro.scores - 0.2 * kl)
    adv = train_rloo.rloo_row_advantages(reg.rewards, c.rloo_k)  # k = 2: A_i = r_i - r_other
    r = ro.scores - 0.2 * kl
    assert torch.allclose(adv, torch.stack([r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]]))


def test_iteration_metrics_of_a_filled_rollout(tiny_tokenizer):
    ro = hand_rollout(tiny_tokenizer)
    g = torch.Generator().manual_seed(1)
    ro.scores, ro.rewards, ro.non_score_reward = torch.tensor([1.0, 0.0, 2.0, 4.0]), torch.tensor([1.5, 0.5, 2.5, 4.5]), torch.full((4,), 0.5)
    ro.old_logprobs = -torch.rand(4, 3, generator=g)
    ro.new_logprobs = ro.old_logprobs + 0.2 * torch.randn(4, 3, generator=g)
    ro.token_entropy, ro.advantages = torch.rand(4, 3, generator=g), torch.tensor([1.0, -1.0, -2.0, 2.0])
    stats = {k: [torch.tensor(1.0), torch.tensor(3.0)] for k in ("clipfrac", "approxkl", "ratio", "loss")}
    stats.update(grad_norm=[], lr=1e-3)
    c = train_rloo.RLOOConfig(regularizer="entropy", kl_ref_every=0, global_batch_size=4, rloo_k=2)
    m = train_rloo.iteration_metrics(c, ro, stats)
    assert m["objective/scores"] == pytest.approx(1.75) and m["objective/entropy_bonus"] == pytest.approx(0.5)
    assert "objective/kl_ref" not in m and "objective/kl_ref_k3" not in m  # no reference log-probs this iteration
    assert m["objective/kl_ref_every"] == 0 and "train/grad_norm" not in m and m["policy/clipfrac"] == 2.0
    for key, value in rollout.kl_prev_metrics(ro.old_logprobs, ro.new_logprobs, ro.response_mask).items():
        assert m[key] == value
    assert m["objective/entropy"] == pytest.approx(float(-(ro.old_logprobs * ro.response_mask).sum(1).mean()))
    assert m["response/length"] == (3 + 3 + 1 + 2) / 4 and m["response/eos_fraction"] == 0.75
    tokens = ro.response_mask.bool()
    assert m["policy/entropy"] == pytest.approx(float(ro.token_entropy[tokens].mean()))  # a token mean, not a sequence mean


@pytest.mark.parametrize("kw, load, at", [
    (dict(regularizer="kl", kl_ref_every=0), True, [1, 2, 3]),  # the kl reward needs pi_ref every iteration
    (dict(regularizer="entropy", kl_ref_every=0), False, []),
    (dict(regularizer="none", kl_ref_every=2), True, [2]),
    (dict(regularizer="entropy", kl_ref_every=1), True, [1, 2, 3]),
])
def test_the_reference_model_is_needed_where_one_method_says(kw, load, at, accelerator, tiny_policy_dir):
    c = train_rloo.RLOOConfig(model_name_or_path=tiny_policy_dir, **kw)
    assert c.needs_ref() == load and [it for it in (1, 2, 3) if c.needs_ref(it)] == at
    m = rollout.load_models(c, accelerator, reward_fn=lambda **kw: [])
    assert (m.ref_policy is not None) == load and m.reward_model is None


def test_step6_update_moves_the_policy_towards_positive_advantages(accelerator, tiny_tokenizer, tiny_policy_dir):
    from maxent_rlhf.schedules import build_lr_scheduler

    torch.manual_seed(0)
    c = train_rloo.RLOOConfig(model_name_or_path=tiny_policy_dir, regularizer="none", kl_ref_every=0, rloo_k=2,
                              global_batch_size=4, num_mini_batches=2, per_device_train_batch_size=1, num_ppo_epochs=2,
                              learning_rate=3e-3, temperature=0.7)
    plan = train_rloo._batch_plan(c, num_processes=1)
    assert (plan.mini_local, plan.grad_accum) == (2, 2)
    m = rollout.load_models(c, accelerator, reward_fn=lambda **kw: [])
    ro = hand_rollout(tiny_tokenizer)
    ro.old_logprobs = rollout.policy_logprobs(c, m, ro, m.policy, share=1)
    ro.advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    opt = torch.optim.AdamW(m.policy.parameters(), lr=c.learning_rate)
    sched = build_lr_scheduler(opt, "linear", 4, 0.0)
    losses = []
    stats, used = train_rloo.update(c, m, plan, ro, opt, sched, check=lambda name, v: losses.append(float(v.detach())))
    assert used.old_logprobs is ro.old_logprobs and used.advantages is ro.advantages  # given: used as they are
    # 2 epochs x 2 mini-batches x 2 micro-batches; every micro-batch loss is checked; one scheduler step
    assert len(stats["loss"]) == len(losses) == 8 and len(stats["grad_norm"]) == 4
    assert stats["lr"] == c.learning_rate and sched.get_last_lr()[0] == pytest.approx(c.learning_rate * 3 / 4)
    new = rollout.policy_logprobs(c, m, ro, m.policy, share=1)
    delta = objectives.masked_sum(new - ro.old_logprobs, ro.response_mask)
    assert (delta * ro.advantages > 0).all(), delta  # log pi(y|x) up where A > 0, down where A < 0


# ------------------------------------------------------------------ step 3: temperature-scaled log-probs
class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a fixed function of position: logits[t] = table[t]."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, logits_to_keep=0, **kw):
        b, t = input_ids.shape
        logits = self.table[:t].expand(b, t, -1)
        if isinstance(logits_to_keep, torch.Tensor):  # HF semantics: positions to keep
            return SimpleNamespace(logits=logits[:, logits_to_keep])
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_step3_logprobs_are_of_logits_over_temperature_at_the_response_positions():
    torch.manual_seed(0)
    table = torch.randn(6, 5)
    qr = torch.tensor([[PAD, 3, 4, 2, EOS, PAD]])  # context 3 (one left pad), response [2, EOS, PAD]
    mask = torch.tensor([[0, 1, 1, 1, 1, 0]])
    lp, ent = generation.response_logprobs(FixedLogits(table), qr, mask, context_length=3, temperature=0.7, return_entropy=True)
    expected = torch.log_softmax(table / 0.7, -1)
    # the logits at position t predict token t + 1
    assert torch.allclose(lp[0], torch.stack([expected[2, 2], expected[3, EOS], expected[4, PAD]]), atol=1e-6)
    p = torch.softmax(table / 0.7, -1)
    assert torch.allclose(ent[0], -(p * p.log()).sum(-1)[2:5], atol=1e-5)


# ------------------------------------------------------------------ step 4: regularised reward per regulariser
LOGP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
REF = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -0.5, 0.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])  # sequence 0 has 2 real tokens: its third token is padding
SCORES = torch.tensor([1.0, 2.0])


@pytest.mark.parametrize(
    "kw, expected_non_score",
    [
        (dict(regularizer="kl", kl_coef=0.5), [-0.5 * (0.5 - 1.0), -0.5 * (0.5 + 0.0 + 0.0)]),
        (dict(regularizer="entropy", entropy_coef=0.1), [0.3, 0.1]),  # -alpha * log pi(y|x), Eq. 6
        (dict(regularizer="entropy", entropy_coef=0.1, length_normalize=True), [0.15, 0.1 / 3]),  # Eq. 7
        (dict(regularizer="entropy", entropy_coef=-0.1, length_normalize=True), [-0.15, -0.1 / 3]),  # minimum entropy
        (dict(regularizer="entropy", entropy_coef=-0.1), [-0.3, -0.1]),  # a negative alpha is the same variant
        (dict(regularizer="none", kl_coef=0.5, entropy_coef=0.1), [0.0, 0.0]),
    ],
)
def test_step4_regularised_reward_known_answers(kw, expected_non_score):
    c = train_rloo.RLOOConfig(**kw)
    reg = objectives.regularized_reward(SCORES, LOGP, MASK, c.regularizer, train_rloo._regularizer_coef(c),
                                        ref_logprobs=REF, length_normalize=c.length_normalize)
    assert torch.allclose(reg.non_score_reward, torch.tensor(expected_non_score), atol=1e-6)
    assert torch.allclose(reg.rewards, SCORES + torch.tensor(expected_non_score), atol=1e-6)


# ------------------------------------------------------------------ metrics: KL between consecutive policies, entropy
def test_kl_prev_metrics_are_the_objectives_estimators_in_both_directions_with_a_global_ess():
    old, new = LOGP, REF  # samples from pi_old; log-probs before and after an update
    m = rollout.kl_prev_metrics(old, new, MASK)
    # by hand: log w = sum_t (new - old) over real tokens = [0.5, -0.5]
    log_w = torch.tensor([0.5, -0.5], dtype=torch.float64)
    w = log_w.exp()
    assert m["objective/kl_prev"] == pytest.approx(float((w * log_w).mean()), rel=1e-6)  # KL(pi_t || pi_{t-1})
    assert m["objective/kl_prev_k3"] == pytest.approx(float((w * log_w - w + 1).mean()), rel=1e-6)
    assert m["objective/kl_prev_reverse"] == pytest.approx(0.0, abs=1e-7)  # mean of sum_t (old - new) = [-0.5, 0.5]
    k3 = lambda d: d.exp() - 1 - d  # noqa: E731  (k3 of log(pi_new / pi_old) per token, sampled from pi_old)
    assert m["objective/kl_prev_reverse_k3"] == pytest.approx(float(objectives.masked_sum(k3(new - old), MASK).mean()), rel=1e-6)
    assert m["objective/kl_prev_ess"] == pytest.approx(float(w.sum() ** 2 / (2 * (w ** 2).sum())), rel=1e-6)
    # on a random padded batch the metric step is exactly the objectives functions' batch mean
    g = torch.Generator().manual_seed(0)
    old = torch.log_softmax(torch.randn(6, 5, 7, generator=g), -1)[..., 0]
    new = old + 0.3 * torch.randn(6, 5, generator=g)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).long()
    m = rollout.kl_prev_metrics(old, new, mask)
    for key, fn in (("objective/kl_prev", objectives.kl_new_old_from_old_samples),
                    ("objective/kl_prev_reverse", objectives.kl_old_new_from_old_samples)):
        for suffix, est in (("", "k1"), ("_k3", "k3")):
            assert m[key + suffix] == float(fn(old, new, mask, est).mean())
    assert m["objective/kl_prev"] != pytest.approx(m["objective/kl_prev_reverse"], rel=1e-3)  # the directions differ
    # `gather` sees the per-sequence log weights: the ESS is of the global batch, not a mean over processes
    seen = []
    rollout.kl_prev_metrics(old, new, mask, gather=lambda x: seen.append(x) or x)
    log_w = objectives.masked_sum(new.double() - old.double(), mask)
    assert any(t.shape == log_w.shape and torch.equal(t, log_w) for t in seen)
    assert m["objective/kl_prev_ess"] == pytest.approx(float(objectives.effective_sample_fraction(log_w)))


def test_entropy_metrics_on_a_hand_built_padded_batch():
    # -log pi(y|x) over real tokens: sequence 0 = 1 + 2 (its third token is padding), sequence 1 = 0.5 + 0.5 + 0
    m = rollout.entropy_metrics(LOGP, MASK)
    assert m["objective/entropy"] == pytest.approx((3.0 + 1.0) / 2)
    assert m["objective/entropy_per_token"] == pytest.approx((3.0 / 2 + 1.0 / 3) / 2)


# ------------------------------------------------------------------ step 5: advantages in the script's row layout
def test_step5_leave_one_out_advantages_follow_the_row_layout():
    # 2 prompts x k = 3: rows 0-2 belong to prompt 0, rows 3-5 to prompt 1 (row p * k + j)
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 60.0])
    adv = train_rloo.rloo_row_advantages(rewards, k=3)
    assert torch.allclose(adv, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 40.0, 20 - 35.0, 60 - 15.0]))
    w = train_rloo.rloo_row_advantages(rewards, k=3, whiten=True)
    assert abs(float(w.mean())) < 1e-6 and abs(float(w.std(unbiased=False)) - 1) < 1e-4
    with pytest.raises(ValueError, match="whole groups"):
        train_rloo.rloo_row_advantages(rewards[:5], k=3)


def test_prompt_tokenisation_cuts_from_the_left_and_counts(tiny_tokenizer):
    ids, cut = tokenize_prompts(tiny_tokenizer, ["my cat sat on the mat TL;DR:", "TL;DR:"], max_len=3)
    assert cut == 1
    assert tiny_tokenizer.decode(ids[0]) == "the mat TL;DR:" and tiny_tokenizer.decode(ids[1]) == "TL;DR:"
    with pytest.raises(DataError, match="tokenises to nothing"):
        tokenize_prompts(tiny_tokenizer, [""], max_len=3)


def test_prompt_stream_is_seeded_and_resumable():
    a = PromptStream(10, 4, seed=3)
    first = [a.next() for _ in range(3)]  # 10 // 4: the third batch starts epoch 1
    assert a.epoch == 1 and sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))
    b = PromptStream(10, 4, seed=3)
    b.next()
    c = PromptStream(10, 4, seed=3)
    c.load(b.state())
    assert [c.next(), c.next()] == first[1:]


# ------------------------------------------------------------------ bad input
def test_batch_plan_per_process_sizes_and_errors():
    c = train_rloo.RLOOConfig(global_batch_size=64, rloo_k=4, num_mini_batches=2, per_device_train_batch_size=8)
    p = train_rloo._batch_plan(c, num_processes=2)
    assert (p.prompts_global, p.prompts_local, p.rows_local, p.mini_local, p.grad_accum) == (16, 8, 32, 16, 2)
    with pytest.raises(ConfigError, match="rloo_k"):
        train_rloo._batch_plan(replace(c, rloo_k=1), 1)
    with pytest.raises(ConfigError, match=r"multiple of num_processes x rloo_k = 3 x 4 = 12"):
        train_rloo._batch_plan(c, 3)
    with pytest.raises(ConfigError, match=r"multiple of num_processes x rloo_k = 1 x 3"):
        train_rloo._batch_plan(replace(c, rloo_k=3), 1)
    with pytest.raises(ConfigError, match="num_mini_batches"):
        train_rloo._batch_plan(replace(c, num_mini_batches=3), 1)
    with pytest.raises(ConfigError, match="`per_device_train_batch_size` = 5 does not divide"):
        train_rloo._batch_plan(replace(c, per_device_train_batch_size=5), 2)
    with pytest.raises(ConfigError, match="less than one batch"):
        train_rloo._batch_plan(replace(c, total_episodes=10), 1)


@pytest.fixture
def ok(tiny_policy_dir, tiny_reward_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"POST: {w} TL;DR:"}) + "\n" for w in ["cat", "dog", "mat", "home"]))
    return train_rloo.RLOOConfig(model_name_or_path=tiny_policy_dir, reward_model_name_or_path=tiny_reward_dir,
                                 dataset_name=str(data), global_batch_size=4, rloo_k=2, per_device_train_batch_size=4,
                                 num_iterations=1, response_length=4, max_prompt_length=16, report_to="none", output_dir=str(tmp_path / "run"))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(rloo_k=1), ConfigError, "at least 2 completions"),
        (dict(global_batch_size=6, rloo_k=4), ConfigError, "multiple of num_processes x rloo_k"),
        (dict(kl_ref_every=-1), ConfigError, "`kl_ref_every` = -1"),
        (dict(kl_prev_per_prompt=3), ConfigError, "`kl_prev_per_prompt` = 3 must be in 0..rloo_k = 2"),
        (dict(local_rollout_forward_batch_size=0), ConfigError, "`local_rollout_forward_batch_size` = 0"),
        (dict(regularizer="none", reward_model_name_or_path=None), ConfigError, "nothing to score"),
        (dict(reward_fn="no_such_module_xyz:f"), ConfigError, "cannot be imported"),
        (dict(reward_fn="json"), ConfigError, "package.module:function"),
        (dict(temperature=0.0), ConfigError, "temperature"),
        (dict(response_length=0), ConfigError, "response_length"),
        (dict(global_batch_size=16, rloo_k=2), DataError, "4 rows, fewer than the 8 prompts"),
        (dict(prompt_column="query"), DataError, r"missing column\(s\) \['query'\]"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(ok, overrides, error, match):
    with pytest.raises(error, match=match):
        train_rloo.main(replace(ok, **overrides))


def test_reward_model_must_be_a_one_label_classifier(ok, tiny_tokenizer, tmp_path):
    from transformers import GPTNeoXForSequenceClassification

    from maxent_rlhf.models import tiny_gpt_neox_config

    two = tmp_path / "two_label"
    GPTNeoXForSequenceClassification(tiny_gpt_neox_config(len(tiny_tokenizer), num_labels=2)).save_pretrained(two)
    tiny_tokenizer.save_pretrained(two)
    with pytest.raises(ValueError, match="num_labels = 2"):
        train_rloo.main(replace(ok, reward_model_name_or_path=str(two)))


# ------------------------------------------------------------------ configs
CONFIGS = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))
RLOO_CONFIGS = [p for p in CONFIGS if p.name.split("_")[0] in ("kl", "maxent", "minent")]


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in fields(train_rloo.RLOOConfig))


def test_paper_configs_exist():
    names = {p.stem for p in RLOO_CONFIGS}
    assert {"maxent_1b", "maxent_2p8b", "maxent_6p9b", "kl_1b", "kl_2p8b", "kl_6p9b", "minent_1b", "minent_2p8b"} <= names


@pytest.mark.parametrize("path", RLOO_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_parse_and_match_the_paper(path):
    c = parse_config(train_rloo.RLOOConfig, ["--config", str(path)])
    size = path.stem.split("_")[1].replace("p", ".")
    assert size in c.model_name_or_path and size in c.reward_model_name_or_path
    assert (c.rloo_k, c.response_length, c.temperature, c.missing_eos_penalty) == (2, 53, 0.7, 1.0)
    train_rloo._batch_plan(c, 8)  # the published recipe: 8 GPUs
    if path.stem.startswith("kl"):
        assert (c.regularizer, c.kl_coef, c.learning_rate) == ("kl", 0.05, 1e-6)
    else:
        assert c.regularizer == "entropy" and c.length_normalize
        assert (train_rloo._regularizer_coef(c) < 0) == path.stem.startswith("minent")
    if path.stem.startswith("maxent"):
        assert c.learning_rate == 1e-7


# ------------------------------------------------------------------ speed paths: same metrics as the plain ones
def steps_2_to_8(c, accelerator, policy_dir, reward_dir, ro):
    """Score, learn (steps 3-6, fused or not), kl_prev and the metrics, from freshly loaded models."""
    from maxent_rlhf.schedules import build_lr_scheduler

    c = replace(c, model_name_or_path=policy_dir, reward_model_name_or_path=reward_dir)
    m = rollout.load_models(c, accelerator, reward_fn=None)
    plan = train_rloo._batch_plan(c, num_processes=1)
    opt = torch.optim.AdamW(m.policy.parameters(), lr=c.learning_rate)
    sched = build_lr_scheduler(opt, "linear", 4, 0.0)
    m.sharing = train_rloo.prompt_sharing(c, m, plan)
    torch.manual_seed(0)  # the same mini-batch shuffles in the runs a test compares
    ro.completions, ro.scores = rollout.score(c, m, ro)
    stats = train_rloo.learn(c, m, plan, ro, opt, sched, needs_ref=True, timings={})
    ro.kl_prev_rows, ro.new_logprobs = rollout.kl_prev_logprobs(c, m, ro)
    return train_rloo.iteration_metrics(c, ro, stats), [p.detach().clone() for p in m.policy.parameters()]


def assert_same_run(a, b, weights_atol=1e-6):
    (metrics_a, weights_a), (metrics_b, weights_b) = a, b
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5, abs=1e-6), key
    for wa, wb in zip(weights_a, weights_b, strict=True):
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=weights_atol)


# shared_prefix off: these compare one speed path at a time (the shared prompt pass: further below)
FUSABLE = dict(rloo_k=2, global_batch_size=4, num_mini_batches=1, per_device_train_batch_size=2, num_ppo_epochs=1,
               learning_rate=3e-3, temperature=0.7, kl_ref_every=1, shared_prefix=False)


@pytest.mark.parametrize("kw", [dict(regularizer="kl", kl_coef=0.5),
                                dict(regularizer="entropy", entropy_coef=0.3, length_normalize=True)])
def test_update_with_old_logprobs_from_its_own_forward_equals_a_separate_old_logprob_pass(
        kw, accelerator, tiny_tokenizer, tiny_policy_dir, tiny_reward_dir):
    c = train_rloo.RLOOConfig(**FUSABLE, **kw)
    assert train_rloo.can_fuse(c) and not train_rloo.can_fuse(replace(c, fused_old_logprobs=False))
    assert not train_rloo.can_fuse(replace(c, num_ppo_epochs=2)) and not train_rloo.can_fuse(replace(c, whiten_advantages=True))
    fused = steps_2_to_8(c, accelerator, tiny_policy_dir, tiny_reward_dir, hand_rollout(tiny_tokenizer))
    plain = steps_2_to_8(replace(c, fused_old_logprobs=False), accelerator, tiny_policy_dir, tiny_reward_dir,
                         hand_rollout(tiny_tokenizer))
    assert fused[0]["objective/kl_prev_reverse"] > 1e-4  # the update moved the policy: a real comparison
    assert_same_run(plain, fused)


def test_cutting_the_pad_tail_changes_no_metric(accelerator, tiny_tokenizer, tiny_policy_dir, tiny_reward_dir):
    base = hand_rollout(tiny_tokenizer)
    pad = torch.full((len(base), 3), tiny_tokenizer.pad_token_id)
    padded = rollout.Rollout(base.query_ids, base.query_mask, torch.cat([base.responses, pad], 1),
                                torch.cat([base.response_mask, torch.zeros_like(pad)], 1), base.contains_eos)
    cut_ids, cut_mask = rollout.cut_to_longest(padded.responses, padded.response_mask)
    assert cut_ids.shape[1] == int(base.response_mask.sum(1).max()) == 3
    cut = rollout.Rollout(base.query_ids, base.query_mask, cut_ids, cut_mask, base.contains_eos)
    c = train_rloo.RLOOConfig(**dict(FUSABLE, num_ppo_epochs=2, per_device_train_batch_size=1), regularizer="kl")
    # other tensor shapes, other float rounding: Adam divides by |g|, so a parameter with a near-zero gradient
    # moves by up to lr (3e-3) whatever its size, and two steps of rounding-level gradient differences show
    # in the weights at ~1e-5 (every metric still agrees to 1e-5)
    assert_same_run(steps_2_to_8(c, accelerator, tiny_policy_dir, tiny_reward_dir, padded),
                    steps_2_to_8(c, accelerator, tiny_policy_dir, tiny_reward_dir, cut), weights_atol=2e-5)


def test_rollout_args_mix_into_another_online_config_with_their_checks_and_defaults():
    """A second online trainer's config (RolloutArgs next to TrainConfig, without RLOO's fields) gets the
    rollout's fields with RLOO's defaults, its range checks chained after TrainConfig's, and a reference
    used every iteration unless it overrides `needs_ref` (RLOOConfig does: kl_ref_every)."""
    from dataclasses import dataclass

    from maxent_rlhf.config import TrainConfig

    @dataclass
    class OnlineConfig(rollout.RolloutArgs, TrainConfig):
        pass

    c = OnlineConfig()
    rloo = train_rloo.RLOOConfig()
    for f in fields(rollout.RolloutArgs):
        assert getattr(c, f.name) == getattr(rloo, f.name), f.name
    assert not hasattr(c, "kl_ref_every") and not hasattr(c, "num_ppo_epochs")
    assert c.needs_ref() and c.needs_ref(3)
    assert not train_rloo.RLOOConfig(regularizer="none", kl_ref_every=0).needs_ref()
    with pytest.raises(ConfigError, match="`temperature` = 0"):
        OnlineConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="`kl_prev_per_prompt` = 5 must be in 0..rloo_k = 4"):
        OnlineConfig(rloo_k=4, kl_prev_per_prompt=5)
    with pytest.raises(ConfigError, match="`learning_rate`"):  # TrainConfig's checks still run
        OnlineConfig(learning_rate=-1.0)


# ==================================================================================================
# The cheaper forwards of train_rloo.py. The shared prompt pass in its row layout (completion j of prompt p
# at row p * k + j, the "grouped" layout of generation.shared_prefix_*): each prompt runs once, its KV cache
# is repeated k times. Checked against the plain forwards: same log-probs, entropies, gradients, reward
# scores and samples, and a whole fused RLOO iteration with it equals one without. The run decides shared
# or plain once (`train_rloo.prompt_sharing` on `rollout.prompt_sharing`); a forward asked to share where
# it cannot raises instead of running plain. The "tiled" layout (train_offline.py) is tested in
# test_train_offline.py. And `kl_prev_per_prompt`: step 7 on a subset of each prompt's completions
# gives exactly the full-batch estimators restricted to those rows.
# ==================================================================================================
def grouped_rows(tok, k: int, seed: int, prompts: int = 5):
    """`prompts` prompts of 1..12 tokens (one without left padding), each repeated k times (row p * k + j),
    and k different responses each of 1..8 real tokens, cut after the first EOS, right-padded."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    lengths = torch.randint(1, 12, (prompts,), generator=g).tolist()
    lengths[0] = 12
    q_ids, q_mask = generation.left_pad([torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths],
                                        tok.pad_token_id)
    raw = torch.randint(3, vocab, (prompts * k, 8), generator=g)
    eos_at = torch.randint(0, 10, (prompts * k,), generator=g)  # >= 8: never emits EOS
    eos_at[1] = 0  # a one-token response (just EOS)
    raw[eos_at < 8, eos_at[eos_at < 8]] = tok.eos_token_id
    responses, mask, _ = generation.truncate_after_eos(raw, tok.eos_token_id, tok.pad_token_id)
    ids = torch.cat([q_ids.repeat_interleave(k, 0), responses], 1)
    return ids, torch.cat([q_mask.repeat_interleave(k, 0), mask], 1), q_ids.shape[1]


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (4, 2)])
def test_grouped_logprobs_entropy_and_gradients_equal_the_plain_forward(tiny_tokenizer, k, seed):
    model = build_tiny_policy(tiny_tokenizer, seed=seed)
    ids, mask, ctx = grouped_rows(tiny_tokenizer, k, seed)
    assert generation.shared_prefix_usable(model, ids, mask, ctx, k)
    results = []
    for share in (k, 1):
        model.zero_grad(set_to_none=True)
        lp, ent = generation.response_logprobs(model, ids, mask, ctx, temperature=0.7, return_entropy=True,
                                               shared_prefix_k=share)
        seq = objectives.masked_sum(lp, mask[:, ctx:])
        (seq * torch.linspace(0.5, 1.5, seq.numel())).sum().backward()  # weighted: rows differ
        results.append((lp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (s_lp, s_ent, s_grad), (p_lp, p_ent, p_grad) = results
    real = mask[:, ctx:].bool()
    torch.testing.assert_close(s_lp[real], p_lp[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(s_ent[real], p_ent[real], rtol=0, atol=1e-5)
    for gs, gp in zip(s_grad, p_grad, strict=True):
        torch.testing.assert_close(gs, gp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [2, 4])
def test_grouped_reward_scores_equal_the_plain_ones(tiny_tokenizer, k):
    rm = build_tiny_reward_model(tiny_tokenizer, seed=3).eval()
    ids, mask, ctx = grouped_rows(tiny_tokenizer, k, seed=k)
    plain = generation.reward_model_scores(rm, ids, mask)
    shared = generation.reward_model_scores(rm, ids, mask, ctx, shared_prefix_k=k)
    assert plain.std() > 1e-3  # scores differ between rows: a real comparison
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    # a row without any response token cannot be read in the continuation: refused, not scored plainly
    empty = mask.clone()
    empty[0, ctx:] = 0
    with pytest.raises(ValueError, match="no response token"):
        generation.reward_model_scores(rm, ids, empty, ctx, shared_prefix_k=k)


def test_sample_with_a_shared_prefill_draws_the_same_tokens(tiny_tokenizer):
    k, tok = 4, tiny_tokenizer
    model = build_tiny_policy(tok, seed=0).eval()
    ids, mask, ctx = grouped_rows(tok, k, seed=5, prompts=6)
    q, q_mask = ids[:, :ctx], mask[:, :ctx]
    shapes = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    out = {}
    for share in (1, k):
        shapes.clear()
        torch.manual_seed(11)
        out[share] = generation.sample(model, q, q_mask, 10, tok.eos_token_id, tok.pad_token_id, temperature=0.9,
                                       shared_prefix_k=share)
        out[share, "calls"] = shapes[:2]
    # the shared prefill ran each prompt once and decoding went on from its repeated cache (no plain re-prefill)
    assert out[1, "calls"] == [(24, ctx), (24, 1)] and out[k, "calls"] == [(6, ctx), (24, 1)]
    assert torch.equal(out[k], out[1])
    assert len({tuple(r) for r in out[1].tolist()}) > 12  # the k samples of a prompt differ: real sampling


def test_usable_only_where_rows_repeat_their_prompt(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    ids, mask, ctx = grouped_rows(tiny_tokenizer, 2, seed=0)
    assert generation.shared_prefix_usable(model, ids, mask, ctx, 2)
    assert not generation.shared_prefix_usable(model, ids, mask, ctx, 1)  # nothing to share
    assert not generation.shared_prefix_usable(model, ids[:-1], mask[:-1], ctx, 2)  # a group cut in two
    assert not generation.shared_prefix_usable(model, ids, mask, ctx, 2, layout="tiled")  # rows grouped, not tiled
    other = ids.clone()
    other[3, ctx - 1] = other[2, ctx - 1] + 1  # row 3 no longer repeats row 2's prompt
    assert not generation.shared_prefix_usable(model, other, mask, ctx, 2)
    assert generation.shared_prefix_supported(model)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert not generation.shared_prefix_supported(model)  # HF drops the KV cache then
    assert not generation.shared_prefix_usable(model, ids, mask, ctx, 2)


def test_a_forward_asked_to_share_where_it_cannot_raises(tiny_tokenizer):
    """No quiet plain pass: a shared pass asked for rows that do not repeat their prompt, a model that cannot
    share, or a sharded sampler raises (the run decided once, so such a call is a bug)."""
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    rm = build_tiny_reward_model(tiny_tokenizer, seed=3)
    ids, mask, ctx = grouped_rows(tiny_tokenizer, 2, seed=0)
    tok = tiny_tokenizer
    with pytest.raises(ValueError, match="do not repeat each prompt"):
        generation.response_logprobs(model, ids[:-1], mask[:-1], ctx, shared_prefix_k=2)  # a group cut in two
    with pytest.raises(ValueError, match="do not repeat each prompt"):
        generation.sample(model, ids[:-1, :ctx], mask[:-1, :ctx], 2, tok.eos_token_id, tok.pad_token_id, shared_prefix_k=2)
    with pytest.raises(ValueError, match="synced_gpus"):
        generation.sample(model, ids[:, :ctx], mask[:, :ctx], 2, tok.eos_token_id, tok.pad_token_id, synced_gpus=True,
                          shared_prefix_k=2)
    other = ids.clone()
    other[3, ctx - 1] = other[2, ctx - 1] + 1
    with pytest.raises(ValueError, match="do not repeat each prompt"):
        generation.reward_model_scores(rm, other, mask, ctx, shared_prefix_k=2)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        generation.response_logprobs(model, ids, mask, ctx, shared_prefix_k=2)


def test_the_run_decides_shared_or_plain_once_per_forward(accelerator, tiny_tokenizer, tiny_policy_dir, tiny_reward_dir):
    c = train_rloo.RLOOConfig(**dict(FUSABLE, shared_prefix=True), model_name_or_path=tiny_policy_dir,
                              reward_model_name_or_path=tiny_reward_dir, kl_prev_per_prompt=1)
    m = rollout.load_models(c, accelerator, reward_fn=None)
    plan = train_rloo._batch_plan(c, num_processes=1)
    share = train_rloo.prompt_sharing(c, m, plan)
    assert share == rollout.PromptSharing(sample=2, score=2, old=2, ref=2, update=2, kl_prev=1)  # m = 1: nothing to share
    assert train_rloo.prompt_sharing(replace(c, shared_prefix=False), m, plan) == rollout.PromptSharing()
    # chunks of 3 rows would cut a prompt group of 2: those forwards run plain all run long (the update's
    # micro-batches of 2 still share); a chunk covering the whole batch shares
    assert train_rloo.prompt_sharing(replace(c, local_rollout_forward_batch_size=3), m, plan) == rollout.PromptSharing(
        update=2)
    assert train_rloo.prompt_sharing(replace(c, local_rollout_forward_batch_size=8), m, plan) == share
    assert train_rloo.prompt_sharing(replace(c, num_ppo_epochs=2), m, plan).update == 1  # shuffled micro-batches
    m.retokenize = True  # the reward model reads other tokens: no shared prompt columns
    assert train_rloo.prompt_sharing(c, m, plan).score == 1
    (getattr(m.policy, "activation_checkpointing_enable", None) or m.policy.gradient_checkpointing_enable)()
    assert train_rloo.prompt_sharing(c, m, plan) == rollout.PromptSharing(ref=2)  # only the frozen reference shares


@pytest.mark.parametrize("kw", [dict(regularizer="kl", kl_coef=0.5),
                                dict(regularizer="entropy", entropy_coef=0.3, length_normalize=True)])
def test_rloo_iteration_with_shared_prefix_equals_the_plain_one(kw, accelerator, tiny_tokenizer, tiny_policy_dir,
                                                                 tiny_reward_dir, monkeypatch):
    """Steps 2-8 (reward model, reference, fused update, kl_prev) with and without the shared prompt pass."""
    calls = []
    for name in ("shared_prefix_logits", "shared_prefix_reward_scores"):
        real = getattr(generation, name)
        def counted(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(generation, name, counted)
    c = train_rloo.RLOOConfig(**dict(FUSABLE, shared_prefix=True), **kw)
    shared = steps_2_to_8(c, accelerator, tiny_policy_dir, tiny_reward_dir, hand_rollout(tiny_tokenizer))
    # score, reference, 2 fused micro-batches, kl_prev: each through the shared pass
    assert sorted(calls) == ["shared_prefix_logits"] * 4 + ["shared_prefix_reward_scores"]
    calls.clear()
    plain = steps_2_to_8(replace(c, shared_prefix=False), accelerator, tiny_policy_dir, tiny_reward_dir,
                         hand_rollout(tiny_tokenizer))
    assert calls == []
    (m_s, w_s), (m_p, w_p) = shared, plain
    assert m_s["objective/kl_prev_reverse"] > 1e-4  # the update moved the policy: a real comparison
    assert m_s.keys() == m_p.keys()
    for key in m_s:
        if not key.startswith("time/"):
            assert m_s[key] == pytest.approx(m_p[key], rel=1e-4, abs=1e-5), key
    # weights after one AdamW step at lr 3e-3: Adam divides by |g|, so a parameter with a near-zero gradient
    # moves by up to lr whatever its size; rounding-level gradient differences stay well below 1e-4 here
    for a, b in zip(w_s, w_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_kl_prev_rows_are_the_first_m_completions_of_each_prompt():
    c = train_rloo.RLOOConfig(rloo_k=4, global_batch_size=12)
    assert rollout.kl_prev_rows(c, 12)[0].tolist() == list(range(12))  # 0: every completion
    assert rollout.kl_prev_rows(replace(c, kl_prev_per_prompt=1), 12)[0].tolist() == [0, 4, 8]
    rows, m = rollout.kl_prev_rows(replace(c, kl_prev_per_prompt=2), 12)
    assert (rows.tolist(), m) == ([0, 1, 4, 5, 8, 9], 2)


@pytest.mark.parametrize("shared", [True, False])
def test_kl_prev_on_one_completion_per_prompt_is_the_full_estimate_on_those_rows(shared, accelerator, tiny_tokenizer,
                                                                                 tiny_policy_dir, tiny_reward_dir):
    """kl_prev_per_prompt 1 (k 2) runs step 7 on rows 0 and 2 only: its kl_prev* metrics equal kl_prev_metrics
    of the full run's post-update log-probs restricted to those rows, and no other metric changes."""
    c = train_rloo.RLOOConfig(**dict(FUSABLE, shared_prefix=shared), regularizer="kl", kl_coef=0.5)
    full_ro, cheap_ro = hand_rollout(tiny_tokenizer), hand_rollout(tiny_tokenizer)
    full, _ = steps_2_to_8(c, accelerator, tiny_policy_dir, tiny_reward_dir, full_ro)
    cheap, _ = steps_2_to_8(replace(c, kl_prev_per_prompt=1), accelerator, tiny_policy_dir, tiny_reward_dir, cheap_ro)
    assert full_ro.kl_prev_rows.tolist() == [0, 1, 2, 3] and cheap_ro.kl_prev_rows.tolist() == [0, 2]
    assert (full["objective/kl_prev_samples"], cheap["objective/kl_prev_samples"]) == (4, 2)
    torch.testing.assert_close(cheap_ro.new_logprobs, full_ro.new_logprobs[[0, 2]], rtol=0, atol=1e-5)
    rows = [0, 2]
    expected = rollout.kl_prev_metrics(full_ro.old_logprobs[rows], full_ro.new_logprobs[rows],
                                          full_ro.response_mask[rows])
    assert full["objective/kl_prev"] > 1e-4 and expected["objective/kl_prev"] != pytest.approx(full["objective/kl_prev"])
    for key, value in expected.items():
        assert cheap[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for key in full:
        if not key.startswith(("objective/kl_prev", "time/")):
            assert cheap[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
