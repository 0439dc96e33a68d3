"""Offline training from a fixed dataset: SFT, Bradley-Terry reward models and preference losses.

    accelerate launch train_offline.py --config configs/simpo_1b.yaml [--key value ...]
    python train_offline.py --config configs/dpo_1b.yaml --learning_rate 1e-6

Losses (`--loss_type`), every formula from `maxent_rlhf.objectives`:
    sft       NLL of the completion (per token, mean over examples)           data: prompt, completion
    reward    Bradley-Terry reward model, read at the last real token (EOS)    data: prompt, chosen, rejected
    dpo ipo chipo                    (need a reference model)                  data: prompt, chosen, rejected
    simpo cpo orpo slic              (reference-free)                          data: prompt, chosen, rejected
    simpo_pl  SimPO over K ranked responses (Plackett-Luce)                    data: prompt, responses, ranking

One run, numbered below exactly like this; each step is a function, so `main` reads as the list:
  1. `launch`: the accelerator, the run directory (another run's output_dir is refused unless --resume or
     --overwrite_output_dir), config.yaml, the seed
  2. `load_data`: the tokenizer, the tokenised training examples (and the loss-based eval's), the step count
  3. `load_models`: the policy (loss `reward`: the reward model), with a LoRA adapter when use_peft; for
     dpo/ipo/chipo the frozen reference (use_peft: none is loaded, the reference is the adapter switched off)
  4. `precompute_references` (precompute_ref_logprobs): the reference log-probs of every example, once;
     the reference is freed
  5. `prepare_training`, `resume`: optimizer, schedule, accelerator.prepare; with --resume the checkpoint
  6. `train`, `train_step`: each step one global batch in micro-batches (forward, loss, backward), one optimizer
     step, the global-batch means logged; the loss-based eval, the win rate and checkpoints when due
  7. `finish`: the final loss-based eval, the reward normalisation (loss `reward`), the last checkpoint
  8. `closing_summary`: the run's story and its figure

Data flow of one optimizer step (6): the global batch (a slice of a seeded per-epoch permutation of the
dataset) is split over processes, then into micro-batches. A micro-batch holds K responses per prompt
(K = 2: chosen and rejected) concatenated along the batch axis, so all of them go through the model in
ONE forward: prompts left-padded, responses right-padded, only response positions' logits computed.
Per-example losses are averaged over the micro-batch and divided by the number of accumulation steps,
and DDP averages over processes, so the gradient is the global-batch mean (`distributed.micro_step` syncs
gradients on the last micro-batch only, and drives DeepSpeed's engine the same way). Metrics are summed over
micro-batches and processes and divided by the global batch size.

Shared prompt pass (`shared_prefix`): the K responses of a prompt run the prompt once and repeat its KV
cache (same values, fewer prompt FLOPs). Whether a model does is decided once per run, for the reference
in step 3 and for the policy in step 5 once it is prepared (`shares_prompt_pass`: not under FSDP / ZeRO-3 /
gradient checkpointing); every forward of that model then takes the decided path.

Evaluation: the loss-based one on `dataset_test_split` (eval/loss, eval/accuracy) and, when `judge` is
set, the win rate of greedy generations against references (`maxent_rlhf.evaluation`, the machinery of
evaluate_judge.py: eval/win_rate with its Wilson interval, n, invalid, lengths; at step 0, every
`eval_steps` and at the end; a judge outage is logged as eval/missing and training goes on).

Outputs (run directory = output_dir): config.yaml, metrics.jsonl, checkpoints/step_XXXXXXXX (HF
safetensors weights + tokenizer + trainer state), eval/ (judged generations per step, judgment cache),
curves.png (the paper's Fig. 7 layout); at the end the run's story (maxent_rlhf.story) is printed.
LoRA (`use_peft`): the model trains a LoRA adapter (the reward model: lora_task_type SEQ_CLS, its new score
head in full); the reference is the policy with its adapter switched off (`Models.reference`, no second copy);
checkpoints hold the adapter (adapter_model.safetensors + adapter_config.json) next to the trainer state;
full merged weights: `python -m maxent_rlhf.lora merge CKPT OUT_DIR`; evaluate_judge.py takes the adapter.
`main(cfg)` returns the run directory; the final model is `checkpoints.latest_checkpoint(run_dir)`.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from maxent_rlhf import checkpoints, data, distributed, generation, lora, models, objectives, plotting, runs
from maxent_rlhf.config import ConfigError, PreferenceLossArgs, TrainConfig, cfg, config_to_dict, derive_batch_sizes
from maxent_rlhf.evaluation import EvalArgs, TrainingEvaluator
from maxent_rlhf.lora import PeftArgs
from maxent_rlhf.story import run_story
from maxent_rlhf.schedules import build_lr_scheduler

LOSSES = ("sft", "reward", "dpo", "simpo", "ipo", "cpo", "orpo", "slic", "chipo", "simpo_pl")
REFERENCE_LOSSES = objectives.REFERENCE_LOSSES  # need log pi_ref
DATA_KIND = {"sft": "sft", "simpo_pl": "listwise"}  # every other loss reads pairwise data


@dataclass
class OfflineConfig(PeftArgs, EvalArgs, PreferenceLossArgs, TrainConfig):
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
        None, "frozen reference policy for dpo/ipo/chipo (default: model_name_or_path, i.e. the initial policy; "
        "with use_peft the reference is always the policy with its adapter disabled)"
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
    # reward model normalisation
    normalize_reward: bool = cfg(True, "loss_type `reward`: after training, shift the output so reference completions average 0")
    reward_norm_dataset: Optional[str] = cfg(
        None, "prompt/completion data whose completions are the references (e.g. trl-lib/tldr); "
        "null: the training data's `completion` column if it has one, else no normalisation",
    )
    reward_norm_split: str = cfg("train", "split of reward_norm_dataset")
    reward_norm_samples: int = cfg(0, "use the first N reference rows (0: all)")

    def range_checks(self) -> list:
        """Value ranges (config.check_ranges, when the config is built); the batch arithmetic is
        `derive_batch_sizes`'. `choices` is checked where a config is parsed: the first two lines also stop a
        config built in Python."""
        return super().range_checks() + [
            (self.loss_type in LOSSES, f"unknown loss_type {self.loss_type!r}; valid losses: {', '.join(LOSSES)}"),
            (self.prompt_overflow in data.PROMPT_OVERFLOW,
             f"`prompt_overflow` must be one of {list(data.PROMPT_OVERFLOW)}, got {self.prompt_overflow!r}"),
            (self.max_completion_length >= 1, f"`max_completion_length` = {self.max_completion_length} must be >= 1"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "set `max_steps` > 0 or `num_train_epochs` > 0"),
            (not (self.judge and self.loss_type == "reward"),
             "`judge`: a win rate needs a policy that generates, and loss_type `reward` trains a reward model; set "
             "judge: null (the loss-based eval on dataset_test_split still runs)"),
        ] + ([] if not self.use_peft else [
            (self.lora_task_type == ("SEQ_CLS" if self.loss_type == "reward" else "CAUSAL_LM"),
             f"`lora_task_type` = {self.lora_task_type!r} does not fit loss_type {self.loss_type!r}: set "
             f"lora_task_type: {'SEQ_CLS' if self.loss_type == 'reward' else 'CAUSAL_LM'}"),
            (not (self.loss_type == "reward" and self.normalize_reward),
             "`normalize_reward` with use_peft: the shift edits a base weight, which an adapter checkpoint does not "
             "hold; set normalize_reward: false (or train the reward model without use_peft)"),
        ])


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
# what the steps hand each other
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Step 1: the accelerator, the run directory and the split of the global batch on this process."""

    accelerator: Accelerator
    run_dir: runs.RunDir
    resume_from: Optional[Path]  # the checkpoint to resume from (None: a fresh run)
    trackers: list  # accelerate `log_with` names (empty: metrics.jsonl only)
    per_process: int  # examples of one global batch on this process
    grad_accum: int  # micro-batches per optimizer step


@dataclass
class Data:
    """Step 2: tokenised examples (`data.tokenize_offline_dataset`) and the step count they give."""

    tokenizer: object
    train: list
    eval: Optional[list]  # the loss-based eval's (None: no dataset_test_split)
    train_columns: list  # the training data's columns (the reward normalisation looks for `completion`)
    steps_per_epoch: int  # the last incomplete global batch of an epoch is dropped
    total_steps: int

    @property
    def num_examples(self) -> int:
        return len(self.train)


@dataclass
class Models:
    """Steps 3-5: what trains and what stays frozen. `shared` / `ref_shared`: whether the model runs each
    prompt once for its K responses, decided once (`shares_prompt_pass`)."""

    model: torch.nn.Module  # what trains: the policy, or RewardScorer around the reward model; prepared in step 5
    hf_model: torch.nn.Module  # the HF model inside `model` (resume, the reward shift)
    ref_model: Optional[torch.nn.Module] = None  # dpo/ipo/chipo, until precomputed (step 4)
    ref_adapter_off: bool = False  # use_peft: the reference is `model` with its adapter disabled (no copy)
    ref_train: Optional[torch.Tensor] = None  # precomputed reference log-probs [N, K] of the training examples
    ref_eval: Optional[torch.Tensor] = None  # ... and of the eval examples
    shared: bool = False
    ref_shared: bool = False

    @property
    def has_reference(self) -> bool:
        """Is a live reference model there to run (not precomputed, not freed)?"""
        return self.ref_model is not None or self.ref_adapter_off

    @contextlib.contextmanager
    def reference(self):
        """(model, shares the prompt pass) for a no-grad reference forward: the frozen copy, or with use_peft
        the policy with its adapter switched off (decided once, in step 3)."""
        if not self.ref_adapter_off:
            with torch.no_grad():
                yield self.ref_model, self.ref_shared
            return
        was_training = self.model.training  # the frozen copy runs in eval mode: so does the adapter-off policy
        self.model.eval()
        try:
            with torch.no_grad(), lora.adapter_disabled(self.model):
                yield self.model, self.ref_shared
        finally:
            self.model.train(was_training)


def shares_prompt_pass(c: OfflineConfig, model, d: Data) -> bool:
    """Does `model` run each prompt once for its K responses in every forward of this run? Every batch
    comes from `data.collate_responses` (each prompt repeated K times, "tiled"), so only the model can
    change the answer (sharded parameters, gradient checkpointing, an encoder-decoder): asked once, of a
    batch of the first training example. False for SFT (K = 1) and with shared_prefix off."""
    probe = data.collate_responses(d.train[:1], d.tokenizer.pad_token_id)
    return c.shared_prefix and generation.shared_prefix_usable(
        model, probe.input_ids, probe.attention_mask, probe.context_length, probe.num_responses, "tiled")


# --------------------------------------------------------------------------------------------------
# forward + loss of one micro-batch
# --------------------------------------------------------------------------------------------------
def response_logps(model, batch: data.ResponseBatch, prefix_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs S and lengths |y|, both [B, K] (column 0 = chosen / best).
    `prefix_k`: K when the model shares the prompt pass (rows k * B + b share example b's prompt), 1 for
    the plain forward."""
    logits = generation.response_logits(model, batch.input_ids, batch.attention_mask, batch.context_length,
                                        shared_prefix_k=prefix_k, layout="tiled")
    seq = objectives.sequence_logprobs(logits, batch.labels, batch.response_mask)
    lengths = batch.response_mask.sum(-1).to(seq.dtype)
    k = batch.num_responses
    return seq.view(k, -1).T, lengths.view(k, -1).T


def preference_loss(c: OfflineConfig, logps: torch.Tensor, lengths: torch.Tensor,
                    ref_logps: Optional[torch.Tensor]) -> objectives.PairwiseLossOutput:
    """The preference loss of `c.loss_type` from S and |y| [B, K] (`objectives.preference_loss`, the one
    dispatch train_online.py uses too): chosen / best is column 0, rejected / worst column -1."""
    return objectives.preference_loss(c.loss_type, logps, lengths, ref_logps, objectives.PreferenceLossParams.of(c))


def reward_stats(out: objectives.PairwiseLossOutput) -> dict:
    return {"rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.margins, "rewards/accuracies": out.accuracies}


def batch_loss(c: OfflineConfig, m: Models, batch: data.ResponseBatch, ref_logps: Optional[torch.Tensor]):
    """Per-example losses [B] and per-example metric values {name: [B]} for one micro-batch.
    `ref_logps`: the precomputed reference log-probs of its examples, or None (the live reference runs)."""
    k = batch.num_responses
    if c.loss_type == "reward":
        scores = m.model(batch.input_ids, batch.attention_mask).float().view(k, -1).T
        out = objectives.bradley_terry_loss(scores[:, 0], scores[:, 1])
        return out.losses, reward_stats(out)
    stats: dict[str, torch.Tensor] = {}
    logps, lengths = response_logps(m.model, batch, k if m.shared else 1)
    if c.loss_type in REFERENCE_LOSSES and ref_logps is None:
        with m.reference() as (ref_model, ref_shared):
            ref_logps, _ = response_logps(ref_model, batch, k if ref_shared else 1)
    if ref_logps is not None:
        ref_logps = ref_logps.to(logps.dtype)
        stats["ref/logratio"] = (ref_logps[:, 0] - ref_logps[:, 1]).detach()
    stats["logps/chosen"] = logps[:, 0].detach()
    stats["logps/chosen_per_token"] = (logps[:, 0] / lengths[:, 0]).detach()
    if c.loss_type == "sft":
        return objectives.sft_loss(logps[:, 0], lengths[:, 0]), stats
    stats["logps/rejected"] = logps[:, -1].detach()
    stats["logps/rejected_per_token"] = (logps[:, -1] / lengths[:, -1]).detach()
    out = preference_loss(c, logps, lengths, ref_logps)
    return out.losses, {**stats, **reward_stats(out)}


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
def reference_logprobs_table(c: OfflineConfig, ref_model, shared: bool, examples: list, pad_id: int,
                             accelerator) -> torch.Tensor:
    """Summed reference log-probs [N, K] of every example, computed once (each process a share, then
    summed across processes: every entry is written by exactly one process)."""
    k = len(examples[0]["responses"])
    table = torch.zeros(len(examples), k, device=accelerator.device, dtype=torch.float32)
    for idx, valid in tqdm(list(sharded_batches(len(examples), c.per_device_eval_batch_size, accelerator)),
                           desc="reference log-probs", disable=not accelerator.is_main_process):
        batch = data.collate_responses([examples[i] for i in idx], pad_id).to(accelerator.device)
        logps, _ = response_logps(ref_model, batch, k if shared else 1)
        rows = torch.tensor(idx, device=accelerator.device)[valid.to(accelerator.device)]
        table[rows] = logps[valid.to(accelerator.device)].float()
    return accelerator.reduce(table, reduction="sum").cpu()


@torch.no_grad()
def evaluate(c: OfflineConfig, m: Models, examples: list, ref_table, pad_id: int, accelerator) -> dict:
    """eval/loss and eval/accuracy (pairwise accuracy of the reward model, or implicit-reward accuracy)."""
    m.model.eval()
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for idx, valid in sharded_batches(len(examples), c.per_device_eval_batch_size, accelerator):
        batch = data.collate_responses([examples[i] for i in idx], pad_id).to(accelerator.device)
        ref = ref_table[idx].to(accelerator.device) if ref_table is not None else None
        losses, stats = batch_loss(c, m, batch, ref)
        v = valid.to(accelerator.device, torch.float64)
        totals[0] += (losses.double() * v).sum()
        if "rewards/accuracies" in stats:
            totals[1] += (stats["rewards/accuracies"].double() * v).sum()
        totals[2] += v.sum()
    m.model.train()
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


def load_split(c: OfflineConfig, dataset: str, split: str, limit: int, kind: str, tokenizer, accelerator,
               prompt_column: str = "prompt") -> tuple[list, list]:
    """The first `limit` rows (0: all) of one split, tokenised as `kind` data (data.OFFLINE_KINDS);
    returns (examples, the split's column names)."""
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


# --------------------------------------------------------------------------------------------------
# the steps of main
# --------------------------------------------------------------------------------------------------
def launch(c: OfflineConfig) -> Run:
    """1. The global batch's split (errors before anything starts), the accelerator, the run directory
    (refuses an output_dir holding another run unless --resume / --overwrite_output_dir), config.yaml, the seed."""
    if c.use_peft:
        lora.require_peft()  # without peft: one line naming the install, before anything is written
    num_processes = distributed.process_state().num_processes
    per_process, grad_accum = derive_batch_sizes(c.global_batch_size, num_processes, c.per_device_train_batch_size)
    trackers = distributed.resolve_trackers(c.report_to)
    accelerator = Accelerator(mixed_precision=distributed.resolve_mixed_precision(c.mixed_precision), log_with=trackers or None,
                              project_dir=c.output_dir)
    distributed.configure_deepspeed(accelerator, c.per_device_train_batch_size, c.max_grad_norm)  # no-op without DeepSpeed
    if c.loss_type == "reward" and c.normalize_reward and (distributed.zero_stage(accelerator) == 3 or distributed.fsdp_version(accelerator)):
        # the reward shift edits one bias of the HF model in place: under ZeRO-3 / FSDP that is a shard
        raise ConfigError("`normalize_reward` is not supported under ZeRO-3 or FSDP (the shift would edit one "
                          "shard); train reward models with DDP or deepspeed_zero2.yaml, or set normalize_reward: false")
    run_dir, resume_from = runs.open_run_dir(c.output_dir, c.resume, c.overwrite_output_dir, accelerator)
    run_dir.save_config(c)
    distributed.seed_everything(c.seed)
    return Run(accelerator, run_dir, resume_from, trackers, per_process, grad_accum)


def load_data(c: OfflineConfig, run: Run) -> Data:
    """2. The tokenizer, the training examples (and the loss-based eval's) tokenised, the number of steps."""
    tokenizer = models.load_tokenizer(
        c.tokenizer_name_or_path or c.model_name_or_path, padding_side="left", trust_remote_code=c.trust_remote_code
    )
    kind = DATA_KIND.get(c.loss_type, "pairwise")
    train_examples, train_columns = load_split(
        c, c.dataset_name, c.dataset_train_split, c.max_train_samples, kind, tokenizer, run.accelerator, c.prompt_column
    )
    eval_examples = None
    if c.dataset_test_split:
        eval_examples, _ = load_split(
            c, c.eval_dataset_name or c.dataset_name, c.dataset_test_split, c.max_eval_samples, kind, tokenizer,
            run.accelerator, c.prompt_column,
        )
    num_examples = len(train_examples)
    if num_examples < c.global_batch_size:
        raise ConfigError(
            f"the training data has {num_examples} usable examples, fewer than global_batch_size = {c.global_batch_size}"
        )
    steps_per_epoch = num_examples // c.global_batch_size
    total_steps = c.max_steps if c.max_steps > 0 else max(1, int(c.num_train_epochs * steps_per_epoch))
    return Data(tokenizer, train_examples, eval_examples, train_columns, steps_per_epoch, total_steps)


def load_models(c: OfflineConfig, run: Run, d: Data) -> Models:
    """3. The model that trains (float32, with use_peft a LoRA adapter in float32 on the frozen base in the
    mixed-precision dtype; the reward model for loss `reward`, else the policy) and, for
    dpo/ipo/chipo, the frozen reference in the mixed-precision dtype, prepared for the engine; whether the
    reference shares the prompt pass is decided here."""
    # prompt + response must fit the model's positions: checked from its config.json, before any weights load
    models.check_context_length(
        models.load_model_config(c.model_name_or_path, "model", c.trust_remote_code, c.model_revision),
        c.max_prompt_length, c.max_completion_length, "max_prompt_length", "max_completion_length")
    # LoRA: the base weights are frozen, so they load in the frozen models' dtype (bf16 on GPU); else float32
    dtype = models.resolve_dtype(c.mixed_precision, run.accelerator.device) if c.use_peft else torch.float32
    if c.loss_type == "reward":
        model = models.load_reward_model_for_training(c.model_name_or_path, dtype, c.trust_remote_code, c.model_revision)
    else:
        model = models.load_policy(c.model_name_or_path, dtype, c.trust_remote_code, revision=c.model_revision)
    model.config.pad_token_id = d.tokenizer.pad_token_id
    if c.gradient_checkpointing:
        models.enable_activation_checkpointing(model)
    if c.use_peft:  # adapter_config.json records the location the user gave (hub id, path, toylab://)
        model = lora.apply_lora(model, c, base_model_name_or_path=c.model_name_or_path)
    m = Models(model=model, hf_model=model)
    if c.loss_type in REFERENCE_LOSSES and c.use_peft:  # the reference is the policy, adapter off: nothing loads
        m.ref_adapter_off = True
        m.ref_shared = shares_prompt_pass(c, model, d)  # until step 5 decides it on the prepared policy
    elif c.loss_type in REFERENCE_LOSSES:
        with distributed.frozen_model_loading(run.accelerator):
            ref_model = models.load_policy(
                c.ref_model_name_or_path or c.model_name_or_path,
                models.resolve_dtype(c.mixed_precision, run.accelerator.device),
                c.trust_remote_code,
                revision=None if c.ref_model_name_or_path else c.model_revision,
            )
        m.ref_model = distributed.prepare_frozen_model(ref_model, run.accelerator)  # a replica, or ZeRO-3 engine
        m.ref_shared = shares_prompt_pass(c, m.ref_model, d)
    return m


def precompute_references(c: OfflineConfig, run: Run, d: Data, m: Models) -> None:
    """4. With precompute_ref_logprobs: the reference log-probs of every training (and eval) example, into
    m.ref_train / m.ref_eval, and the reference freed (a model's memory for one pass over the data)."""
    if not m.has_reference or not c.precompute_ref_logprobs:
        return
    pad_id = d.tokenizer.pad_token_id
    with m.reference() as (ref_model, ref_shared):
        m.ref_train = reference_logprobs_table(c, ref_model, ref_shared, d.train, pad_id, run.accelerator)
        if d.eval is not None:
            m.ref_eval = reference_logprobs_table(c, ref_model, ref_shared, d.eval, pad_id, run.accelerator)
    m.ref_model, m.ref_adapter_off = None, False
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_training(c: OfflineConfig, run: Run, d: Data, m: Models):
    """5. AdamW, the learning-rate schedule and accelerator.prepare (m.model becomes the prepared model);
    whether the policy shares the prompt pass is decided here, on the prepared model. Returns
    (optimizer, scheduler)."""
    optimizer = torch.optim.AdamW(
        [p for p in m.model.parameters() if p.requires_grad],
        lr=c.learning_rate,
        betas=(c.adam_beta1, c.adam_beta2),
        eps=c.adam_epsilon,
        weight_decay=c.weight_decay,
    )
    # not passed to accelerator.prepare: the schedule counts optimizer steps of the GLOBAL batch
    scheduler = build_lr_scheduler(optimizer, c.lr_scheduler_type, d.total_steps, c.warmup_ratio)
    model = RewardScorer(m.model) if c.loss_type == "reward" else m.model
    m.model, optimizer = run.accelerator.prepare(model, optimizer)
    m.model.train()
    if c.loss_type != "reward":  # the reward model's forward is RewardScorer's, one plain pass per row
        m.shared = shares_prompt_pass(c, m.model, d)
    if m.ref_adapter_off:
        m.ref_shared = m.shared  # the reference forward is the prepared policy's
    return optimizer, scheduler


def resume(c: OfflineConfig, run: Run, d: Data, m: Models, optimizer, scheduler) -> int:
    """5. The step the run starts after: 0 for a fresh run, else the checkpoint's, whose weights, optimizer
    and schedule are loaded (open_run_dir dropped the log lines past it)."""
    if run.resume_from is None:
        return 0
    state = checkpoints.load_checkpoint(run.resume_from, model=m.hf_model, optimizer=optimizer, scheduler=scheduler,
                                 accelerator=run.accelerator)
    if state.get("num_examples") != d.num_examples or state.get("global_batch_size") != c.global_batch_size:
        raise ConfigError(
            f"resume: {run.resume_from} was trained on {state.get('num_examples')} examples with global batch "
            f"{state.get('global_batch_size')}; this run has {d.num_examples} and {c.global_batch_size}: the data "
            "position would not match"
        )
    if run.accelerator.is_main_process:
        print(f"[train_offline] resumed from {run.resume_from} at step {state['step']} (epoch {state['epoch']})")
    return state["step"]


@functools.lru_cache(maxsize=1)
def epoch_order(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The seeded permutation of the training examples in `epoch` (the same on every process)."""
    g = torch.Generator().manual_seed(distributed.mix_seed(seed, epoch, multiplier=100_003))
    return torch.randperm(num_examples, generator=g)


def local_batch(c: OfflineConfig, run: Run, d: Data, step: int) -> torch.Tensor:
    """This process's example indices of the global batch of `step` (1-based)."""
    epoch, position = divmod(step - 1, d.steps_per_epoch)
    start = position * c.global_batch_size + run.accelerator.process_index * run.per_process
    return epoch_order(c.seed, epoch, d.num_examples)[start : start + run.per_process]


def train_step(c: OfflineConfig, run: Run, d: Data, m: Models, step: int, optimizer, scheduler) -> dict:
    """6. One optimizer step on the global batch of `step`; returns its metrics (global-batch means)."""
    t0 = time.perf_counter()
    accelerator, pad_id = run.accelerator, d.tokenizer.pad_token_id
    local_idx = local_batch(c, run, d, step)
    sums: dict[str, torch.Tensor] = {}
    tokens = torch.zeros((), device=accelerator.device)
    for i in range(run.grad_accum):
        idx = local_idx[i * c.per_device_train_batch_size : (i + 1) * c.per_device_train_batch_size].tolist()
        batch = data.collate_responses([d.train[j] for j in idx], pad_id).to(accelerator.device)
        ref = m.ref_train[idx].to(accelerator.device) if m.ref_train is not None else None
        # DDP/FSDP: all-reduce gradients on the last micro-batch only; DeepSpeed: the engine steps there
        with distributed.micro_step(accelerator, m.model, is_last=i == run.grad_accum - 1):
            losses, stats = batch_loss(c, m, batch, ref)
            accelerator.backward(losses.mean() / run.grad_accum)
        for name, v in [("train/loss", losses.detach())] + list(stats.items()):
            sums[name] = sums.get(name, 0.0) + v.float().sum()
        tokens += batch.attention_mask.sum()
    grad_norm = accelerator.clip_grad_norm_(  # DeepSpeed clips inside its step and returns the norm
        m.model.parameters(), c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
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
    runs.check_finite("train/loss", metrics["train/loss"], step, run.run_dir)
    metrics.update({
        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "train/lr": lr,
        "train/epoch": step / d.steps_per_epoch,
        "perf/tokens_per_s": float(reduced[-1]) / elapsed, "perf/samples_per_s": c.global_batch_size / elapsed,
    })
    return metrics


def save(c: OfflineConfig, run: Run, d: Data, m: Models, step: int, optimizer, scheduler) -> None:
    checkpoints.save_checkpoint(
        run.run_dir, step, m.model, d.tokenizer, optimizer, scheduler,
        state={"epoch": step // d.steps_per_epoch, "batch_in_epoch": step % d.steps_per_epoch,
               "num_examples": d.num_examples, "global_batch_size": c.global_batch_size, "loss_type": c.loss_type},
        keep_last=c.save_total_limit,
    )


def train(c: OfflineConfig, run: Run, d: Data, m: Models, optimizer, scheduler, evaluator: TrainingEvaluator,
          start_step: int) -> int:
    """6. Steps start_step + 1 .. total_steps, each followed by its log line, the loss-based eval and the win
    rate when due, and a checkpoint every save_steps (the last one is step 7's). Returns the last step
    checkpointed (-1: none)."""
    accelerator, run_dir, total = run.accelerator, run.run_dir, d.total_steps
    if accelerator.is_main_process:
        print(f"[train_offline] loss {c.loss_type}: {d.num_examples} examples, {total} steps of {c.global_batch_size} "
              f"= {accelerator.num_processes} processes x {c.per_device_train_batch_size} micro-batch x "
              f"{run.grad_accum} accumulation")
    if start_step == 0 and evaluator.due(0):  # the initial policy: the "SFT" point of the closing summary
        run_dir.log_metrics(evaluator.evaluate(m.model, d.tokenizer, 0), 0)
    progress = tqdm(total=total, initial=start_step, desc=f"train_offline[{c.loss_type}]",
                    disable=not accelerator.is_main_process)
    last_saved = start_step if run.resume_from is not None else -1
    for step in range(start_step + 1, total + 1):
        metrics = train_step(c, run, d, m, step, optimizer, scheduler)
        if d.eval is not None and c.eval_steps > 0 and step % c.eval_steps == 0 and step != total:
            metrics.update(evaluate(c, m, d.eval, m.ref_eval, d.tokenizer.pad_token_id, accelerator))
        if step % c.logging_steps == 0 or step == total or "eval/loss" in metrics:
            run_dir.log_metrics(metrics, step)
        if evaluator.due(step):  # win rate of the current weights (its own record; {"eval/missing": 1} on an outage)
            run_dir.log_metrics(evaluator.evaluate(m.model, d.tokenizer, step), step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", samples_s=f"{metrics['perf/samples_per_s']:.1f}")
        if c.save_steps > 0 and step % c.save_steps == 0 and step != total:
            save(c, run, d, m, step, optimizer, scheduler)
            last_saved = step
    progress.close()
    return last_saved


def finish(c: OfflineConfig, run: Run, d: Data, m: Models, optimizer, scheduler, last_saved: int) -> None:
    """7. The final loss-based eval and reward normalisation (logged at the last step), then the last
    checkpoint unless the loop wrote it and nothing changed since."""
    final = {}
    if d.eval is not None:
        final.update(evaluate(c, m, d.eval, m.ref_eval, d.tokenizer.pad_token_id, run.accelerator))
    if c.loss_type == "reward" and c.normalize_reward:
        final.update(normalize_reward_model(c, m.hf_model, d.tokenizer, d.train_columns, run.accelerator))
    if final:
        run.run_dir.log_metrics(final, d.total_steps)
        if run.accelerator.is_main_process:
            print(f"[train_offline] final: {json.dumps(final)}")
    if last_saved != d.total_steps or final:
        save(c, run, d, m, d.total_steps, optimizer, scheduler)


def main(c: OfflineConfig) -> str:
    """Train; returns the run directory. The config's ranges were checked when it was built (range_checks)."""
    run = launch(c)  # 1.
    d = load_data(c, run)  # 2.
    m = load_models(c, run, d)  # 3.
    precompute_references(c, run, d, m)  # 4.
    optimizer, scheduler = prepare_training(c, run, d, m)  # 5.
    start_step = resume(c, run, d, m, optimizer, scheduler)
    # the win rate (when `judge` is set): one evaluator for the run; it prints the judge's cost once, here
    evaluator = TrainingEvaluator(c, run.accelerator, run.run_dir, d.total_steps, start_step, log_prefix="[train_offline]")
    if run.trackers:
        run.accelerator.init_trackers(
            c.tracker_project_name,
            config={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(c).items()},
        )
    last_saved = train(c, run, d, m, optimizer, scheduler, evaluator, start_step)  # 6.
    finish(c, run, d, m, optimizer, scheduler, last_saved)  # 7.
    run.accelerator.end_training()
    if run.accelerator.is_main_process:
        closing_summary(c, run.run_dir.path)  # 8.
    return str(run.run_dir.path)


def closing_summary(c: OfflineConfig, run_path) -> None:
    """8. The run's story (maxent_rlhf.story; the proxy of an offline run is its implicit reward margin) and
    its figure (Fig. 7 layout, <run>/curves.png)."""
    records = runs.read_metrics(run_path)
    proxy = "rewards/margins" if c.loss_type != "sft" else "logps/chosen_per_token"
    print("[train_offline] summary\n" + run_story(records, run_path, proxy_key=proxy).text())
    figure = plotting.plot_offline_run(run_path)
    if figure is not None:
        print(f"[train_offline] figure: {figure}")


def normalize_reward_model(c: OfflineConfig, reward_model, tokenizer, train_columns, accelerator) -> dict:
    """7. Shift the reward so that reference completions average 0 (the TL;DR recipe), in HF format.

    GPT-NeoX's score head has no bias: `models.shift_reward_output` moves the final layer norm's bias
    along w / ||w||^2, which adds exactly `delta` to every score (see its docstring).
    """
    source = c.reward_norm_dataset or (c.dataset_name if "completion" in train_columns else None)
    if source is None:
        if accelerator.is_main_process:
            print("[train_offline] no reference completions (set reward_norm_dataset): reward not normalised")
        return {}
    examples, _ = load_split(c, source, c.reward_norm_split, c.reward_norm_samples, "sft", tokenizer, accelerator)
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
