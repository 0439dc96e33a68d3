"""Shared tiny fixtures: a word-level tokenizer and GPT-NeoX models built locally (no network)."""
import os

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
