"""The toy lab's artifacts and how each is built (the models through the project's own scripts).

    tokenizer  word-level HF tokenizer over the task vocabulary           (models.build_word_tokenizer)
    sft_data   prompt/completion jsonl (train/validation/test): posts + reference summaries
    prompts    prompt/completion jsonl (train: RL prompts, test: evaluation posts with references)
    sft        tiny GPT-NeoX policy, SFT on sft_data              (python train_offline.py --loss_type sft)
    pairs      prompt/chosen/rejected jsonl: two samples of the SFT policy per prompt, labelled by the
               gold judge with Bradley-Terry noise (gold ties dropped)
    reward     proxy reward model trained on `pairs`            (python train_offline.py --loss_type reward)

`ensure_artifact("sft")` returns a local path, building the artifact and whatever it depends on first.
A name may carry a profile, `PROFILE/NAME` (e.g. `toylab://test/sft`); otherwise the profile is
$MAXENT_RLHF_TOYLAB_PROFILE or `default`. Each artifact's recipe hash covers its own recipe and its
dependencies' hashes, so a change anywhere upstream rebuilds everything downstream.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
from pathlib import Path
from typing import Optional

from ..checkpoints import latest_checkpoint
from ..distributed import mix_seed
from ..runs import read_jsonl
from . import task
from .cache import default_cache_dir, ensure_built
from .scripts import run_script

ENV_PROFILE = "MAXENT_RLHF_TOYLAB_PROFILE"
BUILD_VERSION = 1  # bump when a builder's code changes what it produces

MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128}

PROFILES: dict[str, dict] = {
    "default": {
        "task": {"version": task.TASK_VERSION, "seed": 0, "p_short": 0.55, "p_detail": 0.15,
                 "n_sft_train": 4000, "n_sft_validation": 200, "n_rl_train": 2000, "n_test": 200,
                 "n_pair_prompts": 4000},
        "model": MODEL,
        "sft": {"max_steps": 1200, "batch_size": 32, "lr": 3e-3, "seed": 0},
        "pairs": {"temperature": 1.0, "bt_temperature": 0.5, "max_new_tokens": 16, "seed": 0,
                  "validation_fraction": 0.1, "test_fraction": 0.1},
        "reward": {"epochs": 3, "batch_size": 32, "lr": 1e-3, "seed": 0},
    },
    # seconds-long stages for the tests: the same code paths, tiny sizes
    "test": {
        "task": {"version": task.TASK_VERSION, "seed": 0, "p_short": 0.55, "p_detail": 0.15,
                 "n_sft_train": 64, "n_sft_validation": 16, "n_rl_train": 32, "n_test": 16,
                 "n_pair_prompts": 64},
        "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 128},
        "sft": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "seed": 0},
        "pairs": {"temperature": 1.0, "bt_temperature": 0.5, "max_new_tokens": 8, "seed": 0,
                  "validation_fraction": 0.2, "test_fraction": 0.2},
        "reward": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "seed": 0},
    },
}
# the length channel: the default task, SFT policy and prompts, but pairs labelled by raters who add
# 0.25 gold points per token (a 4-token longer summary is worth one key fact to them), sampled with room
# to be long (24 new tokens): the proxy learns a preference for length that the gold judge does not share.
# The bias widens the label margins, so the raters are noisier (Bradley-Terry temperature 0.75, not 0.5):
# with 0.5 the proxy's held-out accuracy was 0.915, above the lab's 0.65-0.90
PROFILES["length"] = {
    **copy.deepcopy(PROFILES["default"]),
    "pairs": {**PROFILES["default"]["pairs"], "max_new_tokens": 24, "label_length_bias": 0.25, "bt_temperature": 0.75},
}
# the default lab with head size 32 (2 heads of 32, not 4 of 16): vLLM's CPU attention kernels reject head
# size 16, so the vLLM rollout tests compare the engine with the default path on this policy
PROFILES["head32"] = {
    **copy.deepcopy(PROFILES["default"]),
    "model": {**MODEL, "num_heads": 2},
}
# artifacts a profile takes from another profile (same recipe): the length channel changes only the labels;
# head32 only the policy's attention shape (and so the pairs sampled from it, and the reward model)
SHARED = {"length": {"tokenizer": "default", "sft_data": "default", "prompts": "default", "sft": "default"},
          "head32": {"tokenizer": "default", "sft_data": "default", "prompts": "default"}}

DEPENDENCIES = {
    "tokenizer": [],
    "sft_data": [],
    "prompts": [],
    "sft": ["tokenizer", "sft_data"],
    "pairs": ["sft", "prompts"],
    "reward": ["sft", "pairs", "sft_data"],
}
RECIPE_KEYS = {  # which parts of the profile each artifact's recipe contains
    "tokenizer": ["task"],
    "sft_data": ["task"],
    "prompts": ["task"],
    "sft": ["task", "model", "sft"],
    "pairs": ["task", "pairs"],
    "reward": ["task", "reward"],
}
ARTIFACTS = tuple(DEPENDENCIES)


def split_name(name: str) -> tuple[str, str]:
    name = name.strip("/")
    if "/" in name:
        profile, art = name.split("/", 1)
    else:
        profile, art = os.environ.get(ENV_PROFILE, "default"), name
    if art not in DEPENDENCIES:
        raise ValueError(f"unknown toy-lab artifact {art!r}; known: {', '.join(ARTIFACTS)} (as toylab://NAME)")
    if profile not in PROFILES:
        raise ValueError(f"unknown toy-lab profile {profile!r}; known: {', '.join(PROFILES)}")
    return profile, art


def owner(profile: str, art: str) -> str:
    """The profile whose cache holds `art` for `profile` (itself unless it shares the artifact: SHARED)."""
    return SHARED.get(profile, {}).get(art, profile)


def recipe_of(profile: str, art: str) -> dict:
    profile = owner(profile, art)
    prof = PROFILES[profile]
    recipe = {"artifact": art, "build_version": BUILD_VERSION}
    recipe.update({k: copy.deepcopy(prof[k]) for k in RECIPE_KEYS[art]})
    recipe["depends"] = {d: recipe_hash(profile, d) for d in DEPENDENCIES[art]}
    return recipe


def recipe_hash(profile: str, art: str) -> str:
    return task.stable_hash(recipe_of(owner(profile, art), art))


def ensure_artifact(name: str, cache_dir: Optional[str | Path] = None) -> Path:
    """Local path of toy-lab artifact `name` (`NAME` or `PROFILE/NAME`), built on first use (and whatever
    it depends on first), reused afterwards, rebuilt when its recipe changes or its files do not match
    the manifest.

    Safe inside a running script, also under `accelerate launch`: the models are trained by the scripts
    in subprocesses of their own (`scripts.py`), the rest is built here without touching the caller's
    random streams, and a file lock lets one process build while the others wait."""
    profile, art = split_name(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if owner(profile, art) != profile:
        return ensure_artifact(f"{owner(profile, art)}/{art}", root)
    profile_dir = root / profile
    deps = {d: ensure_artifact(f"{profile}/{d}", root) for d in DEPENDENCIES[art]}
    recipe = recipe_of(profile, art)
    builder = BUILDERS[art]

    def build(out: Path) -> None:
        import torch

        with torch.random.fork_rng(devices=[]):  # a build inside a running program leaves its random streams alone
            builder(out, PROFILES[profile], deps)

    return ensure_built(profile_dir, art, recipe, task.stable_hash(recipe), build)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            n += 1
    return n


@contextlib.contextmanager
def quiet_threads(n: int = 1):
    """Tiny models on a shared CPU: one thread is several times faster than two under contention."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _posts(prof: dict, split: str) -> list[task.Post]:
    t = prof["task"]
    offsets = {"sft_train": 0, "sft_validation": 1, "rl_train": 2, "test": 3, "pair_prompts": 4}
    n = t[f"n_{split}"]
    seed = mix_seed(t["seed"], offsets[split])  # the profiles' task seed is 0: the seed is the split's offset
    return task.generate_posts(n, seed=seed, p_short=t["p_short"], p_detail=t["p_detail"])


def _row(p: task.Post) -> dict:
    return {"id": p.id, "prompt": p.prompt, "completion": " " + p.reference, "facts": p.facts}


# --------------------------------------------------------------------------------------------------
# builders: build(out_dir, profile_dict, dependency_paths)
# --------------------------------------------------------------------------------------------------
def build_tokenizer(out: Path, prof: dict, deps: dict) -> None:
    from maxent_rlhf.models import build_word_tokenizer

    build_word_tokenizer(task.vocabulary(), save_dir=out)


def build_sft_data(out: Path, prof: dict, deps: dict) -> None:
    write_jsonl(out / "train.jsonl", map(_row, _posts(prof, "sft_train")))
    write_jsonl(out / "validation.jsonl", map(_row, _posts(prof, "sft_validation")))
    write_jsonl(out / "test.jsonl", map(_row, _posts(prof, "test")))


def build_prompts(out: Path, prof: dict, deps: dict) -> None:
    write_jsonl(out / "train.jsonl", map(_row, _posts(prof, "rl_train")))
    write_jsonl(out / "validation.jsonl", map(_row, _posts(prof, "test")))
    write_jsonl(out / "test.jsonl", map(_row, _posts(prof, "test")))


# prompts are <= ~62 tokens and summaries <= ~16: both fit the tiny models' 128 positions
OFFLINE_COMMON = dict(max_prompt_length=100, max_completion_length=28, warmup_ratio=0.05, mixed_precision="no",
                      logging_steps=10)


def _run_offline(out: Path, values: dict) -> Path:
    """`python train_offline.py --key value ...` into out/run; the final checkpoint's HF files are copied to `out`."""
    import shutil

    run_dir = out / "run"
    common = {k: v for k, v in OFFLINE_COMMON.items() if k not in values}
    run_script("train_offline.py", log=out / "train.log", **values, **common, output_dir=str(run_dir), report_to="none")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RuntimeError(f"train_offline wrote no checkpoint under {run_dir}")
    for f in ckpt.iterdir():
        if f.is_file() and not f.name.startswith(("trainer_state", "rng_state")):
            shutil.copy2(f, out / f.name)
    # keep the run's metrics (loss curve, eval accuracy) for the report; drop the checkpoints
    keep = {"metrics.jsonl", "config.yaml"}
    for f in list(run_dir.iterdir()):
        if f.name not in keep:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    return out


def build_sft(out: Path, prof: dict, deps: dict) -> None:
    from maxent_rlhf.models import build_tiny_policy, load_tokenizer

    init = out / "init"
    tok = load_tokenizer(str(deps["tokenizer"]))
    build_tiny_policy(tok, seed=prof["sft"]["seed"], save_dir=init, **prof["model"])
    s = prof["sft"]
    _run_offline(
        out,
        dict(
            loss_type="sft",
            model_name_or_path=str(init),
            dataset_name=str(deps["sft_data"]),
            dataset_test_split="validation",
            max_steps=s["max_steps"],
            global_batch_size=s["batch_size"],
            per_device_train_batch_size=s["batch_size"],
            learning_rate=s["lr"],
            seed=s["seed"],
        ),
    )
    import shutil

    shutil.rmtree(init)


def build_pairs(out: Path, prof: dict, deps: dict) -> None:
    import torch

    from maxent_rlhf.generation import complete_prompts
    from maxent_rlhf.models import load_policy, load_tokenizer

    p = prof["pairs"]
    posts = _posts(prof, "pair_prompts")
    tok = load_tokenizer(str(deps["sft"]))
    model = load_policy(str(deps["sft"]))
    model.eval()
    torch.manual_seed(p["seed"])
    prompts = [x.prompt for x in posts]

    def sample() -> list[str]:  # special tokens other than EOS stay in the text, where the gold judge sees them
        return [c.text for batch in complete_prompts(model, tok, prompts, p["max_new_tokens"], 256, do_sample=True,
                                                     temperature=p["temperature"], skip_special_tokens=False)
                for c in batch]

    with quiet_threads(1):
        a, b = sample(), sample()
    rng = random.Random(p["seed"])
    rows, ties, flipped = [], 0, 0
    bias = p.get("label_length_bias", 0.0)  # the labeller's taste for length (0: the labeller is the gold judge)
    longer = strict = 0
    for post, x, y in zip(posts, a, b):
        gx, gy = task.gold_score(x, post.prompt, post.facts), task.gold_score(y, post.prompt, post.facts)
        lx, ly = (task.labeller_score(s, post.prompt, post.facts, bias) for s in (x, y))
        if abs(lx - ly) < 1e-9:
            ties += 1
            continue
        x_wins = task.bt_label(lx, ly, rng, p["bt_temperature"])
        strict += int(abs(gx - gy) > 1e-9)  # gold ties kept only when the labeller's length taste breaks them
        flipped += int(abs(gx - gy) > 1e-9 and x_wins != (gx > gy))
        nx, ny = len(x.split()), len(y.split())
        longer += int(nx != ny and x_wins == (nx > ny))
        chosen, rejected = (x, y) if x_wins else (y, x)
        rows.append({"id": post.id, "prompt": post.prompt, "chosen": " " + chosen, "rejected": " " + rejected,
                     "gold_chosen": gx if x_wins else gy, "gold_rejected": gy if x_wins else gx})
    n = len(rows)
    n_test = int(round(n * p["test_fraction"]))
    n_val = int(round(n * p["validation_fraction"]))
    write_jsonl(out / "train.jsonl", rows[: n - n_val - n_test])
    write_jsonl(out / "validation.jsonl", rows[n - n_val - n_test : n - n_test])
    write_jsonl(out / "test.jsonl", rows[n - n_test :])
    stats = {"pairs": n, "gold_ties_dropped": ties, "labels_against_gold": flipped,
             "label_gold_agreement": 1 - flipped / max(strict, 1)}
    if bias:  # only the length profile: the default's stats.json stays as it was
        stats.update(label_length_bias=bias, labels_prefer_longer=longer / max(n, 1))
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(f"[toylab] pairs: {stats}", flush=True)


def build_reward(out: Path, prof: dict, deps: dict) -> None:
    r = prof["reward"]
    n_train = len(read_jsonl(Path(deps["pairs"]) / "train.jsonl"))
    steps = max(1, r["epochs"] * n_train // r["batch_size"])
    _run_offline(
        out,
        dict(
            loss_type="reward",
            model_name_or_path=str(deps["sft"]),
            dataset_name=str(deps["pairs"]),
            dataset_test_split="validation",
            max_steps=steps,
            global_batch_size=r["batch_size"],
            per_device_train_batch_size=r["batch_size"],
            per_device_eval_batch_size=64,
            reward_norm_dataset=str(deps["sft_data"]),  # the references average reward 0 (TL;DR recipe)
            reward_norm_split="train",
            reward_norm_samples=500,
            learning_rate=r["lr"],
            seed=r["seed"],
        ),
    )
    acc = pair_accuracy(out, Path(deps["pairs"]) / "test.jsonl")
    (out / "heldout_accuracy.json").write_text(json.dumps(acc, indent=1))
    print(f"[toylab] reward model held-out accuracy: {acc}", flush=True)


BUILDERS = {
    "tokenizer": build_tokenizer,
    "sft_data": build_sft_data,
    "prompts": build_prompts,
    "sft": build_sft,
    "pairs": build_pairs,
    "reward": build_reward,
}


# --------------------------------------------------------------------------------------------------
# the reward model's held-out accuracy
# --------------------------------------------------------------------------------------------------
def pair_accuracy(reward_dir: str | Path, pairs_file: str | Path) -> dict:
    """Held-out accuracy of a reward model on gold-labelled pairs: against the (noisy) labels and
    against the noiseless gold preference."""
    from maxent_rlhf.generation import score_completions
    from maxent_rlhf.models import load_reward_model, load_tokenizer

    rows = read_jsonl(pairs_file)
    tok = load_tokenizer(str(reward_dir))
    rm = load_reward_model(str(reward_dir))
    rm.eval()
    prompts = [r["prompt"] for r in rows]
    with quiet_threads(1):
        c = score_completions(rm, tok, prompts, [r["chosen"] for r in rows], 256)
        j = score_completions(rm, tok, prompts, [r["rejected"] for r in rows], 256)
    n = len(rows)
    acc_labels = sum(a > b for a, b in zip(c, j)) / max(n, 1)
    acc_gold = sum((a > b) == (r["gold_chosen"] > r["gold_rejected"]) for a, b, r in zip(c, j, rows)) / max(n, 1)
    # the length channel: of the pairs whose summaries differ in length, how often each side prefers the longer
    diff = [(a, b, r) for a, b, r in zip(c, j, rows) if len(r["chosen"].split()) != len(r["rejected"].split())]
    chosen_longer = [len(r["chosen"].split()) > len(r["rejected"].split()) for _, _, r in diff]
    rm_longer = sum((a > b) == cl for (a, b, _), cl in zip(diff, chosen_longer)) / max(len(diff), 1)
    gold_longer = sum((r["gold_chosen"] > r["gold_rejected"]) == cl for (_, _, r), cl in zip(diff, chosen_longer)
                      if abs(r["gold_chosen"] - r["gold_rejected"]) > 1e-9) / max(len(diff), 1)
    return {"n": n, "accuracy_vs_labels": acc_labels, "accuracy_vs_gold": acc_gold, "n_length_differs": len(diff),
            "rm_prefers_longer": rm_longer, "gold_prefers_longer": gold_longer}
