"""Online RLOO with a KL, maximum-entropy, minimum-entropy or no regulariser (paper Sec. 4.1-4.2).

    accelerate launch train_rloo.py --config configs/maxent_1b.yaml [--key value ...]
    python train_rloo.py --config configs/kl_1b.yaml --output_dir runs/kl_1b --resume latest

One iteration, numbered below exactly like this; each step is a function of the iteration's `Rollout`
record (this process's rows) that returns its values, which `main` (steps 3-6: `learn`) assigns to the
record, so `main` reads as the list and a step can be tested alone:
  1. generate: `rloo_k` completions per prompt (KV-cached sampling at `temperature`, top_k 0 / top_p 1,
     `generation.sample`: HF generate's tokens under the same RNG, without its per-token machinery),
     each truncated after its first EOS (EOS kept), the rest padded                      `generate`
  2. score: prompt + completion with the reward model at the last real token; missing-EOS penalty  `score`
  3. log-probs of the sampled tokens under the policy (old) and the reference, from logits / T   `policy_logprobs`
  4. regularised sequence reward: kl (beta), entropy (alpha, Eq. 6; Eq. 7 with length_normalize), none
                                                                                          `regularised_reward`
  5. RLOO leave-one-out advantages over the k samples of each prompt (optional whitening) `rloo_row_advantages`
  6. update: num_ppo_epochs x num_mini_batches clipped policy-gradient steps (grad accumulation,
     clipping, lr decay); with one epoch of one mini-batch it also does 3 (policy part)-5    `update`
  7. kl_prev: log-probs of the same samples after the update (KL between consecutive policies;
     all of them, or `kl_prev_per_prompt` of each prompt)                                  `kl_prev_logprobs`
  8. log, sample, checkpoint                                                              `iteration_metrics`
Speed (same values up to float rounding; tests/test_rloo_units.py and test_rloo_shared_prefix.py compare
every metric): step 1 cuts the padded responses to the longest real row (`cut_to_longest`), so every later
forward is as short as the batch allows; every forward runs each prompt once for its rloo_k completions
and repeats its KV cache (`shared_prefix`; `prompt_sharing` decides it once per run and forward: plain
under FSDP / ZeRO-3 / gradient checkpointing or for chunks that cut prompt groups);
with one PPO epoch of one mini-batch (the bench and TRL 1.16 default, `can_fuse`) the update takes the old
log-probs from its own first forward (steps 3-6 in one pass, one policy forward fewer per iteration).
Step 7 is work TRL does not do (10-11% of an iteration at the bench's sizes); `kl_prev_per_prompt: 1`
runs it on one completion per prompt (1/rloo_k of its cost, unbiased, noisier).
Around the loop: the win rate of greedy summaries against references (`maxent_rlhf.evaluation`, the
machinery of evaluate_judge.py) at iteration 0, every `eval_steps` and at the end when `judge` is set,
as eval/* records in metrics.jsonl (a judge outage logs `eval/missing: 1` and training goes on); at the
end the run's story (`maxent_rlhf.story.run_story`: proxy score, KL, win rate SFT -> peak -> final and
the overoptimisation verdict) is printed and its figure written to <output_dir>/curves.png (Fig. 10 layout).

Every formula comes from `maxent_rlhf.objectives`; generation / scoring from `maxent_rlhf.generation`.

Decisions (documented here once):
- Batch layout: each process holds whole prompt groups; completion j of local prompt p sits at row
  p * k + j, so `rewards.view(P, k)` is the [num_prompts, k] layout of `objectives.rloo_advantages`.
  Global batch sizes live in the config; per-process sizes are derived (`_batch_plan`), with errors
  naming the numbers when they do not divide.
- Policy and reward model with different vocabularies: the text is RE-TOKENISED for the reward model
  (decoded prompt + decoded response, plus the reward tokenizer's EOS when the response emitted EOS).
  Identical vocabularies pass the token ids through unchanged (no decode/encode round trip).
- Prompts longer than `max_prompt_length` tokens are cut from the LEFT (the end, "TL;DR:", is kept);
  the cumulative count is logged as `data/truncated_prompts`.
- `objective/kl_ref` and the `objective/kl_prev*` keys are sums over the real response tokens of a
  sequence, averaged over the global batch; the plain key is the k1 estimate, `_k3` the non-negative k3
  one. With a regulariser other than `kl` the reference model is only used for kl_ref, every
  `kl_ref_every` iterations (each record carries `objective/kl_ref_every`; the kl_ref keys are absent on
  the other iterations; 0 = never, and the reference is not even loaded).
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
  sequence entropy, Fig. 1), logged for every regulariser and coefficient; `objective/entropy_per_token`
  is the mean over sequences of the same divided by |y|. `objective/entropy_bonus` is the entropy term's
  weighted contribution to the reward (-alpha log pi(y|x), / |y| with length_normalize); it is 0 for the kl
  and none regularisers. `policy/entropy` is the true token entropy of softmax(logits / T), averaged over
  real response tokens.
- Minimum entropy: a negative `entropy_coef` (the entropy term with the opposite sign).
- The reference model is needed for the kl regulariser's reward every iteration, otherwise only for
  kl_ref every `kl_ref_every` iterations: `RLOOConfig.needs_ref(iteration)` decides it, in one place.
- Dropout is switched off in the policy (old and new log-probs must come from the same function).
- Programmatic reward hook: `reward_fn: "package.module:function"` in the config, or
  `main(cfg, reward_fn=callable)`, replaces the reward model. It is called as
  fn(prompts=list[str], completions=list[str], response_ids=Tensor[B, T], response_mask=Tensor[B, T])
  and returns B scores (tensor or list); the EOS penalty is still applied afterwards.
"""
from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from maxent_rlhf import distributed, generation, objectives, plotting
from maxent_rlhf.config import LR_SCHEDULER_TYPES, ConfigError, TrainConfig, cfg, derive_batch_sizes
from maxent_rlhf.data import PromptStream, load_any_dataset, require_columns, tokenize_prompts
from maxent_rlhf.evaluation import EvalArgs, TrainingEvaluator
from maxent_rlhf.models import (check_context_length, load_model_config, load_policy, load_reward_model, load_tokenizer,
                                 resolve_dtype)
from maxent_rlhf.schedules import build_lr_scheduler
from maxent_rlhf.story import run_story
from maxent_rlhf.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from maxent_rlhf.distributed import resolve_mixed_precision, resolve_trackers, seed_everything
from maxent_rlhf.runs import check_finite, open_run_dir, read_metrics


@dataclass
class RLOOConfig(EvalArgs, TrainConfig):
    """Online RLOO (PPO-style clipped update, no value head) with a KL / entropy / no regulariser; the win
    rate during training (EvalArgs: `judge`, `eval_steps`, `judge_dataset_*`) is off unless `judge` is set."""

    # models and data (the shared fields are in TrainConfig; here the ones RLOO adds or reads differently)
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
    # RLOO / PPO
    rloo_k: int = cfg(2, "completions per prompt (>= 2 for the leave-one-out baseline)")
    global_batch_size: int = cfg(64, "GLOBAL completions per iteration (prompts x rloo_k), over all processes")
    num_mini_batches: int = cfg(1, "optimizer steps per PPO epoch (the batch is split into this many mini-batches)")
    per_device_train_batch_size: int = cfg(
        8, "micro-batch per process for the update; accumulation = global / num_mini_batches / (processes x this)"
    )
    local_rollout_forward_batch_size: int = cfg(64, "rows per generation / no-grad forward chunk on each process")
    num_ppo_epochs: int = cfg(4, "passes over each iteration's batch")
    fused_old_logprobs: bool = cfg(
        True, "with num_ppo_epochs = num_mini_batches = 1 (no whitening, per_device_train_batch_size a multiple of "
        "rloo_k) take the old log-probs from the update's own forward: same values, one policy forward fewer"
    )
    total_episodes: int = cfg(1_000_000, "total completions to train on; iterations = total_episodes // global_batch_size")
    num_iterations: Optional[int] = cfg(None, "if set, overrides total_episodes: number of iterations to run")
    learning_rate: float = cfg(3e-6, "peak AdamW learning rate")
    lr_scheduler_type: str = cfg(
        "linear", "decay after warmup, one scheduler step per iteration: 'linear' to 0 over the run, 'cosine', "
        "or 'constant'", choices=LR_SCHEDULER_TYPES,
    )
    warmup_ratio: float = cfg(0.0, "fraction of the iterations spent warming the learning rate up from 0")
    max_grad_norm: float = cfg(1.0, "gradient clipping norm (<= 0 disables)")
    cliprange: float = cfg(0.2, "PPO clip range epsilon (values down to 1e-4 are supported)")
    loss_level: str = cfg("sequence", "importance ratio per 'sequence' (paper) or per 'token'", choices=("sequence", "token"))
    whiten_advantages: bool = cfg(False, "whiten advantages over the global batch")
    # regulariser
    regularizer: str = cfg("kl", "'kl' (beta), 'entropy' (alpha, Eq. 6/7) or 'none'", choices=objectives.REGULARIZERS)
    kl_coef: float = cfg(0.05, "beta of the KL-regularised reward r - beta * sum_t (log pi - log pi_ref)")
    entropy_coef: float = cfg(0.0, "alpha of r - alpha * log pi(y|x); negative = minimum entropy")
    length_normalize: bool = cfg(False, "entropy term / |y| (Eq. 7, what the paper trains)")
    kl_ref_every: int = cfg(
        1, "non-kl regularisers: compute objective/kl_ref every N iterations (0: never); kl computes it every iteration"
    )
    kl_prev_per_prompt: int = cfg(
        0, "completions per prompt whose post-update log-probs estimate objective/kl_prev* (0: all rloo_k; m in "
        "1..rloo_k: the first m of each prompt): step 7's forward costs m / rloo_k, the estimate stays unbiased "
        "but rests on prompts x m sequences (objective/kl_prev_samples)"
    )
    # logging
    sample_every: int = cfg(10, "write completions to samples.jsonl every N iterations (0: never)")
    num_samples: int = cfg(4, "completions written per sample_every")

    def range_checks(self) -> list:
        """Value ranges (config.check_ranges, at construction); the batch arithmetic is `_batch_plan`'s."""
        return super().range_checks() + [
            (self.response_length >= 1, f"`response_length` = {self.response_length} must be >= 1"),
            (self.temperature > 0, f"`temperature` = {self.temperature} must be > 0"),
            (self.num_ppo_epochs >= 1, f"`num_ppo_epochs` = {self.num_ppo_epochs} must be >= 1"),
            (self.local_rollout_forward_batch_size >= 1,
             f"`local_rollout_forward_batch_size` = {self.local_rollout_forward_batch_size} must be >= 1"),
            (self.cliprange > 0, f"`cliprange` = {self.cliprange} must be > 0"),
            (self.kl_ref_every >= 0, f"`kl_ref_every` = {self.kl_ref_every} must be >= 0"),
            (0 <= self.kl_prev_per_prompt <= self.rloo_k,
             f"`kl_prev_per_prompt` = {self.kl_prev_per_prompt} must be in 0..rloo_k = {self.rloo_k} (0: every completion)"),
        ]

    def kl_ref_interval(self) -> int:
        """Iterations between reference forwards: 1 for `kl` (its reward needs pi_ref), else `kl_ref_every`."""
        return 1 if self.regularizer == "kl" else self.kl_ref_every

    def needs_ref(self, iteration: Optional[int] = None) -> bool:
        """Is the reference model used at `iteration` (None: at all in this run, i.e. must it be loaded)?"""
        every = self.kl_ref_interval()
        return every > 0 and (iteration is None or iteration % every == 0)


# ----------------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    prompts_global: int  # prompts per iteration over all processes
    prompts_local: int  # prompts per iteration on this process
    rows_local: int  # completions per iteration on this process
    mini_local: int  # completions per mini-batch on this process
    grad_accum: int  # micro-batches per optimizer step
    num_iterations: int


def _batch_plan(c: RLOOConfig, num_processes: int) -> BatchPlan:
    if c.rloo_k < 2:
        raise ConfigError(f"`rloo_k` = {c.rloo_k}: RLOO needs at least 2 completions per prompt")
    gbs = c.global_batch_size
    if gbs % (num_processes * c.rloo_k):
        raise ConfigError(
            f"`global_batch_size` = {gbs} completions must be a multiple of num_processes x rloo_k = "
            f"{num_processes} x {c.rloo_k} = {num_processes * c.rloo_k}, so every process holds whole prompt groups"
        )
    if c.num_mini_batches < 1 or gbs % c.num_mini_batches:
        raise ConfigError(f"`num_mini_batches` = {c.num_mini_batches} must be >= 1 and divide `global_batch_size` = {gbs}")
    mini_local, accum = derive_batch_sizes(
        gbs // c.num_mini_batches, num_processes, c.per_device_train_batch_size, name="global_batch_size / num_mini_batches"
    )
    n_iter = c.num_iterations if c.num_iterations is not None else c.total_episodes // gbs
    if n_iter < 1:
        raise ConfigError(f"`total_episodes` = {c.total_episodes} is less than one batch of {gbs}; nothing to train")
    rows_local = gbs // num_processes
    return BatchPlan(gbs // c.rloo_k, rows_local // c.rloo_k, rows_local, mini_local, accum, n_iter)



def _regularizer_coef(c: RLOOConfig) -> float:
    if c.regularizer == "kl":
        return c.kl_coef
    if c.regularizer == "entropy":
        return c.entropy_coef  # negative: minimum entropy
    return 0.0


def _load_reward_fn(spec: str) -> Callable:
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


def _disable_dropout(model: torch.nn.Module) -> None:
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


def rloo_row_advantages(rewards: torch.Tensor, k: int, whiten: bool = False, accelerator=None) -> torch.Tensor:
    """Step 5 in this script's row layout (completion j of prompt p at row p * k + j).

    `objectives.rloo_advantages` wants [num_prompts, k]: that is `rewards.view(-1, k)` here. Whitening
    (optional) runs over the global batch (gathered from every process), then returns this process's rows.
    """
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not form whole groups of rloo_k = {k}")
    adv = objectives.rloo_advantages(rewards.view(-1, k)).reshape(-1)
    if whiten:
        if accelerator is None or accelerator.num_processes == 1:
            return objectives.whiten(adv)
        return objectives.whiten(accelerator.gather(adv)).view(accelerator.num_processes, -1)[accelerator.process_index]
    return adv


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


@contextmanager
def _timed(timings: dict, key: str):
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# the iteration's record and its steps
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSharing:
    """Rows per shared prompt pass in each forward of an iteration (`shared_prefix`; 1: the plain pass), fixed
    once per run by `prompt_sharing`; a `generation` call that cannot honour its number raises."""

    sample: int = 1  # step 1: the policy's prefill
    score: int = 1  # step 2: the reward model (1 when it reads re-tokenised text)
    old: int = 1  # step 3: the policy's no-grad forward
    ref: int = 1  # step 3: the reference
    update: int = 1  # step 6 when fused (the other updates run shuffled rows: 1)
    kl_prev: int = 1  # step 7: kl_prev_per_prompt rows of each prompt


@dataclass
class Models:
    """What the steps run on: the accelerator, the (prepared) policy, the frozen models, the tokenizers."""

    accelerator: object
    tokenizer: object  # the policy's, left padding
    policy: torch.nn.Module
    ref_policy: Optional[torch.nn.Module] = None  # loaded only when RLOOConfig.needs_ref()
    reward_model: Optional[torch.nn.Module] = None  # None when a programmatic reward_fn scores
    reward_tokenizer: object = None
    retokenize: bool = False  # the reward model reads its own tokens (other vocabulary)
    reward_fn: Optional[Callable] = None
    sharing: PromptSharing = field(default_factory=PromptSharing)  # main: `prompt_sharing` once the models are prepared


@dataclass
class Rollout:
    """One iteration's batch on this process: completion j of local prompt p sits at row p * k + j.

    Step 1 builds it; `main` / `learn` assign each later step's returned values to the fields below the
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

    def __post_init__(self):
        self.query_responses = torch.cat([self.query_ids, self.responses], 1)
        self.attention_mask = torch.cat([self.query_mask, self.response_mask], 1)

    @property
    def context_length(self) -> int:
        return self.query_ids.shape[1]

    def __len__(self) -> int:
        return self.query_ids.shape[0]


class OldPolicyValues(NamedTuple):
    """Steps 3-5's values of every row: what the update trains against (`update` returns them)."""

    old_logprobs: torch.Tensor
    token_entropy: torch.Tensor
    rewards: torch.Tensor
    non_score_reward: torch.Tensor
    advantages: torch.Tensor


def can_fuse(c: RLOOConfig) -> bool:
    """Steps 3-5 inside the update's forward (`update`): one PPO epoch of one mini-batch, no whitening,
    micro-batches of whole prompt groups, and `fused_old_logprobs` on."""
    return (c.fused_old_logprobs and c.num_ppo_epochs == 1 and c.num_mini_batches == 1 and not c.whiten_advantages
            and c.per_device_train_batch_size % c.rloo_k == 0)


def prompt_sharing(c: RLOOConfig, m: Models, plan: BatchPlan) -> PromptSharing:
    """`shared_prefix`, decided once per run for each forward: its rows share each prompt's pass when the model
    can (`generation.shared_prefix_supported`: not under FSDP / ZeRO-3 / gradient checkpointing) and every chunk
    holds whole prompt groups (its size a multiple of the group, or the whole batch); otherwise that forward
    runs plain for the whole run. Call it on the prepared models (preparing is what shards them)."""
    if not c.shared_prefix:
        return PromptSharing()

    def rows_per_pass(model, group: int, rows: int, chunk: int = c.local_rollout_forward_batch_size) -> int:
        whole_groups = chunk >= rows or chunk % group == 0
        return group if model is not None and whole_groups and generation.shared_prefix_supported(model) else 1

    per_prompt = c.kl_prev_per_prompt or c.rloo_k
    k, rows = c.rloo_k, plan.rows_local
    return PromptSharing(
        sample=rows_per_pass(m.policy, k, rows),
        score=1 if m.retokenize else rows_per_pass(m.reward_model, k, rows),
        old=rows_per_pass(m.policy, k, rows),
        ref=rows_per_pass(m.ref_policy, k, rows),
        update=rows_per_pass(m.policy, k, rows, c.per_device_train_batch_size) if can_fuse(c) else 1,
        kl_prev=rows_per_pass(m.policy, per_prompt, plan.prompts_local * per_prompt),
    )


def prompt_texts(tokenizer, query_ids: torch.Tensor, query_mask: torch.Tensor) -> list[str]:
    """The prompts as text (left padding dropped)."""
    pad_id = tokenizer.pad_token_id
    return tokenizer.batch_decode(query_ids * query_mask + pad_id * (1 - query_mask), skip_special_tokens=True)


def prompt_batch(c: RLOOConfig, tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This process's prompts, cut from the left to max_prompt_length, left-padded, each repeated rloo_k
    times (row p * k + j); returns query ids, mask and the number of prompts cut."""
    prompt_ids, cut = tokenize_prompts(tokenizer, texts, c.max_prompt_length)
    query_ids, query_mask = generation.left_pad(prompt_ids, tokenizer.pad_token_id)
    return query_ids.repeat_interleave(c.rloo_k, 0).to(device), query_mask.repeat_interleave(c.rloo_k, 0).to(device), cut


def generate(c: RLOOConfig, m: Models, query_ids: torch.Tensor, query_mask: torch.Tensor, iteration: int,
             first_row: int) -> Rollout:
    """Step 1: sample one completion per row at the training temperature, truncate after the first EOS.

    Each chunk samples from a stream tied to its first row in the GLOBAL batch (`first_row` = this
    process's offset), not to the process: with `local_rollout_forward_batch_size` dividing the
    per-process batch, N processes sample exactly what one process samples (distributed.sampling_rng).
    """
    acc, tok = m.accelerator, m.tokenizer
    m.policy.eval()
    raw = []
    with distributed.unwrap_for_generation(acc, m.policy) as gen_model, acc.autocast():
        for s in _chunks(query_ids.shape[0], c.local_rollout_forward_batch_size):
            with distributed.sampling_rng(c.seed, iteration, first_row + s.start, acc.device):
                # generation.sample: generate's tokens without its per-token overhead (sharded: generate itself)
                raw.append(generation.sample(gen_model, query_ids[s], query_mask[s], c.response_length, tok.eos_token_id,
                                             tok.pad_token_id, temperature=c.temperature,
                                             synced_gpus=distributed.needs_synced_gpus(acc),
                                             shared_prefix_k=m.sharing.sample))
    responses, response_mask, contains_eos = generation.truncate_after_eos(torch.cat(raw), tok.eos_token_id, tok.pad_token_id)
    responses, response_mask = cut_to_longest(responses, response_mask)
    return Rollout(query_ids, query_mask, responses, response_mask, contains_eos)


def cut_to_longest(responses: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the all-pad tail columns: keep the longest real row (EOS included) and nothing after.

    Every later forward (reward model, old / reference / updated policy, kl_prev) then runs on T_max real
    columns instead of `response_length`: when every sample stops early that is most of their cost. The
    dropped columns carry mask 0, so no value changes (tests/test_rloo_units.py checks every metric);
    per-token tensors of the rollout are [n, T_max] (T_max may differ between processes: only per-sequence
    values are gathered).
    """
    longest = max(int(response_mask.sum(1).max()), 1) if response_mask.numel() else responses.shape[1]
    return responses[:, :longest], response_mask[:, :longest]


def score(c: RLOOConfig, m: Models, ro: Rollout) -> tuple[list[str], torch.Tensor]:
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
                                for s in _chunks(n, c.local_rollout_forward_batch_size)])
    return completions, objectives.missing_eos_penalty(scores, ro.contains_eos, c.missing_eos_penalty)


def policy_logprobs(c: RLOOConfig, m: Models, ro: Rollout, model, share: int, return_entropy: bool = False,
                    rows: Optional[torch.Tensor] = None):
    """No-grad log-probs of the sampled tokens under `model` from logits / T, in chunks (`share` rows per
    prompt pass: a `PromptSharing` field). The forwards go through the prepared model, so sharded engines
    gather their parameters. Step 7 calls it after the update on `rows` (`kl_prev_rows`)."""
    model.eval()
    ids, mask = (ro.query_responses, ro.attention_mask) if rows is None else (ro.query_responses[rows], ro.attention_mask[rows])
    lps, ents = [], []
    with torch.no_grad(), m.accelerator.autocast():
        for s in _chunks(ids.shape[0], c.local_rollout_forward_batch_size):
            out = generation.response_logprobs(model, ids[s], mask[s], ro.context_length, c.temperature,
                                               return_entropy=return_entropy, shared_prefix_k=share)
            if return_entropy:
                lps.append(out[0].float())
                ents.append(out[1].float())
            else:
                lps.append(out.float())
    return (torch.cat(lps), torch.cat(ents)) if return_entropy else torch.cat(lps)


def kl_prev_rows(c: RLOOConfig, n: int, device=None) -> tuple[torch.Tensor, int]:
    """Step 7's rows: the first m = `kl_prev_per_prompt` completions of each prompt (rows p * k + j, j < m;
    all when 0), and m. Any fixed subset of a prompt's i.i.d. samples is a sample of pi_{t-1} too, so the
    estimates stay unbiased; their variance grows by about k / m."""
    per_prompt = c.kl_prev_per_prompt or c.rloo_k
    rows = torch.arange(n, device=device).view(-1, c.rloo_k)[:, :per_prompt].reshape(-1)
    return rows, per_prompt


def kl_prev_logprobs(c: RLOOConfig, m: Models, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 7: the `kl_prev_rows` and their samples' log-probs under the updated policy."""
    rows, _ = kl_prev_rows(c, len(ro), ro.responses.device)
    return rows, policy_logprobs(c, m, ro, m.policy, m.sharing.kl_prev, rows=rows)


def regularised_reward(c: RLOOConfig, ro: Rollout, rows=slice(None), old_logprobs: Optional[torch.Tensor] = None
                       ) -> objectives.RegularizedReward:
    """Step 4: the sequence reward RLOO maximises (objectives.regularized_reward: kl / Eq. 6 / Eq. 7 / none).

    `rows` / `old_logprobs`: the same for a subset of rows whose old log-probs are given (the fused update)."""
    old_logprobs = ro.old_logprobs if old_logprobs is None else old_logprobs
    ref = ro.ref_logprobs[rows] if ro.ref_logprobs is not None else None
    return objectives.regularized_reward(ro.scores[rows], old_logprobs, ro.response_mask[rows], c.regularizer,
                                         _regularizer_coef(c), ref_logprobs=ref, length_normalize=c.length_normalize)


def rewards_and_advantages(c: RLOOConfig, ro: Rollout, old_logprobs: torch.Tensor, rows=slice(None), accelerator=None,
                           check: Callable[[str, torch.Tensor], None] = lambda name, value: None):
    """Steps 4-5 on `rows` (whole prompt groups) from their old log-probs: (rewards, non_score_reward,
    advantages); whitening, when on, over the global batch."""
    reg = regularised_reward(c, ro, rows, old_logprobs)
    check("regularised reward", reg.rewards)
    return reg.rewards, reg.non_score_reward, rloo_row_advantages(reg.rewards, c.rloo_k, c.whiten_advantages, accelerator)


def update(c: RLOOConfig, m: Models, plan: BatchPlan, ro: Rollout, optimizer, scheduler,
           check: Callable[[str, torch.Tensor], None] = lambda name, value: None) -> tuple[dict, OldPolicyValues]:
    """Step 6: num_ppo_epochs x num_mini_batches clipped policy-gradient steps on the rollout, one scheduler
    step. Returns the per-micro-batch statistics (lists of tensors) with the learning rate used, and the
    steps 3-5 values it trained against.

    Old log-probs: `ro.old_logprobs` (with the rewards and advantages of steps 4-5), or, when they are None
    (`can_fuse`: one epoch of one mini-batch), each micro-batch's own forward. That forward runs on the
    pre-update weights, so it IS the old-policy forward: its log-probs, detached, are the old log-probs
    (ratio 1, as a separate pass up to rounding), its logits give the token entropy, and steps 4-5 run on
    its rows' whole prompt groups. One policy forward fewer per iteration; the cost: micro-batches run over
    prompt groups in row order instead of shuffled (their gradients sum into one optimizer step anyway).
    `check(name, value)` runs on every micro-batch loss (and, fused, its regularised rewards).
    """
    acc, policy, device = m.accelerator, m.policy, m.accelerator.device
    n, micro = len(ro), c.per_device_train_batch_size
    fused = ro.old_logprobs is None
    if fused and not can_fuse(c):  # a later epoch or mini-batch would run on moved weights
        raise ValueError("update: old log-probs missing, and they can come from its own forward only when can_fuse")
    policy.train()
    stats = {"clipfrac": [], "approxkl": [], "ratio": [], "loss": [], "grad_norm": []}
    computed = []  # fused: each micro-batch's OldPolicyValues, in row order
    for _epoch in range(c.num_ppo_epochs):
        order = torch.arange(n, device=device) if fused else torch.randperm(n).to(device)
        for mb_start in range(0, n, plan.mini_local):
            mb = order[mb_start : mb_start + plan.mini_local]
            for a in range(plan.grad_accum):
                rows = mb[a * micro : (a + 1) * micro]
                sync = a == plan.grad_accum - 1
                # DDP/FSDP: all-reduce on the last micro-batch only; DeepSpeed: the engine steps there
                with distributed.micro_step(acc, policy, sync), acc.autocast():
                    out = generation.response_logprobs(policy, ro.query_responses[rows], ro.attention_mask[rows],
                                                       ro.context_length, c.temperature, return_entropy=fused,
                                                       shared_prefix_k=m.sharing.update if fused else 1)
                    if fused:  # steps 3-5 on these rows from this very forward
                        new_lp = out[0].float()
                        old_lp = new_lp.detach()
                        computed.append(OldPolicyValues(old_lp, out[1].float(),
                                                        *rewards_and_advantages(c, ro, old_lp, rows, check=check)))
                        adv = computed[-1].advantages
                    else:
                        new_lp, old_lp, adv = out.float(), ro.old_logprobs[rows], ro.advantages[rows]
                    pg = objectives.ppo_clipped_policy_loss(new_lp, old_lp, adv, ro.response_mask[rows], c.cliprange,
                                                            level=c.loss_level)
                    acc.backward(pg.loss / plan.grad_accum)
                check("policy loss", pg.loss)
                for key in ("clipfrac", "approxkl", "ratio", "loss"):
                    stats[key].append(getattr(pg, key).detach().float())
            if c.max_grad_norm > 0:
                gn = acc.clip_grad_norm_(policy.parameters(), c.max_grad_norm)
                # float(): under FSDP2 the norm is a DTensor, which the metric gather cannot take
                stats["grad_norm"].append(torch.tensor(float(gn), device=device))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    stats["lr"] = scheduler.get_last_lr()[0]
    scheduler.step()
    if fused:
        return stats, OldPolicyValues(*(torch.cat(parts) for parts in zip(*computed)))
    return stats, OldPolicyValues(ro.old_logprobs, ro.token_entropy, ro.rewards, ro.non_score_reward, ro.advantages)


def learn(c: RLOOConfig, m: Models, plan: BatchPlan, ro: Rollout, optimizer, scheduler, needs_ref: bool, timings: dict,
          check: Callable[[str, torch.Tensor], None] = lambda name, value: None) -> dict:
    """Steps 3-6 on a scored rollout: assigns the rollout's steps 3-5 fields from what the steps return and
    returns the update's statistics; `timings` gets their phases. With `can_fuse(c)` the policy part of step 3
    and steps 4-5 run inside the update's forward (`update`)."""
    fused = can_fuse(c)
    with _timed(timings, "logprobs"):  # 3. reference log-probs; the old ones here unless the update's forward gives them
        ro.ref_logprobs = policy_logprobs(c, m, ro, m.ref_policy, m.sharing.ref) if needs_ref else None
        if not fused:
            ro.old_logprobs, ro.token_entropy = policy_logprobs(c, m, ro, m.policy, m.sharing.old, return_entropy=True)
    if not fused:  # 4.-5. regularised sequence reward, RLOO advantages
        ro.rewards, ro.non_score_reward, ro.advantages = rewards_and_advantages(c, ro, ro.old_logprobs,
                                                                                accelerator=m.accelerator, check=check)
    with _timed(timings, "update"):  # 6. clipped policy-gradient updates
        stats, old = update(c, m, plan, ro, optimizer, scheduler, check=check)
    ro.old_logprobs, ro.token_entropy, ro.rewards, ro.non_score_reward, ro.advantages = old
    return stats


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


def iteration_metrics(c: RLOOConfig, ro: Rollout, stats: dict,
                      gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """Step 8: the iteration's metrics from the filled rollout and the update's statistics, as means over
    the global batch (`gather` concatenates every process's rows; the identity on one process)."""
    lengths = ro.response_mask.sum(1).float()

    def gmean(x: torch.Tensor) -> float:
        return float(gather(x.detach().float().reshape(-1)).mean())

    def seq_sum(x: torch.Tensor) -> torch.Tensor:
        return objectives.masked_sum(x, ro.response_mask)

    tokens_global = float(gather(lengths).sum())
    metrics = {
        "objective/scores": gmean(ro.scores),
        "objective/rlhf_reward": gmean(ro.rewards),
        "objective/non_score_reward": gmean(ro.non_score_reward),
        "objective/entropy_bonus": gmean(ro.non_score_reward) if c.regularizer == "entropy" else 0.0,
        **entropy_metrics(ro.old_logprobs, ro.response_mask, gather),
    }
    if ro.ref_logprobs is not None:
        metrics["objective/kl_ref"] = gmean(seq_sum(objectives.kl_estimate(ro.old_logprobs, ro.ref_logprobs, "k1")))
        metrics["objective/kl_ref_k3"] = gmean(seq_sum(objectives.kl_estimate(ro.old_logprobs, ro.ref_logprobs, "k3")))
    metrics["objective/kl_ref_every"] = c.kl_ref_interval()
    kl_rows = ro.kl_prev_rows if ro.kl_prev_rows is not None else slice(None)
    metrics.update(kl_prev_metrics(ro.old_logprobs[kl_rows], ro.new_logprobs, ro.response_mask[kl_rows], gather))
    metrics["objective/kl_prev_samples"] = c.global_batch_size // c.rloo_k * (c.kl_prev_per_prompt or c.rloo_k)
    metrics["policy/entropy"] = float(gather(seq_sum(ro.token_entropy)).sum()) / max(tokens_global, 1.0)
    for key, name in (("clipfrac", "policy/clipfrac"), ("approxkl", "policy/approxkl"), ("ratio", "val/ratio"), ("loss", "loss/policy")):
        metrics[name] = gmean(torch.stack(stats[key]).mean())
    if stats["grad_norm"]:
        metrics["train/grad_norm"] = gmean(torch.stack(stats["grad_norm"]).mean())
    metrics["train/lr"] = stats["lr"]
    # std over the GLOBAL batch (a mean of per-process stds is not the global std)
    metrics["val/advantage_std"] = float(gather(ro.advantages.detach().float().reshape(-1)).std()) if c.global_batch_size > 1 else 0.0
    metrics["response/length"] = tokens_global / c.global_batch_size
    metrics["response/eos_fraction"] = gmean(ro.contains_eos)
    return metrics


def sample_records(c: RLOOConfig, m: Models, ro: Rollout, iteration: int) -> list[dict]:
    """The first `num_samples` completions of this process, for samples.jsonl."""
    rows = list(range(min(c.num_samples, len(ro))))
    prompts = prompt_texts(m.tokenizer, ro.query_ids[rows], ro.query_mask[rows])
    return [{"step": iteration, "prompt": prompts[j], "completion": ro.completions[r], "score": float(ro.scores[r]),
             "rlhf_reward": float(ro.rewards[r]), "contains_eos": bool(ro.contains_eos[r]), "temperature": c.temperature}
            for j, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def load_models(c: RLOOConfig, accelerator, reward_fn: Optional[Callable]) -> Models:
    """Tokenizer, policy (dropout off), the reference when `c.needs_ref()`, and the reward model unless a
    reward_fn scores. Frozen models are in the mixed-precision dtype and prepared for the engine."""
    frozen_dtype = resolve_dtype(c.mixed_precision, accelerator.device)
    tokenizer = load_tokenizer(c.model_name_or_path, padding_side="left", trust_remote_code=c.trust_remote_code)
    policy = load_policy(c.model_name_or_path, trust_remote_code=c.trust_remote_code, gradient_checkpointing=c.gradient_checkpointing)
    _disable_dropout(policy)
    m = Models(accelerator, tokenizer, policy, reward_fn=reward_fn)
    if c.needs_ref():
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
            print("[train_rloo] policy and reward model tokenizers differ: re-tokenising text for the reward model")
    return m


def main(c: RLOOConfig, reward_fn: Optional[Callable] = None) -> Path:
    """Train; returns the run directory. `reward_fn` (optional) replaces the reward model (see docstring)."""
    from accelerate import Accelerator

    trackers = resolve_trackers(c.report_to)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(c.mixed_precision),
        log_with=trackers or None,
        project_dir=c.output_dir,
    )
    device = accelerator.device
    plan = _batch_plan(c, accelerator.num_processes)
    if reward_fn is None and c.reward_fn:
        reward_fn = _load_reward_fn(c.reward_fn)
    if reward_fn is None and not c.reward_model_name_or_path:
        raise ConfigError("set `reward_model_name_or_path` or `reward_fn`: there is nothing to score completions with")

    # refuses an output_dir holding another run unless --resume / --overwrite_output_dir (runs.open_run_dir)
    run_dir, ckpt = open_run_dir(c.output_dir, c.resume, c.overwrite_output_dir, accelerator)
    run_dir.save_config(c)
    seed_everything(c.seed)
    if trackers:
        accelerator.init_trackers(c.tracker_project_name, config={k: v for k, v in vars(c).items() if isinstance(v, (int, float, str, bool))})

    # ---- models, optimizer ----
    # prompt + response must fit the policy's positions: checked from its config.json, before any weights load
    check_context_length(load_model_config(c.model_name_or_path, trust_remote_code=c.trust_remote_code),
                         c.max_prompt_length, c.response_length, "max_prompt_length", "response_length")
    m = load_models(c, accelerator, reward_fn)
    optimizer = torch.optim.AdamW(m.policy.parameters(), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                  eps=c.adam_epsilon, weight_decay=c.weight_decay)
    # one scheduler step per iteration: linear gives lr_t = lr * (1 - t / num_iterations) without warmup
    scheduler = build_lr_scheduler(optimizer, c.lr_scheduler_type, plan.num_iterations, c.warmup_ratio)
    distributed.configure_deepspeed(accelerator, c.per_device_train_batch_size, c.max_grad_norm)  # no-op without DeepSpeed
    m.policy, optimizer = accelerator.prepare(m.policy, optimizer)
    m.sharing = prompt_sharing(c, m, plan)  # shared prompt pass or plain, per forward, for the whole run

    # ---- data ----
    dataset = load_any_dataset(c.dataset_name, c.dataset_train_split)
    require_columns(dataset, [c.prompt_column], f"{c.dataset_name} ({c.dataset_train_split})")
    prompts_all = dataset[c.prompt_column]
    stream = PromptStream(len(prompts_all), plan.prompts_global, c.seed)
    truncated_prompts = 0

    # ---- resume ----
    start = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, m.policy, optimizer, scheduler, accelerator)
        start = state["step"]
        stream.load(state["data"])
        truncated_prompts = int(state.get("truncated_prompts", 0))
        if accelerator.is_main_process:
            print(f"[train_rloo] resumed from {ckpt} at iteration {start}")
    # win rate during training (when `judge` is set): one evaluator for the run, which prints a paid judge's cost once
    evaluator = TrainingEvaluator(c, accelerator, run_dir, plan.num_iterations, start, log_prefix="[train_rloo]")
    if start == 0 and evaluator.due(0):  # the initial policy: the "SFT" point of the closing summary
        run_dir.log_metrics(evaluator.evaluate(m.policy, m.tokenizer, 0), 0)

    rank, gather = accelerator.process_index, accelerator.gather
    last_saved = start if ckpt is not None else -1
    progress = tqdm(
        range(start + 1, plan.num_iterations + 1), desc=f"train_rloo[{c.regularizer}]", initial=start,
        total=plan.num_iterations, disable=not accelerator.is_main_process, dynamic_ncols=True,
    )
    for it in progress:
        t_iter, cpu_iter = time.perf_counter(), time.process_time()
        timings: dict = {}
        # prompts of this process: whole groups, each repeated k times (row p * k + j)
        idx = stream.next()[rank * plan.prompts_local : (rank + 1) * plan.prompts_local]
        query_ids, query_mask, cut = prompt_batch(c, m.tokenizer, [prompts_all[i] for i in idx], device)
        truncated_prompts += int(gather(torch.tensor([cut], device=device)).sum())

        with _timed(timings, "generate"):  # 1. sample rloo_k completions per prompt, cut after EOS
            ro = generate(c, m, query_ids, query_mask, it, first_row=rank * plan.rows_local)
        with _timed(timings, "score"):  # 2. reward-model score; missing-EOS penalty
            ro.completions, ro.scores = score(c, m, ro)
            check_finite("reward-model score", ro.scores, it, run_dir)
        stats = learn(c, m, plan, ro, optimizer, scheduler, c.needs_ref(it), timings,  # 3.-6.
                      check=lambda name, v: check_finite(name, v, it, run_dir))
        with _timed(timings, "kl_prev"):  # 7. the same samples (all, or kl_prev_per_prompt of each prompt) after the update
            ro.kl_prev_rows, ro.new_logprobs = kl_prev_logprobs(c, m, ro)

        # 8. log, sample, checkpoint (metrics are means over the global batch: gathered from every process)
        metrics = iteration_metrics(c, ro, stats, gather)
        metrics["data/truncated_prompts"] = truncated_prompts
        metrics["data/epoch"] = stream.epoch
        metrics["episodes"] = it * c.global_batch_size
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        t_total = time.perf_counter() - t_iter
        metrics["time/iteration"] = t_total
        metrics["time/iteration_cpu"] = time.process_time() - cpu_iter  # CPU seconds of this process (all threads)
        metrics["perf/episodes_per_s"] = c.global_batch_size / t_total
        metrics["perf/tokens_per_s"] = metrics["response/length"] * c.global_batch_size / t_total  # real response tokens
        if it % c.logging_steps == 0 or it == plan.num_iterations:
            run_dir.log_metrics(metrics, it)
        progress.set_postfix(
            score=f"{metrics['objective/scores']:.3f}", rlhf=f"{metrics['objective/rlhf_reward']:.3f}",
            kl_prev=f"{metrics['objective/kl_prev']:.2g}", eps_s=f"{metrics['perf/episodes_per_s']:.1f}", refresh=False,
        )
        if evaluator.due(it):  # greedy summaries of the current weights, judged (before the checkpoint: a resume redoes it)
            run_dir.log_metrics(evaluator.evaluate(m.policy, m.tokenizer, it), it)
        if c.sample_every > 0 and it % c.sample_every == 0 and c.num_samples > 0:
            run_dir.append_jsonl("samples.jsonl", sample_records(c, m, ro, it))
        if (c.save_steps > 0 and it % c.save_steps == 0) or it == plan.num_iterations:
            save_checkpoint(run_dir, it, m.policy, m.tokenizer, optimizer, scheduler,
                            state={"data": stream.state(), "truncated_prompts": truncated_prompts}, keep_last=c.save_total_limit)
            last_saved = it
    if last_saved < 0 and latest_checkpoint(run_dir.path) is None:  # nothing ran (resumed at the end)
        save_checkpoint(run_dir, start, m.policy, m.tokenizer, optimizer, scheduler,
                        state={"data": stream.state(), "truncated_prompts": truncated_prompts})
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    if accelerator.is_main_process:
        closing_summary(run_dir.path)
    return run_dir.path


def closing_summary(run_path: Path) -> None:
    """The run's story from its metrics.jsonl (maxent_rlhf.story) and its figure (<run>/curves.png)."""
    print("[train_rloo] summary\n" + run_story(read_metrics(run_path), run_path).text(), flush=True)
    figure = plotting.plot_rloo_run(run_path)
    if figure is not None:
        print(f"[train_rloo] figure: {figure}", flush=True)


if __name__ == "__main__":
    from maxent_rlhf.cli import run_script

    run_script(main, RLOOConfig)
