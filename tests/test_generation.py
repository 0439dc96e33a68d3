"""Generation plumbing: padding, EOS truncation, response log-probs and reward scores are
independent of padding and equal a naive unpadded computation; and a checkpoint's generation_config.json
never changes how the project decodes."""
import json

import pytest
import torch

from maxent_rlhf import objectives
from maxent_rlhf.generation import (
    first_true_index,
    hf_generate,
    left_pad,
    response_logprobs,
    reward_model_scores,
    truncate_after_eos,
)
from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model, load_policy

EOS, PAD = 0, 1


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=PAD)
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="more than the padded length"):
        left_pad([[1, 2, 3]], PAD, length=2)


def test_truncate_after_eos_keeps_first_eos_and_pads_rest():
    responses = torch.tensor([[5, EOS, 6, EOS], [5, 6, 7, 8], [EOS, 9, 9, 9]])
    out, mask, has_eos = truncate_after_eos(responses, EOS, PAD)
    assert out.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    assert first_true_index(torch.tensor([[False, False]])).tolist() == [2]


def _naive_response_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_response_logprobs_match_unpadded_naive(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0).eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    responses = [[10, 11, EOS], [12, EOS]]
    q, qmask = left_pad(prompts, PAD)
    r = torch.tensor([[10, 11, EOS], [12, EOS, PAD]])
    rmask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logps, entropy = response_logprobs(
        model, torch.cat([q, r], 1), torch.cat([qmask, rmask], 1), q.shape[1], temperature=0.7, return_entropy=True
    )
    for i in range(2):
        naive = _naive_response_logprobs(model, prompts[i], responses[i], 0.7)
        assert torch.allclose(logps[i, : len(responses[i])], naive, atol=1e-5)
    assert entropy.shape == logps.shape and bool((entropy >= 0).all())


def test_reward_model_reads_last_real_token_independent_of_padding(tiny_tokenizer):
    rm = build_tiny_reward_model(tiny_tokenizer, seed=1).eval()
    seqs = [[3, 4, 5, 10, EOS], [8, 12, EOS]]
    # left-padded prompt + right-padded response, as in RLOO
    q, qmask = left_pad([[3, 4, 5], [8]], PAD)
    r = torch.tensor([[10, EOS], [12, EOS]])
    scores = reward_model_scores(rm, torch.cat([q, r], 1), torch.cat([qmask, torch.ones_like(r)], 1))
    for i, s in enumerate(seqs):
        backbone_out = rm.gpt_neox(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
        assert scores[i].item() == pytest.approx(rm.score(backbone_out).item(), abs=1e-5)


def test_greedy_generation_is_deterministic_and_sampling_uses_pure_temperature(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0).eval()
    q, qmask = left_pad([[3, 4, 5], [6]], PAD)
    a = hf_generate(model, q, qmask, 6, EOS, PAD, do_sample=False)
    b = hf_generate(model, q, qmask, 6, EOS, PAD, do_sample=False)
    assert a.shape == (2, 6) and torch.equal(a, b)
    # greedy picks the argmax of the padded forward at every step
    out, mask, _ = truncate_after_eos(a, EOS, PAD)
    logits = model(
        input_ids=torch.cat([q, out], 1),
        attention_mask=torch.cat([qmask, mask], 1),
        position_ids=(torch.cat([qmask, mask], 1).cumsum(-1) - 1).clamp_min(0),
    ).logits[:, q.shape[1] - 1 : -1]
    assert torch.equal(logits.argmax(-1)[mask.bool()], out[mask.bool()])
    # sampling is reproducible under a seed
    torch.manual_seed(3)
    s1 = hf_generate(model, q, qmask, 6, EOS, PAD, temperature=0.7)
    torch.manual_seed(3)
    s2 = hf_generate(model, q, qmask, 6, EOS, PAD, temperature=0.7)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("sampler", ["hf_generate", "sample"])
def test_sampling_distribution_is_softmax_of_logits_over_temperature(tiny_tokenizer, sampler):
    """top_k/top_p must be off: the first sampled token's frequencies match softmax(logits / T), for HF
    `hf_generate` (evaluation, sharded RLOO) and the lean sampler RLOO uses."""
    from maxent_rlhf import generation

    draw = getattr(generation, sampler)
    model = build_tiny_policy(tiny_tokenizer, seed=0).eval()
    n, temperature = 4000, 0.7
    q, qmask = left_pad([[3, 4, 5]] * n, PAD)
    torch.manual_seed(0)
    first = draw(model, q, qmask, 1, EOS, PAD, temperature=temperature)[:, 0]
    probs = torch.softmax(model(input_ids=q[:1]).logits[0, -1] / temperature, -1)
    freq = torch.bincount(first, minlength=probs.numel()).double() / n
    # total variation distance of an exact sampler at n=4000 over ~45 tokens is ~0.04; HF's default
    # top_k=50 / top_p would not change much here, so also check a low-probability tail is sampled
    assert 0.5 * (freq - probs.double()).abs().sum() < 0.08
    tail = probs < probs.sort(descending=True).values[20]
    assert freq[tail].sum() > 0.5 * probs[tail].sum()


# --------------------------------------------------------------------------------------------------
# text in, text out: complete_prompts and score_completions
# --------------------------------------------------------------------------------------------------
PROMPTS = ["SUBREDDIT: r/cats TITLE: my cat sat POST: the cat sat on my mat TL;DR:",
           "POST: dog ran far away TL;DR:", "TL;DR:"]


def test_score_completions_is_independent_of_padding_and_prompt_cut(tiny_tokenizer):
    """The reward-model judge and the toy lab share this scorer (left-padded); the toy lab used to
    right-pad. Both paddings give the score of the unpadded sequence read at its EOS."""
    from maxent_rlhf.generation import score_completions

    tok = tiny_tokenizer
    rm = build_tiny_reward_model(tok, seed=1).eval()
    summaries = [" my cat sat on the mat ", "dog ran", "happy"]
    got = score_completions(rm, tok, PROMPTS, summaries, batch_size=2)
    seqs = [tok(p, add_special_tokens=False).input_ids + tok(" " + s.strip(), add_special_tokens=False).input_ids
            + [tok.eos_token_id] for p, s in zip(PROMPTS, summaries)]
    width = max(map(len, seqs))
    right = torch.full((3, width), tok.pad_token_id)
    right_mask = torch.zeros((3, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, : len(s)], right_mask[i, : len(s)] = torch.tensor(s), 1
    right_scores = reward_model_scores(rm, right, right_mask)
    for i, s in enumerate(seqs):
        alone = rm.score(rm.gpt_neox(input_ids=torch.tensor([s])).last_hidden_state[0, -1]).item()
        assert got[i] == pytest.approx(alone, abs=1e-5) and right_scores[i].item() == pytest.approx(got[i], abs=1e-5)
    # max_prompt_length keeps the prompt's last tokens ("TL;DR:" stays next to the summary)
    cut = score_completions(rm, tok, PROMPTS[:1], summaries[:1], batch_size=1, max_prompt_length=3)
    tail = tok(PROMPTS[0], add_special_tokens=False).input_ids[-3:]
    seq = tail + tok(" " + summaries[0].strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    alone = rm.score(rm.gpt_neox(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]).item()
    assert cut[0] == pytest.approx(alone, abs=1e-5) and cut[0] != pytest.approx(got[0], abs=1e-5)


def test_complete_prompts_decodes_what_generate_returns(tiny_tokenizer):
    from maxent_rlhf.generation import complete_prompts

    tok = tiny_tokenizer
    model = build_tiny_policy(tok, seed=0).eval()
    batches = list(complete_prompts(model, tok, PROMPTS, 6, batch_size=2))
    assert [len(b) for b in batches] == [2, 1]  # one list per batch, in order
    got = [c for b in batches for c in b]
    for prompt, c in zip(PROMPTS, got):  # each prompt alone, decoded by hand, is the same completion
        q, qmask = left_pad([tok(prompt, add_special_tokens=False).input_ids], tok.pad_token_id)
        r, m, has_eos = truncate_after_eos(hf_generate(model, q, qmask, 6, tok.eos_token_id, tok.pad_token_id,
                                                    do_sample=False), tok.eos_token_id, tok.pad_token_id)
        tokens = r[0][m[0].bool()].tolist()
        tokens = tokens[:-1] if has_eos[0] else tokens
        assert c.num_tokens == len(tokens) and c.text == tok.decode(tokens, skip_special_tokens=True).strip()
    # sampling follows the caller's seed; special tokens can be kept in the text
    torch.manual_seed(0)
    s1 = [c.text for b in complete_prompts(model, tok, PROMPTS, 6, 8, do_sample=True, skip_special_tokens=False) for c in b]
    torch.manual_seed(0)
    s2 = [c.text for b in complete_prompts(model, tok, PROMPTS, 6, 8, do_sample=True, skip_special_tokens=False) for c in b]
    assert s1 == s2


# --------------------------------------------------------------------------------------------------
# sample: generate's pure-temperature sampling without its per-token machinery (what RLOO rolls out with)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sample_draws_generates_tokens_under_the_same_rng_whatever_the_saved_generation_config(tiny_tokenizer, temperature):
    from transformers import GenerationConfig

    from maxent_rlhf.generation import sample

    model = build_tiny_policy(tiny_tokenizer, seed=0).eval()
    with torch.no_grad():  # EOS likely, so rows stop at different steps and the batch stops early
        model.get_output_embeddings().weight[EOS] = 0.0
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tiny_tokenizer), (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (16,), generator=g)]
    q, qmask = left_pad(prompts, PAD)
    torch.manual_seed(1)
    reference = hf_generate(model, q, qmask, 12, EOS, PAD, temperature=temperature)
    model.generation_config = GenerationConfig(do_sample=True, top_k=2, temperature=0.1)  # must change nothing
    torch.manual_seed(1)
    lean = sample(model, q, qmask, 12, EOS, PAD, temperature=temperature)
    assert lean.shape == reference.shape == (16, 12)
    assert torch.equal(lean, reference)
    ended = (reference == EOS).any(1)
    assert 0 < int(ended.sum()) < 16  # ragged: some rows stopped and were padded, some ran to the end


# ==================================================================================================
# A checkpoint's generation_config.json must not change how the project decodes.
#
# transformers merges the model's saved generation config into the one `generate` is given: 4.50-4.57
# replace every passed value that equals the library default (do_sample=False, temperature=1.0, ...)
# with the saved one, 5.x fill every passed field left None (min_p, suppress_tokens, ...). A checkpoint
# saved with `do_sample: true, top_k: 5` would then make greedy evaluation sample and RLOO sample from a
# truncated distribution. Here such checkpoints are saved, loaded with the project's loader, and decoded
# through `generation.hf_generate` (what evaluate_judge.py, train_rloo.py and the toy lab call).
# ==================================================================================================
# Sampling switched on with top-k; then it plus every logits processor a checkpoint may switch on; then
# it plus the knobs that change what `generate` returns (beams, extra sequences, a dict instead of a tensor).
SAMPLING = {"do_sample": True, "top_k": 5, "temperature": 0.3}
LEAKY_CONFIGS = {
    "sampling": SAMPLING,
    "processors": {
        **SAMPLING, "top_p": 0.5, "min_p": 0.2, "typical_p": 0.5, "epsilon_cutoff": 0.01, "repetition_penalty": 3.0,
        "no_repeat_ngram_size": 1, "min_new_tokens": 4, "suppress_tokens": [5, 6], "begin_suppress_tokens": [7],
        "bad_words_ids": [[8]],
    },
    "outputs": {**SAMPLING, "num_beams": 2, "num_return_sequences": 2, "output_scores": True, "return_dict_in_generate": True},
}
PROMPT_IDS = [[3, 4, 5, 6, 7], [9, 9], [12, 4, 20, 21]]


@pytest.fixture(scope="module", params=sorted(LEAKY_CONFIGS))
def leaky_policy(request, tmp_path_factory, tiny_tokenizer):
    """(model loaded by `load_policy` from a dir whose generation_config.json holds `settings`, settings)."""
    settings = LEAKY_CONFIGS[request.param]
    d = tmp_path_factory.mktemp(f"leaky_{request.param}")
    build_tiny_policy(tiny_tokenizer, seed=0, save_dir=d)
    saved = {"eos_token_id": tiny_tokenizer.eos_token_id, "pad_token_id": tiny_tokenizer.pad_token_id, **settings}
    (d / "generation_config.json").write_text(json.dumps(saved))
    model = load_policy(str(d)).eval()
    # the precondition: the loaded model really carries the checkpoint's settings
    for key, value in settings.items():
        assert getattr(model.generation_config, key) == value, key
    return model, settings


def _naive_greedy(model, prompt, max_new_tokens, eos):
    """argmax of an unpadded full forward at every step, stopping after EOS."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt == eos:
                break
    return seq[len(prompt) :]


def test_greedy_ignores_the_checkpoint_generation_config(leaky_policy, tiny_tokenizer):
    model, settings = leaky_policy
    eos, pad, new = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, 8
    q, qmask = left_pad(PROMPT_IDS, pad)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(hf_generate(model, q, qmask, new, eos, pad, do_sample=False))
    assert torch.equal(runs[0], runs[1]), "greedy decoding depends on the seed: it samples"
    for i, prompt in enumerate(PROMPT_IDS):
        naive = _naive_greedy(model, prompt, new, eos)
        assert runs[0][i, : len(naive)].tolist() == naive
        assert runs[0][i, len(naive) :].eq(pad).all()
    # the model keeps its own generation config (a checkpoint saved later still carries it)
    assert all(getattr(model.generation_config, k) == v for k, v in settings.items())


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; bins expecting fewer than 5 draws are pooled into one."""
    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.double), stat / 2))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampling_stays_pure_temperature(leaky_policy, tiny_tokenizer, temperature):
    """First sampled token over 6000 draws against softmax(logits / T): the leaked top_k=5,
    temperature 0.3, penalties or bans would move the fit's p-value to ~0."""
    model, _ = leaky_policy
    eos, pad, n = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, 6000
    prompt = PROMPT_IDS[0]
    q, qmask = left_pad([prompt] * n, pad)
    torch.manual_seed(0)
    first = hf_generate(model, q, qmask, 1, eos, pad, temperature=temperature)[:, 0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
    counts = torch.bincount(first, minlength=probs.numel())
    # the test has power: the leaked top-5 keeps well under the full distribution's mass
    assert probs.sort(descending=True).values[:5].sum() < 0.6
    assert _chi_square_p_value(counts, probs) > 1e-3
