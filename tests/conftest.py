"""Shared tiny fixtures: a word-level tokenizer, GPT-NeoX models and a prompt file built locally (no network)."""
import json
import os
import random

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_WORDS = (
    "SUBREDDIT: r/cats r/dogs TITLE: POST: TL;DR: the a my cat dog ran sat on mat far away home "
    "happy sad big small today yesterday we i you it is was and but not very good bad help"
).split()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from maxent_rlhf.models import build_word_tokenizer

    return build_word_tokenizer(TINY_WORDS)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny GPT-NeoX causal LM + tokenizer (loadable by hub-style path)."""
    from maxent_rlhf.models import build_tiny_policy

    d = tmp_path_factory.mktemp("tiny_policy")
    build_tiny_policy(tiny_tokenizer, seed=0, save_dir=d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny one-label GPT-NeoX sequence classifier + tokenizer."""
    from maxent_rlhf.models import build_tiny_reward_model

    d = tmp_path_factory.mktemp("tiny_reward")
    build_tiny_reward_model(tiny_tokenizer, seed=1, save_dir=d)
    return str(d)


PROMPT_WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it".split()


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """24 TL;DR-style prompts (`prompt` column) of 2-6 words from PROMPT_WORDS, fixed by seed 0."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prompt_data") / "prompts.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            post = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {post} TL;DR:"}) + "\n")
    return str(path)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (the test machine's 2 cores are shared: avoids oversubscription)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
