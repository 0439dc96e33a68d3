"""Online RLOO with a KL, maximum-entropy, minimum-entropy or no regulariser (paper Sec. 4.1-4.2).

    accelerate launch train_rloo.py --config configs/maxent_1b.yaml [--key value ...]
    python train_rloo.py --config configs/kl_1b.yaml --output_dir runs/kl_1b --resume latest

One iteration (numbered below exactly like this):
  1. generate `rloo_k` completions per prompt (KV-cached sampling at `temperature`, top_k 0 / top_p 1)
  2. truncate each completion after its first EOS (EOS kept), pad the rest
  3. score prompt + completion with the reward model at the last real token; EOS penalty
  4. log-probs of the sampled tokens under the policy (old) and the reference, from logits / T
  5. regularised sequence reward: kl (beta), entropy (alpha, Eq. 6; Eq. 7 with length_normalize), none
  6. RLOO leave-one-out advantages over the k samples of each prompt (optional whitening)
  7. num_ppo_epochs x num_mini_batches clipped policy-gradient updates (grad accumulation, clipping, lr decay)
  8. log, sample, checkpoint

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
  sequences).
- `objective/entropy` is the batch mean of the unweighted sequence quantity -log pi(y|x) = sum_t -log
  pi(y_t | x, y_<t) over real response tokens at the training temperature (a one-sample estimate of the
  sequence entropy, Fig. 1), logged for every regulariser and coefficient; `objective/entropy_per_token`
  is the mean over sequences of the same divided by |y|. `objective/entropy_bonus` is the entropy term's
  weighted contribution to the reward (-alpha log pi(y|x), / |y| with length_normalize); it is 0 for the kl
  and none regularisers. `policy/entropy` is the true token entropy of softmax(logits / T), averaged over
  real response tokens.
- Minimum entropy: a negative `entropy_coef`, or `min_entropy: true`, which flips the sign of a
  positive `entropy_coef` (same thing, clearer in a config).
- Dropout is switched off in the policy (old and new log-probs must come from the same function).
- Programmatic reward hook: `reward_fn: "package.module:function"` in the config, or
  `main(cfg, reward_fn=callable)`, replaces the reward model. It is called as
  fn(prompts=list[str], completions=list[str], response_ids=Tensor[B, T], response_mask=Tensor[B, T])
  and returns B scores (tensor or list); the EOS penalty is still applied afterwards.
"""
from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from maxent_rlhf import distributed, generation, objectives
from maxent_rlhf.config import LR_SCHEDULER_TYPES, ConfigError, TrainConfig, cfg, derive_batch_sizes, parse_config
from maxent_rlhf.data import DataError, load_any_dataset, require_columns
from maxent_rlhf.models import load_policy, load_reward_model, load_tokenizer, resolve_dtype
from maxent_rlhf.schedules import build_lr_scheduler
from maxent_rlhf.runs import (
    RunDir,
    check_finite,
    latest_checkpoint,
    load_checkpoint,
    resolve_mixed_precision,
    resolve_resume,
    resolve_trackers,
    save_checkpoint,
    seed_everything,
)


@dataclass
class RLOOConfig(TrainConfig):
    """Online RLOO (PPO-style clipped update, no value head) with a KL / entropy / no regulariser."""

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
    min_entropy: bool = cfg(False, "minimum-entropy variant: flips the sign of a positive entropy_coef")
    kl_ref_every: int = cfg(
        1, "non-kl regularisers: compute objective/kl_ref every N iterations (0: never); kl computes it every iteration"
    )
    # logging
    sample_every: int = cfg(10, "write completions to samples.jsonl every N iterations (0: never)")
    num_samples: int = cfg(4, "completions written per sample_every")


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


def _validate(c: RLOOConfig) -> None:
    checks = [
        (c.response_length >= 1, f"`response_length` = {c.response_length} must be >= 1"),
        (c.temperature > 0, f"`temperature` = {c.temperature} must be > 0"),
        (c.max_prompt_length >= 1, f"`max_prompt_length` = {c.max_prompt_length} must be >= 1"),
        (c.num_ppo_epochs >= 1, f"`num_ppo_epochs` = {c.num_ppo_epochs} must be >= 1"),
        (c.local_rollout_forward_batch_size >= 1, "`local_rollout_forward_batch_size` must be >= 1"),
        (c.cliprange > 0, f"`cliprange` = {c.cliprange} must be > 0"),
        (c.learning_rate >= 0, f"`learning_rate` = {c.learning_rate} must be >= 0"),
        (c.kl_ref_every >= 0, f"`kl_ref_every` = {c.kl_ref_every} must be >= 0"),
        (not (c.min_entropy and c.regularizer != "entropy"), "`min_entropy: true` needs `regularizer: entropy`"),
        (not (c.min_entropy and c.entropy_coef < 0), "`min_entropy: true` with a negative `entropy_coef` would flip the sign twice; give a positive coefficient"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _regularizer_coef(c: RLOOConfig) -> float:
    if c.regularizer == "kl":
        return c.kl_coef
    if c.regularizer == "entropy":
        return -abs(c.entropy_coef) if c.min_entropy else c.entropy_coef
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


class PromptStream:
    """Seeded epoch-wise shuffling of prompt indices; the position is part of the checkpoint state."""

    def __init__(self, n: int, per_iteration: int, seed: int):
        if n < per_iteration:
            raise DataError(f"the prompt dataset has {n} rows, fewer than the {per_iteration} prompts one iteration needs")
        self.n, self.per_iteration, self.seed = n, per_iteration, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> list[int]:
        if self.pos + self.per_iteration > self.n:  # drop the remainder, start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        out = self._perm[self.pos : self.pos + self.per_iteration].tolist()
        self.pos += self.per_iteration
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._make_perm()


def tokenize_prompts(tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (no special tokens added), cut from the left to max_len; returns the count cut."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = 0
    for i, t in enumerate(ids):
        if not t:
            raise DataError(f"prompt {texts[i]!r} tokenises to nothing; remove empty prompts")
        if len(t) > max_len:
            ids[i], cut = t[-max_len:], cut + 1
    return ids, cut


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


def apply_eos_penalty(scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Step 3: score - penalty for every completion that never emitted EOS."""
    return scores.float() - penalty * (~contains_eos.bool()).float()


def rloo_row_advantages(rewards: torch.Tensor, k: int, whiten: bool = False, accelerator=None) -> torch.Tensor:
    """Step 6 in this script's row layout (completion j of prompt p at row p * k + j).

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


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def main(c: RLOOConfig, reward_fn: Optional[Callable] = None) -> Path:
    """Train; returns the run directory. `reward_fn` (optional) replaces the reward model (see docstring)."""
    from accelerate import Accelerator

    _validate(c)
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
    coef = _regularizer_coef(c)

    run_dir = RunDir(c.output_dir, accelerator)
    run_dir.save_config(c)
    seed_everything(c.seed)
    if trackers:
        accelerator.init_trackers(c.tracker_project_name, config={k: v for k, v in vars(c).items() if isinstance(v, (int, float, str, bool))})

    # ---- models ----
    frozen_dtype = resolve_dtype(c.mixed_precision, device)
    tokenizer = load_tokenizer(c.model_name_or_path, padding_side="left", trust_remote_code=c.trust_remote_code)
    policy = load_policy(c.model_name_or_path, trust_remote_code=c.trust_remote_code, gradient_checkpointing=c.gradient_checkpointing)
    _disable_dropout(policy)
    need_ref = c.regularizer == "kl" or c.kl_ref_every > 0
    ref_policy = None
    if need_ref:
        with distributed.frozen_model_loading(accelerator):
            ref_policy = load_policy(c.ref_model_name_or_path or c.model_name_or_path, dtype=frozen_dtype, trust_remote_code=c.trust_remote_code)
        ref_policy = distributed.prepare_frozen_model(ref_policy, accelerator)  # ZeRO-3: own engine, CPU offload
    reward_model = reward_tok = None
    retokenize = False
    if reward_fn is None:
        with distributed.frozen_model_loading(accelerator):
            reward_model = load_reward_model(c.reward_model_name_or_path, dtype=frozen_dtype, trust_remote_code=c.trust_remote_code)
        reward_model = distributed.prepare_frozen_model(reward_model, accelerator)
        reward_tok = load_tokenizer(c.reward_model_name_or_path, padding_side="left", trust_remote_code=c.trust_remote_code)
        retokenize = not same_vocabulary(tokenizer, reward_tok)
        if retokenize and accelerator.is_main_process:
            print("[train_rloo] policy and reward model tokenizers differ: re-tokenising text for the reward model")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    optimizer = torch.optim.AdamW(policy.parameters(), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                  eps=c.adam_epsilon, weight_decay=c.weight_decay)
    # one scheduler step per iteration: linear gives lr_t = lr * (1 - t / num_iterations) without warmup
    scheduler = build_lr_scheduler(optimizer, c.lr_scheduler_type, plan.num_iterations, c.warmup_ratio)
    distributed.configure_deepspeed(accelerator, c.per_device_train_batch_size, c.max_grad_norm)  # no-op without DeepSpeed
    policy, optimizer = accelerator.prepare(policy, optimizer)

    # ---- data ----
    dataset = load_any_dataset(c.dataset_name, c.dataset_train_split)
    require_columns(dataset, [c.prompt_column], f"{c.dataset_name} ({c.dataset_train_split})")
    prompts_all = dataset[c.prompt_column]
    stream = PromptStream(len(prompts_all), plan.prompts_global, c.seed)
    truncated_prompts = 0

    # ---- resume ----
    start = 0
    ckpt = resolve_resume(c.resume, c.output_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, policy, optimizer, scheduler, accelerator)
        start = state["step"]
        stream.load(state["data"])
        truncated_prompts = int(state.get("truncated_prompts", 0))
        run_dir.truncate_logs_after(start, ("metrics.jsonl", "samples.jsonl"))
        if accelerator.is_main_process:
            print(f"[train_rloo] resumed from {ckpt} at iteration {start}")
    else:  # a fresh start (or 'latest' with no checkpoint yet): drop log lines of an earlier attempt
        run_dir.truncate_logs_after(0, ("metrics.jsonl", "samples.jsonl"))

    k, rank = c.rloo_k, accelerator.process_index
    fwd = c.local_rollout_forward_batch_size
    gather = accelerator.gather
    last_saved = start if ckpt is not None else -1
    progress = tqdm(
        range(start + 1, plan.num_iterations + 1), desc=f"train_rloo[{c.regularizer}]", initial=start,
        total=plan.num_iterations, disable=not accelerator.is_main_process, dynamic_ncols=True,
    )
    for it in progress:
        t_iter, cpu_iter = time.perf_counter(), time.process_time()
        metrics: dict = {}
        # prompts of this process: whole groups, each repeated k times (row p * k + j)
        idx = stream.next()[rank * plan.prompts_local : (rank + 1) * plan.prompts_local]
        prompt_ids, cut = tokenize_prompts(tokenizer, [prompts_all[i] for i in idx], c.max_prompt_length)
        truncated_prompts += int(gather(torch.tensor([cut], device=device)).sum())
        query_ids, query_mask = generation.left_pad(prompt_ids, pad_id)
        query_ids = query_ids.repeat_interleave(k, 0).to(device)
        query_mask = query_mask.repeat_interleave(k, 0).to(device)
        ctx = query_ids.shape[1]
        n = query_ids.shape[0]

        # 1. generate rloo_k completions per prompt (KV-cached sampling at the training temperature)
        t0 = time.perf_counter()
        policy.eval()
        # each chunk samples from a stream tied to its first row in the GLOBAL batch (not to the process):
        # with `local_rollout_forward_batch_size` dividing the per-process batch, N processes sample
        # exactly what one process samples (distributed.sampling_rng)
        row0 = rank * plan.rows_local
        raw = []
        with distributed.unwrap_for_generation(accelerator, policy) as gen_model, accelerator.autocast():
            for s in _chunks(n, fwd):
                with distributed.sampling_rng(c.seed, it, row0 + s.start, device):
                    raw.append(generation.generate(gen_model, query_ids[s], query_mask[s], c.response_length, eos_id, pad_id,
                                                   temperature=c.temperature, synced_gpus=distributed.needs_synced_gpus(accelerator)))
        raw = torch.cat(raw)
        t_generate = time.perf_counter() - t0

        # 2. truncate after the first EOS (kept), pad the rest
        responses, response_mask, contains_eos = generation.truncate_after_eos(raw, eos_id, pad_id)
        qr = torch.cat([query_ids, responses], 1)
        qr_mask = torch.cat([query_mask, response_mask], 1)

        # 3. reward-model score at the last real token; EOS penalty
        t0 = time.perf_counter()
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)  # padded after EOS already
        if reward_fn is not None:
            prompt_texts = tokenizer.batch_decode(query_ids * query_mask + pad_id * (1 - query_mask), skip_special_tokens=True)
            scores = torch.as_tensor(
                reward_fn(prompts=prompt_texts, completions=completions, response_ids=responses, response_mask=response_mask),
                dtype=torch.float32, device=device,
            ).reshape(-1)
            if scores.shape[0] != n:
                raise ValueError(f"reward_fn returned {scores.shape[0]} scores for {n} completions")
        else:
            if retokenize:
                rm_ids, rm_mask = retokenize_for_reward(tokenizer, reward_tok, query_ids, query_mask, responses, response_mask, contains_eos)
                rm_ids, rm_mask = rm_ids.to(device), rm_mask.to(device)
            else:
                rm_ids, rm_mask = qr, qr_mask
            with accelerator.autocast():
                scores = torch.cat([generation.reward_model_scores(reward_model, rm_ids[s], rm_mask[s]) for s in _chunks(n, fwd)])
        scores = apply_eos_penalty(scores, contains_eos, c.missing_eos_penalty)
        check_finite("reward-model score", scores, it, run_dir)
        t_score = time.perf_counter() - t0

        # 4. log-probs of the sampled tokens under the policy (old) and the reference, from logits / T
        #    (no-grad forwards go through the prepared model, so sharded engines gather their parameters)
        t0 = time.perf_counter()
        with torch.no_grad(), accelerator.autocast():
            old_lp, ent = [], []
            for s in _chunks(n, fwd):
                lp, e = generation.response_logprobs(policy, qr[s], qr_mask[s], ctx, c.temperature, return_entropy=True)
                old_lp.append(lp.float())
                ent.append(e.float())
            old_logprobs, token_entropy = torch.cat(old_lp), torch.cat(ent)
            compute_kl_ref = c.regularizer == "kl" or (c.kl_ref_every > 0 and it % c.kl_ref_every == 0)
            ref_logprobs = None
            if compute_kl_ref:
                ref_logprobs = torch.cat([
                    generation.response_logprobs(ref_policy, qr[s], qr_mask[s], ctx, c.temperature).float()
                    for s in _chunks(n, fwd)
                ])
        t_logprobs = time.perf_counter() - t0

        # 5. regularised sequence reward (objectives): kl / entropy (Eq. 6, Eq. 7) / none
        reg = objectives.regularized_reward(
            scores, old_logprobs, response_mask, c.regularizer, coef, ref_logprobs=ref_logprobs, length_normalize=c.length_normalize
        )
        check_finite("regularised reward", reg.rewards, it, run_dir)

        # 6. RLOO leave-one-out advantages over the k samples of each prompt ([num_prompts, k] layout)
        advantages = rloo_row_advantages(reg.rewards, k, c.whiten_advantages, accelerator)

        # 7. num_ppo_epochs x num_mini_batches clipped policy-gradient updates
        t0 = time.perf_counter()
        policy.train()
        stats = {"clipfrac": [], "approxkl": [], "ratio": [], "loss": [], "grad_norm": []}
        micro = c.per_device_train_batch_size
        for _epoch in range(c.num_ppo_epochs):
            order = torch.randperm(n).to(device)
            for mb_start in range(0, n, plan.mini_local):
                mb = order[mb_start : mb_start + plan.mini_local]
                for a in range(plan.grad_accum):
                    rows = mb[a * micro : (a + 1) * micro]
                    sync = a == plan.grad_accum - 1
                    # DDP/FSDP: all-reduce on the last micro-batch only; DeepSpeed: the engine steps there
                    with distributed.micro_step(accelerator, policy, sync), accelerator.autocast():
                        new_lp = generation.response_logprobs(policy, qr[rows], qr_mask[rows], ctx, c.temperature).float()
                        out = objectives.ppo_clipped_policy_loss(
                            new_lp, old_logprobs[rows], advantages[rows], response_mask[rows], c.cliprange, level=c.loss_level
                        )
                        accelerator.backward(out.loss / plan.grad_accum)
                    check_finite("policy loss", out.loss, it, run_dir)
                    for key in ("clipfrac", "approxkl", "ratio", "loss"):
                        stats[key].append(getattr(out, key).detach().float())
                if c.max_grad_norm > 0:
                    gn = accelerator.clip_grad_norm_(policy.parameters(), c.max_grad_norm)
                    stats["grad_norm"].append(torch.as_tensor(gn, device=device).float())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        t_update = time.perf_counter() - t0
        # KL between consecutive policies on this iteration's samples (both directions, see kl_prev_metrics):
        # old log-probs vs a post-update forward
        t0 = time.perf_counter()
        policy.eval()
        with torch.no_grad(), accelerator.autocast():
            new_logprobs = torch.cat([
                generation.response_logprobs(policy, qr[s], qr_mask[s], ctx, c.temperature).float() for s in _chunks(n, fwd)
            ])
        t_kl_prev = time.perf_counter() - t0

        # 8. log, sample, checkpoint (metrics are means over the global batch: gathered from every process)
        lengths = response_mask.sum(1).float()

        def gmean(x: torch.Tensor) -> float:
            return float(gather(x.detach().float().reshape(-1)).mean())

        def seq_sum(x: torch.Tensor) -> torch.Tensor:
            return objectives.masked_sum(x, response_mask)

        tokens_global = float(gather(lengths).sum())
        metrics["objective/scores"] = gmean(scores)
        metrics["objective/rlhf_reward"] = gmean(reg.rewards)
        metrics["objective/non_score_reward"] = gmean(reg.non_score_reward)
        metrics["objective/entropy_bonus"] = gmean(reg.non_score_reward) if c.regularizer == "entropy" else 0.0
        metrics.update(entropy_metrics(old_logprobs, response_mask, gather))
        if ref_logprobs is not None:
            metrics["objective/kl_ref"] = gmean(seq_sum(objectives.kl_estimate(old_logprobs, ref_logprobs, "k1")))
            metrics["objective/kl_ref_k3"] = gmean(seq_sum(objectives.kl_estimate(old_logprobs, ref_logprobs, "k3")))
        metrics["objective/kl_ref_every"] = 1 if c.regularizer == "kl" else c.kl_ref_every
        metrics.update(kl_prev_metrics(old_logprobs, new_logprobs, response_mask, gather))
        metrics["policy/entropy"] = float(gather(seq_sum(token_entropy)).sum()) / max(tokens_global, 1.0)
        for key, name in (("clipfrac", "policy/clipfrac"), ("approxkl", "policy/approxkl"), ("ratio", "val/ratio"), ("loss", "loss/policy")):
            metrics[name] = gmean(torch.stack(stats[key]).mean())
        if stats["grad_norm"]:
            metrics["train/grad_norm"] = gmean(torch.stack(stats["grad_norm"]).mean())
        metrics["train/lr"] = lr_used
        # std over the GLOBAL batch (a mean of per-process stds is not the global std)
        metrics["val/advantage_std"] = float(gather(advantages.detach().float().reshape(-1)).std()) if c.global_batch_size > 1 else 0.0
        metrics["response/length"] = tokens_global / c.global_batch_size
        metrics["response/eos_fraction"] = gmean(contains_eos)
        metrics["data/truncated_prompts"] = truncated_prompts
        metrics["data/epoch"] = stream.epoch
        metrics["episodes"] = it * c.global_batch_size
        metrics["time/generate"] = t_generate
        metrics["time/score"] = t_score
        metrics["time/logprobs"] = t_logprobs
        metrics["time/update"] = t_update
        metrics["time/kl_prev"] = t_kl_prev
        t_total = time.perf_counter() - t_iter
        metrics["time/iteration"] = t_total
        metrics["time/iteration_cpu"] = time.process_time() - cpu_iter  # CPU seconds of this process (all threads)
        metrics["perf/episodes_per_s"] = c.global_batch_size / t_total
        metrics["perf/tokens_per_s"] = tokens_global / t_total  # real (unpadded) response tokens
        if c.logging_steps > 0 and (it % c.logging_steps == 0 or it == plan.num_iterations):
            run_dir.log_metrics(metrics, it)
        progress.set_postfix(
            score=f"{metrics['objective/scores']:.3f}", rlhf=f"{metrics['objective/rlhf_reward']:.3f}",
            kl_prev=f"{metrics['objective/kl_prev']:.2g}", eps_s=f"{metrics['perf/episodes_per_s']:.1f}", refresh=False,
        )
        if c.sample_every > 0 and it % c.sample_every == 0 and c.num_samples > 0:
            rows = list(range(min(c.num_samples, n)))
            prompt_texts = tokenizer.batch_decode(query_ids[rows] * query_mask[rows] + pad_id * (1 - query_mask[rows]), skip_special_tokens=True)
            run_dir.append_jsonl("samples.jsonl", [
                {"step": it, "prompt": prompt_texts[j], "completion": completions[r], "score": float(scores[r]),
                 "rlhf_reward": float(reg.rewards[r]), "contains_eos": bool(contains_eos[r]), "temperature": c.temperature}
                for j, r in enumerate(rows)
            ])
        if (c.save_steps > 0 and it % c.save_steps == 0) or it == plan.num_iterations:
            save_checkpoint(run_dir, it, policy, tokenizer, optimizer, scheduler,
                            state={"data": stream.state(), "truncated_prompts": truncated_prompts}, keep_last=c.save_total_limit)
            last_saved = it
    if last_saved < 0 and latest_checkpoint(run_dir.path) is None:  # nothing ran (resumed at the end)
        save_checkpoint(run_dir, start, policy, tokenizer, optimizer, scheduler,
                        state={"data": stream.state(), "truncated_prompts": truncated_prompts})
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    return run_dir.path


if __name__ == "__main__":
    main(parse_config(RLOOConfig))
