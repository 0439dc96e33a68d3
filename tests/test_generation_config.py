"""A checkpoint's generation_config.json must not change how the project decodes.

transformers merges the model's saved generation config into the one `generate` is given: 4.50-4.57
replace every passed value that equals the library default (do_sample=False, temperature=1.0, ...)
with the saved one, 5.x fill every passed field left None (min_p, suppress_tokens, ...). A checkpoint
saved with `do_sample: true, top_k: 5` would then make greedy evaluation sample and RLOO sample from a
truncated distribution. Here such checkpoints are saved, loaded with the project's loader, and decoded
through `generation.generate` (what evaluate_judge.py, train_rloo.py and the toy lab call).
"""
import json

import pytest
import torch

from maxent_rlhf.generation import generate, left_pad
from maxent_rlhf.models import build_tiny_policy, load_policy

# The issue's case; then it plus every logits processor a checkpoint may switch on; then it plus the
# knobs that change what `generate` returns (beams, extra sequences, a dict instead of a tensor).
ISSUE = {"do_sample": True, "top_k": 5, "temperature": 0.3}
LEAKY_CONFIGS = {
    "sampling": ISSUE,
    "processors": {
        **ISSUE, "top_p": 0.5, "min_p": 0.2, "typical_p": 0.5, "epsilon_cutoff": 0.01, "repetition_penalty": 3.0,
        "no_repeat_ngram_size": 1, "min_new_tokens": 4, "suppress_tokens": [5, 6], "begin_suppress_tokens": [7],
        "bad_words_ids": [[8]],
    },
    "outputs": {**ISSUE, "num_beams": 2, "num_return_sequences": 2, "output_scores": True, "return_dict_in_generate": True},
}
PROMPTS = [[3, 4, 5, 6, 7], [9, 9], [12, 4, 20, 21]]


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
    q, qmask = left_pad(PROMPTS, pad)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(generate(model, q, qmask, new, eos, pad, do_sample=False))
    assert torch.equal(runs[0], runs[1]), "greedy decoding depends on the seed: it samples"
    for i, prompt in enumerate(PROMPTS):
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
    prompt = PROMPTS[0]
    q, qmask = left_pad([prompt] * n, pad)
    torch.manual_seed(0)
    first = generate(model, q, qmask, 1, eos, pad, temperature=temperature)[:, 0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
    counts = torch.bincount(first, minlength=probs.numel())
    # the test has power: the leaked top-5 keeps well under the full distribution's mass
    assert probs.sort(descending=True).values[:5].sum() < 0.6
    assert _chi_square_p_value(counts, probs) > 1e-3
