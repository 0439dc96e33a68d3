"""Pairwise judges for win rates: one interface, a registry, an OpenAI-compatible LLM judge and a
reward-model judge.

A judge receives `Pair`s (the post and two summaries shown as A and B) and returns a `Judgment` per
pair: "A", "B", "tie" or "invalid" (an answer that could not be parsed after the retries; it is
reported, never turned into a coin flip or a loss), optionally a soft preference `p_a` = P(A preferred).
Mapping A/B back to policy/reference, caching and statistics live in `maxent_rlhf.evaluation` (used by
evaluate_judge.py and by the training scripts' in-training win rate).

A judge is made by a factory `factory(settings: JudgeSettings) -> Judge`: `settings` holds every judge
option of the run's config, by name (`judge_model`, `reward_model_name_or_path`, ...), and the
`judge_kwargs` options of a plugin judge, which the factory reads with `settings.option(name, default)`.
`get_judge(name, settings)` finds the factory: registered in this process (`@register_judge("name")`),
else the entry point `name` of the group `maxent_rlhf.judges` in an installed package's metadata, which
is how the toy lab provides `toy-gold` (setup.cfg; maxent_rlhf/toylab/judge.py):

    [options.entry_points]
    maxent_rlhf.judges =
        toy-gold = maxent_rlhf.toylab.judge:toy_gold

    def toy_gold(settings: JudgeSettings) -> Judge:
        return ToyGoldJudge()                             # a Judge subclass: judge_pair, cache_id
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# the prompt: the DPO paper's TL;DR judge prompt (Rafailov et al. 2023, App. C.2; docs/sources.md section 4).
# Bump the version on any edit: it is part of the cache key, so a changed prompt never reuses old judgments.
# --------------------------------------------------------------------------------------------------
TEMPLATE_VERSION = "tldr-dpo-v1"
PROMPT_TEMPLATE = """Which of the following summaries does a better job of summarizing the most \
important points in the given forum post, without including unimportant or irrelevant details? \
A good summary is both precise and concise.

Post:
{post}

Summary A:
{summary_a}

Summary B:
{summary_b}

FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. \
SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""


def render_prompt(post: str, summary_a: str, summary_b: str) -> str:
    return PROMPT_TEMPLATE.format(post=post.strip(), summary_a=summary_a.strip(), summary_b=summary_b.strip())


def post_from_prompt(prompt: str) -> str:
    """The post shown to the judge: the policy prompt without its trailing `TL;DR:` cue."""
    text = prompt.rstrip()
    if text.endswith("TL;DR:"):
        text = text[: -len("TL;DR:")]
    return text.strip()


_PREFERRED_RE = re.compile(r"preferred\s*[:：]?[\s\"'`*_(\[]*(?:summary\s*)?([ab])\b", re.IGNORECASE)


def parse_preference(text: Optional[str]) -> Optional[str]:
    """'A' or 'B' from a judge answer (`Preferred: A`, stray quotes/markdown, any case), else None.

    The last `Preferred:` line wins; a bare "A"/"B" answer is accepted too.
    """
    if not text:
        return None
    found = _PREFERRED_RE.findall(text)
    if found:
        return found[-1].upper()
    bare = text.strip().strip("\"'`*_.()[] \n").upper()
    return bare if bare in ("A", "B") else None


def soft_preference_from_logprobs(content: Optional[Sequence[Any]]) -> Optional[float]:
    """P(A) / (P(A) + P(B)) read from the top logprobs of the first answer token after `Preferred:`.

    `content` is the chat-completions `choices[0].logprobs.content` list (objects or dicts with
    `token`, `logprob`, `top_logprobs`). None when no such token or neither A nor B is in the top list.
    """
    if not content:
        return None

    def get(obj, name):
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

    def norm(tok: str) -> str:
        return (tok or "").strip().strip("\"'`*_()[]").upper()

    seen = ""
    for item in content:
        tok = get(item, "token") or ""
        if "preferred" in seen.lower() and norm(tok) in ("A", "B"):
            probs = {"A": 0.0, "B": 0.0}
            for top in get(item, "top_logprobs") or []:
                key = norm(get(top, "token"))
                if key in probs:
                    probs[key] += math.exp(float(get(top, "logprob")))
            total = probs["A"] + probs["B"]
            return probs["A"] / total if total > 0 else None
        seen += tok
    return None


# --------------------------------------------------------------------------------------------------
# interface
# --------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One comparison as the judge sees it. `prompt` is the raw policy prompt (for reward models),
    `post` the text shown to an LLM judge."""

    example_id: str
    prompt: str
    post: str
    summary_a: str
    summary_b: str


@dataclass
class Judgment:
    preferred: str  # "A", "B", "tie" or "invalid"
    p_a: Optional[float] = None  # soft preference P(A preferred), when the judge gives one
    raw: str = ""  # the judge's answer (LLM judges), truncated
    attempts: int = 1  # answers requested for this pair (re-asks after unparseable answers)
    scores: Optional[tuple[float, float]] = None  # (score A, score B) for scoring judges
    error: Optional[str] = None

    def __post_init__(self):
        if self.preferred not in ("A", "B", "tie", "invalid"):
            raise ValueError(f"Judgment.preferred must be 'A', 'B', 'tie' or 'invalid', got {self.preferred!r}")

    def to_json(self) -> dict:
        d = {"preferred": self.preferred, "p_a": self.p_a, "raw": self.raw[:500], "attempts": self.attempts}
        if self.scores is not None:
            d["scores"] = list(self.scores)
        if self.error:
            d["error"] = self.error
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Judgment":
        scores = d.get("scores")
        return cls(d["preferred"], d.get("p_a"), d.get("raw", ""), d.get("attempts", 1),
                   tuple(scores) if scores else None, d.get("error"))


class JudgeError(RuntimeError):
    """A judge failure the user must fix (bad key, unknown model, bad request): not retried."""


class JudgeUnavailableError(JudgeError):
    """The judge server kept failing (429/5xx/timeouts/connection errors) after every retry."""


class Judge:
    """Base class. Override `judge_pair` (simple) or `judge_many` (batched / concurrent)."""

    name: str = "judge"
    #: judgments are stored in the crash-safe cache and reused on rerun (off for cheap local judges)
    cacheable: bool = True
    #: requests cost money / quota (shown in the pre-flight estimate)
    remote: bool = False

    @property
    def cache_id(self) -> str:
        """Identity of the judge in the cache key (model name, version)."""
        return self.name

    def judge_pair(self, pair: Pair) -> Judgment:
        raise NotImplementedError(f"{type(self).__name__} implements neither judge_pair nor judge_many")

    def judge_many(self, pairs: Sequence[Pair], on_result: Callable[[int, Judgment], None]) -> None:
        """Judge every pair; call `on_result(index, verdict)` as soon as each one is known."""
        for i, pair in enumerate(pairs):
            on_result(i, self.judge_pair(pair))

    def estimate_tokens(self, pairs: Sequence[Pair]) -> int:
        """Rough token count of the requests (prompt + answer), for the pre-flight message."""
        return 0

    def describe(self) -> str:
        return self.cache_id


@dataclass
class JudgeSettings:
    """What a judge factory receives: the judge options of the config, by name (each judge reads those it
    uses; the config fields' help says which judge reads which), and `options`, the JSON object of
    `judge_kwargs` for a plugin judge. `evaluation.judge_settings` builds it from a config."""

    judge_model: str
    base_url: Optional[str]
    concurrency: int
    request_timeout: float
    max_retries: int
    backoff_base: float
    backoff_max: float
    parse_retries: int
    logprobs: bool
    reward_model_name_or_path: Optional[str]
    tokenizer_name_or_path: Optional[str]
    judge_batch_size: int
    max_prompt_length: int
    mixed_precision: str
    trust_remote_code: bool
    seed: int
    device: Optional[str] = None
    options: dict = field(default_factory=dict)
    _read: set = field(default_factory=set, init=False, repr=False, compare=False)

    def option(self, name: str, default=None):
        """The `judge_kwargs` option `name` (or `default`); an option no factory reads is an error."""
        self._read.add(name)
        return self.options.get(name, default)


JUDGES_GROUP = "maxent_rlhf.judges"
_REGISTRY: dict[str, Callable[[JudgeSettings], Judge]] = {}


def register_judge(name: str):
    """Decorator of a factory `f(settings: JudgeSettings) -> Judge`: `get_judge(name)` / `--judge name`
    in this process. An installed plugin declares its factory as an entry point instead (module docstring)."""

    def deco(factory: Callable[[JudgeSettings], Judge]):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_judges() -> list[str]:
    """Judges registered in this process or declared by an installed plugin."""
    from .artifacts import installed_plugin_names

    return sorted(set(_REGISTRY) | installed_plugin_names(JUDGES_GROUP))


def get_judge(name: str, settings: JudgeSettings) -> Judge:
    """The judge `name` made by its factory from `settings`. A `judge_kwargs` option that the judge does
    not read is an error naming it (never silently dropped)."""
    from .artifacts import installed_plugin
    from .config import ConfigError

    if name not in _REGISTRY:
        factory = installed_plugin(JUDGES_GROUP, name)
        if factory is None:
            raise ConfigError(f"judge: unknown judge {name!r}; available: {', '.join(available_judges())} (a plugin "
                              f"judge is an entry point of the group {JUDGES_GROUP}: see CONTRIBUTING.md)")
        _REGISTRY[name] = factory
    judge = _REGISTRY[name](settings)
    unread = sorted(set(settings.options) - settings._read)
    if unread:
        raise ConfigError(f"judge_kwargs: judge {name!r} takes no option {', '.join(unread)}; remove it "
                          f"(it reads: {', '.join(sorted(settings._read)) or 'no judge_kwargs options'})")
    judge.name = name
    return judge


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible chat-completions judge
# --------------------------------------------------------------------------------------------------
RETRY_STATUS = {408, 409, 429}


def parse_retry_after(headers) -> Optional[float]:
    """Seconds to wait from `retry-after-ms` / `retry-after` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIJudge(Judge):
    """Any OpenAI-compatible chat-completions server (OpenAI, vLLM, ...) through the `openai` package.

    The API key is read only from the OPENAI_API_KEY environment variable (a local server without
    authentication needs none). Requests run concurrently (at most `concurrency` in flight), each with a
    `timeout`; 429, 408/409, 5xx, timeouts and connection errors are retried up to `max_retries` times
    with exponential back-off (base `backoff_base` s, doubled per retry, capped at `backoff_max`, with
    jitter) or exactly the server's Retry-After when it sends one. An answer without a parseable
    `Preferred: A|B` is re-asked up to `parse_retries` times (at `reask_temperature`), then "invalid".
    """

    remote = True

    def __init__(
        self,
        judge_model: str = "gpt-4o-mini",
        base_url: Optional[str] = None,
        concurrency: int = 8,
        request_timeout: float = 60.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        parse_retries: int = 2,
        logprobs: bool = False,
        temperature: float = 0.0,
        reask_temperature: float = 0.7,
        max_tokens: int = 128,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.model = judge_model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.concurrency = concurrency
        self.timeout = request_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.parse_retries = parse_retries
        self.logprobs = logprobs
        self.temperature = temperature
        self.reask_temperature = reask_temperature
        self.max_tokens = max_tokens
        if not os.environ.get("OPENAI_API_KEY") and self.base_url is None:
            raise JudgeError(
                "the `openai` judge needs an API key: set the OPENAI_API_KEY environment variable "
                "(or --base_url for a local OpenAI-compatible server)"
            )
        self.requests_sent = 0  # HTTP requests attempted (retries included)
        self._sleep = asyncio.sleep  # tests replace it to record back-off delays

    @property
    def cache_id(self) -> str:
        # the server is part of the judge's identity: two servers may serve different models under one
        # name (a local vLLM "gpt-4o-mini"); credentials in the URL never reach the cache
        server = ""
        if self.base_url:
            from urllib.parse import urlsplit

            u = urlsplit(self.base_url)
            server = "@" + (u.hostname or "") + (f":{u.port}" if u.port else "") + u.path.rstrip("/")
        return f"openai/{self.model}{server}" + ("+logprobs" if self.logprobs else "")

    def describe(self) -> str:
        return f"openai ({self.model} at {self.base_url or 'api.openai.com'})"

    def estimate_tokens(self, pairs: Sequence[Pair]) -> int:
        # ~4 characters per token for English prompts; the answer is budgeted at ~60 tokens
        return sum(len(render_prompt(p.post, p.summary_a, p.summary_b)) // 4 + 60 for p in pairs)

    def _client(self):
        try:
            from openai import AsyncOpenAI
        except ImportError as e:  # pragma: no cover
            raise JudgeError("the `openai` judge needs the openai package: pip install openai") from e
        key = os.environ.get("OPENAI_API_KEY") or "no-key"  # local servers (vLLM) accept any key
        # our own retry loop (below) does the retries, so the client's is off
        return AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0)

    def backoff_delay(self, retry: int) -> float:
        """Exponential back-off with jitter for retry number `retry` (0-based): in [d/2, d]."""
        d = min(self.backoff_base * (2.0**retry), self.backoff_max)
        return d * (0.5 + 0.5 * random.random())

    async def _create(self, client, messages, temperature: float):
        import openai

        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                self.requests_sent += 1
                kw = dict(model=self.model, messages=messages, temperature=temperature, max_tokens=self.max_tokens)
                if self.logprobs:
                    kw.update(logprobs=True, top_logprobs=5)
                return await client.chat.completions.create(**kw)
            except openai.APITimeoutError:
                last = f"timeout after {self.timeout}s"
            except openai.APIConnectionError as e:
                last = f"connection error ({type(e.__cause__).__name__ if e.__cause__ else e})"
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in RETRY_STATUS:
                    raise JudgeError(
                        f"the judge server answered HTTP {e.status_code} ({_short(e)}); not retried: check the "
                        f"model name ({self.model}), the key in OPENAI_API_KEY and --base_url"
                    ) from None
                last = f"HTTP {e.status_code} ({_short(e)})"
                retry_after = parse_retry_after(e.response.headers)
            if attempt == self.max_retries:
                break
            delay = retry_after if retry_after is not None else self.backoff_delay(attempt)
            delay = min(delay, max(self.backoff_max, 1.0) * 4)  # never wait unboundedly on a bad header
            logger.warning("judge request failed: %s; retry %d/%d in %.2fs", last, attempt + 1, self.max_retries, delay)
            await self._sleep(delay)
        raise JudgeUnavailableError(
            f"the judge server {self.base_url or 'api.openai.com'} kept failing: {self.max_retries + 1} attempts, "
            f"last error: {last}"
        )

    async def _judge_one(self, client, pair: Pair) -> Judgment:
        messages = [{"role": "user", "content": render_prompt(pair.post, pair.summary_a, pair.summary_b)}]
        text = ""
        for attempt in range(self.parse_retries + 1):
            temperature = self.temperature if attempt == 0 else self.reask_temperature
            resp = await self._create(client, messages, temperature)
            choice = resp.choices[0] if resp.choices else None
            text = (choice.message.content if choice is not None and choice.message else None) or ""
            pref = parse_preference(text)
            if pref is not None:
                p_a = None
                if self.logprobs and choice is not None and choice.logprobs is not None:
                    p_a = soft_preference_from_logprobs(choice.logprobs.content)
                return Judgment(pref, p_a=p_a, raw=text, attempts=attempt + 1)
            logger.warning("unparseable judge answer for example %s (attempt %d): %r", pair.example_id, attempt + 1, text[:200])
        return Judgment("invalid", raw=text, attempts=self.parse_retries + 1, error="no 'Preferred: A|B' in the answer")

    async def _run(self, pairs: Sequence[Pair], on_result: Callable[[int, Judgment], None]) -> None:
        client = self._client()
        sem = asyncio.Semaphore(self.concurrency)

        async def one(i: int, pair: Pair):
            async with sem:
                verdict = await self._judge_one(client, pair)
                on_result(i, verdict)  # written (and flushed) before the slot is released

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(pairs)]
        try:
            for fut in asyncio.as_completed(tasks):
                await fut  # the first persistent failure stops the run
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    def judge_many(self, pairs: Sequence[Pair], on_result: Callable[[int, Judgment], None]) -> None:
        if pairs:
            asyncio.run(self._run(pairs, on_result))


@register_judge("openai")
def openai_judge(s: JudgeSettings) -> OpenAIJudge:
    return OpenAIJudge(s.judge_model, s.base_url, s.concurrency, s.request_timeout, s.max_retries, s.backoff_base,
                       s.backoff_max, s.parse_retries, s.logprobs)


def _short(e) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg if len(msg) <= 200 else msg[:200] + "..."


# --------------------------------------------------------------------------------------------------
# reward-model judge
# --------------------------------------------------------------------------------------------------
class RewardModelJudge(Judge):
    """Scores prompt + " " + summary + EOS with a reward model (`generation.score_completions`);
    the higher score wins, equal scores tie; p_a = sigmoid(score A - score B) (Bradley-Terry).
    Fast and offline; not cached (the model at a path may change)."""

    cacheable = False

    def __init__(
        self,
        reward_model_name_or_path: Optional[str] = None,
        tokenizer_name_or_path: Optional[str] = None,
        judge_batch_size: int = 16,
        max_prompt_length: int = 512,
        mixed_precision: str = "auto",
        device: Optional[str] = None,
        trust_remote_code: bool = False,
    ):
        if not reward_model_name_or_path:
            raise JudgeError("the `reward-model` judge needs --reward_model_name_or_path (a hub id or a local directory)")
        import torch

        from .models import load_reward_model, load_tokenizer, resolve_dtype

        self.path = reward_model_name_or_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or reward_model_name_or_path, padding_side="left", trust_remote_code=trust_remote_code)
        self.model = load_reward_model(
            reward_model_name_or_path, dtype=resolve_dtype(mixed_precision, self.device), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.batch_size = judge_batch_size
        self.max_prompt_length = max_prompt_length

    @property
    def cache_id(self) -> str:
        return f"reward-model/{self.path}"

    def score_texts(self, prompts: Sequence[str], summaries: Sequence[str]) -> list[float]:
        from .generation import score_completions

        return score_completions(self.model, self.tokenizer, prompts, summaries, self.batch_size,
                                 max_prompt_length=self.max_prompt_length, device=self.device)

    def judge_many(self, pairs: Sequence[Pair], on_result: Callable[[int, Judgment], None]) -> None:
        import torch

        from .objectives import bradley_terry_probability

        step = self.batch_size
        for s in range(0, len(pairs), step):
            chunk = pairs[s : s + step]
            prompts = [p.prompt for p in chunk]
            sa = self.score_texts(prompts, [p.summary_a for p in chunk])
            sb = self.score_texts(prompts, [p.summary_b for p in chunk])
            p_as = bradley_terry_probability(
                torch.tensor(sa, dtype=torch.float64), torch.tensor(sb, dtype=torch.float64)
            ).tolist()
            for j, (a, b) in enumerate(zip(sa, sb)):
                pref = "A" if a > b else "B" if b > a else "tie"
                on_result(s + j, Judgment(pref, p_a=p_as[j], scores=(a, b)))


@register_judge("reward-model")
def reward_model_judge(s: JudgeSettings) -> RewardModelJudge:
    return RewardModelJudge(s.reward_model_name_or_path, s.tokenizer_name_or_path, s.judge_batch_size,
                            s.max_prompt_length, s.mixed_precision, s.device, s.trust_remote_code)


# --------------------------------------------------------------------------------------------------
# crash-safe judgment cache
# --------------------------------------------------------------------------------------------------
def cache_key(judge_id: str, template_version: str, post: str, summary_a: str, summary_b: str, order: str) -> str:
    blob = json.dumps([judge_id, template_version, post, summary_a, summary_b, order], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Append-only JSONL of judgments keyed by `cache_key`. Each record is written and flushed as soon
    as it is known, so a killed run loses at most the requests in flight; a line torn by a kill is
    skipped on load. Later lines win."""

    def __init__(self, path):
        from pathlib import Path

        from .runs import read_jsonl

        self.path = Path(path)
        torn: list[int] = []
        lines = read_jsonl(self.path, torn=torn)
        judgments = [r for r in lines if isinstance(r, dict) and "key" in r]
        self.records: dict[str, dict] = {r["key"]: r for r in judgments}  # later lines win
        self.torn_lines = len(torn) + len(lines) - len(judgments)  # JSON that is no judgment is skipped too
        self._file = None

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> Optional[Judgment]:
        rec = self.records.get(key)
        return Judgment.from_json(rec["verdict"]) if rec else None

    def put(self, key: str, verdict: Judgment, **meta) -> None:
        rec = {"key": key, **meta, "verdict": verdict.to_json(), "time": time.time()}
        if self._file is None:
            from .runs import open_jsonl_for_append

            self._file = open_jsonl_for_append(self.path)
        self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[key] = rec

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
