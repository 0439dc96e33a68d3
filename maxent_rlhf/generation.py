"""Batched generation, EOS truncation, response log-prob forwards and reward-model scoring.

Conventions (used by train_rloo.py, train_offline.py, evaluate_judge.py, the reward-model judge and the
toy lab):
- queries are LEFT-padded to a common length `context_length`; responses follow, RIGHT-padded;
- the attention mask of query+response is built from lengths (query mask ++ response mask), never from
  `input_ids != pad_token_id`, because Pythia reuses EOS as pad and the EOS must stay visible;
- position ids count real tokens only, so a left-padded prompt sees the same positions as unpadded.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from . import distributed, objectives

Tensor = torch.Tensor


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to `length` (default: the longest). Returns (input_ids, attention_mask)."""
    length = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {length}")
        if len(s):
            ids[i, length - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def first_true_index(bools: Tensor, dim: int = -1) -> Tensor:
    """Index of the first True along `dim`, or the size of `dim` when there is none."""
    size = bools.shape[dim]
    idx = torch.arange(size, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, torch.full_like(idx, size)).min(dim).values


def truncate_after_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each response up to and including its first EOS; pad the rest.

    Returns (responses, response_mask, contains_eos): the mask is 1 on real tokens (the EOS included);
    a response that never emitted EOS keeps all its tokens and has contains_eos False.
    """
    eos_at = first_true_index(responses == eos_token_id)
    positions = torch.arange(responses.shape[1], device=responses.device)[None, :]
    mask = positions <= eos_at[:, None]
    truncated = torch.where(mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, mask.long(), eos_at < responses.shape[1]


@torch.no_grad()
def hf_generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    do_sample: bool = True,
    synced_gpus: bool = False,
) -> Tensor:
    """KV-cached batched sampling (or greedy) with HF `generate`; returns responses [B, max_new_tokens].

    Pure temperature sampling: top_k = 0 and top_p = 1 so the sampling distribution is exactly
    softmax(logits / T), the one whose log-probs RLOO uses. Rows that stop early are padded.
    Nothing from the checkpoint's `generation_config.json` applies (see `_explicit_generation_config`).

    `model` may be a DDP / accelerate wrapper (its `.module` generates). Under ZeRO-3 or FSDP pass
    `synced_gpus=True` (see `maxent_rlhf.distributed.unwrap_for_generation` / `needs_synced_gpus`).
    """
    from transformers import GenerationConfig

    while not hasattr(model, "generate") and hasattr(model, "module"):  # DDP has no `generate`
        model = model.module

    gen_config = _explicit_generation_config(max_new_tokens, eos_token_id, pad_token_id, temperature, do_sample)
    # HF merges the model's own generation config (loaded from the checkpoint's generation_config.json)
    # into the one passed: transformers 4.50-4.57 overwrite every passed value that equals the library
    # default (so do_sample=False, temperature=1.0, top_p=1.0 lose to a saved do_sample/temperature/top_p),
    # 5.x fill every field left None (min_p, bad_words_ids, suppress_tokens, ...). A checkpoint saved
    # with `do_sample: true, top_k: 5` would make "greedy" evaluation sample and RLOO sample from a
    # truncated distribution whose log-probs are not the ones it trains on. So, for this call, the model's
    # generation config is the library default: only `gen_config` decides.
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=gen_config,
            synced_gpus=synced_gpus,
        )
    finally:
        model.generation_config = saved
    responses = out[:, input_ids.shape[1] :]
    if responses.shape[1] < max_new_tokens:
        fill = responses.new_full((responses.shape[0], max_new_tokens - responses.shape[1]), pad_token_id)
        responses = torch.cat([responses, fill], dim=1)
    return responses


@torch.no_grad()
def sample(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    synced_gpus: bool = False,
    shared_prefix_k: int = 1,
) -> Tensor:
    """`hf_generate`'s pure-temperature sampling as a plain KV-cached loop: the same tokens under the same RNG.

    Why: at small model sizes HF `generate` spends more time per token in its own machinery (logits
    processors and stopping-criteria objects, input re-preparation, growing input_ids copies) than in the
    forward. This loop runs HF's sampler ops in HF's order (float32 logits of the last position / T,
    softmax, one `torch.multinomial` draw per row, finished rows padded, stop when every row has emitted
    EOS), so under the same RNG state it returns exactly `hf_generate`'s tensor (tests/test_generation.py).
    It reads no generation config at all (nothing saved with a checkpoint can change it), computes the LM
    head at the last position only, and returns [B, max_new_tokens], pad-filled.

    `synced_gpus` (ZeRO-3 / FSDP: a forward is a collective, every process must keep stepping until all
    have finished): handed to `hf_generate`, which implements that protocol.
    `shared_prefix_k` > 1: rows p * k + j repeat prompt p (RLOO's layout); the prefill runs each prompt
    once and repeats its KV cache k times. The caller decided that the rows and the model allow it
    (`shared_prefix_usable`); a call where they do not raises (there is no quiet plain prefill).
    """
    if synced_gpus:
        if shared_prefix_k > 1:
            raise ValueError("sample: a shared prefill needs whole parameters; with synced_gpus pass shared_prefix_k=1")
        return hf_generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                        temperature=temperature, synced_gpus=True)
    from transformers import DynamicCache

    while not hasattr(model, "generate") and hasattr(model, "module"):  # DDP: the HF module
        model = model.module
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_argument(model)
    rows, device = input_ids.shape[0], input_ids.device
    mask = attention_mask.long()
    position = position_ids_from_mask(mask)
    step_ids = input_ids
    out = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.long, device=device)
    ones = mask.new_ones(rows, 1)
    k = shared_prefix_k
    if k > 1:
        _require_shared(model, input_ids, mask, input_ids.shape[1], k, "grouped")
    for t in range(max_new_tokens):
        if t == 0 and k > 1:  # prefill each prompt once (1/k of the prompt FLOPs), then repeat its cache
            logits = model(input_ids=input_ids[::k], attention_mask=mask[::k], position_ids=position[::k],
                           use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits.repeat_interleave(k, 0)
            _repeat_cache(cache, k, "grouped")
        else:
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=position, use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}).logits
        probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(probs, num_samples=1).squeeze(1)
        token = token * unfinished + pad_token_id * (1 - unfinished)
        out[:, t] = token
        unfinished = unfinished & (token != eos_token_id).long()
        if not bool(unfinished.any()):  # one host sync per token, as in generate
            break
        step_ids, position = token[:, None], position[:, -1:] + 1
        mask = torch.cat([mask, ones], dim=1)
    return out


def _explicit_generation_config(max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float,
                                do_sample: bool):
    """A GenerationConfig with every field that shapes the output set to its neutral value.

    Plain sampling (or greedy) over the full vocabulary, one sequence per prompt, exactly
    `max_new_tokens` unless EOS comes first: no truncation (top_k/top_p/min_p/typical/epsilon/eta),
    no penalties, no beams, and a plain tensor back. Fields whose neutral value is None (min_p,
    bad_words_ids, suppress_tokens, forced_bos/eos_token_id, sequence_bias, ...) cannot be pinned here:
    `generate` blanks the model's own generation config for that.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        num_beams=1,
        num_return_sequences=1,
        # the sampling distribution: softmax(logits / T) over the whole vocabulary; greedy uses none of
        # these (HF warns on a top_k it will not use, hence None there: the library default, also unused)
        temperature=temperature if do_sample else 1.0,
        top_k=0 if do_sample else None,
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        # no logit processors: penalties, bans, forced or suppressed tokens
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        length_penalty=1.0,
        renormalize_logits=False,
        remove_invalid_values=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        use_cache=True,
        output_scores=False,
        output_logits=False,
        return_dict_in_generate=False,
    )


def response_logits(model, query_responses: Tensor, attention_mask: Tensor, context_length: int,
                    shared_prefix_k: int = 1, layout: str = "grouped") -> Tensor:
    """Logits predicting each response token: [B, T_resp, V], from one forward pass.

    Only the response positions' logits are computed (`logits_to_keep`), so a 512-token prompt costs
    no [B, 512, V] logits tensor. `shared_prefix_k` > 1: rows repeat each prompt k times in `layout` and
    the prompt runs once (`shared_prefix_logits`, same values); it raises where that cannot be done.
    """
    if shared_prefix_k > 1:
        return shared_prefix_logits(model, query_responses, attention_mask, context_length, shared_prefix_k, layout)
    resp_len = query_responses.shape[1] - context_length
    kwargs = dict(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    total = query_responses.shape[1]
    # Indices (not a count) so the LM head runs on exactly the response positions: slicing a larger
    # logits tensor afterwards would cost a second logits-sized buffer in backward.
    keep = torch.arange(context_length - 1, total - 1, device=query_responses.device)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # models without logits_to_keep
        logits = model(**kwargs).logits
    if logits.shape[1] != resp_len:  # the model ignored logits_to_keep
        logits = logits[:, context_length - 1 : total - 1]
    return logits


def response_logprobs(
    model,
    query_responses: Tensor,
    attention_mask: Tensor,
    context_length: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    shared_prefix_k: int = 1,
    layout: str = "grouped",
):
    """Per-token log-probs of the response tokens under softmax(logits / T) (memory-lean, `objectives`).

    Returns logprobs [B, T_resp] (and the true token entropy [B, T_resp] when asked). `shared_prefix_k`,
    `layout`: as for `response_logits`.
    """
    logits = response_logits(model, query_responses, attention_mask, context_length, shared_prefix_k, layout)
    labels = query_responses[:, context_length:]
    logps = objectives.token_logprobs(logits, labels, temperature=temperature)
    if return_entropy:
        with torch.no_grad():
            entropy = objectives.token_entropy(logits.detach(), temperature=temperature)
        return logps, entropy
    return logps


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last position with mask 1 in each row (right-padded sequences)."""
    length = attention_mask.shape[1]
    return length - 1 - first_true_index(attention_mask.flip(-1).bool())


def reward_model_scores_with_grad(reward_model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar reward read at the last real token (the EOS) of prompt + response: [B] (differentiable).

    Runs the backbone and applies the `score` head at that one position, instead of relying on HF's
    pooling, which finds the last non-pad token by pad id and breaks when pad == EOS (Pythia).
    """
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    idx = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    return reward_model.score(picked).squeeze(-1)


@torch.no_grad()
def reward_model_scores(reward_model, input_ids: Tensor, attention_mask: Tensor, context_length: Optional[int] = None,
                        shared_prefix_k: int = 1) -> Tensor:
    """`reward_model_scores_with_grad` without autograd, as float32 (scoring rollouts, judging).

    `shared_prefix_k` > 1 with `context_length`: rows p * k + j share prompt p (the first `context_length`
    columns), which runs once (`shared_prefix_reward_scores`; it raises where that cannot be done)."""
    if shared_prefix_k > 1:
        if context_length is None:
            raise ValueError("reward_model_scores: shared_prefix_k > 1 needs the prompt's context_length")
        return shared_prefix_reward_scores(reward_model, input_ids, attention_mask, context_length,
                                           shared_prefix_k).float()
    return reward_model_scores_with_grad(reward_model, input_ids, attention_mask).float()


# --------------------------------------------------------------------------------------------------
# shared prompts: rows that repeat one prompt k times run it once
# --------------------------------------------------------------------------------------------------
# Every forward over k responses per prompt (RLOO's rloo_k completions; DPO's chosen and rejected) runs the
# prompt k times when done plainly. Here the prompt runs once, its KV cache is repeated k times, and the
# responses run on it: (k - 1) / k of the prompt tokens' compute and activations saved (most of a forward
# when prompts are long: a TL;DR prompt is several times its summary), the same values up to float rounding, and
# under grad the backward flows into the one prompt pass. It costs a second call of the model (both through
# the wrapper's forward, so DDP's hooks see them) and the repeated cache (the same K/V the plain pass keeps).
# Two row layouts: "grouped" (row p * k + j, train_rloo.py) and "tiled" (row j * B + p, data.collate_responses).
PREFIX_LAYOUTS = ("grouped", "tiled")


def _prompt_rows(rows: int, k: int, layout: str) -> slice:
    """The rows that hold each prompt once."""
    return slice(None, None, k) if layout == "grouped" else slice(0, rows // k)


def _repeat_rows(x: Tensor, k: int, layout: str) -> Tensor:
    """Inverse of `_prompt_rows`: each row back k times, in `layout`."""
    return x.repeat_interleave(k, 0) if layout == "grouped" else x.repeat(k, *([1] * (x.dim() - 1)))


def _cache_argument(model) -> str:
    """transformers >= 5.2x names the forward's argument `cache` (`past_key_values` is deprecated); older
    ones only know the latter."""
    return "cache" if "cache" in inspect.signature(distributed.hf_model(model).forward).parameters else "past_key_values"


def _repeat_cache(cache, k: int, layout: str) -> None:
    """Repeat every layer's keys and values k times in place (a DynamicCache of transformers >= 4.56)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and torch.is_tensor(layer.keys) for layer in layers):
        raise TypeError(f"shared prompt pass: cannot repeat a {type(cache).__name__} (needs transformers >= 4.56's "
                        "DynamicCache); set shared_prefix: false")
    for layer in layers:
        layer.keys, layer.values = _repeat_rows(layer.keys, k, layout), _repeat_rows(layer.values, k, layout)


def shared_prefix_supported(model) -> bool:
    """Whether this model can run a prompt once for several rows at all: a run decides it once per model
    (train_rloo.prompt_sharing), and every forward of the run then takes the shared or the plain path.
    The plain path (it costs the prompt's k - 1 repeated passes, nothing else) when:
    - parameters are sharded (FSDP, ZeRO-3): every forward all-gathers them, so two forwards gather twice,
      which eats the saving, and their backward prefetch / reshard expects one forward;
    - gradient checkpointing: HF turns the KV cache off in training then, and a recomputed prompt pass
      would not be shared anyway;
    - an encoder-decoder model;
    - a wrapper that is not the HF model itself (a DeepSpeed engine, whose forward passes on only its own
      arguments: ZeRO-2 runs the plain path)."""
    from transformers import PreTrainedModel

    hf = distributed.hf_model(model)
    if not isinstance(hf, PreTrainedModel):
        return False
    checkpointing = getattr(hf, "is_activation_checkpointing", None)  # transformers 5 name; 4.x: the old one
    if checkpointing is None:
        checkpointing = getattr(hf, "is_gradient_checkpointing", False)
    return not (checkpointing or getattr(hf.config, "is_encoder_decoder", False) or distributed.parameters_sharded(model))


def shared_prefix_usable(model, input_ids: Tensor, attention_mask: Tensor, context_length: int, k: int,
                         layout: str = "grouped") -> bool:
    """Whether the prompt may run once for these k-row groups: k >= 2, the model allows it
    (`shared_prefix_supported`) and the rows repeat each prompt k times in `layout`."""
    if layout not in PREFIX_LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {PREFIX_LAYOUTS}")
    rows = input_ids.shape[0]
    if k < 2 or rows % k or rows == 0 or not shared_prefix_supported(model):
        return False
    sel = _prompt_rows(rows, k, layout)
    return all(torch.equal(_repeat_rows(x[sel, :context_length], k, layout), x[:, :context_length])
               for x in (input_ids, attention_mask))


def _require_shared(model, input_ids: Tensor, attention_mask: Tensor, context_length: int, k: int, layout: str) -> None:
    """A shared prompt pass was asked for: refuse (rather than quietly run the plain one) where it cannot be."""
    if not shared_prefix_usable(model, input_ids, attention_mask, context_length, k, layout):
        raise ValueError(
            f"shared prompt pass asked for {input_ids.shape[0]} rows in groups of k = {k} ({layout}), but the rows do "
            "not repeat each prompt k times or the model cannot share a prompt pass (sharded parameters, gradient "
            "checkpointing, encoder-decoder): decide with shared_prefix_supported and pass shared_prefix_k=1"
        )


def _shared_prefix_forward(module, input_ids: Tensor, attention_mask: Tensor, context_length: int, k: int,
                           layout: str, prompt_kw: dict, rest_kw: dict):
    """Prompt pass over each prompt once (fills the KV cache), the cache repeated k times, then the pass over
    every row's continuation (the caller ran `_require_shared`). Returns both outputs."""
    p = context_length
    sel = _prompt_rows(input_ids.shape[0], k, layout)
    q_ids, q_mask = input_ids[sel, :p], attention_mask[sel, :p]
    first = module(input_ids=q_ids, attention_mask=q_mask, position_ids=position_ids_from_mask(q_mask),
                   use_cache=True, **prompt_kw)
    cache = getattr(first, "cache", None) or first.past_key_values  # transformers 5.x renamed the output
    _repeat_cache(cache, k, layout)
    position = position_ids_from_mask(attention_mask)[:, p:]
    rest = module(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=position, use_cache=True,
                  **{_cache_argument(module): cache}, **rest_kw)
    return first, rest


def shared_prefix_logits(model, query_responses: Tensor, attention_mask: Tensor, context_length: int, k: int,
                         layout: str = "grouped") -> Tensor:
    """`response_logits` with each prompt run once for its k rows: the prompt pass's last position predicts
    the first response token, the response pass the rest. Raises where the rows or the model do not allow it."""
    if "logits_to_keep" not in inspect.signature(distributed.hf_model(model).forward).parameters:
        raise TypeError(f"shared prompt pass: {type(distributed.hf_model(model)).__name__}.forward takes no "
                        "logits_to_keep; set shared_prefix: false")
    _require_shared(model, query_responses, attention_mask, context_length, k, layout)
    resp_len = query_responses.shape[1] - context_length
    keep = torch.arange(0, resp_len - 1, device=query_responses.device)  # the last response token predicts nothing
    first, rest = _shared_prefix_forward(model, query_responses, attention_mask, context_length, k, layout,
                                         dict(logits_to_keep=1), dict(logits_to_keep=keep))
    return torch.cat([_repeat_rows(first.logits[:, -1:], k, layout), rest.logits[:, : resp_len - 1]], 1)


def shared_prefix_reward_scores(reward_model, input_ids: Tensor, attention_mask: Tensor, context_length: int, k: int,
                                layout: str = "grouped") -> Tensor:
    """`reward_model_scores_with_grad` with each prompt run once for its k rows: the score head at the last
    real token, which lies in the continuation (every row needs one: RLOO's responses start with a real
    token). Raises where the rows or the model do not allow it."""
    rest_mask = attention_mask[:, context_length:]
    if rest_mask.shape[1] == 0 or not bool(rest_mask[:, 0].all()):
        raise ValueError("shared prompt pass: a row has no response token to read the score at; score it plainly")
    _require_shared(reward_model, input_ids, attention_mask, context_length, k, layout)
    hf = distributed.hf_model(reward_model)
    _, rest = _shared_prefix_forward(getattr(hf, hf.base_model_prefix), input_ids, attention_mask, context_length,
                                     k, layout, {}, {})
    hidden = rest.last_hidden_state
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(rest_mask)]
    return hf.score(picked).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# text in, text out (evaluation, the reward-model judge, the toy lab)
# --------------------------------------------------------------------------------------------------
@dataclass
class Completion:
    text: str  # decoded completion, EOS removed, stripped
    num_tokens: int  # its length in tokens (the EOS not counted)


def complete_prompts(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    max_prompt_length: Optional[int] = None,
    skip_special_tokens: bool = True,
    device=None,
    synced_gpus: bool = False,
) -> Iterator[list[Completion]]:
    """Decode `prompts` (greedily by default, else sampled at `temperature`) `batch_size` at a time;
    yields each batch's completions, in order, so a caller can save and report as it goes.

    Each prompt is tokenised alone without special tokens and keeps its last `max_prompt_length` tokens
    (when given, so "TL;DR:" stays next to the completion), left-padded; each completion is cut after its
    first EOS (`truncate_after_eos`) and decoded without it (`skip_special_tokens=False` keeps any other
    special token the model emitted in the text). `synced_gpus`: as for `generate` (ZeRO-3 / FSDP2; every
    process must then decode the same number of batches).
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        queries = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts[start : start + batch_size]]
        if max_prompt_length:
            queries = [q[-max_prompt_length:] for q in queries]
        ids, mask = left_pad(queries, pad)
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        responses = hf_generate(model, ids, mask, max_new_tokens, eos, pad, temperature=temperature, do_sample=do_sample,
                             synced_gpus=synced_gpus)
        responses, response_mask, _ = truncate_after_eos(responses, eos, pad)
        batch = []
        for row, keep in zip(responses.cpu(), response_mask.cpu()):
            tokens = row[keep.bool()].tolist()
            if tokens and tokens[-1] == eos:
                tokens = tokens[:-1]
            batch.append(Completion(tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens).strip(), len(tokens)))
        yield batch


def score_completions(
    reward_model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int,
    max_prompt_length: Optional[int] = None,
    device=None,
) -> list[float]:
    """Reward of each prompt + " " + completion.strip() + EOS (the TL;DR format the reward models were
    trained on), read at the EOS (`reward_model_scores`), `batch_size` sequences per forward.

    The prompt keeps its last `max_prompt_length` tokens when given. Sequences are left-padded; with
    position ids counted over real tokens a score does not depend on the padding (tests/test_generation.py
    checks it against right padding).
    """
    seqs = []
    for prompt, completion in zip(prompts, completions, strict=True):
        q = tokenizer(prompt, add_special_tokens=False).input_ids
        if max_prompt_length:
            q = q[-max_prompt_length:]
        seqs.append(q + tokenizer(" " + completion.strip(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    out: list[float] = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[start : start + batch_size], tokenizer.pad_token_id)
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        out.extend(reward_model_scores(reward_model, ids, mask).tolist())
    return out
