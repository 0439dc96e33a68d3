"""Offline training from a fixed dataset: SFT, Bradley-Terry reward models and preference losses.

    accelerate launch train_offline.py --config configs/simpo_1b.yaml [--key value ...]
    python train_offline.py --config configs/dpo_1b.yaml --learning_rate 1e-6

Losses (`--loss_type`), every formula from `maxent_rlhf.objectives`:
    sft       NLL of the completion (per token, mean over examples)           data: prompt, completion
    reward    Bradley-Terry reward model, read at the last real token (EOS)    data: prompt, chosen, rejected
    dpo ipo chipo                    (need a reference model)                  data: prompt, chosen, rejected
    simpo cpo orpo slic              (reference-free)                          data: prompt, chosen, rejected
    simpo_pl  SimPO over K ranked responses (Plackett-Luce)                    data: prompt, responses, ranking

Data flow of one optimizer step: the global batch (a slice of a seeded per-epoch permutation of the
dataset) is split over processes, then into micro-batches. A micro-batch holds K responses per prompt
(K = 2: chosen and rejected) concatenated along the batch axis, so all of them go through the model in
ONE forward: prompts left-padded, responses right-padded, only response positions' logits computed.
Per-example losses are averaged over the micro-batch and divided by the number of accumulation steps,
and DDP averages over processes, so the gradient is the global-batch mean (`distributed.micro_step` syncs
gradients on the last micro-batch only, and drives DeepSpeed's engine the same way). Metrics are summed over
micro-batches and processes and divided by the global batch size.

Evaluation: the loss-based one on `dataset_test_split` (eval/loss, eval/accuracy) and, when `judge` is
set, the win rate of greedy generations against references (`maxent_rlhf.evaluation`, the machinery of
evaluate_judge.py: eval/win_rate with its Wilson interval, n, invalid, lengths; at step 0, every
`eval_steps` and at the end; a judge outage is logged as eval/missing and training goes on).

Outputs (run directory = output_dir): config.yaml, metrics.jsonl, checkpoints/step_XXXXXXXX (HF
safetensors weights + tokenizer + trainer state), eval/ (judged generations per step, judgment cache),
curves.png (the paper's Fig. 7 layout); at the end the run's story (maxent_rlhf.story) is printed.
`main(cfg)` returns the run directory; the final model is `checkpoints.latest_checkpoint(run_dir)`.
"""
from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from maxent_rlhf import checkpoints, data, distributed, generation, models, objectives, plotting, runs
from maxent_rlhf.config import ConfigError, TrainConfig, cfg, config_to_dict, derive_batch_sizes, parse_config
from maxent_rlhf.evaluation import EvalArgs, TrainingEvaluator
from maxent_rlhf.story import run_story
from maxent_rlhf.schedules import build_lr_scheduler

LOSSES = ("sft", "reward", "dpo", "simpo", "ipo", "cpo", "orpo", "slic", "chipo", "simpo_pl")
REFERENCE_LOSSES = ("dpo", "ipo", "chipo")  # need log pi_ref
DATA_KIND = {"sft": "sft", "simpo_pl": "listwise"}  # every other loss reads pairwise data


@dataclass
class OfflineConfig(EvalArgs, TrainConfig):
    """Offline training: SFT, reward model, DPO / SimPO / IPO / CPO / ORPO / SLiC / chi-PO / SimPO-PL."""

    loss_type: str = cfg("dpo", "objective: " + ", ".join(LOSSES), choices=LOSSES)
    # models (the shared fields are in TrainConfig; here the ones offline training adds or reads differently)
    model_name_or_path: str = cfg(
        "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr",
        "policy to train (causal LM), or for loss_type `reward` the model to start from: an SFT policy (gets a "
        "new one-label score head) or an existing one-label reward model; hub id, local path or toylab://NAME",
    )
    model_revision: Optional[str] = cfg(None, "hub revision (branch, tag or commit) of model_name_or_path")
    tokenizer_name_or_path: Optional[str] = cfg(None, "tokenizer (default: model_name_or_path)")
    ref_model_name_or_path: Optional[str] = cfg(
        None, "frozen reference policy for dpo/ipo/chipo (default: model_name_or_path, i.e. the initial policy)"
    )
    precompute_ref_logprobs: bool = cfg(
        False, "compute reference log-probs once over the dataset before training and free the reference model"
    )
    # data
    dataset_name: str = cfg(
        "trl-lib/tldr-preference", "hub id, local .json/.jsonl/.parquet file or directory, or toylab://NAME"
    )
    prompt_column: str = cfg("prompt", "column holding the prompt text (the response columns keep their names)")
    eval_dataset_name: Optional[str] = cfg(None, "dataset of the loss-based evaluation (default: `dataset_name`)")
    dataset_test_split: Optional[str] = cfg(
        None, "split of the loss-based evaluation (eval/loss, eval/accuracy; null: none); the win rate reads "
        "judge_dataset_name / judge_dataset_test_split")
    max_train_samples: int = cfg(0, "use only the first N training rows (0: all)")
    max_eval_samples: int = cfg(1000, "evaluate on the first N rows of dataset_test_split (0: all)")
    max_prompt_length: int = cfg(512, "longest prompt in tokens; see prompt_overflow")
    max_completion_length: int = cfg(
        128, "longest response in tokens, EOS included; longer ones keep their first tokens"
    )
    prompt_overflow: str = cfg(
        "error", "prompt longer than max_prompt_length: 'error', 'drop' the row, or 'truncate_left' (keep the end)",
        choices=data.PROMPT_OVERFLOW,
    )
    # optimisation
    global_batch_size: int = cfg(64, "examples (prompts) per optimizer step over all processes")
    per_device_eval_batch_size: int = cfg(
        16, "examples per forward in evaluation, reward normalisation and precomputation, on one process"
    )
    num_train_epochs: float = cfg(1.0, "passes over the training data (fractional allowed)")
    max_steps: int = cfg(0, "optimizer steps; > 0 overrides num_train_epochs")
    learning_rate: float = cfg(1e-6, "peak learning rate of AdamW")
    warmup_ratio: float = cfg(0.1, "fraction of the steps spent warming the learning rate up from 0")
    eval_steps: int = cfg(
        0, "evaluate every N steps (0: at the end only): the loss-based eval on dataset_test_split (eval/loss, "
        "eval/accuracy) and, when `judge` is set, the win rate on judge_dataset_name (also at step 0)")
    # loss hyper-parameters
    beta: float = cfg(0.1, "inverse temperature of dpo/ipo/chipo/simpo/simpo_pl/cpo (SimPO: beta of beta*A)")
    simpo_gamma: float = cfg(0.5, "SimPO / SimPO-PL target margin, absolute (TRL's simpo_gamma, not the ratio gamma/beta)")
    length_normalize: bool = cfg(True, "SimPO / SimPO-PL: average log-probs over response tokens (A = S/|y|)")
    cpo_alpha: float = cfg(1.0, "CPO: weight of the chosen NLL term (TRL's cpo_alpha)")
    orpo_lambda: float = cfg(0.1, "ORPO: weight lambda of the odds-ratio term")
    slic_delta: float = cfg(1.0, "SLiC-HF: hinge margin delta on S_w - S_l")
    slic_nll_coef: float = cfg(0.1, "SLiC-HF: weight of the chosen NLL term")
    chipo_reward_clip: float = cfg(1.0, "chi-PO: R_max; the reward difference is clipped to +-2 R_max")
    # reward model normalisation
    normalize_reward: bool = cfg(True, "loss_type `reward`: after training, shift the output so reference completions average 0")
    reward_norm_dataset: Optional[str] = cfg(
        None, "prompt/completion data whose completions are the references (e.g. trl-lib/tldr); "
        "null: the training data's `completion` column if it has one, else no normalisation",
    )
    reward_norm_split: str = cfg("train", "split of reward_norm_dataset")
    reward_norm_samples: int = cfg(0, "use the first N reference rows (0: all)")


def validate(c: OfflineConfig) -> None:
    """Checks a config built in-process (parse_config has already checked choices and types)."""
    if c.loss_type not in LOSSES:
        raise ConfigError(f"unknown loss_type {c.loss_type!r}; valid losses: {', '.join(LOSSES)}")
    if c.prompt_overflow not in data.PROMPT_OVERFLOW:
        raise ConfigError(f"`prompt_overflow` must be one of {list(data.PROMPT_OVERFLOW)}, got {c.prompt_overflow!r}")
    for name in ("max_prompt_length", "max_completion_length", "per_device_eval_batch_size"):
        if getattr(c, name) < 1:
            raise ConfigError(f"`{name}` must be >= 1, got {getattr(c, name)}")
    if c.max_steps <= 0 and c.num_train_epochs <= 0:
        raise ConfigError("set `max_steps` > 0 or `num_train_epochs` > 0")
    if c.judge and c.loss_type == "reward":
        raise ConfigError("`judge`: a win rate needs a policy that generates, and loss_type `reward` trains a reward "
                          "model; set judge: null (the loss-based eval on dataset_test_split still runs)")


# --------------------------------------------------------------------------------------------------
# the reward model's forward (DDP-safe)
# --------------------------------------------------------------------------------------------------
class RewardScorer(torch.nn.Module):
    """Wraps a sequence classifier so that the training forward (and DDP's gradient hooks) goes through
    `generation.reward_model_scores_with_grad`: the score at the last real token, not HF's pooling by
    pad id (wrong when pad == EOS, as for Pythia). `save_pretrained` saves the inner HF model as is."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return generation.reward_model_scores_with_grad(self.model, input_ids, attention_mask)

    def save_pretrained(self, path, state_dict=None, **kwargs):
        if state_dict is not None:
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        self.model.save_pretrained(path, state_dict=state_dict, **kwargs)


# --------------------------------------------------------------------------------------------------
# forward + loss of one micro-batch
# --------------------------------------------------------------------------------------------------
def response_logps(model, batch: data.ResponseBatch, shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs S and lengths |y|, both [B, K] (column 0 = chosen / best).
    `shared_prefix`: one prompt pass for the K responses (rows k * B + b share example b's prompt) where
    `generation.shared_prefix_usable` says it is valid (not under FSDP / ZeRO-3 / gradient checkpointing)."""
    share = shared_prefix and generation.shared_prefix_supported(model)
    logits = generation.response_logits(model, batch.input_ids, batch.attention_mask, batch.context_length,
                                        shared_prefix_k=batch.num_responses if share else 1, layout="tiled")
    seq = objectives.sequence_logprobs(logits, batch.labels, batch.response_mask)
    lengths = batch.response_mask.sum(-1).to(seq.dtype)
    k = batch.num_responses
    return seq.view(k, -1).T, lengths.view(k, -1).T


def batch_loss(c: OfflineConfig, model, batch: data.ResponseBatch, ref_logps: Optional[torch.Tensor], ref_model=None):
    """Per-example losses [B] and per-example metric values {name: [B]} for one micro-batch."""
    stats: dict[str, torch.Tensor] = {}
    if c.loss_type == "reward":
        scores = model(batch.input_ids, batch.attention_mask).float().view(batch.num_responses, -1).T
        out = objectives.bradley_terry_loss(scores[:, 0], scores[:, 1])
        losses = out.losses
    else:
        logps, lengths = response_logps(model, batch, c.shared_prefix)
        if c.loss_type in REFERENCE_LOSSES and ref_logps is None:
            with torch.no_grad():
                ref_logps, _ = response_logps(ref_model, batch, c.shared_prefix)
        if ref_logps is not None:
            ref_logps = ref_logps.to(logps.dtype)
            stats["ref/logratio"] = (ref_logps[:, 0] - ref_logps[:, 1]).detach()
        if c.loss_type == "sft":
            losses = objectives.sft_loss(logps[:, 0], lengths[:, 0])
            stats["logps/chosen"] = logps[:, 0].detach()
            stats["logps/chosen_per_token"] = (logps[:, 0] / lengths[:, 0]).detach()
            return losses, stats
        s_w, s_l, n_w, n_l = logps[:, 0], logps[:, -1], lengths[:, 0], lengths[:, -1]
        if c.loss_type == "dpo":
            out = objectives.dpo_loss(s_w, s_l, ref_logps[:, 0], ref_logps[:, 1], c.beta)
        elif c.loss_type == "ipo":
            out = objectives.ipo_loss(s_w, s_l, ref_logps[:, 0], ref_logps[:, 1], n_w, n_l, c.beta)
        elif c.loss_type == "chipo":
            out = objectives.chipo_loss(s_w, s_l, ref_logps[:, 0], ref_logps[:, 1], c.beta, c.chipo_reward_clip)
        elif c.loss_type == "simpo":
            out = objectives.simpo_loss(s_w, s_l, n_w, n_l, c.beta, c.simpo_gamma, c.length_normalize)
        elif c.loss_type == "cpo":
            out = objectives.cpo_loss(s_w, s_l, n_w, c.beta, c.cpo_alpha)
        elif c.loss_type == "orpo":
            out = objectives.orpo_loss(s_w, s_l, n_w, n_l, c.orpo_lambda)
        elif c.loss_type == "slic":
            out = objectives.slic_loss(s_w, s_l, n_w, c.slic_delta, c.slic_nll_coef)
        elif c.loss_type == "simpo_pl":
            losses = objectives.simpo_plackett_luce_loss(logps, lengths, c.beta, c.simpo_gamma, c.length_normalize)
            rewards = objectives.simpo_rewards(logps, lengths, c.beta, c.length_normalize).detach()
            out = objectives.PairwiseLossOutput(losses, rewards[:, 0], rewards[:, -1])  # best vs worst
        else:  # validate() makes this unreachable
            raise ConfigError(f"unknown loss_type {c.loss_type!r}; valid losses: {', '.join(LOSSES)}")
        losses = out.losses
        stats["logps/chosen"] = s_w.detach()
        stats["logps/rejected"] = s_l.detach()
        stats["logps/chosen_per_token"] = (s_w / n_w).detach()
        stats["logps/rejected_per_token"] = (s_l / n_l).detach()
    stats["rewards/chosen"] = out.chosen_rewards
    stats["rewards/rejected"] = out.rejected_rewards
    stats["rewards/margins"] = out.margins
    stats["rewards/accuracies"] = out.accuracies
    return losses, stats


# --------------------------------------------------------------------------------------------------
# passes over a whole dataset, sharded over processes (evaluation, reference log-probs, normalisation)
# --------------------------------------------------------------------------------------------------
def sharded_batches(num_examples: int, batch_size: int, accelerator):
    """Yield (indices, valid) batches of this process's share. Every process runs the same number of
    batches (padding repeats index 0 with valid False) so that collectives inside forwards line up."""
    p, rank = accelerator.num_processes, accelerator.process_index
    per_round = p * batch_size
    padded = math.ceil(num_examples / per_round) * per_round
    for start in range(0, padded, per_round):
        idx = [start + rank * batch_size + j for j in range(batch_size)]
        yield [i if i < num_examples else 0 for i in idx], torch.tensor([i < num_examples for i in idx])


@torch.no_grad()
def precompute_ref_logprobs(c: OfflineConfig, ref_model, examples: list, pad_id: int, accelerator) -> torch.Tensor:
    """Summed reference log-probs [N, K] of every example, computed once (each process a share, then
    summed across processes: every entry is written by exactly one process)."""
    k = len(examples[0]["responses"])
    table = torch.zeros(len(examples), k, device=accelerator.device, dtype=torch.float32)
    for idx, valid in tqdm(list(sharded_batches(len(examples), c.per_device_eval_batch_size, accelerator)),
                           desc="reference log-probs", disable=not accelerator.is_main_process):
        batch = data.collate_responses([examples[i] for i in idx], pad_id).to(accelerator.device)
        logps, _ = response_logps(ref_model, batch, c.shared_prefix)
        rows = torch.tensor(idx, device=accelerator.device)[valid.to(accelerator.device)]
        table[rows] = logps[valid.to(accelerator.device)].float()
    return accelerator.reduce(table, reduction="sum").cpu()


@torch.no_grad()
def evaluate(c: OfflineConfig, model, examples: list, ref_table, ref_model, pad_id: int, accelerator) -> dict:
    """eval/loss and eval/accuracy (pairwise accuracy of the reward model, or implicit-reward accuracy)."""
    model.eval()
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for idx, valid in sharded_batches(len(examples), c.per_device_eval_batch_size, accelerator):
        batch = data.collate_responses([examples[i] for i in idx], pad_id).to(accelerator.device)
        ref = ref_table[idx].to(accelerator.device) if ref_table is not None else None
        losses, stats = batch_loss(c, model, batch, ref, ref_model)
        v = valid.to(accelerator.device, torch.float64)
        totals[0] += (losses.double() * v).sum()
        if "rewards/accuracies" in stats:
            totals[1] += (stats["rewards/accuracies"].double() * v).sum()
        totals[2] += v.sum()
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    out = {"eval/loss": float(totals[0] / totals[2])}
    if c.loss_type != "sft":
        out["eval/accuracy"] = float(totals[1] / totals[2])
    return out


@torch.no_grad()
def reference_reward_mean(c: OfflineConfig, reward_model, examples: list, pad_id: int, accelerator) -> float:
    """Mean reward of the reference completions (prompt/completion examples)."""
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for idx, valid in sharded_batches(len(examples), c.per_device_eval_batch_size, accelerator):
        batch = data.collate_responses([examples[i] for i in idx], pad_id).to(accelerator.device)
        scores = generation.reward_model_scores(reward_model, batch.input_ids, batch.attention_mask).double()
        v = valid.to(accelerator.device, torch.float64)
        totals += torch.stack([(scores * v).sum(), v.sum()])
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1])


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def load_examples(c: OfflineConfig, dataset: str, split: str, limit: int, kind: str, tokenizer, accelerator,
                  prompt_column: str = "prompt"):
    ds = data.load_any_dataset(dataset, split)
    source = f"{dataset} [{split}]"
    if prompt_column != "prompt":  # the tokeniser reads `prompt`: the configured column takes that name
        data.require_columns(ds, [prompt_column], source)
        ds = ds.remove_columns([n for n in ("prompt",) if n in ds.column_names]).rename_column(prompt_column, "prompt")
    data.require_columns(ds, data.OFFLINE_KINDS[kind], source)
    if limit and limit < len(ds):
        ds = ds.select(range(limit))
    examples, report = data.tokenize_offline_dataset(
        ds, tokenizer, kind, c.max_prompt_length, c.max_completion_length, c.prompt_overflow, source
    )
    if accelerator.is_main_process:
        print(f"[train_offline] {report.summary()}")
    return examples, ds.column_names


def main(c: OfflineConfig) -> str:
    validate(c)
    num_processes = distributed.process_state().num_processes
    per_process, grad_accum = derive_batch_sizes(c.global_batch_size, num_processes, c.per_device_train_batch_size)
    trackers = distributed.resolve_trackers(c.report_to)
    accelerator = Accelerator(mixed_precision=distributed.resolve_mixed_precision(c.mixed_precision), log_with=trackers or None, project_dir=c.output_dir)
    distributed.configure_deepspeed(accelerator, c.per_device_train_batch_size, c.max_grad_norm)  # no-op without DeepSpeed
    if c.loss_type == "reward" and c.normalize_reward and (distributed.zero_stage(accelerator) == 3 or distributed.fsdp_version(accelerator)):
        # the reward shift edits one bias of the HF model in place: under ZeRO-3 / FSDP that is a shard
        raise ConfigError("`normalize_reward` is not supported under ZeRO-3 or FSDP (the shift would edit one "
                          "shard); train reward models with DDP or deepspeed_zero2.yaml, or set normalize_reward: false")
    # refuses an output_dir holding another run unless --resume / --overwrite_output_dir (runs.open_run_dir)
    run_dir, resume_from = runs.open_run_dir(c.output_dir, c.resume, c.overwrite_output_dir, accelerator)
    run_dir.save_config(c)
    distributed.seed_everything(c.seed)
    device = accelerator.device

    # ---- tokenizer and data ----
    tokenizer = models.load_tokenizer(
        c.tokenizer_name_or_path or c.model_name_or_path, padding_side="left", trust_remote_code=c.trust_remote_code
    )
    pad_id = tokenizer.pad_token_id
    kind = DATA_KIND.get(c.loss_type, "pairwise")
    train_examples, train_columns = load_examples(
        c, c.dataset_name, c.dataset_train_split, c.max_train_samples, kind, tokenizer, accelerator, c.prompt_column
    )
    eval_examples = None
    if c.dataset_test_split:
        eval_examples, _ = load_examples(
            c, c.eval_dataset_name or c.dataset_name, c.dataset_test_split, c.max_eval_samples, kind, tokenizer,
            accelerator, c.prompt_column,
        )
    num_examples = len(train_examples)
    if num_examples < c.global_batch_size:
        raise ConfigError(
            f"the training data has {num_examples} usable examples, fewer than global_batch_size = {c.global_batch_size}"
        )
    steps_per_epoch = num_examples // c.global_batch_size  # the last incomplete global batch is dropped
    total_steps = c.max_steps if c.max_steps > 0 else max(1, int(c.num_train_epochs * steps_per_epoch))

    # ---- models ----
    # prompt + response must fit the model's positions: checked from its config.json, before any weights load
    models.check_context_length(
        models.load_model_config(c.model_name_or_path, "model", c.trust_remote_code, c.model_revision),
        c.max_prompt_length, c.max_completion_length, "max_prompt_length", "max_completion_length")
    if c.loss_type == "reward":
        model = models.load_reward_model_for_training(
            c.model_name_or_path, torch.float32, c.trust_remote_code, c.model_revision
        )
    else:
        model = models.load_policy(c.model_name_or_path, torch.float32, c.trust_remote_code, revision=c.model_revision)
    model.config.pad_token_id = pad_id
    if c.gradient_checkpointing:
        models.enable_activation_checkpointing(model)
    ref_model, ref_train, ref_eval = None, None, None
    if c.loss_type in REFERENCE_LOSSES:
        with distributed.frozen_model_loading(accelerator):
            ref_model = models.load_policy(
                c.ref_model_name_or_path or c.model_name_or_path,
                models.resolve_dtype(c.mixed_precision, device),
                c.trust_remote_code,
                revision=None if c.ref_model_name_or_path else c.model_revision,
            )
        ref_model = distributed.prepare_frozen_model(ref_model, accelerator)  # a replica, or ZeRO-3 engine
        if c.precompute_ref_logprobs:
            ref_train = precompute_ref_logprobs(c, ref_model, train_examples, pad_id, accelerator)
            if eval_examples is not None:
                ref_eval = precompute_ref_logprobs(c, ref_model, eval_examples, pad_id, accelerator)
            del ref_model
            ref_model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=c.learning_rate,
        betas=(c.adam_beta1, c.adam_beta2),
        eps=c.adam_epsilon,
        weight_decay=c.weight_decay,
    )
    # not passed to accelerator.prepare: the schedule counts optimizer steps of the GLOBAL batch
    scheduler = build_lr_scheduler(optimizer, c.lr_scheduler_type, total_steps, c.warmup_ratio)
    hf_model = model
    if c.loss_type == "reward":
        model = RewardScorer(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    start_step = 0
    if resume_from is not None:
        state = checkpoints.load_checkpoint(resume_from, model=hf_model, optimizer=optimizer, scheduler=scheduler,
                                     accelerator=accelerator)
        if state.get("num_examples") != num_examples or state.get("global_batch_size") != c.global_batch_size:
            raise ConfigError(
                f"resume: {resume_from} was trained on {state.get('num_examples')} examples with global batch "
                f"{state.get('global_batch_size')}; this run has {num_examples} and {c.global_batch_size}: the data "
                "position would not match"
            )
        start_step = state["step"]  # open_run_dir dropped the log lines past it
        if accelerator.is_main_process:
            print(f"[train_offline] resumed from {resume_from} at step {start_step} (epoch {state['epoch']})")
    # the win rate (when `judge` is set): one evaluator for the run; it prints the judge's cost once, here
    evaluator = TrainingEvaluator(c, accelerator, run_dir, total_steps, start_step, log_prefix="[train_offline]")
    if trackers:
        accelerator.init_trackers(
            c.tracker_project_name,
            config={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(c).items()},
        )

    def save(step: int) -> None:
        checkpoints.save_checkpoint(
            run_dir, step, model, tokenizer, optimizer, scheduler,
            state={"epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                   "num_examples": num_examples, "global_batch_size": c.global_batch_size, "loss_type": c.loss_type},
            keep_last=c.save_total_limit,
        )

    def epoch_order(epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(distributed.mix_seed(c.seed, epoch, multiplier=100_003))
        return torch.randperm(num_examples, generator=g)

    if accelerator.is_main_process:
        print(f"[train_offline] loss {c.loss_type}: {num_examples} examples, {total_steps} steps of {c.global_batch_size} "
              f"= {num_processes} processes x {c.per_device_train_batch_size} micro-batch x {grad_accum} accumulation")
    if start_step == 0 and evaluator.due(0):  # the initial policy: the "SFT" point of the closing summary
        run_dir.log_metrics(evaluator.evaluate(model, tokenizer, 0), 0)
    progress = tqdm(total=total_steps, initial=start_step, desc=f"train_offline[{c.loss_type}]",
                    disable=not accelerator.is_main_process)
    order, order_epoch = None, -1
    last_saved = start_step if resume_from is not None else -1
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        epoch, position = divmod(step - 1, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(epoch), epoch
        global_idx = order[position * c.global_batch_size : (position + 1) * c.global_batch_size]
        local_idx = global_idx[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]

        sums: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), device=device)
        for m in range(grad_accum):
            idx = local_idx[m * c.per_device_train_batch_size : (m + 1) * c.per_device_train_batch_size].tolist()
            batch = data.collate_responses([train_examples[i] for i in idx], pad_id).to(device)
            ref = ref_train[idx].to(device) if ref_train is not None else None
            # DDP/FSDP: all-reduce gradients on the last micro-batch only; DeepSpeed: the engine steps there
            with distributed.micro_step(accelerator, model, is_last=m == grad_accum - 1):
                losses, stats = batch_loss(c, model, batch, ref, ref_model)
                accelerator.backward(losses.mean() / grad_accum)
            for name, v in [("train/loss", losses.detach())] + list(stats.items()):
                sums[name] = sums.get(name, 0.0) + v.float().sum()
            tokens += batch.attention_mask.sum()
        grad_norm = accelerator.clip_grad_norm_(  # DeepSpeed clips inside its step and returns the norm
            model.parameters(), c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        )
        optimizer.step()  # a no-op under DeepSpeed (the engine stepped in the last backward)
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        # global-batch means: sum over micro-batches and processes, divide by the global batch size
        names = sorted(sums)
        reduced = accelerator.reduce(torch.stack([sums[n] for n in names] + [tokens.float()]), reduction="sum")
        elapsed = time.perf_counter() - t0
        metrics = {n: float(reduced[i]) / c.global_batch_size for i, n in enumerate(names)}
        runs.check_finite("train/loss", metrics["train/loss"], step, run_dir)
        metrics.update({
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "train/lr": lr, "train/epoch": step / steps_per_epoch,
            "perf/tokens_per_s": float(reduced[-1]) / elapsed, "perf/samples_per_s": c.global_batch_size / elapsed,
        })
        if eval_examples is not None and c.eval_steps > 0 and step % c.eval_steps == 0 and step != total_steps:
            metrics.update(evaluate(c, model, eval_examples, ref_eval, ref_model, pad_id, accelerator))
        if step % c.logging_steps == 0 or step == total_steps or "eval/loss" in metrics:
            run_dir.log_metrics(metrics, step)
        if evaluator.due(step):  # win rate of the current weights (its own record; {"eval/missing": 1} on an outage)
            run_dir.log_metrics(evaluator.evaluate(model, tokenizer, step), step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", samples_s=f"{metrics['perf/samples_per_s']:.1f}")
        if c.save_steps > 0 and step % c.save_steps == 0 and step != total_steps:
            save(step)
            last_saved = step
    progress.close()

    final = {}
    if eval_examples is not None:
        final.update(evaluate(c, model, eval_examples, ref_eval, ref_model, pad_id, accelerator))
    if c.loss_type == "reward" and c.normalize_reward:
        final.update(normalize_reward_model(c, hf_model, tokenizer, train_columns, accelerator, run_dir))
    if final:
        run_dir.log_metrics(final, total_steps)
        if accelerator.is_main_process:
            print(f"[train_offline] final: {json.dumps(final)}")
    if last_saved != total_steps or final:
        save(total_steps)
    accelerator.end_training()
    if accelerator.is_main_process:
        closing_summary(c, run_dir.path)
    return str(run_dir.path)


def closing_summary(c: OfflineConfig, run_path) -> None:
    """The run's story (maxent_rlhf.story; the proxy of an offline run is its implicit reward margin) and
    its figure (Fig. 7 layout, <run>/curves.png)."""
    records = runs.read_metrics(run_path)
    proxy = "rewards/margins" if c.loss_type != "sft" else "logps/chosen_per_token"
    print("[train_offline] summary\n" + run_story(records, run_path, proxy_key=proxy).text())
    figure = plotting.plot_offline_run(run_path)
    if figure is not None:
        print(f"[train_offline] figure: {figure}")


def normalize_reward_model(c: OfflineConfig, reward_model, tokenizer, train_columns, accelerator, run_dir) -> dict:
    """Shift the reward so that reference completions average 0 (the TL;DR recipe), in HF format.

    GPT-NeoX's score head has no bias: `models.shift_reward_output` moves the final layer norm's bias
    along w / ||w||^2, which adds exactly `delta` to every score (see its docstring).
    """
    source = c.reward_norm_dataset or (c.dataset_name if "completion" in train_columns else None)
    if source is None:
        if accelerator.is_main_process:
            print("[train_offline] no reference completions (set reward_norm_dataset): reward not normalised")
        return {}
    examples, _ = load_examples(c, source, c.reward_norm_split, c.reward_norm_samples, "sft", tokenizer, accelerator)
    reward_model.eval()
    mean_before = reference_reward_mean(c, reward_model, examples, tokenizer.pad_token_id, accelerator)
    changed = models.shift_reward_output(reward_model, -mean_before)
    reward_model.config.reward_normalization = {
        "dataset": source, "split": c.reward_norm_split, "num_examples": len(examples),
        "mean_before": mean_before, "shift": -mean_before, "parameter": changed,
    }
    reward_model.train()
    if accelerator.is_main_process:
        print(f"[train_offline] reward normalised: reference mean {mean_before:.4f} -> 0 (shift in {changed})")
    return {"reward/reference_mean_before_norm": mean_before, "reward/shift": -mean_before}


if __name__ == "__main__":
    from maxent_rlhf.cli import run_script

    run_script(main, OfflineConfig)
