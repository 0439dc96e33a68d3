"""Online pairwise training: online DPO / SimPO / IPO / ... on the policy's own samples.

    accelerate launch train_online.py --config configs/online_simpo_1b.yaml [--key value ...]
    python train_online.py --config configs/toy/online_dpo.yaml --output_dir runs/toy/online_dpo --resume latest

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's OnlineDPOTrainer):
each iteration samples completions from the current policy, the reward model ranks them, and a pairwise
loss of train_offline.py is applied to the on-policy pair. The pairs change with the policy: there is no
dataset constraint, only the loss's own anchor (DPO's reference, SimPO's margin).

One iteration, numbered below exactly like this; steps 1-2 and 6 are the online trainers' shared rollout
(`maxent_rlhf.rollout`, as in train_rloo.py), each step a function of the iteration's `Rollout` record
(this process's rows) whose values `main` assigns, so `main` reads as the list:
  1. generate: `rloo_k` >= 2 completions per prompt at `temperature`, cut after EOS      `rollout.generate`
  2. score: reward model at the last real token (or `reward_fn`); missing-EOS penalty     `rollout.score`
  3. pairs: chosen = best, rejected = worst of each prompt's k by score; a prompt whose k scores are all
     equal (a tie) has no preference: skipped and counted (`online/ties`)       `objectives.best_worst_pairs`
  4. log-probs of every sample under the policy before the update (entropy, KL metrics) and, when the
     loss needs the reference (dpo, ipo, chipo) or objective/kl_ref is due, under the reference
                                                                                `rollout.policy_logprobs`
  5. update: the pairwise loss of train_offline.py (`objectives.preference_loss`, one dispatch for both)
     on the pairs' summed log-probs S and lengths |y|, mean over the GLOBAL batch's pairs; gradient
     accumulation over `per_device_train_batch_size` pairs, clipping, one optimizer and one schedule step
     per iteration                                                                            `update`
     with `use_vllm` (step 1 then samples on a vLLM engine): the new weights go into the engine, and a
     probe sequence checks it took them, as in train_rloo.py                  `rollout.sync_engine`
  6. kl_prev: log-probs of the same samples after the update                 `rollout.kl_prev_logprobs`
  7. log: the RLOO run's keys where they mean the same (objective/scores, entropy, kl_ref (+_k3),
     kl_prev*, response/*, eval/* win rate) plus train_offline's pairwise ones (train/loss,
     rewards/chosen, rejected, margins, accuracies, logps/*)                       `iteration_metrics`
  8. sample, checkpoint (`--resume latest` continues exactly: weights, optimizer, schedule, prompt stream;
     sampling streams are tied to the iteration), closing summary (`maxent_rlhf.story.run_story`)
Setup, resume and the bookkeeping around the steps (data/*, time/*, perf/*, logging, the win rate, samples,
checkpoints) are the online trainers' shared run (`rollout.start_run`, `rollout.OnlineRun`).

Decisions (documented here once; the rollout's are in `maxent_rlhf.rollout`):
- The loss reads log pi(y|x) from logits / temperature, as every log-prob of the rollout does: the policy
  that is trained is the one that sampled. With temperature 1 the numbers are train_offline's exactly
  (tests/test_online.py). DPO's reference log-probs use the same temperature.
- `global_batch_size` counts completions (prompts x rloo_k), as in train_rloo.py; each process holds whole
  prompt groups, so its pairs are its own. `per_device_train_batch_size` counts pairs per micro-batch.
- Ties stay in the micro-batches with weight 0 (every process runs the same forwards, so the gradient
  all-reduce lines up); the loss and the pairwise metrics are means over the global batch's untied pairs.
  An iteration whose every prompt ties makes no optimizer step (the schedule still steps; the pairwise
  metrics are absent from its record).
- Step 4's policy forward is one no-grad pass over every sample (k per prompt): the update only sees
  the pairs, but entropy and both KL metrics are over all samples, as in an RLOO run. The update's
  forward runs the plain (unshared) prompt pass: its rows are chosen / rejected, not prompt groups.
- Reference-free losses (simpo, cpo, orpo, slic) load the reference only for objective/kl_ref, every
  `kl_ref_every` iterations (0: never, and it is not loaded), as train_rloo.py does.
- LoRA (`use_peft`) as in train_rloo.py: the policy trains an adapter and the reference is the same policy
  with the adapter switched off (no second copy); checkpoints hold the adapter. With vLLM the loss takes no
  importance weights (`vllm_importance_sampling_correction` is refused): the pairs' log-probs are the
  trainer's own, and the engine only chooses which completions there are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from maxent_rlhf import distributed, generation, objectives, plotting, rollout
from maxent_rlhf.config import LR_SCHEDULER_TYPES, ConfigError, PreferenceLossArgs, TrainConfig, cfg, derive_batch_sizes
from maxent_rlhf.evaluation import EvalArgs
from maxent_rlhf.lora import PeftArgs
from maxent_rlhf.rollout import Models, Rollout, RolloutArgs
from maxent_rlhf.runs import read_metrics
from maxent_rlhf.story import run_story
from maxent_rlhf.vllm_engine import VLLMArgs

# the pairwise losses that take an on-policy pair; sft / reward / simpo_pl (K ranked responses) are offline-only
ONLINE_LOSSES = ("dpo", "ipo", "chipo", "simpo", "cpo", "orpo", "slic")
OFFLINE_ONLY = ("sft", "reward", "simpo_pl")


@dataclass
class OnlineConfig(PeftArgs, EvalArgs, VLLMArgs, RolloutArgs, PreferenceLossArgs, TrainConfig):
    """Online pairwise training (online DPO / SimPO / ...): the rollout's fields are `RolloutArgs` (`rloo_k`:
    completions per prompt, >= 2); the loss fields are `PreferenceLossArgs` (train_offline.py's); the win rate during training
    (EvalArgs) is off unless `judge` is set. LoRA: `PeftArgs`; vLLM as the rollout engine: `VLLMArgs`."""

    loss_type: str = cfg("simpo", "pairwise loss on the on-policy pair: " + ", ".join(ONLINE_LOSSES))
    global_batch_size: int = cfg(64, "GLOBAL completions per iteration (prompts x rloo_k), over all processes")
    per_device_train_batch_size: int = cfg(
        8, "pairs (prompts) per micro-batch on each process; accumulation = prompts per process / this")
    total_episodes: int = cfg(1_000_000, "total completions to train on; iterations = total_episodes // global_batch_size")
    num_iterations: Optional[int] = cfg(None, "if set, overrides total_episodes: number of iterations to run")
    learning_rate: float = cfg(5e-7, "peak AdamW learning rate (TRL's OnlineDPOConfig default)")
    lr_scheduler_type: str = cfg(
        "linear", "decay after warmup, one scheduler step per iteration: 'linear' to 0, 'cosine' or 'constant'",
        choices=LR_SCHEDULER_TYPES,
    )
    warmup_ratio: float = cfg(0.0, "fraction of the iterations spent warming the learning rate up from 0")
    max_grad_norm: float = cfg(1.0, "gradient clipping norm (<= 0 disables)")
    kl_ref_every: int = cfg(
        1, "reference-free losses: compute objective/kl_ref every N iterations (0: never); dpo/ipo/chipo every iteration"
    )

    def range_checks(self) -> list:
        """Value ranges (config.check_ranges, at construction); the batch arithmetic is `batch_plan`'s."""
        offline = (f"`loss_type` = {self.loss_type!r} is an offline loss (train_offline.py); " if self.loss_type in OFFLINE_ONLY
                   else f"unknown loss_type {self.loss_type!r}; ")
        return super().range_checks() + [
            (self.loss_type in ONLINE_LOSSES, offline + "online pairwise losses: " + ", ".join(ONLINE_LOSSES)),
            (self.rloo_k >= 2, f"`rloo_k` = {self.rloo_k}: online pairwise training needs at least 2 completions per "
                               "prompt (chosen = best, rejected = worst); set rloo_k >= 2"),
            (self.kl_ref_every >= 0, f"`kl_ref_every` = {self.kl_ref_every} must be >= 0"),
            (not self.use_peft or self.lora_task_type == "CAUSAL_LM",
             f"`lora_task_type` = {self.lora_task_type!r}: the online policy is a causal LM; set lora_task_type: CAUSAL_LM"),
            (not self.vllm_importance_sampling_correction,
             "`vllm_importance_sampling_correction`: the pairwise loss takes no importance weights (train_rloo.py "
             "does); set vllm_importance_sampling_correction: false"),
        ]

    def needs_loss_ref(self) -> bool:
        return self.loss_type in objectives.REFERENCE_LOSSES

    def kl_ref_interval(self) -> int:
        """Iterations between reference forwards: 1 when the loss needs pi_ref, else `kl_ref_every`."""
        return 1 if self.needs_loss_ref() else self.kl_ref_every

    def needs_ref(self, iteration: Optional[int] = None) -> bool:
        """Is the reference used at `iteration` (None: at all, i.e. must it be loaded; `rollout.load_models`)?"""
        every = self.kl_ref_interval()
        return every > 0 and (iteration is None or iteration % every == 0)


# ----------------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    prompts_global: int  # prompts (= pairs before ties) per iteration over all processes
    prompts_local: int  # prompts per iteration on this process
    rows_local: int  # completions per iteration on this process
    grad_accum: int  # micro-batches of per_device_train_batch_size pairs per optimizer step
    num_iterations: int


def batch_plan(c: OnlineConfig, num_processes: int) -> BatchPlan:
    gbs, k = c.global_batch_size, c.rloo_k
    if gbs % (num_processes * k):
        raise ConfigError(
            f"`global_batch_size` = {gbs} completions must be a multiple of num_processes x rloo_k = "
            f"{num_processes} x {k} = {num_processes * k}, so every process holds whole prompt groups"
        )
    prompts_local, accum = derive_batch_sizes(gbs // k, num_processes, c.per_device_train_batch_size,
                                              name="global_batch_size / rloo_k (prompts)")
    n_iter = c.num_iterations if c.num_iterations is not None else c.total_episodes // gbs
    if n_iter < 1:
        raise ConfigError(f"`total_episodes` = {c.total_episodes} is less than one batch of {gbs}; nothing to train")
    return BatchPlan(gbs // k, prompts_local, prompts_local * k, accum, n_iter)


# ----------------------------------------------------------------------------------------------------
# steps 3-5 (the record and steps 1-2, 6: maxent_rlhf.rollout)
# ----------------------------------------------------------------------------------------------------
def select_pairs(c: OnlineConfig, ro: Rollout) -> objectives.PairSelection:
    """Step 3: this process's pairs (one per local prompt), as ROW indices of the rollout (row p * k + j)."""
    sel = objectives.best_worst_pairs(ro.scores.view(-1, c.rloo_k))
    first = torch.arange(sel.valid.shape[0], device=sel.valid.device) * c.rloo_k
    return objectives.PairSelection(first + sel.chosen, first + sel.rejected, sel.valid)


def sequence_logps(logprobs: torch.Tensor, response_mask: torch.Tensor, chosen: torch.Tensor,
                   rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S and |y| of the pairs, [pairs, 2] (column 0 chosen, 1 rejected): train_offline's layout.
    `logprobs` [2 * pairs, T] rows chosen first, then rejected; `response_mask` [n, T] of the whole rollout."""
    rows = torch.cat([chosen, rejected])
    mask = response_mask[rows]
    s = objectives.masked_sum(logprobs, mask)
    n = mask.sum(-1).to(s.dtype)
    p = chosen.shape[0]
    return torch.stack([s[:p], s[p:]], 1), torch.stack([n[:p], n[p:]], 1)


def update(c: OnlineConfig, m: Models, plan: BatchPlan, ro: Rollout, pairs: objectives.PairSelection, optimizer,
           scheduler, check: Callable[[str, torch.Tensor], None] = lambda name, value: None) -> dict:
    """Step 5: one optimizer step on the pairwise loss, mean over the global batch's untied pairs.

    Returns {"n_pairs": global untied pairs, "sums": {metric: sum over this process's untied pairs},
    "grad_norm": tensor or None, "lr": the learning rate used}."""
    acc, policy, device = m.accelerator, m.policy, m.accelerator.device
    params = objectives.PreferenceLossParams.of(c)
    weights = pairs.valid.float()
    n_pairs = float(acc.reduce(weights.sum(), reduction="sum")) if acc.num_processes > 1 else float(weights.sum())
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    if n_pairs > 0:  # the same on every process: all run the same forwards or none
        policy.train()
        micro = c.per_device_train_batch_size
        for a in range(plan.grad_accum):
            idx = slice(a * micro, (a + 1) * micro)
            chosen, rejected, w = pairs.chosen[idx], pairs.rejected[idx], weights[idx]
            rows = torch.cat([chosen, rejected])
            # DDP/FSDP: all-reduce on the last micro-batch only; DeepSpeed: the engine steps there
            with distributed.micro_step(acc, policy, a == plan.grad_accum - 1), acc.autocast():
                lp = generation.response_logprobs(policy, ro.query_responses[rows], ro.attention_mask[rows],
                                                  ro.context_length, c.temperature)
                logps, lengths = sequence_logps(lp.float(), ro.response_mask, chosen, rejected)
                ref = None
                if c.needs_loss_ref():
                    ref, _ = sequence_logps(ro.ref_logprobs[rows], ro.response_mask, chosen, rejected)
                out = objectives.preference_loss(c.loss_type, logps, lengths, ref, params)
                # sum over this process's pairs / global pairs x processes: DDP's mean over processes
                # then gives the mean over the global batch's untied pairs
                loss = (out.losses * w).sum() * acc.num_processes / n_pairs
                acc.backward(loss)
            check("pairwise loss", out.losses.detach())
            stats = {"train/loss": out.losses, "rewards/chosen": out.chosen_rewards,
                     "rewards/rejected": out.rejected_rewards, "rewards/margins": out.margins,
                     "rewards/accuracies": out.accuracies, "logps/chosen": logps[:, 0], "logps/rejected": logps[:, 1],
                     "logps/chosen_per_token": logps[:, 0] / lengths[:, 0],
                     "logps/rejected_per_token": logps[:, 1] / lengths[:, 1]}
            if ref is not None:
                stats["ref/logratio"] = ref[:, 0] - ref[:, 1]
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + (v.detach().float() * w).sum()
        if c.max_grad_norm > 0:
            # float(): under FSDP2 the norm is a DTensor, which the metric reduce cannot take
            grad_norm = torch.tensor(float(acc.clip_grad_norm_(policy.parameters(), c.max_grad_norm)), device=device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return {"n_pairs": n_pairs, "sums": sums, "grad_norm": grad_norm, "lr": lr}


# ----------------------------------------------------------------------------------------------------
# step 7: metrics
# ----------------------------------------------------------------------------------------------------
def iteration_metrics(c: OnlineConfig, ro: Rollout, pairs: objectives.PairSelection, stats: dict,
                      gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                      reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """Step 7: the iteration's metrics, means over the global batch (`gather` concatenates every process's
    rows, `reduce` sums a tensor over processes; the identity on one process). The pairwise ones are
    means over the untied pairs."""
    metrics = rollout.rollout_metrics(c, ro, gather)  # scores, entropy, kl_ref, kl_prev, policy/entropy, response/*
    n_pairs = stats["n_pairs"]
    metrics["online/pairs"] = n_pairs
    metrics["online/ties"] = c.global_batch_size // c.rloo_k - n_pairs
    gap = (ro.scores[pairs.chosen] - ro.scores[pairs.rejected]) * pairs.valid.float()
    if n_pairs > 0:
        metrics["online/score_gap"] = float(reduce(gap.sum())) / n_pairs  # score(chosen) - score(rejected)
        names = sorted(stats["sums"])
        totals = reduce(torch.stack([stats["sums"][k] for k in names]))
        metrics.update({k: float(totals[i]) / n_pairs for i, k in enumerate(names)})
    if stats["grad_norm"] is not None:
        metrics["train/grad_norm"] = rollout.global_mean(stats["grad_norm"], gather)
    metrics["train/lr"] = stats["lr"]
    return metrics


def sample_records(c: OnlineConfig, m: Models, ro: Rollout, pairs: objectives.PairSelection, iteration: int) -> list[dict]:
    """The first `num_samples` completions of this process, for samples.jsonl (`pair`: chosen / rejected / '')."""
    rows = list(range(min(c.num_samples, len(ro))))
    prompts = rollout.prompt_texts(m.tokenizer, ro.query_ids[rows], ro.query_mask[rows])
    role = {}
    for ch, rj, ok in zip(pairs.chosen.tolist(), pairs.rejected.tolist(), pairs.valid.tolist()):
        if ok:
            role[ch], role[rj] = "chosen", "rejected"
    return [{"step": iteration, "prompt": prompts[j], "completion": ro.completions[r], "score": float(ro.scores[r]),
             "pair": role.get(r, ""), "contains_eos": bool(ro.contains_eos[r]), "temperature": c.temperature}
            for j, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def main(c: OnlineConfig, reward_fn: Optional[Callable] = None) -> Path:
    """Train; returns the run directory. `reward_fn` (optional) replaces the reward model (maxent_rlhf.rollout)."""
    # setup, resume and the iteration-0 win rate: rollout.start_run; the update's rows are pairs: its pass is plain
    run = rollout.start_run(c, reward_fn, batch_plan, "[train_online]")
    m, plan, gather, acc = run.m, run.plan, run.accelerator.gather, run.accelerator
    reduce = (lambda x: acc.reduce(x, reduction="sum")) if acc.num_processes > 1 else (lambda x: x)
    for it in run.iterations(desc=f"train_online[{c.loss_type}]"):
        timings = rollout.Timings()
        query_ids, query_mask = run.next_prompts()  # whole prompt groups, each repeated k times (row p * k + j)
        with rollout.timed(timings, "generate"):  # 1. rloo_k completions per prompt, cut after EOS
            ro = rollout.generate(c, m, query_ids, query_mask, it, first_row=run.first_row)
        with rollout.timed(timings, "score"):  # 2. reward-model score; missing-EOS penalty
            ro.completions, ro.scores = rollout.score(c, m, ro)
            run.check(it)("reward-model score", ro.scores)
        pairs = select_pairs(c, ro)  # 3. chosen = best, rejected = worst; ties marked
        with rollout.timed(timings, "logprobs"):  # 4. the policy's (old) and, when used, the reference's log-probs
            ro.old_logprobs, ro.token_entropy = rollout.policy_logprobs(c, m, ro, m.policy, m.sharing.old, return_entropy=True)
            ro.ref_logprobs = rollout.reference_logprobs(c, m, ro) if c.needs_ref(it) else None
        with rollout.timed(timings, "update"):  # 5. the pairwise loss, one optimizer step
            stats = update(c, m, plan, ro, pairs, run.optimizer, run.scheduler, run.check(it))
        engine = run.sync_after_update(ro, it, timings)  # 5b. vLLM: the updated weights into the engine, probed
        with rollout.timed(timings, "kl_prev"):  # 6. the same samples after the update
            ro.kl_prev_rows, ro.new_logprobs = rollout.kl_prev_logprobs(c, m, ro)

        # 7. log (means over the global batch); 8. win rate, samples, checkpoint
        metrics = {**iteration_metrics(c, ro, pairs, stats, gather, reduce), **engine}
        run.add_bookkeeping(metrics, it, timings)
        run.end_iteration(it, metrics, samples=lambda: sample_records(c, m, ro, pairs, it), postfix=dict(
            score=f"{metrics['objective/scores']:.3f}", loss=f"{metrics.get('train/loss', float('nan')):.3f}",
            ties=int(metrics["online/ties"])))
    return run.finish(closing_summary)


# the run figure: the RLOO figure's panels (entropy, KL to the reference, KL between consecutive policies)
# under the proxy score, plus the pairwise loss's implicit reward margin
ONLINE_RUN_PANELS = ([("proxy score", [("objective/scores", None)])] + plotting.RLOO_RUN_PANELS[1:]
                     + [("reward margin", [("rewards/margins", None)])])


def closing_summary(run_path: Path) -> None:
    """The run's story from its metrics.jsonl (maxent_rlhf.story: proxy score, KL, win rate, verdict) and its
    figure (<run>/curves.png)."""
    print("[train_online] summary\n" + run_story(read_metrics(run_path), run_path).text(), flush=True)
    figure = plotting.draw_run_figure(run_path, ONLINE_RUN_PANELS, "online pairwise", plotting.RUN_FIGURE)
    if figure is not None:
        print(f"[train_online] figure: {figure}", flush=True)


if __name__ == "__main__":
    from maxent_rlhf.cli import run_script

    run_script(main, OnlineConfig)
