"""train_offline.py on tiny local GPT-NeoX models and JSONL data (no network), and its shared-prefix forward."""
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # train_offline.py is a top-level script, importable from the repo root

import train_offline  # noqa: E402
from helpers.jsonl import write_jsonl
from helpers.resume import run_killed_inside
from maxent_rlhf import checkpoints, data, generation, models, objectives, runs
from maxent_rlhf.config import ConfigError, parse_config
from train_offline import LOSSES, OfflineConfig

WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it is was and not very good bad help".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))



def pair_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({
            "prompt": f"SUBREDDIT: r/cats TITLE: {sentence(rng, 3)} POST: {sentence(rng, 6)} TL;DR:",
            "chosen": sentence(rng, 2 + i % 3),
            "rejected": sentence(rng, 4 + i % 2),
            "completion": sentence(rng, 3),
        })
    return rows


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline_data")
    rng = random.Random(3)
    listwise = []
    for r in pair_rows(4, seed=5):
        responses = [sentence(rng, 3), r["chosen"], r["rejected"]]
        listwise.append({"prompt": r["prompt"], "responses": responses, "ranking": [1, 0, 2]})
    return {
        "pairs4": write_jsonl(d / "pairs4.jsonl", pair_rows(4)),
        "pairs12": write_jsonl(d / "pairs12.jsonl", pair_rows(12, seed=1)),
        "sft4": write_jsonl(d / "sft4.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in pair_rows(4)]),
        "list4": write_jsonl(d / "list4.jsonl", listwise),
    }


@pytest.fixture(scope="module")
def ref_policy_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("tiny_ref_policy")
    models.build_tiny_policy(tiny_tokenizer, seed=7, save_dir=d)
    return str(d)


def make_cfg(tmp_path, model, dataset, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"), model_name_or_path=model, dataset_name=dataset, report_to="none",
        global_batch_size=4, per_device_train_batch_size=2, max_steps=3, learning_rate=3e-3, lr_scheduler_type="constant",
        warmup_ratio=0.0, max_prompt_length=32, max_completion_length=12, per_device_eval_batch_size=4, beta=0.5, simpo_gamma=0.2,
    )
    base.update(kw)
    return OfflineConfig(**base)


def final_checkpoint(run):
    ckpt = checkpoints.latest_checkpoint(run)
    assert ckpt is not None
    return ckpt


# --------------------------------------------------------------------------------------------------
# every loss: runs, logs the documented metrics, overfits a fixed batch, saves a loadable checkpoint
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_runs_and_overfits_a_fixed_batch(loss, tmp_path, datasets, tiny_policy_dir):
    dataset = {"sft": datasets["sft4"], "simpo_pl": datasets["list4"]}.get(loss, datasets["pairs4"])
    # 4 examples = one global batch: every step sees the same batch, so its loss must go down
    c = make_cfg(tmp_path, tiny_policy_dir, dataset, loss_type=loss, max_steps=5,
                 learning_rate=1e-3 if loss == "reward" else 3e-3,
                 precompute_ref_logprobs=(loss == "ipo"), gradient_checkpointing=(loss in ("sft", "reward")))
    run = train_offline.main(c)
    metrics = [m for m in runs.read_metrics(run) if "train/loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    expected = {"train/loss", "train/grad_norm", "train/lr", "perf/tokens_per_s"}
    if loss != "sft":
        expected |= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    if loss not in ("sft", "reward"):
        expected |= {"logps/chosen", "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token"}
    if loss in ("dpo", "ipo", "chipo"):
        expected.add("ref/logratio")
    assert expected <= set(metrics[0]), expected - set(metrics[0])
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] - 1e-3
    ckpt = final_checkpoint(run)
    assert checkpoints.checkpoint_step(ckpt) == 5
    loaded = models.load_reward_model(str(ckpt)) if loss == "reward" else models.load_policy(str(ckpt))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


# --------------------------------------------------------------------------------------------------
# logged metrics equal `objectives` computed directly, on an unpadded naive forward
# --------------------------------------------------------------------------------------------------
def naive_seq_logp(model, prompt_ids, resp_ids):
    ids = torch.tensor([prompt_ids + resp_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].double(), -1)
    tok = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return tok[len(prompt_ids) - 1 :].sum(), len(resp_ids)


def naive_score(rm, ids):
    with torch.no_grad():
        h = rm.gpt_neox(torch.tensor([ids])).last_hidden_state[0, -1]
        return rm.score(h).double().squeeze()


def direct_inputs(tokenizer, path):
    rows = [json.loads(l) for l in open(path)]
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return [(enc(r["prompt"]), enc(r["chosen"]) + eos, enc(r["rejected"]) + eos) for r in rows]


@pytest.mark.parametrize("loss", ["dpo", "simpo", "reward"])
def test_metrics_equal_objectives_on_hand_built_batch(loss, tmp_path, datasets, tiny_tokenizer, tiny_policy_dir,
                                                     ref_policy_dir, tiny_reward_dir):
    model_dir = tiny_reward_dir if loss == "reward" else tiny_policy_dir
    c = make_cfg(tmp_path, model_dir, datasets["pairs4"], loss_type=loss, max_steps=1, normalize_reward=False,
                 ref_model_name_or_path=ref_policy_dir)
    (m,) = [m for m in runs.read_metrics(train_offline.main(c)) if "train/loss" in m]
    triples = direct_inputs(tiny_tokenizer, datasets["pairs4"])
    if loss == "reward":
        rm = models.load_reward_model(tiny_reward_dir)
        w = torch.stack([naive_score(rm, p + ch) for p, ch, _ in triples])
        l = torch.stack([naive_score(rm, p + rj) for p, _, rj in triples])
        out = objectives.bradley_terry_loss(w, l)
    else:
        pol, ref = models.load_policy(tiny_policy_dir), models.load_policy(ref_policy_dir)
        sw, nw = zip(*[naive_seq_logp(pol, p, ch) for p, ch, _ in triples])
        sl, nl = zip(*[naive_seq_logp(pol, p, rj) for p, _, rj in triples])
        sw, sl = torch.stack(sw), torch.stack(sl)
        nw, nl = torch.tensor(nw, dtype=torch.float64), torch.tensor(nl, dtype=torch.float64)
        if loss == "dpo":
            rw = torch.stack([naive_seq_logp(ref, p, ch)[0] for p, ch, _ in triples])
            rl = torch.stack([naive_seq_logp(ref, p, rj)[0] for p, _, rj in triples])
            out = objectives.dpo_loss(sw, sl, rw, rl, c.beta)
            assert m["ref/logratio"] == pytest.approx(float((rw - rl).mean()), rel=1e-4, abs=1e-4)
        else:
            out = objectives.simpo_loss(sw, sl, nw, nl, c.beta, c.simpo_gamma)
        assert m["logps/chosen"] == pytest.approx(float(sw.mean()), rel=1e-4)
        assert m["logps/rejected"] == pytest.approx(float(sl.mean()), rel=1e-4)
        assert m["logps/chosen_per_token"] == pytest.approx(float((sw / nw).mean()), rel=1e-4)
        assert m["logps/rejected_per_token"] == pytest.approx(float((sl / nl).mean()), rel=1e-4)
    assert m["train/loss"] == pytest.approx(float(out.losses.mean()), rel=1e-4)
    assert m["rewards/chosen"] == pytest.approx(float(out.chosen_rewards.mean()), rel=1e-4, abs=1e-5)
    assert m["rewards/rejected"] == pytest.approx(float(out.rejected_rewards.mean()), rel=1e-4, abs=1e-5)
    assert m["rewards/margins"] == pytest.approx(float(out.margins.mean()), rel=1e-4, abs=1e-5)
    assert m["rewards/accuracies"] == pytest.approx(float(out.accuracies.mean()))


# --------------------------------------------------------------------------------------------------
# reward normalisation
# --------------------------------------------------------------------------------------------------
def test_shift_reward_output_adds_exactly_delta(tiny_tokenizer):
    rm = models.build_tiny_reward_model(tiny_tokenizer, seed=3)
    ids = torch.randint(3, len(tiny_tokenizer), (5, 9))
    mask = torch.ones_like(ids)
    before = generation.reward_model_scores(rm, ids, mask)
    assert models.shift_reward_output(rm, 0.75) == "gpt_neox.final_layer_norm.bias"
    after = generation.reward_model_scores(rm, ids, mask)
    torch.testing.assert_close(after - before, torch.full_like(before, 0.75), atol=1e-5, rtol=0)


def test_reward_model_reference_mean_is_zero_after_save_and_load(tmp_path, datasets, tiny_tokenizer, tiny_policy_dir):
    # the reward model starts from the SFT policy (new one-label head) and is normalised on sft4's completions
    c = make_cfg(tmp_path, tiny_policy_dir, datasets["pairs4"], loss_type="reward", max_steps=2, learning_rate=1e-3,
                 reward_norm_dataset=datasets["sft4"])
    run = train_offline.main(c)
    final = [m for m in runs.read_metrics(run) if "reward/shift" in m][0]
    assert abs(final["reward/reference_mean_before_norm"]) > 1e-3  # there was something to remove
    rm = models.load_reward_model(str(final_checkpoint(run)))  # plain HF format, as train_rloo loads it
    assert rm.config.reward_normalization["num_examples"] == 4
    refs, _ = data.tokenize_offline_dataset(data.load_any_dataset(datasets["sft4"]), tiny_tokenizer, "sft", 32, 12)
    batch = data.collate_responses(refs, tiny_tokenizer.pad_token_id)
    scores = generation.reward_model_scores(rm, batch.input_ids, batch.attention_mask)
    assert abs(float(scores.mean())) < 1e-5
    # and equal to the unnormalised model's scores plus the logged shift (only a constant moved)
    unshifted = models.load_reward_model(str(final_checkpoint(run)))
    models.shift_reward_output(unshifted, -final["reward/shift"])
    raw = generation.reward_model_scores(unshifted, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(scores - raw, torch.full_like(raw, final["reward/shift"]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------------
def test_resume_after_kill_gives_identical_weights(tmp_path, datasets, tiny_policy_dir, monkeypatch):
    # 12 examples / global batch 4 = 3 steps per epoch; 6 steps cross an epoch; checkpoints at 2 and 4
    # (both mid-epoch); the second run is killed inside step 5 and resumed from step 4.
    kw = dict(loss_type="dpo", max_steps=6, save_steps=2, lr_scheduler_type="cosine", warmup_ratio=0.34, learning_rate=2e-3)
    full = train_offline.main(make_cfg(tmp_path / "a", tiny_policy_dir, datasets["pairs12"], **kw))

    cfg_b = make_cfg(tmp_path / "b", tiny_policy_dir, datasets["pairs12"], **kw)
    # 4 steps x 2 micro-batches, then the process "dies" inside step 5
    run_killed_inside(monkeypatch, train_offline.objectives, "dpo_loss", 4 * 2, lambda: train_offline.main(cfg_b))
    assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(cfg_b.output_dir)) == 4
    cfg_b.resume = "latest"
    resumed = train_offline.main(cfg_b)

    a = models.load_policy(str(final_checkpoint(full))).state_dict()
    b = models.load_policy(str(final_checkpoint(resumed))).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = [m for m in runs.read_metrics(full) if "train/loss" in m]
    mb = [m for m in runs.read_metrics(resumed) if "train/loss" in m]
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    assert [m["train/loss"] for m in ma] == [m["train/loss"] for m in mb]
    assert [m["train/lr"] for m in ma] == [m["train/lr"] for m in mb]


def test_precomputed_reference_logprobs_match_the_live_reference(tmp_path, datasets, tiny_policy_dir, ref_policy_dir):
    kw = dict(loss_type="dpo", max_steps=2, ref_model_name_or_path=ref_policy_dir)
    live = train_offline.main(make_cfg(tmp_path / "live", tiny_policy_dir, datasets["pairs12"], **kw))
    pre = train_offline.main(make_cfg(tmp_path / "pre", tiny_policy_dir, datasets["pairs12"], precompute_ref_logprobs=True, **kw))
    for a, b in zip(runs.read_metrics(live), runs.read_metrics(pre)):
        for k in ("train/loss", "ref/logratio", "rewards/margins"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


# --------------------------------------------------------------------------------------------------
# data handling
# --------------------------------------------------------------------------------------------------
def test_message_lists_are_read_as_their_assistant_text(tiny_tokenizer):
    import datasets as hfds

    msgs = lambda text: [{"role": "user", "content": "TL;DR:"}, {"role": "assistant", "content": text}]
    ds = hfds.Dataset.from_list([{"prompt": "TL;DR:", "chosen": msgs("the cat"), "rejected": msgs("a dog")}])
    (ex,), _ = data.tokenize_offline_dataset(ds, tiny_tokenizer, "pairwise", 8, 8)
    enc = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert ex["responses"] == [enc("the cat"), enc("a dog")]


def test_listwise_responses_follow_the_ranking(tiny_tokenizer):
    import datasets as hfds

    ds = hfds.Dataset.from_list([{"prompt": "TL;DR:", "responses": ["cat", "dog ran", "mat"], "ranking": [2, 0, 1]}])
    (ex,), _ = data.tokenize_offline_dataset(ds, tiny_tokenizer, "listwise", 8, 8)
    eos = tiny_tokenizer.eos_token_id
    enc = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"] + [eos]
    assert ex["responses"] == [enc("mat"), enc("cat"), enc("dog ran")]


def test_truncation_policy_and_counts(tiny_tokenizer):
    import datasets as hfds

    rows = [{"prompt": "the cat sat on the mat TL;DR:", "chosen": "a b c d e f g", "rejected": "dog"},
            {"prompt": "TL;DR:", "chosen": "cat", "rejected": "dog"}]
    ds = hfds.Dataset.from_list(rows)
    (ex, _), rep = data.tokenize_offline_dataset(ds, tiny_tokenizer, "pairwise", 4, 5, "truncate_left")
    assert rep.truncated_prompts == 1 and rep.truncated_responses == 1
    assert ex["prompt"] == tiny_tokenizer("on the mat TL;DR:", add_special_tokens=False)["input_ids"]
    assert len(ex["responses"][0]) == 5 and tiny_tokenizer.eos_token_id not in ex["responses"][0]
    examples, rep = data.tokenize_offline_dataset(ds, tiny_tokenizer, "pairwise", 4, 5, "drop")
    assert len(examples) == 1 and rep.dropped_long_prompts == 1 and "dropped 1 whose prompt" in rep.summary()


def test_collate_puts_chosen_and_rejected_in_one_batch(tiny_tokenizer):
    exs = [{"prompt": [5, 6], "responses": [[7, 0], [8, 9, 0]]}, {"prompt": [5], "responses": [[7, 7, 7, 0], [9, 0]]}]
    b = data.collate_responses(exs, pad_token_id=1)
    assert b.input_ids.shape == (4, 2 + 4) and b.context_length == 2 and b.num_responses == 2
    assert b.labels[:, 0].tolist() == [7, 7, 8, 9]  # response-major: chosen of both, then rejected of both
    assert b.attention_mask.tolist()[1] == [0, 1, 1, 1, 1, 1]
    assert b.response_mask.sum(-1).tolist() == [2, 4, 3, 2]


# --------------------------------------------------------------------------------------------------
# bad input: each gives its message
# --------------------------------------------------------------------------------------------------
def test_missing_column_names_it_and_the_columns_found(tmp_path, tiny_policy_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "TL;DR:", "chosen": "cat", "answer": "dog"}] * 4)
    with pytest.raises(data.DataError, match=r"missing column\(s\) \['rejected'\]; found columns \['prompt', 'chosen', 'answer'\]"):
        train_offline.main(make_cfg(tmp_path, tiny_policy_dir, path, loss_type="dpo"))


def test_empty_or_identical_pairs_are_dropped_with_a_count(tmp_path, tiny_policy_dir, capsys):
    rows = pair_rows(4) + [{"prompt": "TL;DR:", "chosen": "cat", "rejected": "cat"},
                           {"prompt": "TL;DR:", "chosen": "  ", "rejected": "dog"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    train_offline.main(make_cfg(tmp_path, tiny_policy_dir, path, loss_type="simpo", max_steps=1))
    assert "kept 4 of 6 examples; dropped 2 with an empty or identical chosen/rejected response" in capsys.readouterr().out
    all_bad = write_jsonl(tmp_path / "allbad.jsonl", rows[4:])
    with pytest.raises(data.DataError, match="no usable example left"):
        train_offline.main(make_cfg(tmp_path / "x", tiny_policy_dir, all_bad, loss_type="simpo", max_steps=1))


def test_prompt_longer_than_limit_is_an_error_naming_the_row(tmp_path, datasets, tiny_policy_dir):
    with pytest.raises(data.DataError, match=r"row 0 has a prompt of \d+ tokens, longer than max_prompt_length = 5"):
        train_offline.main(make_cfg(tmp_path, tiny_policy_dir, datasets["pairs4"], loss_type="dpo", max_prompt_length=5))


def test_reward_model_with_two_labels_is_refused(tmp_path, datasets, tiny_tokenizer):
    d = tmp_path / "rm2"
    from transformers import GPTNeoXForSequenceClassification

    GPTNeoXForSequenceClassification(models.tiny_gpt_neox_config(len(tiny_tokenizer), num_labels=2)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    with pytest.raises(ValueError, match="num_labels = 2; a reward model must be a sequence classifier with exactly one label"):
        train_offline.main(make_cfg(tmp_path, str(d), datasets["pairs4"], loss_type="reward"))


def test_tokenizer_without_pad_token_gets_one_and_says_so(tmp_path, datasets, tiny_tokenizer, tiny_policy_dir, capsys):
    from maxent_rlhf.models import build_word_tokenizer
    from conftest import TINY_WORDS

    tok = build_word_tokenizer(TINY_WORDS)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    run = train_offline.main(make_cfg(tmp_path, tiny_policy_dir, datasets["sft4"], loss_type="sft", max_steps=1,
                                      tokenizer_name_or_path=str(tmp_path / "nopad")))
    assert "has no pad token: using EOS '<|endoftext|>' as pad" in capsys.readouterr().out
    assert runs.read_metrics(run)[0]["step"] == 1


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, datasets, tiny_policy_dir, monkeypatch):
    real = objectives.sft_loss
    calls = {"n": 0}

    def nan_at_step_3(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 2 * 2 else out

    monkeypatch.setattr(train_offline.objectives, "sft_loss", nan_at_step_3)
    c = make_cfg(tmp_path, tiny_policy_dir, datasets["sft4"], loss_type="sft", max_steps=5, save_steps=2)
    with pytest.raises(runs.NonFiniteError, match=r"train/loss is nan at step 3: stopping.*the last good checkpoint is \S*step_00000002 \(step 2\)"):
        train_offline.main(c)
    ckpt = checkpoints.resolve_resume("latest", c.output_dir)
    assert checkpoints.checkpoint_step(ckpt) == 2
    assert all(torch.isfinite(p).all() for p in models.load_policy(str(ckpt)).parameters())


def test_fresh_run_refuses_an_output_dir_holding_another_run(tmp_path, datasets, tiny_policy_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="already holds a run .*--resume latest"):
        train_offline.main(make_cfg(tmp_path, tiny_policy_dir, datasets["sft4"], loss_type="sft"))


def test_unknown_loss_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        parse_config(OfflineConfig, ["--loss_type", "dpoo"])
    assert "field `loss_type` must be one of ['sft', 'reward', 'dpo'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown loss_type 'dpoo'; valid losses: sft, reward, dpo, simpo, ipo, cpo, orpo, slic, chipo, simpo_pl"):
        train_offline.main(OfflineConfig(loss_type="dpoo"))


@pytest.mark.parametrize("kw,message", [
    (dict(max_completion_length=0), "`max_completion_length` = 0 must be >= 1"),
    (dict(max_steps=0, num_train_epochs=0.0), "set `max_steps` > 0 or `num_train_epochs` > 0"),
    (dict(prompt_overflow="cut"), "`prompt_overflow` must be one of"),
    (dict(max_prompt_length=0), "`max_prompt_length` = 0 must be >= 1"),  # TrainConfig's check, reached from here
    (dict(per_device_eval_batch_size=0), "`per_device_eval_batch_size` = 0 must be >= 1"),  # JudgeArgs'
])
def test_a_config_out_of_range_fails_when_built(kw, message):
    with pytest.raises(ConfigError, match=message):
        OfflineConfig(**kw)


def test_global_batch_that_does_not_divide_names_the_numbers(tmp_path, datasets, tiny_policy_dir):
    with pytest.raises(ConfigError, match="`global_batch_size` = 6 over 1 processes gives 6 per process, which `per_device_train_batch_size` = 4 does not divide"):
        train_offline.main(make_cfg(tmp_path, tiny_policy_dir, datasets["pairs4"], global_batch_size=6, per_device_train_batch_size=4))


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(OfflineConfig, ["--help"])
    out = capsys.readouterr().out
    for name in ("--precompute_ref_logprobs", "--global_batch_size", "--reward_norm_dataset", "--prompt_overflow"):
        assert name in out
    assert "(default: 64)" in out


@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "simpo"])
def test_shipped_1b_configs_parse(name):
    c = parse_config(OfflineConfig, ["--config", str(REPO / "configs" / f"{name}_1b.yaml")])
    assert c.loss_type == {"rm": "reward"}.get(name, name)
    assert "cleanrl/EleutherAI_pythia-1b-deduped" in c.model_name_or_path or c.model_name_or_path == "EleutherAI/pythia-1b-deduped"
    if name == "simpo":
        assert (c.learning_rate, c.beta, c.simpo_gamma) == (2e-7, 2.0, 1.0)
    if name == "dpo":
        assert (c.learning_rate, c.beta) == (1e-6, 0.05)


# ==================================================================================================
# train_offline's shared-prefix forward (one prompt pass for chosen and rejected, its KV cache tiled:
# generation.shared_prefix_logits in the "tiled" layout) against the plain one-forward path: same log-probs,
# same gradients, same DPO run; and the choice between them, made once per run and model. The "grouped"
# layout (train_rloo.py) is tested in test_train_rloo.py.
# ==================================================================================================
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
