"""The cheaper forwards of train_rloo.py. The shared prompt pass in its row layout (completion j of prompt p at row p * k + j, the
"grouped" layout of generation.shared_prefix_*): each prompt runs once, its KV cache is repeated k times.
Checked against the plain forwards: same log-probs, entropies, gradients, reward scores and samples, and a
whole fused RLOO iteration with it equals one without. The run decides shared or plain once
(`train_rloo.prompt_sharing` on `rollout.prompt_sharing`); a forward asked to share where it cannot raises instead of running plain. The "tiled" layout (train_offline.py) is tested in
test_offline_shared_prefix.py. And `kl_prev_per_prompt`: step 7 on a subset of each prompt's completions
gives exactly the full-batch estimators restricted to those rows."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_rloo  # noqa: E402
from maxent_rlhf import generation, objectives, rollout  # noqa: E402
from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model  # noqa: E402
from test_rloo_units import FUSABLE, accelerator, hand_rollout, steps_2_to_8  # noqa: E402,F401  (accelerator: the fixture)


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
