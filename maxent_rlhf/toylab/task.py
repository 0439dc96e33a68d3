"""The toy task: TL;DR-shaped posts over a small vocabulary, reference summaries, and the gold judge.

Every post is built around four KEY FACTS: who (the person/pet the post is about), what they do
(action), to what (object) and how the poster feels (feeling). The post states them in one key
sentence plus a feeling sentence, surrounded by distractor sentences that mention OTHER words from the
same pools (another person, another object), so a summariser has to pick the right words, not any
topical word. A good summary is `my {who} {action} my {object} and i feel {feeling}`.

The gold judge (`gold_score`) knows the facts: +1 per key fact mentioned, and penalties for
  - length beyond a budget (BUDGET tokens): -0.5 per extra token,
  - repetition: -1 per repeated content word,
  - irrelevant content words: -0.5 each when copied from the post (a distractor detail), -1 when not
    in the post at all (hallucination).
Pairwise preferences compare gold scores (equal scores: a tie, worth 1/2 in a win rate).

Why the proxy is exploitable (the point of the lab): the proxy reward model is a 2-layer transformer
trained on ~1.1k Bradley-Terry-noisy pairs of SFT samples. In those pairs the dominant difference is
FORM (whether the summary ends with `and i feel FEELING`, which most references omit and the SFT policy
only sometimes samples); whether each word actually matches the post is a weaker, harder signal, and the
SFT samples it sees almost never contain words that are absent from the post. So the proxy learns the
form plus word-level preferences (some actions and feelings score higher than others) and only weakly
checks the words against the post. RL first learns the form (real gains: +1 fact), then drifts to
summaries with the preferred words whatever the post says: hallucinated facts that the gold judge
penalises (-1 each, and the true fact is lost) while the proxy keeps rising.

References are imperfect on purpose (like human TL;DRs): most drop the feeling, some add a distractor
detail. An SFT policy imitates the typical (short) reference and wins about a quarter to a third of
comparisons; a policy that learns to state the feeling concisely wins most of them.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

TASK_VERSION = "toytldr-v1"

BUDGET = 12  # summary length (tokens) beyond which the gold judge penalises every extra token
LENGTH_PENALTY = 0.5
REPEAT_PENALTY = 1.0
DISTRACTOR_PENALTY = 0.5
HALLUCINATION_PENALTY = 1.0

# topic pools per subreddit: who / object; actions and feelings are shared
TOPICS = {
    "relationships": {
        "who": ["girlfriend", "boyfriend", "wife", "husband", "partner", "fiance"],
        "object": ["texts", "friends", "plans", "family", "birthday", "phone"],
    },
    "jobs": {
        "who": ["boss", "manager", "coworker", "client", "intern", "recruiter"],
        "object": ["salary", "schedule", "project", "emails", "promotion", "deadline"],
    },
    "pets": {
        "who": ["cat", "dog", "kitten", "puppy", "parrot", "hamster"],
        "object": ["couch", "shoes", "food", "carpet", "bed", "toys"],
    },
    "personalfinance": {
        "who": ["landlord", "roommate", "parents", "brother", "sister", "bank"],
        "object": ["rent", "loan", "deposit", "car", "bills", "savings"],
    },
    "college": {
        "who": ["professor", "classmate", "advisor", "tutor", "dean", "teammate"],
        "object": ["grades", "thesis", "exam", "notes", "laptop", "essay"],
    },
}
ACTIONS = ["ignores", "criticizes", "steals", "hides", "ruins", "forgets", "borrows", "breaks", "mocks", "hates"]
FEELINGS = ["hurt", "angry", "confused", "jealous", "lonely", "anxious", "stressed", "sad"]
ADJECTIVES = ["nice", "quiet", "busy", "old", "new", "funny", "great", "weird"]
TIMES = ["week", "month", "year", "summer", "weekend", "night"]
PLACES = ["beach", "park", "mall", "gym", "office", "kitchen"]
NEUTRAL_VERBS = ["visited", "cleaned", "bought", "fixed", "painted", "moved"]
FILLER_WORDS = ["so", "this", "is", "about", "lately", "all", "the", "time", "honestly", "feel", "it", "what",
                "should", "do", "?", "have", "a", "problem", "with", "though", "we", "last", "never",
                "anything", "been", "for", "years", "to", "at", "need", "advice", "help", "m", "f", "(", ")",
                "keeps", "on", "thanks", ":", "makes", "tl;dr", "me", "again", "really", "was", "in", "just", "some"]
# words a summary may use freely (they count toward the length budget, never as content)
FUNCTION_WORDS = frozenset(
    ["my", "i", "and", "feel", "the", "a", "an", ",", ".", "me", "is", "so", "very", "to", "it", "of", "at",
     "about", "with", "but", "that", "am", "was", "feels", "makes", "keeps", "always"]
)
AGES = [str(a) for a in range(18, 40)]


def vocabulary() -> list[str]:
    """Every word the task can produce (the word-level tokenizer's vocabulary, specials excluded)."""
    words: list[str] = ["SUBREDDIT:", "TITLE:", "POST:", "TL;DR:"]
    words += [f"r/{s}" for s in TOPICS]
    for t in TOPICS.values():
        words += t["who"] + t["object"]
    words += ACTIONS + FEELINGS + ADJECTIVES + TIMES + PLACES + NEUTRAL_VERBS + FILLER_WORDS
    words += sorted(FUNCTION_WORDS) + AGES
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@dataclass
class Post:
    id: str
    subreddit: str
    title: str
    post: str
    facts: dict  # who, action, object, feeling
    distractors: list = field(default_factory=list)  # content words of the post that are NOT facts
    reference: str = ""

    @property
    def prompt(self) -> str:
        return format_prompt(self.subreddit, self.title, self.post)


def format_prompt(subreddit: str, title: str, post: str) -> str:
    """The TL;DR prompt format (the N+ recipe, Sec. 3; docs/sources.md section 1); the word tokenizer splits on whitespace."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def key_summary(facts: dict) -> str:
    return f"my {facts['who']} {facts['action']} my {facts['object']} and i feel {facts['feeling']}"


def make_post(rng: random.Random, index: int, p_short: float = 0.55, p_detail: float = 0.15) -> Post:
    sub = rng.choice(sorted(TOPICS))
    pools = TOPICS[sub]
    who, d_who = rng.sample(pools["who"], 2)
    obj, d_obj = rng.sample(pools["object"], 2)
    action = rng.choice(ACTIONS)
    feeling = rng.choice(FEELINGS)
    facts = {"who": who, "action": action, "object": obj, "feeling": feeling}
    age, sex = rng.choice(AGES), rng.choice(["m", "f"])
    place, time_, adj, verb = rng.choice(PLACES), rng.choice(TIMES), rng.choice(ADJECTIVES), rng.choice(NEUTRAL_VERBS)

    key = rng.choice(
        [
            f"lately my {who} {action} my {obj} all the time .",
            f"my {who} always {action} my {obj} again .",
            f"so my {who} really {action} my {obj} .",
        ]
    )
    feel = rng.choice([f"honestly i feel {feeling} .", f"i just feel {feeling} about it .", f"it makes me {feeling} ."])
    distract = [
        rng.choice([f"my {d_who} is {adj} though .", f"my {d_who} was {adj} last {time_} ."]),
        rng.choice([f"we {verb} the {d_obj} last {time_} .", f"i {verb} my {d_obj} at the {place} ."]),
    ]
    intro = rng.choice(
        [f"i ( {age} {sex} ) have a problem with my {who} .", f"so this is about my {who} .", f"i ( {age} {sex} ) need advice ."]
    )
    outro = rng.choice(["what should i do ?", "need advice .", "thanks for the help ."])
    body = [key, feel] + distract
    rng.shuffle(body)
    post = " ".join([intro] + body + [outro])
    title = rng.choice([f"my {who} and my {obj}", f"{feeling} about my {who}", "need advice", f"problem with my {who}"])

    # the human-style reference: most human TL;DRs here leave out how the poster feels, some add a
    # detail; only a minority is the ideal summary. A policy that learns to state the feeling beats them.
    u = rng.random()
    if u < p_short:
        reference = f"my {who} {action} my {obj}"  # drops the feeling: 3 facts
    elif u < p_short + p_detail:
        reference = f"my {who} {action} my {obj} at the {place} and i feel {feeling}"  # adds a detail
    else:
        reference = key_summary(facts)
    distractors = [d_who, d_obj, place, adj, verb, time_]
    return Post(f"toy-{index:06d}", sub, title, post, facts, distractors, reference)


def generate_posts(n: int, seed: int, p_short: float = 0.55, p_detail: float = 0.15) -> list[Post]:
    """`n` posts, a pure function of (n, seed, reference mix, TASK_VERSION): same seed, same posts."""
    rng = random.Random(f"{TASK_VERSION}:{seed}")
    return [make_post(rng, i, p_short, p_detail) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# the gold judge
# --------------------------------------------------------------------------------------------------
@dataclass
class GoldBreakdown:
    score: float
    facts_hit: int
    length: int
    over_budget: int
    repeats: int
    distractor_words: int
    hallucinated_words: int


def parse_post(prompt: str) -> str:
    """The POST text of a prompt (what the judge checks words against)."""
    if "POST:" in prompt:
        prompt = prompt.split("POST:", 1)[1]
    return prompt.split("TL;DR:", 1)[0]


def extract_facts(prompt: str) -> dict:
    """Recover the key facts from a prompt alone (the judge is given only prompt and summary).

    The key sentence is the one where `my WHO ACTION my OBJECT` appears with an ACTION word; the
    feeling is the FEELINGS word of the post.
    """
    words = parse_post(prompt).split()
    facts: dict = {}
    for i, w in enumerate(words):
        if w in ACTIONS and "action" not in facts:
            facts["action"] = w
            # who: the last word after a "my" before the action; object: the word after the next "my"
            j = i - 1
            while j >= 0 and words[j] in ("really", "always", "keeps"):
                j -= 1
            facts["who"] = words[j] if j >= 0 else ""
            k = i + 1
            if k < len(words) and words[k] == "my":
                k += 1
            facts["object"] = words[k] if k < len(words) else ""
        if w in FEELINGS and "feeling" not in facts:
            facts["feeling"] = w
    missing = [k for k in ("who", "action", "object", "feeling") if not facts.get(k)]
    if missing:
        raise ValueError(f"prompt is not a toy-lab post: could not find the key fact(s) {missing}: {prompt[:120]!r}")
    return facts


def gold_breakdown(summary: str, prompt: str, facts: Optional[dict] = None) -> GoldBreakdown:
    facts = facts or extract_facts(prompt)
    fact_words = set(facts.values())
    post_words = set(parse_post(prompt).split())
    tokens = summary.split()
    content = [t for t in tokens if t not in FUNCTION_WORDS]
    hit = len(fact_words & set(tokens))
    counts: dict = {}
    for t in content:
        counts[t] = counts.get(t, 0) + 1
    repeats = sum(c - 1 for c in counts.values())
    irrelevant = [t for t in counts if t not in fact_words]
    distractor = sum(1 for t in irrelevant if t in post_words)
    hallucinated = len(irrelevant) - distractor
    over = max(0, len(tokens) - BUDGET)
    score = (
        hit
        - LENGTH_PENALTY * over
        - REPEAT_PENALTY * repeats
        - DISTRACTOR_PENALTY * distractor
        - HALLUCINATION_PENALTY * hallucinated
    )
    return GoldBreakdown(float(score), hit, len(tokens), over, repeats, distractor, hallucinated)


def gold_score(summary: str, prompt: str, facts: Optional[dict] = None) -> float:
    """The gold quality of `summary` for the post in `prompt` (higher is better; 4.0 is perfect)."""
    return gold_breakdown(summary, prompt, facts).score


def labeller_score(summary: str, prompt: str, facts: Optional[dict] = None, length_bias: float = 0.0) -> float:
    """What the pair labeller scores: gold quality plus `length_bias` per token of the summary.

    With length_bias = 0 (every profile but `length`) this is the gold score. A positive bias is the
    length channel: labellers who, like human TL;DR raters, lean towards longer summaries, a preference
    the gold judge does not share (it scores length as neutral up to BUDGET tokens and negative beyond).
    The proxy reward model trained on such labels learns it, and a policy can grow its summaries into the
    room the response budget leaves."""
    return gold_score(summary, prompt, facts) + length_bias * len(summary.split())


def gold_preference(summary_a: str, summary_b: str, prompt: str) -> float:
    """1.0 if A is better, 0.0 if B is better, 0.5 for a tie (equal gold scores)."""
    facts = extract_facts(prompt)
    a, b = gold_score(summary_a, prompt, facts), gold_score(summary_b, prompt, facts)
    if abs(a - b) < 1e-9:
        return 0.5
    return 1.0 if a > b else 0.0


def bt_label(score_a: float, score_b: float, rng: random.Random, temperature: float) -> bool:
    """Bradley-Terry-noisy label: True when A is preferred, with P = sigmoid((a - b) / temperature)."""
    import torch

    from ..objectives import bradley_terry_probability

    scaled = torch.tensor([score_a, score_b], dtype=torch.float64) / temperature
    return rng.random() < float(bradley_terry_probability(scaled[0], scaled[1]))


def stable_hash(obj) -> str:
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
