"""train_rloo.py: known answers for the iteration's steps, each alone on a hand-built `Rollout`, and every bad input."""
import json
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_rloo
from maxent_rlhf import generation, objectives, rollout
from maxent_rlhf.config import ConfigError, parse_config
from maxent_rlhf.data import DataError, PromptStream, tokenize_prompts

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


# shared_prefix off: these compare one speed path at a time (the shared prompt pass: test_rloo_shared_prefix.py)
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
