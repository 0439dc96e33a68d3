"""Loading tokenizers, policies and reward models (hub id or local path), and building tiny ones.

Real runs load Pythia / GPT-NeoX checkpoints from the hub (e.g. `cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr`).
Tests, the toy lab and the GPU smoke benchmark build small GPT-NeoX models and word-level tokenizers
locally with the same classes, so the same code paths run without any download.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import torch

from .artifacts import is_local_path, resolve_path
from .config import ConfigError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
UNK_TOKEN = "<unk>"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_location(name_or_path: str, what: str = "model", need: Iterable[str] = ("config.json",)) -> str:
    """`resolve_path(name_or_path)`, after checking that a local location is a saved HF model.

    A local path (see `artifacts.is_local_path`) that does not exist is reported as a missing directory,
    not as an invalid hub id; a run directory (config.yaml, checkpoints/) is told apart from a model
    directory and its newest checkpoint suggested. `need`: files of which at least one must be there.
    Hub ids pass unchanged (their errors are reported by `from_pretrained_or_error`)."""
    path = resolve_path(name_or_path)
    if not is_local_path(path):
        return path
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} {name_or_path!r}: directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise ConfigError(f"{what} {name_or_path!r} is a file; give the directory of a saved model (config.json, *.safetensors)")
    if not any((p / f).exists() for f in need):
        ckpts = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
        hint = (f"; it is a run directory: give one of its checkpoints, e.g. {ckpts[-1]}" if ckpts
                else "; give the directory that save_pretrained wrote")
        raise ConfigError(f"{what} {name_or_path!r}: {p} has no {' or '.join(need)}{hint}")
    return path


def from_pretrained_or_error(load, name_or_path: str, what: str, *args, **kwargs):
    """`load(name_or_path, ...)` (a `from_pretrained`), with transformers' OSError for a hub id it cannot
    reach or a directory missing weights turned into one ConfigError line naming `what` and the location."""
    try:
        return load(name_or_path, *args, **kwargs)
    except OSError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise ConfigError(f"{what} {name_or_path!r} cannot be loaded: {lines[0] if lines else type(e).__name__}") from e


def load_model_config(name_or_path: str, what: str = "policy", trust_remote_code: bool = False, revision=None):
    """The model's config alone (config.json: no weights), for checks that should fail before a large model loads."""
    from transformers import AutoConfig

    name_or_path = check_model_location(name_or_path, what)
    return from_pretrained_or_error(AutoConfig.from_pretrained, name_or_path, what, trust_remote_code=trust_remote_code,
                                    revision=revision)


def check_context_length(model, prompt_length: int, response_length: int, prompt_field: str, response_field: str) -> None:
    """ConfigError when a prompt of `prompt_length` plus a response of `response_length` tokens do not fit
    the model's positions (`max_position_embeddings`): names both fields and the model's limit. `model`: a
    model or its config (`load_model_config`, to check before loading the weights)."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_length + response_length > limit:
        raise ConfigError(
            f"`{prompt_field}` + `{response_field}` = {prompt_length} + {response_length} = "
            f"{prompt_length + response_length} exceeds the model's max_position_embeddings = {limit}; lower one of them"
        )


def resolve_dtype(mixed_precision: str, device: torch.device | str) -> torch.dtype:
    """Weights dtype for frozen models: bf16 on GPU when asked ('auto' or 'bf16'), float32 on CPU; 'fp16'
    only off the CPU, where accelerate autocasts the trained policy to fp16 too."""
    device = torch.device(device)
    if mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if mixed_precision == "fp16" and device.type != "cpu":
        return torch.float16
    return torch.float32


def load_tokenizer(name_or_path: str, padding_side: str = "left", trust_remote_code: bool = False, revision=None):
    """AutoTokenizer with a pad token and the given padding side.

    A tokenizer without a pad token (Pythia's) gets one: the EOS token is reused as pad, which is safe
    here because every mask in the suite is built from lengths / attention masks, never from pad ids.
    """
    from transformers import AutoTokenizer

    name_or_path = check_model_location(name_or_path, "tokenizer", need=TOKENIZER_FILES)
    tok = from_pretrained_or_error(
        AutoTokenizer.from_pretrained, name_or_path, "tokenizer", trust_remote_code=trust_remote_code, revision=revision
    )
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer {name_or_path!r} has no EOS token; responses could never end")
    if tok.pad_token is None:
        logger.warning("tokenizer %s has no pad token: using EOS %r as pad", name_or_path, tok.eos_token)
        print(f"[maxent_rlhf] tokenizer {name_or_path} has no pad token: using EOS {tok.eos_token!r} as pad")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_policy(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    revision=None,
):
    """A causal LM (AutoModelForCausalLM), safetensors weights only."""
    from transformers import AutoModelForCausalLM

    name_or_path = check_model_location(name_or_path, "policy")
    model = from_pretrained_or_error(
        AutoModelForCausalLM.from_pretrained, name_or_path, "policy",
        dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, revision=revision,
    )
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward; transformers 5 renamed the switch (4.x has only the old name, which
    5.x still takes with a deprecation warning). HF then drops the KV cache in training."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False


def load_reward_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, revision=None):
    """A one-label sequence classifier (AutoModelForSequenceClassification), read at the last real token."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    name_or_path = check_model_location(name_or_path, "reward model")
    config = from_pretrained_or_error(
        AutoConfig.from_pretrained, name_or_path, "reward model", trust_remote_code=trust_remote_code, revision=revision
    )
    num_labels = getattr(config, "num_labels", None)
    if num_labels != 1:
        raise ConfigError(
            f"reward model {name_or_path!r} has num_labels = {num_labels}; a reward model must be a "
            "sequence classifier with exactly one label (a scalar score)"
        )
    model = from_pretrained_or_error(
        AutoModelForSequenceClassification.from_pretrained, name_or_path, "reward model",
        dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, revision=revision,
    )
    if not hasattr(model, "score"):
        raise ConfigError(f"reward model {name_or_path!r} ({type(model).__name__}) has no `score` head")
    return model


# --------------------------------------------------------------------------------------------------
# tiny local models (tests, toy lab, benchmarks)
# --------------------------------------------------------------------------------------------------
def build_word_tokenizer(words: Iterable[str], save_dir: Optional[str | Path] = None, model_max_length: int = 2048):
    """A word-level HF fast tokenizer over `words` (whitespace-split), with EOS, pad and unk tokens.

    Special tokens are ids 0 (EOS), 1 (pad), 2 (unk); words follow in the order given (deduplicated).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, UNK_TOKEN: 2}
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",
    )
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def tiny_gpt_neox_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: Optional[int] = None,
    max_position_embeddings: int = 512,
    eos_token_id: int = 0,
    pad_token_id: int = 1,
    num_labels: int = 1,
):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        num_labels=num_labels,
    )


def _build_tiny(model_cls, tokenizer, seed: int, save_dir, **config_kw):
    config = tiny_gpt_neox_config(
        len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config_kw
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
        tokenizer.save_pretrained(str(save_dir))
    return model


def build_tiny_policy(tokenizer, seed: int = 0, save_dir: Optional[str | Path] = None, **config_kw):
    """A randomly initialised GPT-NeoX causal LM (the Pythia architecture) sized by `config_kw`."""
    from transformers import GPTNeoXForCausalLM

    return _build_tiny(GPTNeoXForCausalLM, tokenizer, seed, save_dir, **config_kw)


def build_tiny_reward_model(tokenizer, seed: int = 0, save_dir: Optional[str | Path] = None, **config_kw):
    """A randomly initialised one-label GPT-NeoX sequence classifier."""
    from transformers import GPTNeoXForSequenceClassification

    return _build_tiny(GPTNeoXForSequenceClassification, tokenizer, seed, save_dir, num_labels=1, **config_kw)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# reward-model training helpers (train_offline.py, loss `reward`)
# --------------------------------------------------------------------------------------------------
def load_reward_model_for_training(
    name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, revision=None
):
    """A one-label sequence classifier to train: an existing reward model (checked by
    `load_reward_model`: exactly one label), or a causal LM (the SFT policy) whose backbone is reused
    under a freshly initialised one-label `score` head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = check_model_location(name_or_path, "model")
    config = from_pretrained_or_error(
        AutoConfig.from_pretrained, path, "model", trust_remote_code=trust_remote_code, revision=revision
    )
    if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    print(f"[maxent_rlhf] reward model initialised from policy {name_or_path}: new one-label `score` head")
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, revision=revision
    )


FINAL_NORM_NAMES = ("final_layer_norm", "ln_f", "norm", "final_layernorm")


@torch.no_grad()
def shift_reward_output(reward_model, delta: float) -> str:
    """Add the constant `delta` to every reward the model outputs, keeping the plain HF format.

    A reward model computes r = w . n(h) (+ b), with n the backbone's final norm and w the one-label
    `score` head. When the head has a bias, b += delta. GPT-NeoX's head has none (`bias=False`), so the
    shift goes into the final norm's bias instead: beta_n += delta * w / ||w||^2 gives
    w . (n(h) + delta * w / ||w||^2) = w . n(h) + delta exactly. This is only valid because in a
    sequence classifier the final norm's output feeds nothing but the score head (the backbone returns
    it as `last_hidden_state`; there is no LM head). Returns the name of the parameter changed.
    """
    score = reward_model.score
    if getattr(score, "bias", None) is not None:
        score.bias.add_(delta)
        return "score.bias"
    w = score.weight.detach().float().reshape(-1)
    if score.weight.shape[0] != 1:
        raise ValueError(f"shift_reward_output needs a one-label score head, got weight {tuple(score.weight.shape)}")
    norm_sq = float(w.pow(2).sum())
    if norm_sq == 0.0:
        raise ValueError("the reward model's score head is all zeros; its output cannot be shifted")
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    for name in FINAL_NORM_NAMES:
        norm = getattr(backbone, name, None)
        if norm is not None and getattr(norm, "bias", None) is not None:
            norm.bias.add_((delta * w / norm_sq).to(norm.bias.dtype))
            return f"{reward_model.base_model_prefix}.{name}.bias"
    raise ValueError(
        f"{type(reward_model).__name__}: neither a `score` bias nor a final norm with a bias "
        f"({', '.join(FINAL_NORM_NAMES)}) to hold the reward shift"
    )
