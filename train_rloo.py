"""Online RLOO with a KL, maximum-entropy, minimum-entropy or no regulariser (paper Sec. 4.1-4.2).

    accelerate launch train_rloo.py --config configs/maxent_1b.yaml [--key value ...]
    python train_rloo.py --config configs/kl_1b.yaml --output_dir runs/kl_1b --resume latest

One iteration, numbered below exactly like this; each step is a function of the iteration's `Rollout`
record (this process's rows) that returns its values, which `main` (steps 3-6: `learn`) assigns to the
record, so `main` reads as the list and a step can be tested alone. Steps 1-2 and 7, the record and the
model loading are the online trainers' shared rollout (`maxent_rlhf.rollout`); steps 3-6 are RLOO's:
  1. generate: `rloo_k` completions per prompt (KV-cached sampling at `temperature`, top_k 0 / top_p 1,
     `generation.sample`: HF generate's tokens under the same RNG, without its per-token machinery),
     each truncated after its first EOS (EOS kept), the rest padded              `rollout.generate`
  2. score: prompt + completion with the reward model at the last real token; missing-EOS penalty  `rollout.score`
  3. log-probs of the sampled tokens under the policy (old) and the reference, from logits / T
                                                                                  `rollout.policy_logprobs`
  4. regularised sequence reward: kl (beta), entropy (alpha, Eq. 6; Eq. 7 with length_normalize), none
                                                                                          `regularised_reward`
  5. RLOO leave-one-out advantages over the k samples of each prompt (optional whitening) `rloo_row_advantages`
  6. update: num_ppo_epochs x num_mini_batches clipped policy-gradient steps (grad accumulation,
     clipping, lr decay); with one epoch of one mini-batch it also does 3 (policy part)-5    `update`
     with `use_vllm` (step 1 then samples on a vLLM engine): the new weights go into the engine, and a
     probe sequence checks it took them                                               `rollout.sync_engine`
  7. kl_prev: log-probs of the same samples after the update (KL between consecutive policies;
     all of them, or `kl_prev_per_prompt` of each prompt)                          `rollout.kl_prev_logprobs`
  8. log, sample, checkpoint                                                              `iteration_metrics`
Setup, resume and the bookkeeping around the steps (data/*, time/*, perf/*, logging, the win rate, samples,
checkpoints) are the online trainers' shared run (`rollout.start_run`, `rollout.OnlineRun`).
Speed (same values up to float rounding; tests/test_train_rloo.py compares
every metric): step 1 cuts the padded responses to the longest real row (`rollout.cut_to_longest`), so every
later forward is as short as the batch allows; every forward runs each prompt once for its rloo_k completions
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

Decisions (documented here once; the rollout's: batch layout, re-tokenising, prompt cutting, kl_prev,
objective/entropy, dropout, the reward_fn hook, the shared prompt pass, are in `maxent_rlhf.rollout`):
- Batch layout: `rewards.view(P, k)` is the [num_prompts, k] layout of `objectives.rloo_advantages`.
  Global batch sizes live in the config; per-process sizes are derived (`_batch_plan`), with errors
  naming the numbers when they do not divide.
- `objective/kl_ref` is a sum over the real response tokens of a sequence, averaged over the global
  batch; the plain key is the k1 estimate, `_k3` the non-negative k3 one. With a regulariser other than
  `kl` the reference model is only used for kl_ref, every `kl_ref_every` iterations (each record carries
  `objective/kl_ref_every`; the kl_ref keys are absent on the other iterations; 0 = never, and the
  reference is not even loaded).
- `objective/entropy_bonus` is the entropy term's weighted contribution to the reward (-alpha log pi(y|x),
  / |y| with length_normalize); it is 0 for the kl and none regularisers. `policy/entropy` is the true
  token entropy of softmax(logits / T), averaged over real response tokens.
- Minimum entropy: a negative `entropy_coef` (the entropy term with the opposite sign).
- The reference model is needed for the kl regulariser's reward every iteration, otherwise only for
  kl_ref every `kl_ref_every` iterations: `RLOOConfig.needs_ref(iteration)` decides it, in one place.
- LoRA (`use_peft`): the policy trains a LoRA adapter and the reference is the same policy with the adapter
  switched off (`rollout.Models.reference`, decided at load time; no second copy). Checkpoints hold the
  adapter (adapter_model.safetensors + adapter_config.json) next to the trainer state; full merged weights:
  `python -m maxent_rlhf.lora merge CKPT OUT_DIR`; evaluate_judge.py judges an adapter checkpoint as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from maxent_rlhf import distributed, generation, objectives, plotting, rollout
from maxent_rlhf.config import LR_SCHEDULER_TYPES, ConfigError, TrainConfig, cfg, derive_batch_sizes
from maxent_rlhf.evaluation import EvalArgs
from maxent_rlhf.lora import PeftArgs
from maxent_rlhf.rollout import Models, Rollout, RolloutArgs
from maxent_rlhf.story import run_story
from maxent_rlhf.vllm_engine import VLLMArgs
from maxent_rlhf.runs import read_metrics


@dataclass
class RLOOConfig(PeftArgs, EvalArgs, VLLMArgs, RolloutArgs, TrainConfig):
    """Online RLOO (PPO-style clipped update, no value head) with a KL / entropy / no regulariser; the win
    rate during training (EvalArgs: `judge`, `eval_steps`, `judge_dataset_*`) is off unless `judge` is set.
    Models, data and sampling: `RolloutArgs`; vLLM as the rollout engine: `VLLMArgs`."""

    # RLOO / PPO (the rollout's fields: RolloutArgs)
    global_batch_size: int = cfg(64, "GLOBAL completions per iteration (prompts x rloo_k), over all processes")
    num_mini_batches: int = cfg(1, "optimizer steps per PPO epoch (the batch is split into this many mini-batches)")
    per_device_train_batch_size: int = cfg(
        8, "micro-batch per process for the update; accumulation = global / num_mini_batches / (processes x this)"
    )
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

    def range_checks(self) -> list:
        """Value ranges (config.check_ranges, at construction); the batch arithmetic is `_batch_plan`'s."""
        return super().range_checks() + [
            (self.num_ppo_epochs >= 1, f"`num_ppo_epochs` = {self.num_ppo_epochs} must be >= 1"),
            (self.cliprange > 0, f"`cliprange` = {self.cliprange} must be > 0"),
            (self.kl_ref_every >= 0, f"`kl_ref_every` = {self.kl_ref_every} must be >= 0"),
            (not self.use_peft or self.lora_task_type == "CAUSAL_LM",
             f"`lora_task_type` = {self.lora_task_type!r}: the RLOO policy is a causal LM; set lora_task_type: CAUSAL_LM"),
        ]

    def kl_ref_interval(self) -> int:
        """Iterations between reference forwards: 1 for `kl` (its reward needs pi_ref), else `kl_ref_every`."""
        return 1 if self.regularizer == "kl" else self.kl_ref_every

    def needs_ref(self, iteration: Optional[int] = None) -> bool:
        """Is the reference model used at `iteration` (None: at all in this run, i.e. must it be loaded)?
        The kl reward every iteration, otherwise kl_ref every `kl_ref_every` (`rollout.load_models` reads it)."""
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


# ----------------------------------------------------------------------------------------------------
# steps 3-6 (the record and steps 1-2, 7: maxent_rlhf.rollout)
# ----------------------------------------------------------------------------------------------------
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


def update_chunk(c: RLOOConfig) -> Optional[int]:
    """The update forward's rows when it runs whole prompt groups in row order (the fused update, `can_fuse`:
    it may share the prompt pass); None: the other updates run shuffled rows (plain)."""
    return c.per_device_train_batch_size if can_fuse(c) else None


def prompt_sharing(c: RLOOConfig, m: Models, plan: BatchPlan) -> rollout.PromptSharing:
    """The run's one shared-or-plain decision (`rollout.prompt_sharing`, which `rollout.start_run` makes) with
    RLOO's own update forward (`update_chunk`)."""
    return rollout.prompt_sharing(c, m, plan.rows_local, update_chunk(c))


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
                    is_weights = None  # vLLM's samples: truncated importance weights of the engine/trainer mismatch
                    if c.use_vllm and c.vllm_importance_sampling_correction:
                        is_weights = objectives.truncated_importance_weights(
                            old_lp, ro.engine_logprobs[rows], ro.response_mask[rows], c.vllm_importance_sampling_cap,
                            c.loss_level)
                    pg = objectives.ppo_clipped_policy_loss(new_lp, old_lp, adv, ro.response_mask[rows], c.cliprange,
                                                            level=c.loss_level, weights=is_weights)
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
    with rollout.timed(timings, "logprobs"):  # 3. reference log-probs; the old ones here unless the update's forward gives them
        ro.ref_logprobs = rollout.reference_logprobs(c, m, ro) if needs_ref else None
        if not fused:
            ro.old_logprobs, ro.token_entropy = rollout.policy_logprobs(c, m, ro, m.policy, m.sharing.old, return_entropy=True)
    if not fused:  # 4.-5. regularised sequence reward, RLOO advantages
        ro.rewards, ro.non_score_reward, ro.advantages = rewards_and_advantages(c, ro, ro.old_logprobs,
                                                                                accelerator=m.accelerator, check=check)
    with rollout.timed(timings, "update"):  # 6. clipped policy-gradient updates
        stats, old = update(c, m, plan, ro, optimizer, scheduler, check=check)
    ro.old_logprobs, ro.token_entropy, ro.rewards, ro.non_score_reward, ro.advantages = old
    return stats




def iteration_metrics(c: RLOOConfig, ro: Rollout, stats: dict,
                      gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """Step 8: the iteration's metrics from the filled rollout and the update's statistics, as means over
    the global batch (`gather` concatenates every process's rows; the identity on one process)."""
    def gmean(x: torch.Tensor) -> float:
        return rollout.global_mean(x, gather)

    metrics = rollout.rollout_metrics(c, ro, gather)  # scores, entropy, kl_ref, kl_prev, policy/entropy, response/*
    metrics["objective/rlhf_reward"] = gmean(ro.rewards)
    metrics["objective/non_score_reward"] = gmean(ro.non_score_reward)
    metrics["objective/entropy_bonus"] = gmean(ro.non_score_reward) if c.regularizer == "entropy" else 0.0
    for key, name in (("clipfrac", "policy/clipfrac"), ("approxkl", "policy/approxkl"), ("ratio", "val/ratio"), ("loss", "loss/policy")):
        metrics[name] = gmean(torch.stack(stats[key]).mean())
    if stats["grad_norm"]:
        metrics["train/grad_norm"] = gmean(torch.stack(stats["grad_norm"]).mean())
    metrics["train/lr"] = stats["lr"]
    # std over the GLOBAL batch (a mean of per-process stds is not the global std)
    metrics["val/advantage_std"] = float(gather(ro.advantages.detach().float().reshape(-1)).std()) if c.global_batch_size > 1 else 0.0
    return metrics


def sample_records(c: RLOOConfig, m: Models, ro: Rollout, iteration: int) -> list[dict]:
    """The first `num_samples` completions of this process, for samples.jsonl."""
    rows = list(range(min(c.num_samples, len(ro))))
    prompts = rollout.prompt_texts(m.tokenizer, ro.query_ids[rows], ro.query_mask[rows])
    return [{"step": iteration, "prompt": prompts[j], "completion": ro.completions[r], "score": float(ro.scores[r]),
             "rlhf_reward": float(ro.rewards[r]), "contains_eos": bool(ro.contains_eos[r]), "temperature": c.temperature}
            for j, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def main(c: RLOOConfig, reward_fn: Optional[Callable] = None) -> Path:
    """Train; returns the run directory. `reward_fn` (optional) replaces the reward model (see docstring)."""
    # setup, resume and the iteration-0 win rate (rollout.start_run; the shared prompt pass: `prompt_sharing`)
    run = rollout.start_run(c, reward_fn, _batch_plan, "[train_rloo]", update_chunk=update_chunk(c))
    m, plan, gather = run.m, run.plan, run.accelerator.gather
    for it in run.iterations(desc=f"train_rloo[{c.regularizer}]"):
        timings = rollout.Timings()
        query_ids, query_mask = run.next_prompts()  # whole prompt groups, each repeated k times (row p * k + j)
        with rollout.timed(timings, "generate"):  # 1. sample rloo_k completions per prompt, cut after EOS
            ro = rollout.generate(c, m, query_ids, query_mask, it, first_row=run.first_row)
        with rollout.timed(timings, "score"):  # 2. reward-model score; missing-EOS penalty
            ro.completions, ro.scores = rollout.score(c, m, ro)
            run.check(it)("reward-model score", ro.scores)
        stats = learn(c, m, plan, ro, run.optimizer, run.scheduler, c.needs_ref(it), timings, check=run.check(it))  # 3.-6.
        engine = run.sync_after_update(ro, it, timings)  # 6b. vLLM: the updated weights into the engine, probed
        with rollout.timed(timings, "kl_prev"):  # 7. the same samples (all, or kl_prev_per_prompt of each prompt) after the update
            ro.kl_prev_rows, ro.new_logprobs = rollout.kl_prev_logprobs(c, m, ro)

        # 8. log, sample, checkpoint (metrics are means over the global batch: gathered from every process)
        metrics = {**iteration_metrics(c, ro, stats, gather), **engine}
        run.add_bookkeeping(metrics, it, timings)
        run.end_iteration(it, metrics, samples=lambda: sample_records(c, m, ro, it), postfix=dict(
            score=f"{metrics['objective/scores']:.3f}", rlhf=f"{metrics['objective/rlhf_reward']:.3f}",
            kl_prev=f"{metrics['objective/kl_prev']:.2g}", eps_s=f"{metrics['perf/episodes_per_s']:.1f}"))
    return run.finish(closing_summary)


def closing_summary(run_path: Path) -> None:
    """The run's story from its metrics.jsonl (maxent_rlhf.story) and its figure (<run>/curves.png)."""
    print("[train_rloo] summary\n" + run_story(read_metrics(run_path), run_path).text(), flush=True)
    figure = plotting.plot_rloo_run(run_path)
    if figure is not None:
        print(f"[train_rloo] figure: {figure}", flush=True)


if __name__ == "__main__":
    from maxent_rlhf.cli import run_script

    run_script(main, RLOOConfig)
