"""train_offline's shared-prefix forward (one prompt pass for chosen and rejected, its KV cache tiled:
generation.shared_prefix_logits in the "tiled" layout) against the plain one-forward path: same log-probs,
same gradients, same DPO run; and the choice between them, made once per run and model. The "grouped"
layout (train_rloo.py) is tested in test_rloo_shared_prefix.py."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_offline  # noqa: E402
from maxent_rlhf import checkpoints, data, generation, models, runs  # noqa: E402
from test_offline import datasets, make_cfg  # noqa: E402,F401  (the module's data fixture and config)


def usable(model, batch):
    return generation.shared_prefix_usable(model, batch.input_ids, batch.attention_mask, batch.context_length,
                                           batch.num_responses, "tiled")


def ragged_batch(tokenizer, k, seed):
    """Prompts of 1..29 tokens (left padding from none to most of the row), responses of 1..19 tokens + EOS
    (right padding, including one-token responses and the longest row of its batch)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)

    def words(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    examples = [{"prompt": words(1, 30), "responses": [words(0, 20) + [tokenizer.eos_token_id] for _ in range(k)]}
                for _ in range(6)]
    examples[0]["prompt"] = words(29, 30)  # one row without left padding
    return data.collate_responses(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("k,seed", [(2, 0), (2, 1), (3, 2)])
def test_shared_prefix_logps_and_gradients_equal_the_plain_forward(tiny_tokenizer, k, seed):
    model = models.build_tiny_policy(tiny_tokenizer, seed=seed)
    batch = ragged_batch(tiny_tokenizer, k, seed)
    assert usable(model, batch)
    with torch.no_grad():  # the shared path really runs (no silent fallback to the plain one)
        assert generation.shared_prefix_logits(model, batch.input_ids, batch.attention_mask, batch.context_length, k,
                                               "tiled") is not None
    results = []
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        logps, lengths = train_offline.response_logps(model, batch, prefix_k=k if shared else 1)
        (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum().backward()  # weighted: rows differ
        results.append((logps.detach(), lengths, [p.grad.clone() for p in model.parameters()]))
    (s_lp, s_len, s_grad), (p_lp, p_len, p_grad) = results
    assert s_lp.shape == (6, k) and torch.equal(s_len, p_len)
    torch.testing.assert_close(s_lp, p_lp, rtol=0, atol=1e-5)
    for gs, gp in zip(s_grad, p_grad):
        torch.testing.assert_close(gs, gp, rtol=1e-4, atol=1e-6)


def test_shared_prefix_is_not_usable_where_it_cannot_share(tiny_tokenizer):
    model = models.build_tiny_policy(tiny_tokenizer, seed=0)
    batch = ragged_batch(tiny_tokenizer, 2, 0)
    single = data.collate_responses([{"prompt": [5, 6], "responses": [[7, 0]]}], tiny_tokenizer.pad_token_id)
    assert not usable(model, single)  # one response: nothing to share
    batch.input_ids[6, 0] = batch.input_ids[0, 0] + 1  # rejected row 0 no longer repeats chosen row 0's prompt
    assert not usable(model, batch)
    # HF drops the KV cache in training then (transformers 5 renamed the switch)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert not usable(model, ragged_batch(tiny_tokenizer, 2, 0))


def test_dpo_run_with_shared_prefix_equals_the_plain_run(tmp_path, datasets, tiny_policy_dir, monkeypatch):  # noqa: F811
    kw = dict(loss_type="dpo", max_steps=3, learning_rate=2e-3)
    shared_calls = []
    real = generation.shared_prefix_logits

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        shared_calls.append(out is not None)
        return out

    monkeypatch.setattr(generation, "shared_prefix_logits", counted)
    on = train_offline.main(make_cfg(tmp_path / "on", tiny_policy_dir, datasets["pairs12"], shared_prefix=True, **kw))
    # 3 steps x 2 micro-batches x (policy + live reference), all on the shared path
    assert shared_calls == [True] * 12
    off = train_offline.main(make_cfg(tmp_path / "off", tiny_policy_dir, datasets["pairs12"], shared_prefix=False, **kw))
    assert len(shared_calls) == 12  # the plain run never called it
    m_on = [m for m in runs.read_metrics(on) if "train/loss" in m]
    m_off = [m for m in runs.read_metrics(off) if "train/loss" in m]
    assert [m["step"] for m in m_on] == [1, 2, 3] == [m["step"] for m in m_off]
    for a, b in zip(m_on, m_off):
        for key in ("train/loss", "train/grad_norm", "logps/chosen", "logps/rejected", "ref/logratio", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert m_on[-1]["train/loss"] != pytest.approx(m_on[0]["train/loss"], rel=1e-3)  # the weights did move
    a = models.load_policy(str(checkpoints.latest_checkpoint(on))).state_dict()
    b = models.load_policy(str(checkpoints.latest_checkpoint(off))).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_shared_or_plain_is_decided_once_per_model_and_every_forward_follows_it(tmp_path, datasets, tiny_policy_dir,
                                                                                monkeypatch):  # noqa: F811
    """Gradient checkpointing rules the shared pass out for the policy, not for the live reference (loaded
    without it): the run asks once per model, then passes k = 1 to every policy forward and k = 2 to every
    reference forward, and the reference's shared calls all run the shared path."""
    decided, ks, shared_calls = [], [], []
    real_decide, real_logits, real_shared = (train_offline.shares_prompt_pass, generation.response_logits,
                                             generation.shared_prefix_logits)

    def decide(c, model, d):
        decided.append(real_decide(c, model, d))
        return decided[-1]

    def logits(*args, shared_prefix_k=1, **kwargs):
        ks.append((torch.is_grad_enabled(), shared_prefix_k))
        return real_logits(*args, shared_prefix_k=shared_prefix_k, **kwargs)

    def shared(*args, **kwargs):
        out = real_shared(*args, **kwargs)
        shared_calls.append(out is not None)
        return out

    monkeypatch.setattr(train_offline, "shares_prompt_pass", decide)
    monkeypatch.setattr(generation, "response_logits", logits)
    monkeypatch.setattr(generation, "shared_prefix_logits", shared)
    train_offline.main(make_cfg(tmp_path, tiny_policy_dir, datasets["pairs12"], loss_type="dpo", max_steps=3,
                                gradient_checkpointing=True))
    assert decided == [True, False]  # the reference (step 3), then the prepared policy (step 5)
    # 3 steps x 2 micro-batches: the policy's forward (with grad) plain, the reference's (no grad) shared
    assert ks == [(True, 1), (False, 2)] * 6
    assert shared_calls == [True] * 6
