"""The online trainers' rollout: models, prompts, sampling, scoring and the log-probs every online step reads.

Shared by the online trainers (train_rloo.py, train_online.py): they run steps 1-2 and 7 from here and their
own steps 3-6 in between. A config mixes in `RolloutArgs` (the fields read here), `PeftArgs`, `VLLMArgs` and
`EvalArgs` next to `TrainConfig`; the functions take that config as `c`.
  1. generate: `rloo_k` completions per prompt (KV-cached sampling at `temperature`, top_k 0 / top_p 1,
     `generation.sample`), each truncated after its first EOS (EOS kept), the rest padded and the all-pad
     tail columns dropped                                                         `generate`, `cut_to_longest`
     (with `use_vllm`: on the run's vLLM engine, which also returns its log-probs     `engine_generate`)
  2. score: prompt + completion with the reward model at the last real token (or `reward_fn`); the
     missing-EOS penalty                                                                             `score`
  3. (the trainer's) log-probs of the sampled tokens under a model, from logits / T          `policy_logprobs`
  7. kl_prev: log-probs of the same samples after the update                                `kl_prev_logprobs`
Around them: `load_models` (tokenizer, policy with dropout off, the reference when `c.needs_ref()`, the
reward model or `reward_fn`; with `use_peft` a LoRA policy whose reference is itself with the adapter
switched off, `Models.reference`; the vLLM engine with `use_vllm`), `sync_engine` (the updated weights into
the engine, `full_policy_weights`, and the probe that checks them), `prompt_batch` (this process's prompts), `prompt_sharing` (the shared prompt
pass, decided once per run), and the metrics of the rollout's own values (`rollout_metrics`, `kl_prev_metrics`,
`entropy_metrics`).
The run around the iterations is shared too (`OnlineRun`): `start_run` (accelerator, run directory, models,
optimizer and schedule, prompt stream, resume, the win-rate evaluator), then per iteration `next_prompts`,
`sync_after_update`, `add_bookkeeping` (data/*, episodes, time/*, perf/*) and `end_iteration` (log,
evaluate, samples, checkpoint), and `finish`; each trainer's `main` keeps only its own steps and metrics.

Decisions (documented here once):
- Batch layout: each process holds whole prompt groups; completion j of local prompt p sits at row
  p * k + j (`prompt_batch` repeats each prompt k times).
- Policy and reward model with different vocabularies: the text is RE-TOKENISED for the reward model
  (decoded prompt + decoded response, plus the reward tokenizer's EOS when the response emitted EOS).
  Identical vocabularies pass the token ids through unchanged (no decode/encode round trip).
- Prompts longer than `max_prompt_length` tokens are cut from the LEFT (the end, "TL;DR:", is kept);
  the trainer logs the cumulative count as `data/truncated_prompts`.
- `objective/kl_prev*` keys are sums over the real response tokens of a sequence, averaged over the
  global batch; the plain key is the k1 estimate, `_k3` the non-negative k3 one.
- KL between consecutive policies, from this iteration's samples (drawn from pi_old = pi_{t-1}) and their
  log-probs before (old) and after the update (a post-update forward, pi_new = pi_t):
  `objective/kl_prev` (+ `_k3`) is the paper's direction KL(pi_t || pi_{t-1}) (Fig. 3 bottom, Figs. 10-12),
  importance-weighted by w = pi_new(y) / pi_old(y) (`objectives.kl_new_old_from_old_samples`);
  `objective/kl_prev_reverse` (+ `_k3`) is KL(pi_{t-1} || pi_t), which needs no weight. They agree to second
  order while the update is small and part when the policy drifts. `objective/kl_prev_ess` is the effective
  sample fraction of the weights over the global batch (1: reliable; near 1/batch: kl_prev rests on a few
  sequences). `kl_prev_per_prompt` = m > 0 computes them all on the first m completions of each prompt
  (`objective/kl_prev_samples` says how many sequences; a subset of i.i.d. samples is still a sample of
  pi_{t-1}, so nothing is biased, only noisier by about sqrt(k / m)).
- `objective/entropy` is the batch mean of the unweighted sequence quantity -log pi(y|x) = sum_t -log
  pi(y_t | x, y_<t) over real response tokens at the training temperature (a one-sample estimate of the
  sequence entropy, Fig. 1), logged for every objective; `objective/entropy_per_token` is the mean over
  sequences of the same divided by |y|.
- Dropout is switched off in the policy (old and new log-probs must come from the same function).
- Programmatic reward hook: `reward_fn: "package.module:function"` in the config, or
  `main(cfg, reward_fn=callable)`, replaces the reward model. It is called as
  fn(prompts=list[str], completions=list[str], response_ids=Tensor[B, T], response_mask=Tensor[B, T])
  and returns B scores (tensor or list); the EOS penalty is still applied afterwards.
- Shared prompt pass (`shared_prefix`): every forward runs each prompt once for its k completions and
  repeats its KV cache; `prompt_sharing` decides it once per run and forward (plain under FSDP / ZeRO-3 /
  gradient checkpointing or for chunks that cut prompt groups).
"""
from __future__ import annotations

import importlib
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import distributed, generation, lora, objectives, vllm_engine
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, cfg
from .data import PromptStream, load_any_dataset, require_columns, tokenize_prompts
from .distributed import resolve_mixed_precision, resolve_trackers, seed_everything
from .evaluation import TrainingEvaluator
from .models import check_context_length, load_model_config, load_policy, load_reward_model, load_tokenizer, resolve_dtype
from .runs import check_finite, open_run_dir
from .schedules import build_lr_scheduler


# ----------------------------------------------------------------------------------------------------
# config fields
# ----------------------------------------------------------------------------------------------------
@dataclass
class RolloutArgs:
    """What the rollout (steps 1-2, 7) and the model loading read (mixed into an online trainer's config
    next to TrainConfig: `class RLOOConfig(PeftArgs, EvalArgs, VLLMArgs, RolloutArgs, TrainConfig)`)."""

    # models and data (the shared fields are in TrainConfig; here the ones the online trainers add or read differently)
    model_name_or_path: str = cfg(
        "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr", "policy to train (hub id, local path or toylab://NAME)"
    )
    ref_model_name_or_path: Optional[str] = cfg(None, "reference policy for KL (default: model_name_or_path)")
    reward_model_name_or_path: Optional[str] = cfg(
        "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr",
        "one-label sequence-classifier reward model (ignored when reward_fn is set)",
    )
    reward_fn: Optional[str] = cfg(
        None, "programmatic reward 'package.module:function' replacing the reward model (see module docstring)"
    )
    dataset_name: str = cfg("trl-lib/tldr", "prompt dataset: hub id, local json/jsonl/parquet, or toylab://NAME")
    max_prompt_length: int = cfg(512, "prompts longer than this many tokens are cut from the left (counted)")
    # sampling
    response_length: int = cfg(53, "new tokens sampled per completion")
    temperature: float = cfg(0.7, "sampling temperature; every log-prob uses logits / temperature")
    missing_eos_penalty: float = cfg(1.0, "subtracted from the score of completions that never emit EOS")
    rloo_k: int = cfg(2, "completions per prompt (>= 2 for the leave-one-out baseline)")
    local_rollout_forward_batch_size: int = cfg(64, "rows per generation / no-grad forward chunk on each process")
    kl_prev_per_prompt: int = cfg(
        0, "completions per prompt whose post-update log-probs estimate objective/kl_prev* (0: all rloo_k; m in "
        "1..rloo_k: the first m of each prompt): step 7's forward costs m / rloo_k, the estimate stays unbiased "
        "but rests on prompts x m sequences (objective/kl_prev_samples)"
    )
    # logging
    sample_every: int = cfg(10, "write completions to samples.jsonl every N iterations (0: never)")
    num_samples: int = cfg(4, "completions written per sample_every")

    def range_checks(self) -> list:
        """Value ranges of the rollout fields (config.check_ranges; chained with the other mixed-in configs)."""
        return getattr(super(), "range_checks", list)() + [
            (self.response_length >= 1, f"`response_length` = {self.response_length} must be >= 1"),
            (self.temperature > 0, f"`temperature` = {self.temperature} must be > 0"),
            (self.local_rollout_forward_batch_size >= 1,
             f"`local_rollout_forward_batch_size` = {self.local_rollout_forward_batch_size} must be >= 1"),
            (0 <= self.kl_prev_per_prompt <= self.rloo_k,
             f"`kl_prev_per_prompt` = {self.kl_prev_per_prompt} must be in 0..rloo_k = {self.rloo_k} (0: every completion)"),
        ]

    def needs_ref(self, iteration: Optional[int] = None) -> bool:
        """Is the reference model used at `iteration` (None: at all in this run, i.e. must it be loaded)?
        Here: always; a trainer that uses it less often overrides this (RLOOConfig: `kl_ref_every`)."""
        return True


# ----------------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------------
def chunks(n: int, size: int):
    """Slices of `size` rows (the last one shorter) covering n rows."""
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


@contextmanager
def timed(timings: dict, key: str):
    """timings[key] = the wall-clock seconds of the block."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def load_reward_fn(spec: str) -> Callable:
    """The callable a `reward_fn: "package.module:function"` names (ConfigError when it cannot be had)."""
    if ":" not in spec:
        raise ConfigError(f"`reward_fn` = {spec!r} must look like 'package.module:function'")
    mod, attr = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"`reward_fn` = {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ConfigError(f"`reward_fn` = {spec!r} is not callable")
    return fn


def resolve_reward_fn(c, reward_fn: Optional[Callable] = None) -> Optional[Callable]:
    """The run's programmatic reward: `reward_fn` given to main, else the config's `reward_fn`, else None (the
    reward model scores); ConfigError when neither it nor a reward model is set."""
    if reward_fn is None and c.reward_fn:
        reward_fn = load_reward_fn(c.reward_fn)
    if reward_fn is None and not c.reward_model_name_or_path:
        raise ConfigError("set `reward_model_name_or_path` or `reward_fn`: there is nothing to score completions with")
    return reward_fn


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the modules and in the config (old and new log-probs must come from the same function)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)


def same_vocabulary(tok_a, tok_b) -> bool:
    """Token ids mean the same thing for both tokenizers (then ids pass to the reward model unchanged)."""
    return tok_a.get_vocab() == tok_b.get_vocab() and tok_a.eos_token_id == tok_b.eos_token_id


def retokenize_for_reward(policy_tok, reward_tok, query_ids, query_mask, responses, response_mask, contains_eos):
    """Decode prompt + response with the policy tokenizer and encode it with the reward tokenizer.

    The response's EOS becomes the reward tokenizer's EOS (kept only when the policy emitted one).
    Returns left-padded (input_ids, attention_mask) for the reward model.
    """
    seqs = []
    for i in range(query_ids.shape[0]):
        resp_tokens = responses[i][response_mask[i].bool()].tolist()
        if contains_eos[i]:
            resp_tokens = resp_tokens[:-1]
        # decode prompt and response together: the tokenizer decides the spacing at the seam
        text = policy_tok.decode(query_ids[i][query_mask[i].bool()].tolist() + resp_tokens, skip_special_tokens=True)
        ids = reward_tok(text, add_special_tokens=False)["input_ids"]
        if contains_eos[i]:
            ids = ids + [reward_tok.eos_token_id]
        seqs.append(ids)
    return generation.left_pad(seqs, reward_tok.pad_token_id)


# ----------------------------------------------------------------------------------------------------
# the models and the iteration's record
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSharing:
    """Rows per shared prompt pass in each forward of an iteration (`shared_prefix`; 1: the plain pass), fixed
    once per run by `prompt_sharing`; a `generation` call that cannot honour its number raises."""

    sample: int = 1  # step 1: the policy's prefill
    score: int = 1  # step 2: the reward model (1 when it reads re-tokenised text)
    old: int = 1  # step 3: the policy's no-grad forward
    ref: int = 1  # step 3: the reference
    update: int = 1  # the trainer's update when it runs whole prompt groups in row order (else shuffled rows: 1)
    kl_prev: int = 1  # step 7: kl_prev_per_prompt rows of each prompt


@dataclass
class Models:
    """What the steps run on: the accelerator, the (prepared) policy, the frozen models, the tokenizers."""

    accelerator: object
    tokenizer: object  # the policy's, left padding
    policy: torch.nn.Module
    ref_policy: Optional[torch.nn.Module] = None  # loaded only when c.needs_ref() and not use_peft
    ref_adapter_off: bool = False  # use_peft: the reference is `policy` with its LoRA adapter disabled (no copy)
    reward_model: Optional[torch.nn.Module] = None  # None when a programmatic reward_fn scores
    reward_tokenizer: object = None
    retokenize: bool = False  # the reward model reads its own tokens (other vocabulary)
    reward_fn: Optional[Callable] = None
    sharing: PromptSharing = field(default_factory=PromptSharing)  # main: `prompt_sharing` once the models are prepared
    engine: Optional[object] = None  # vllm_engine.VLLMEngine when `use_vllm` (step 1 samples with it)

    @property
    def reference_model(self) -> Optional[torch.nn.Module]:
        """The module the reference forward runs through: the frozen copy, or with use_peft the policy."""
        return self.policy if self.ref_adapter_off else self.ref_policy

    @contextmanager
    def reference(self):
        """Yields the reference model for a no-grad forward (`reference_logprobs`): the frozen copy, or with
        use_peft the (prepared) policy with its adapter switched off, decided once in `load_models`."""
        with (lora.adapter_disabled(self.policy) if self.ref_adapter_off else nullcontext()):
            yield self.reference_model


@dataclass
class Rollout:
    """One iteration's batch on this process: completion j of local prompt p sits at row p * k + j.

    Step 1 builds it; the trainer assigns each later step's returned values to the fields below the
    sample (no step writes into the record itself); every tensor has n = prompts x rloo_k rows.
    """

    query_ids: torch.Tensor  # [n, ctx] left-padded prompt tokens, each prompt repeated rloo_k times
    query_mask: torch.Tensor  # [n, ctx]
    responses: torch.Tensor  # [n, T] sampled tokens, truncated after the first EOS (kept), pad after
    response_mask: torch.Tensor  # [n, T] 1 on real response tokens
    contains_eos: torch.Tensor  # [n] bool
    completions: list = field(default_factory=list)  # decoded responses (step 2)
    scores: Optional[torch.Tensor] = None  # [n] step 2: reward-model score minus the missing-EOS penalty
    old_logprobs: Optional[torch.Tensor] = None  # [n, T] step 3: log pi_old(y_t | x, y_<t) at temperature T
    token_entropy: Optional[torch.Tensor] = None  # [n, T] step 3: entropy of softmax(logits / T)
    ref_logprobs: Optional[torch.Tensor] = None  # [n, T] step 3, None when the reference is not used
    rewards: Optional[torch.Tensor] = None  # [n] step 4: the RLHF reward r + non_score_reward
    non_score_reward: Optional[torch.Tensor] = None  # [n] step 4: the regulariser's term
    advantages: Optional[torch.Tensor] = None  # [n] step 5
    new_logprobs: Optional[torch.Tensor] = None  # [len(kl_prev_rows), T] step 7: those rows' tokens after the update
    kl_prev_rows: Optional[torch.Tensor] = None  # step 7: the rows it ran on (all, or the first m of each prompt)
    engine_logprobs: Optional[torch.Tensor] = None  # [n, T] step 1 with vLLM: the engine's log-probs of the samples

    def __post_init__(self):
        self.query_responses = torch.cat([self.query_ids, self.responses], 1)
        self.attention_mask = torch.cat([self.query_mask, self.response_mask], 1)

    @property
    def context_length(self) -> int:
        return self.query_ids.shape[1]

    def __len__(self) -> int:
        return self.query_ids.shape[0]


def load_models(c, accelerator, reward_fn: Optional[Callable], log_prefix: str = "[rollout]") -> Models:
    """Tokenizer, policy (dropout off), the reference when `c.needs_ref()`, and the reward model unless a
    reward_fn scores. Frozen models are in the mixed-precision dtype and prepared for the engine. With
    `c.use_vllm` (VLLMArgs) this process's vLLM engine starts first, from `model_name_or_path`."""
    engine = None
    if c.use_vllm:  # chosen once: step 1 samples with it for the whole run (started first: fails fast)
        engine = vllm_engine.start_engine(c, accelerator, max_model_len=c.max_prompt_length + c.response_length)
        if accelerator.is_main_process:
            print(f"{log_prefix} vLLM engine ({engine.dtype}) started in {engine.start_seconds:.1f} s")
    frozen_dtype = resolve_dtype(c.mixed_precision, accelerator.device)
    tokenizer = load_tokenizer(c.model_name_or_path, padding_side="left", trust_remote_code=c.trust_remote_code)
    use_peft = c.use_peft
    # LoRA: the base weights are frozen, so they load in the frozen models' dtype (bf16 on GPU: 13.8 GB at 6.9B)
    policy = load_policy(c.model_name_or_path, dtype=frozen_dtype if use_peft else torch.float32,
                         trust_remote_code=c.trust_remote_code, gradient_checkpointing=c.gradient_checkpointing)
    if use_peft:  # adapter_config.json records the location the user gave
        policy = lora.apply_lora(policy, c, base_model_name_or_path=c.model_name_or_path)
    disable_dropout(policy)  # the LoRA branch's dropout too
    m = Models(accelerator, tokenizer, policy, reward_fn=reward_fn)
    if c.needs_ref() and use_peft:
        m.ref_adapter_off = True  # the reference is the base weights the policy already holds: nothing loads
    elif c.needs_ref():
        with distributed.frozen_model_loading(accelerator):
            ref = load_policy(c.ref_model_name_or_path or c.model_name_or_path, dtype=frozen_dtype, trust_remote_code=c.trust_remote_code)
        m.ref_policy = distributed.prepare_frozen_model(ref, accelerator)  # ZeRO-3: own engine, CPU offload
    if reward_fn is None:
        with distributed.frozen_model_loading(accelerator):
            rm = load_reward_model(c.reward_model_name_or_path, dtype=frozen_dtype, trust_remote_code=c.trust_remote_code)
        m.reward_model = distributed.prepare_frozen_model(rm, accelerator)
        m.reward_tokenizer = load_tokenizer(c.reward_model_name_or_path, padding_side="left", trust_remote_code=c.trust_remote_code)
        m.retokenize = not same_vocabulary(tokenizer, m.reward_tokenizer)
        if m.retokenize and accelerator.is_main_process:
            print(f"{log_prefix} policy and reward model tokenizers differ: re-tokenising text for the reward model")
    m.engine = engine
    return m


def prompt_sharing(c, m: Models, rows_local: int, update_chunk: Optional[int] = None) -> PromptSharing:
    """`shared_prefix`, decided once per run for each forward: its rows share each prompt's pass when the model
    can (`generation.shared_prefix_supported`: not under FSDP / ZeRO-3 / gradient checkpointing) and every chunk
    holds whole prompt groups (its size a multiple of the group, or the whole batch); otherwise that forward
    runs plain for the whole run. `rows_local`: the process's rows per iteration; `update_chunk`: the rows of
    the trainer's update forward when it runs whole prompt groups in row order (None: shuffled rows, plain).
    Call it on the prepared models (preparing is what shards them)."""
    if not c.shared_prefix:
        return PromptSharing()

    def rows_per_pass(model, group: int, rows: int, chunk: int = c.local_rollout_forward_batch_size) -> int:
        whole_groups = chunk >= rows or chunk % group == 0
        return group if model is not None and whole_groups and generation.shared_prefix_supported(model) else 1

    per_prompt = c.kl_prev_per_prompt or c.rloo_k
    k, rows = c.rloo_k, rows_local
    return PromptSharing(
        sample=rows_per_pass(m.policy, k, rows),
        score=1 if m.retokenize else rows_per_pass(m.reward_model, k, rows),
        old=rows_per_pass(m.policy, k, rows),
        ref=rows_per_pass(m.reference_model, k, rows),
        update=rows_per_pass(m.policy, k, rows, update_chunk) if update_chunk is not None else 1,
        kl_prev=rows_per_pass(m.policy, per_prompt, rows // k * per_prompt),
    )


# ----------------------------------------------------------------------------------------------------
# steps 1-2, 3's forwards, 7
# ----------------------------------------------------------------------------------------------------
def prompt_texts(tokenizer, query_ids: torch.Tensor, query_mask: torch.Tensor) -> list[str]:
    """The prompts as text (left padding dropped)."""
    pad_id = tokenizer.pad_token_id
    return tokenizer.batch_decode(query_ids * query_mask + pad_id * (1 - query_mask), skip_special_tokens=True)


def prompt_batch(c, tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This process's prompts, cut from the left to max_prompt_length, left-padded, each repeated rloo_k
    times (row p * k + j); returns query ids, mask and the number of prompts cut."""
    prompt_ids, cut = tokenize_prompts(tokenizer, texts, c.max_prompt_length)
    query_ids, query_mask = generation.left_pad(prompt_ids, tokenizer.pad_token_id)
    return query_ids.repeat_interleave(c.rloo_k, 0).to(device), query_mask.repeat_interleave(c.rloo_k, 0).to(device), cut


def generate(c, m: Models, query_ids: torch.Tensor, query_mask: torch.Tensor, iteration: int,
             first_row: int) -> Rollout:
    """Step 1: sample one completion per row at the training temperature, truncate after the first EOS.

    Each chunk samples from a stream tied to its first row in the GLOBAL batch (`first_row` = this
    process's offset), not to the process: with `local_rollout_forward_batch_size` dividing the
    per-process batch, N processes sample exactly what one process samples (distributed.sampling_rng).
    With the vLLM engine (`m.engine`) every row samples with a seed of its own from (seed, iteration,
    global row), so N processes sample what one does there too; the engine's log-probs of the samples
    come back in `engine_logprobs`.
    """
    acc, tok = m.accelerator, m.tokenizer
    if m.engine is not None:
        raw, engine_lp = engine_generate(c, m, query_ids, query_mask, iteration, first_row)
    else:
        m.policy.eval()
        raw, engine_lp = [], None
        with distributed.unwrap_for_generation(acc, m.policy) as gen_model, acc.autocast():
            for s in chunks(query_ids.shape[0], c.local_rollout_forward_batch_size):
                with distributed.sampling_rng(c.seed, iteration, first_row + s.start, acc.device):
                    # generation.sample: generate's tokens without its per-token overhead (sharded: generate itself)
                    raw.append(generation.sample(gen_model, query_ids[s], query_mask[s], c.response_length,
                                                 tok.eos_token_id, tok.pad_token_id, temperature=c.temperature,
                                                 synced_gpus=distributed.needs_synced_gpus(acc),
                                                 shared_prefix_k=m.sharing.sample))
        raw = torch.cat(raw)
    responses, response_mask, contains_eos = generation.truncate_after_eos(raw, tok.eos_token_id, tok.pad_token_id)
    responses, response_mask = cut_to_longest(responses, response_mask)
    ro = Rollout(query_ids, query_mask, responses, response_mask, contains_eos)
    if engine_lp is not None:
        ro.engine_logprobs = engine_lp[:, : responses.shape[1]] * response_mask
    return ro


def engine_generate(c, m: Models, query_ids: torch.Tensor, query_mask: torch.Tensor, iteration: int,
                    first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 on the vLLM engine: (responses [n, response_length], the engine's log-probs of them), on the
    accelerator's device. The same sampling as `generation.sample` (softmax(logits / T), top_k 0, top_p 1,
    stop after the EOS, kept); the seed of global row r is (mix_seed(seed, iteration), r)
    (`vllm_engine.request_seed`). The engine sleeps between rollouts with `vllm_enable_sleep_mode`."""
    k, tok, device = c.rloo_k, m.tokenizer, m.accelerator.device
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids[::k].cpu(), query_mask[::k].cpu())]
    m.engine.wake_up()
    responses, logprobs = m.engine.generate(prompts, n=k, max_tokens=c.response_length, temperature=c.temperature,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            seed=distributed.mix_seed(c.seed, iteration), row_offset=first_row)
    if m.engine.enable_sleep_mode:
        m.engine.sleep()
    return responses.to(device), logprobs.to(device)


def full_policy_weights(accelerator, policy) -> dict[str, torch.Tensor]:
    """The policy's full HF-named weights on EVERY process (what a colocated engine loads): a LoRA
    `PeftModel` gives its base weights with the adapters added (`lora.merged_state_dict`, which gathers
    FSDP2 shards itself); any other model `accelerator.get_state_dict`, as the checkpoint writer takes them
    (ZeRO-3 / FSDP gather the shards onto the main process, which then broadcasts them: one pickled copy
    of the weights per process, the cost of colocated engines on sharded training). Every process must call it."""
    unwrapped = accelerator.unwrap_model(policy)
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None and isinstance(unwrapped, peft.PeftModel):
        return lora.merged_state_dict(policy)
    state = accelerator.get_state_dict(policy)
    if accelerator.num_processes > 1 and distributed.distributed_type(accelerator) in ("DEEPSPEED", "FSDP"):
        box = [state if accelerator.is_main_process else None]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def sync_engine(c, m: Models, probe: Optional[Rollout] = None, iteration: int = 0) -> Optional[float]:
    """Push the policy's current weights into this process's engine (every process calls it). With `probe`
    (the iteration's rollout): the mean |engine - trainer| log-prob per token of its first row (prompt +
    completion) at T=1, the largest over the processes, after the sync; a gap beyond the dtype's rounding
    stops the run (`vllm_engine.check_probe`: the engine did not take the weights). Returns that gap."""
    weights = full_policy_weights(m.accelerator, m.policy)
    m.engine.wake_up()
    m.engine.load_weights(weights.items())
    del weights
    diff = None
    if probe is not None:
        diff = engine_probe_diff(m, probe)
        try:
            vllm_engine.check_probe(diff, m.engine.dtype, iteration)
        except vllm_engine.EngineSyncError:
            m.engine.close()  # the run stops here: shut the engine down now, not at interpreter exit
            raise
    if m.engine.enable_sleep_mode:
        m.engine.sleep()
    return diff


def engine_probe_diff(m: Models, ro: Rollout) -> float:
    """Mean |engine - trainer| log-prob at T=1 over the real completion tokens of `ro`'s first row, the
    largest over the processes. T=1: the engine's prompt log-probs are the raw logits' ones."""
    prompt = ro.query_ids[0][ro.query_mask[0].bool()].tolist()
    real = ro.response_mask[0].bool()
    m.policy.eval()
    with torch.no_grad(), m.accelerator.autocast():
        trainer = generation.response_logprobs(m.policy, ro.query_responses[:1], ro.attention_mask[:1],
                                               ro.context_length, 1.0)[0].float()[real]
    engine = m.engine.sequence_logprobs(prompt, ro.responses[0][real].tolist(), temperature=1.0).to(trainer.device)
    diff = (engine - trainer).abs().mean().reshape(1)
    return float(m.accelerator.gather(diff).max())


def engine_metrics(c, ro: Rollout, gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """How far the engine's log-probs of the samples are from the trainer's old ones: the mean |difference|
    over the real tokens of the global batch; with `vllm_importance_sampling_correction`, the truncated
    importance weights' mean and the fraction truncated at the cap (tokens or sequences, as loss_level)."""
    mask = ro.response_mask.float()
    gap = gather(objectives.masked_sum((ro.engine_logprobs - ro.old_logprobs).abs().float(), mask).reshape(-1))
    out = {"rollout/engine_trainer_logprob_diff": float(gap.sum()) / max(float(gather(mask.sum(1)).sum()), 1.0)}
    if c.vllm_importance_sampling_correction:
        raw = objectives.truncated_importance_weights(ro.old_logprobs, ro.engine_logprobs, ro.response_mask,
                                                      math.inf, c.loss_level)
        real = ro.response_mask.bool() if c.loss_level == "token" else torch.ones_like(raw, dtype=torch.bool)
        raw = raw[real].double()  # real tokens, or every sequence
        # sums and counts per process, then over the processes (per-token tensors differ in length between them)
        totals = gather(torch.stack([raw.clamp(max=c.vllm_importance_sampling_cap).sum(),
                                     (raw > c.vllm_importance_sampling_cap).double().sum(),
                                     torch.tensor(float(raw.numel()), dtype=torch.float64, device=raw.device)]
                                    ).reshape(1, 3)).sum(0)
        out["rollout/is_weight_mean"] = float(totals[0] / totals[2].clamp(min=1))
        out["rollout/is_clipped_frac"] = float(totals[1] / totals[2].clamp(min=1))
    return out


def cut_to_longest(responses: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the all-pad tail columns: keep the longest real row (EOS included) and nothing after.

    Every later forward (reward model, old / reference / updated policy, kl_prev) then runs on T_max real
    columns instead of `response_length`: when every sample stops early that is most of their cost. The
    dropped columns carry mask 0, so no value changes (tests/test_train_rloo.py checks every metric);
    per-token tensors of the rollout are [n, T_max] (T_max may differ between processes: only per-sequence
    values are gathered).
    """
    longest = max(int(response_mask.sum(1).max()), 1) if response_mask.numel() else responses.shape[1]
    return responses[:, :longest], response_mask[:, :longest]


def score(c, m: Models, ro: Rollout) -> tuple[list[str], torch.Tensor]:
    """Step 2: the decoded completions, and one score per completion (reward model at the last real token, or
    `reward_fn`) minus the missing-EOS penalty."""
    n, device = len(ro), m.accelerator.device
    completions = m.tokenizer.batch_decode(ro.responses, skip_special_tokens=True)  # padded after EOS already
    if m.reward_fn is not None:
        scores = torch.as_tensor(
            m.reward_fn(prompts=prompt_texts(m.tokenizer, ro.query_ids, ro.query_mask), completions=completions,
                        response_ids=ro.responses, response_mask=ro.response_mask),
            dtype=torch.float32, device=device,
        ).reshape(-1)
        if scores.shape[0] != n:
            raise ValueError(f"reward_fn returned {scores.shape[0]} scores for {n} completions")
    else:
        if m.retokenize:  # other tokens: no shared prompt columns (m.sharing.score is 1)
            rm_ids, rm_mask = retokenize_for_reward(m.tokenizer, m.reward_tokenizer, ro.query_ids, ro.query_mask,
                                                    ro.responses, ro.response_mask, ro.contains_eos)
            rm_ids, rm_mask, context_length = rm_ids.to(device), rm_mask.to(device), None
        else:
            rm_ids, rm_mask, context_length = ro.query_responses, ro.attention_mask, ro.context_length
        with m.accelerator.autocast():
            scores = torch.cat([generation.reward_model_scores(m.reward_model, rm_ids[s], rm_mask[s], context_length,
                                                               m.sharing.score)
                                for s in chunks(n, c.local_rollout_forward_batch_size)])
    return completions, objectives.missing_eos_penalty(scores, ro.contains_eos, c.missing_eos_penalty)


def policy_logprobs(c, m: Models, ro: Rollout, model, share: int, return_entropy: bool = False,
                    rows: Optional[torch.Tensor] = None):
    """No-grad log-probs of the sampled tokens under `model` from logits / T, in chunks (`share` rows per
    prompt pass: a `PromptSharing` field). The forwards go through the prepared model, so sharded engines
    gather their parameters. Step 7 calls it after the update on `rows` (`kl_prev_rows`)."""
    model.eval()
    ids, mask = (ro.query_responses, ro.attention_mask) if rows is None else (ro.query_responses[rows], ro.attention_mask[rows])
    lps, ents = [], []
    with torch.no_grad(), m.accelerator.autocast():
        for s in chunks(ids.shape[0], c.local_rollout_forward_batch_size):
            out = generation.response_logprobs(model, ids[s], mask[s], ro.context_length, c.temperature,
                                               return_entropy=return_entropy, shared_prefix_k=share)
            if return_entropy:
                lps.append(out[0].float())
                ents.append(out[1].float())
            else:
                lps.append(out.float())
    return (torch.cat(lps), torch.cat(ents)) if return_entropy else torch.cat(lps)


def reference_logprobs(c, m: Models, ro: Rollout) -> torch.Tensor:
    """Step 3's reference log-probs of the sampled tokens (`policy_logprobs` of `m.reference()`)."""
    with m.reference() as ref:
        return policy_logprobs(c, m, ro, ref, m.sharing.ref)


def kl_prev_rows(c, n: int, device=None) -> tuple[torch.Tensor, int]:
    """Step 7's rows: the first m = `kl_prev_per_prompt` completions of each prompt (rows p * k + j, j < m;
    all when 0), and m. Any fixed subset of a prompt's i.i.d. samples is a sample of pi_{t-1} too, so the
    estimates stay unbiased; their variance grows by about k / m."""
    per_prompt = c.kl_prev_per_prompt or c.rloo_k
    rows = torch.arange(n, device=device).view(-1, c.rloo_k)[:, :per_prompt].reshape(-1)
    return rows, per_prompt


def kl_prev_logprobs(c, m: Models, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 7: the `kl_prev_rows` and their samples' log-probs under the updated policy."""
    rows, _ = kl_prev_rows(c, len(ro), ro.responses.device)
    return rows, policy_logprobs(c, m, ro, m.policy, m.sharing.kl_prev, rows=rows)


# ----------------------------------------------------------------------------------------------------
# metrics of the rollout's own values
# ----------------------------------------------------------------------------------------------------
def kl_prev_metrics(old_logprobs: torch.Tensor, new_logprobs: torch.Tensor, response_mask: torch.Tensor,
                    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """KL between consecutive policies on this iteration's samples (drawn from pi_old), both directions.

    Per-sequence values from `objectives`, averaged over the global batch (`gather` concatenates every
    process's rows); the effective sample fraction of the importance weights is over the global batch too.
    """
    out = {}
    for key, fn in (("objective/kl_prev", objectives.kl_new_old_from_old_samples),  # paper: KL(pi_t || pi_{t-1})
                    ("objective/kl_prev_reverse", objectives.kl_old_new_from_old_samples)):
        for suffix, estimator in (("", "k1"), ("_k3", "k3")):
            out[key + suffix] = float(gather(fn(old_logprobs, new_logprobs, response_mask, estimator).float()).mean())
    log_w = objectives.masked_sum(new_logprobs.double() - old_logprobs.double(), response_mask)
    out["objective/kl_prev_ess"] = float(objectives.effective_sample_fraction(gather(log_w)))
    return out


def entropy_metrics(old_logprobs: torch.Tensor, response_mask: torch.Tensor,
                    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """Unweighted sampled entropy -log pi(y|x) (and per token), batch means over the global batch (Fig. 1)."""
    ent = objectives.sampled_entropy(old_logprobs, response_mask)
    return {"objective/entropy": float(gather(ent.sequence.float()).mean()),
            "objective/entropy_per_token": float(gather(ent.per_token.float()).mean())}



def global_mean(x: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> float:
    """The mean of per-row values over the global batch (`gather` concatenates every process's rows)."""
    return float(gather(x.detach().float().reshape(-1)).mean())


def rollout_metrics(c, ro: Rollout, gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """The metrics of the rollout's own values that every online trainer logs, means over the global batch:
    objective/scores, the sampled entropy (`entropy_metrics`), objective/kl_ref (+ _k3) when the reference ran
    and kl_ref_every (`c.kl_ref_interval()`), kl_prev* (`kl_prev_metrics`) and kl_prev_samples, policy/entropy
    (a token mean), response/length and response/eos_fraction."""
    tokens_global = float(gather(ro.response_mask.sum(1).float()).sum())

    def seq_sum(x: torch.Tensor) -> torch.Tensor:
        return objectives.masked_sum(x, ro.response_mask)

    metrics = {"objective/scores": global_mean(ro.scores, gather),
               **entropy_metrics(ro.old_logprobs, ro.response_mask, gather)}
    if ro.ref_logprobs is not None:
        for suffix, estimator in (("", "k1"), ("_k3", "k3")):
            kl = seq_sum(objectives.kl_estimate(ro.old_logprobs, ro.ref_logprobs, estimator))
            metrics["objective/kl_ref" + suffix] = global_mean(kl, gather)
    metrics["objective/kl_ref_every"] = c.kl_ref_interval()
    kl_rows = ro.kl_prev_rows if ro.kl_prev_rows is not None else slice(None)
    metrics.update(kl_prev_metrics(ro.old_logprobs[kl_rows], ro.new_logprobs, ro.response_mask[kl_rows], gather))
    metrics["objective/kl_prev_samples"] = c.global_batch_size // c.rloo_k * (c.kl_prev_per_prompt or c.rloo_k)
    metrics["policy/entropy"] = float(gather(seq_sum(ro.token_entropy)).sum()) / max(tokens_global, 1.0)
    metrics["response/length"] = tokens_global / c.global_batch_size
    metrics["response/eos_fraction"] = global_mean(ro.contains_eos, gather)
    return metrics


# ----------------------------------------------------------------------------------------------------
# the run around the iterations: setup, an iteration's prompts and bookkeeping, the end
# ----------------------------------------------------------------------------------------------------
class Timings(dict):
    """An iteration's phase seconds (`timed` fills them) and when it started, on the wall and CPU clocks."""

    def __init__(self):
        super().__init__()
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()


@dataclass
class OnlineRun:
    """What an online trainer's `main` runs on (`start_run` builds it) and the bookkeeping around its steps.

    `plan` is the trainer's batch plan; read here: prompts_global, prompts_local, rows_local, num_iterations."""

    c: object
    accelerator: object
    trackers: list
    plan: object
    run_dir: object  # runs.RunDir
    m: Models
    optimizer: torch.optim.Optimizer
    scheduler: object
    prompts: list  # the dataset's prompt column
    stream: PromptStream
    start: int  # the last finished iteration: 0, or the resumed checkpoint's
    evaluator: TrainingEvaluator
    log_prefix: str
    truncated_prompts: int = 0  # prompts cut to max_prompt_length so far, over all processes
    last_saved: int = -1  # the iteration of the last checkpoint written or resumed (-1: none)
    progress: Optional[object] = None  # the tqdm bar of `iterations`

    def iterations(self, desc: str):
        """The iterations still to run, start + 1 .. num_iterations, as a progress bar on the main process."""
        self.progress = tqdm(range(self.start + 1, self.plan.num_iterations + 1), desc=desc, initial=self.start,
                             total=self.plan.num_iterations, disable=not self.accelerator.is_main_process,
                             dynamic_ncols=True)
        return self.progress

    @property
    def first_row(self) -> int:
        """This process's first row in the global batch (`generate`'s sampling streams are tied to it)."""
        return self.accelerator.process_index * self.plan.rows_local

    def check(self, iteration: int) -> Callable[[str, torch.Tensor], None]:
        """check(name, value): stop the run with a message when `value` is not finite (`runs.check_finite`)."""
        return lambda name, value: check_finite(name, value, iteration, self.run_dir)

    def next_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's prompts of the next iteration: whole groups, each repeated rloo_k times (row p * k + j),
        as query ids and mask; the prompts cut to max_prompt_length are counted over all processes."""
        acc, per = self.accelerator, self.plan.prompts_local
        idx = self.stream.next()[acc.process_index * per : (acc.process_index + 1) * per]
        query_ids, query_mask, cut = prompt_batch(self.c, self.m.tokenizer, [self.prompts[i] for i in idx], acc.device)
        self.truncated_prompts += int(acc.gather(torch.tensor([cut], device=acc.device)).sum())
        return query_ids, query_mask

    def sync_after_update(self, ro: Rollout, iteration: int, timings: Timings) -> dict[str, float]:
        """With the vLLM engine, right after the update: the new weights into it and the probe that it took them
        (`sync_engine`, timed as weight_sync), and the engine's metrics (`engine_metrics`); {} without one."""
        if self.m.engine is None:
            return {}
        with timed(timings, "weight_sync"):
            probe_diff = sync_engine(self.c, self.m, probe=ro, iteration=iteration)
        return {"rollout/engine_logprob_diff": probe_diff, **engine_metrics(self.c, ro, self.accelerator.gather)}

    def add_bookkeeping(self, metrics: dict, iteration: int, timings: Timings) -> None:
        """The keys every online run logs next to its own: data/*, episodes, time/* (the phases, the iteration's
        wall and CPU seconds of this process) and perf/* (real response tokens per second)."""
        gbs = self.c.global_batch_size
        metrics["data/truncated_prompts"] = self.truncated_prompts
        metrics["data/epoch"] = self.stream.epoch
        metrics["episodes"] = iteration * gbs
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        t_total = time.perf_counter() - timings.wall0
        metrics["time/iteration"] = t_total
        metrics["time/iteration_cpu"] = time.process_time() - timings.cpu0  # all threads of this process
        metrics["perf/episodes_per_s"] = gbs / t_total
        metrics["perf/tokens_per_s"] = metrics["response/length"] * gbs / t_total

    def end_iteration(self, iteration: int, metrics: dict, postfix: dict, samples: Callable[[], list]) -> None:
        """Log the metrics (every logging_steps and at the end), show `postfix` on the progress bar, the win
        rate when due, `samples()` into samples.jsonl every sample_every, the checkpoint every save_steps."""
        c, m, last = self.c, self.m, self.plan.num_iterations
        if iteration % c.logging_steps == 0 or iteration == last:
            self.run_dir.log_metrics(metrics, iteration)
        self.progress.set_postfix(**postfix, refresh=False)
        if self.evaluator.due(iteration):  # before the checkpoint: a resume redoes it
            self.run_dir.log_metrics(self.evaluator.evaluate(m.policy, m.tokenizer, iteration, engine=m.engine), iteration)
        if c.sample_every > 0 and iteration % c.sample_every == 0 and c.num_samples > 0:
            self.run_dir.append_jsonl("samples.jsonl", samples())
        if (c.save_steps > 0 and iteration % c.save_steps == 0) or iteration == last:
            self._save(iteration, keep_last=c.save_total_limit)
            self.last_saved = iteration

    def _save(self, iteration: int, keep_last=None) -> None:
        save_checkpoint(self.run_dir, iteration, self.m.policy, self.m.tokenizer, self.optimizer, self.scheduler,
                        state={"data": self.stream.state(), "truncated_prompts": self.truncated_prompts},
                        keep_last=keep_last)

    def finish(self, closing_summary: Callable[[Path], None]) -> Path:
        """After the last iteration: a checkpoint if none exists (resumed at the end), the engine closed, the
        trackers ended, `closing_summary(run path)` on the main process; returns the run directory."""
        if self.last_saved < 0 and latest_checkpoint(self.run_dir.path) is None:  # nothing ran (resumed at the end)
            self._save(self.start)
        if self.m.engine is not None:
            self.m.engine.close()
        self.accelerator.wait_for_everyone()
        if self.trackers:
            self.accelerator.end_training()
        if self.accelerator.is_main_process:
            closing_summary(self.run_dir.path)
        return self.run_dir.path


def start_run(c, reward_fn: Optional[Callable], batch_plan: Callable[[object, int], object], log_prefix: str,
              update_chunk: Optional[int] = None) -> OnlineRun:
    """Everything before an online trainer's first iteration, in this order: the accelerator and trackers, the
    batch plan (`batch_plan(c, num_processes)`: its errors come before anything is written), the reward (the
    config's or main's `reward_fn`, else the reward model), the run directory (refuses another run's
    output_dir unless --resume / --overwrite_output_dir) with config.yaml, the seeds, the context-length
    check, `load_models`, AdamW over the trainable parameters with one scheduler step per iteration, the
    prepared policy, `prompt_sharing` (`update_chunk`: the update's rows when it runs whole prompt groups in
    row order), the prompt stream, the resume (weights, optimizer, schedule, stream, truncated-prompt count;
    the engine gets the checkpoint's weights) and the win-rate evaluator with its iteration-0 evaluation.
    The trainer's config also carries learning_rate, lr_scheduler_type, warmup_ratio, max_grad_norm,
    per_device_train_batch_size and global_batch_size."""
    from accelerate import Accelerator

    if c.use_peft:
        lora.require_peft()  # without peft: one line naming the install, before anything is written
    trackers = resolve_trackers(c.report_to)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(c.mixed_precision), log_with=trackers or None,
                              project_dir=c.output_dir)
    plan = batch_plan(c, accelerator.num_processes)
    reward_fn = resolve_reward_fn(c, reward_fn)  # the programmatic reward, or None: the reward model
    run_dir, ckpt = open_run_dir(c.output_dir, c.resume, c.overwrite_output_dir, accelerator)
    run_dir.save_config(c)
    seed_everything(c.seed)
    if trackers:
        accelerator.init_trackers(c.tracker_project_name,
                                  config={k: v for k, v in vars(c).items() if isinstance(v, (int, float, str, bool))})

    # ---- models, optimizer ----
    # prompt + response must fit the policy's positions: checked from its config.json, before any weights load
    check_context_length(load_model_config(c.model_name_or_path, trust_remote_code=c.trust_remote_code),
                         c.max_prompt_length, c.response_length, "max_prompt_length", "response_length")
    m = load_models(c, accelerator, reward_fn, log_prefix=log_prefix)
    optimizer = torch.optim.AdamW([p for p in m.policy.parameters() if p.requires_grad], lr=c.learning_rate,
                                  betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon, weight_decay=c.weight_decay)
    # one scheduler step per iteration: linear gives lr_t = lr * (1 - t / num_iterations) without warmup
    scheduler = build_lr_scheduler(optimizer, c.lr_scheduler_type, plan.num_iterations, c.warmup_ratio)
    distributed.configure_deepspeed(accelerator, c.per_device_train_batch_size, c.max_grad_norm)  # no-op without DeepSpeed
    m.policy, optimizer = accelerator.prepare(m.policy, optimizer)
    m.sharing = prompt_sharing(c, m, plan.rows_local, update_chunk)  # shared prompt pass or plain, for the whole run

    # ---- data ----
    dataset = load_any_dataset(c.dataset_name, c.dataset_train_split)
    require_columns(dataset, [c.prompt_column], f"{c.dataset_name} ({c.dataset_train_split})")
    prompts = dataset[c.prompt_column]
    stream = PromptStream(len(prompts), plan.prompts_global, c.seed)

    # ---- resume ----
    start, truncated = 0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, m.policy, optimizer, scheduler, accelerator)
        start = state["step"]
        stream.load(state["data"])
        truncated = int(state.get("truncated_prompts", 0))
        if accelerator.is_main_process:
            print(f"{log_prefix} resumed from {ckpt} at iteration {start}")
        if m.engine is not None:  # the engine started from model_name_or_path: give it the checkpoint's weights
            sync_engine(c, m)
    # win rate during training (when `judge` is set): one evaluator for the run, which prints a paid judge's cost once
    evaluator = TrainingEvaluator(c, accelerator, run_dir, plan.num_iterations, start, log_prefix=log_prefix)
    if start == 0 and evaluator.due(0):  # the initial policy: the "SFT" point of the closing summary
        run_dir.log_metrics(evaluator.evaluate(m.policy, m.tokenizer, 0, engine=m.engine), 0)
    return OnlineRun(c, accelerator, trackers, plan, run_dir, m, optimizer, scheduler, prompts, stream, start, evaluator,
                     log_prefix, truncated_prompts=truncated, last_saved=start if ckpt is not None else -1)
