"""evaluate_judge.py + maxent_rlhf/judges.py end to end through the real `openai` client against the
local fake server (tests/helpers/fake_openai_server.py): exact win rates, A/B mapping, invalid answers, faults
and retries, the crash-safe cache (rerun, kill + restart), the API key never written anywhere; outputs
keyed by judge, template and prompts, never mixed (`runs.check_same_evaluation`); the win-rate figure."""
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import evaluate_judge as ej  # noqa: E402
from helpers.fake_openai_server import FakeJudgeServer  # noqa: E402
from maxent_rlhf import evaluation, judges, plotting  # noqa: E402
from maxent_rlhf.config import ConfigError  # noqa: E402
from maxent_rlhf.judges import JudgeUnavailableError, OpenAIJudge, Pair, parse_preference  # noqa: E402

SECRET = "sk-test-SECRET-9f8e7d6c5b4a"
MARKER = "good"
WORDS = "my cat sat on the mat today and it was very happy but the dog ran far away from home".split()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def server():
    with FakeJudgeServer(marker=MARKER, api_key=SECRET) as s:
        yield s


def make_dataset(tmp_path: Path, n: int, garbled=()) -> Path:
    path = tmp_path / "data" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            post = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) + (" garble" if i in garbled else "")
            prompt = f"SUBREDDIT: r/cats\n\nTITLE: t{i}\n\nPOST: {post}\n\nTL;DR:"
            f.write(json.dumps({"id": f"ex{i}", "prompt": prompt, "completion": f" reference summary {i}"}) + "\n")
    return path


def fake_run(tmp_path: Path, steps) -> Path:
    """A run directory with complete-looking checkpoints (no weights: generations are pre-written)."""
    run = tmp_path / "run"
    for s in steps:
        d = run / "checkpoints" / f"step_{s:08d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": s}))
    return run


def write_generations(out: Path, label: str, data: Path, texts: dict, max_new_tokens=53):
    """Crafted generations: example index -> summary text; n_tokens = words, reference_tokens = 3."""
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    path = out / "generations" / f"{label}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            text = texts[i]
            f.write(json.dumps({"id": row["id"], "generation": text, "n_tokens": len(text.split()),
                                "reference_tokens": 3, "prompt_sha": evaluation.prompt_hash(row["prompt"]),
                                "max_new_tokens": max_new_tokens}) + "\n")


def with_marker(n, winners, tag="", neutral=False):
    """Policy summaries that beat the (neutral) reference on the examples in `winners` (marker word) and
    lose on the others (anti-marker word; `neutral`: neither word, so the server's position bias decides)."""
    lose = f"the dog ran far {tag}".strip() if neutral else f"the dog ran bad {tag}".strip()
    return {i: (f"the cat sat {MARKER} {tag}".strip() if i in winners else lose) for i in range(n)}


def config(tmp_path, server, data, checkpoints, **kw):
    base = dict(output_dir=str(tmp_path / "out"), checkpoints=[str(c) for c in checkpoints], dataset_name=str(data),
                dataset_test_split="test", n=0, judge="openai", plot=False)
    if kw.get("judge", "openai") == "openai":  # options only the openai judge takes
        # a generous timeout: on a loaded machine a 2 s one expired, the client retried, and the server judged a
        # pair twice (tests that want timeouts use the "slow" fault with their own short request_timeout)
        base.update(judge_model="fake-judge", base_url=server.base_url if server else None, concurrency=4,
                    request_timeout=30.0, max_retries=3, backoff_base=0.01, backoff_max=0.05)
    base.update(kw)
    return ej.EvalConfig(**base)


def assert_no_secret(tmp_path, *texts):
    for p in Path(tmp_path).rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), f"API key written to {p}"
    for t in texts:
        assert SECRET not in t


# --------------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Comparison: A is tighter.\nPreferred: A", "A"),
    ('Comparison: x\nPreferred: "B"', "B"),
    ("comparison: x\npreferred: b", "B"),
    ("**Comparison:** x\n**Preferred:** A", "A"),
    ("Preferred: Summary B", "B"),
    ("Comparison: Summary A is better than B.\nPreferred: B", "B"),
    (" 'A' ", "A"),
    ("Preferred: Both", None),
    ("I cannot decide.", None),
    ("", None),
])
def test_parse_preference(text, expected):
    assert parse_preference(text) == expected


def test_soft_preference_from_logprobs():
    content = [{"token": "Comparison: x\n"}, {"token": "Preferred"}, {"token": ":"},
               {"token": " B", "top_logprobs": [{"token": " B", "logprob": -0.5}, {"token": " A", "logprob": -1.5},
                                                {"token": "B", "logprob": -3.0}]}]
    pa, pb = 0.22313016014842982, 0.6065306597126334 + 0.049787068367863944
    assert judges.soft_preference_from_logprobs(content) == pytest.approx(pa / (pa + pb))
    assert judges.soft_preference_from_logprobs([{"token": "A", "top_logprobs": []}]) is None


def test_win_rate_metric_loads_offline_by_path(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = evaluate.load(str(evaluation.METRIC_PATH))
    r = m.compute(predictions=["policy"] * 8 + ["reference"] * 2 + ["invalid"] * 3)
    assert (r["n"], r["wins"], r["losses"], r["invalid"], r["ci_method"]) == (10, 8, 2, 3, "wilson")
    assert r["win_rate"] == 0.8
    assert r["ci_low"] == pytest.approx(0.4902, abs=1e-4) and r["ci_high"] == pytest.approx(0.9433, abs=1e-4)
    t = m.compute(predictions=["policy", "tie", "reference", "reference"], probabilities=[0.9, 0.5, None, 0.1])
    assert t["win_rate"] == 0.375 and t["soft_win_rate"] == pytest.approx(0.5)
    assert m.compute(predictions=["invalid"])["win_rate"] is None


def settings(**kw):
    """The judge settings of an evaluate_judge config with `kw` set."""
    return evaluation.judge_settings(ej.EvalConfig(**kw), None)


def test_registry_factory_gets_the_settings_and_reads_its_options():
    @judges.register_judge("test-constant")
    def constant(s: judges.JudgeSettings) -> judges.Judge:
        j = judges.Judge()
        j.answer, j.seed = s.option("answer", "A"), s.seed
        j.judge_pair = lambda pair: judges.Judgment(j.answer)
        return j

    j = judges.get_judge("test-constant", settings(seed=3, judge_kwargs='{"answer": "B"}'))
    assert j.seed == 3 and j.answer == "B"
    assert judges.get_judge("test-constant", settings()).answer == "A"
    # a judge_kwargs option the judge does not read is an error naming the option and the judge, never dropped
    with pytest.raises(ValueError, match="judge 'test-constant' takes no option colour.*reads: answer"):
        judges.get_judge("test-constant", settings(judge_kwargs='{"answer": "B", "colour": 1}'))
    got = []
    j.judge_many([Pair("1", "p", "p", "a", "b")], lambda i, v: got.append((i, v.preferred)))
    assert got == [(0, "B")] and j.name == "test-constant"
    with pytest.raises(ValueError, match="unknown judge 'nope'.*openai.*reward-model"):
        judges.get_judge("nope", settings())
    with pytest.raises(ValueError, match="preferred"):
        judges.Judgment("coin-flip")


def test_cache_skips_torn_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "c.jsonl"
    c = judges.JudgmentCache(path)
    c.put("k1", judges.Judgment("A"))
    c.close()
    with open(path, "a") as f:
        f.write('{"key": "k2", "verdi')  # killed mid-write
    c = judges.JudgmentCache(path)
    assert "k1" in c and "k2" not in c and c.torn_lines == 1
    c.put("k2", judges.Judgment("B", p_a=0.1))
    c.close()
    c = judges.JudgmentCache(path)
    assert c.get("k2").preferred == "B" and c.get("k1").preferred == "A" and c.torn_lines == 1


def test_backoff_honours_retry_after_and_retries_5xx_and_timeouts():
    with FakeJudgeServer(marker=MARKER, api_key=SECRET, faults=["429", "500", "slow", "503"],
                         retry_after="7", slow_seconds=1.5) as s:
        j = OpenAIJudge(judge_model="m", base_url=s.base_url, request_timeout=0.4, max_retries=5,
                        backoff_base=1.0, backoff_max=60.0)
        slept = []

        async def record(d):
            slept.append(d)

        j._sleep = record
        out = []
        j.judge_many([Pair("1", "p", "post", f"x {MARKER}", "y")], lambda i, v: out.append(v))
    assert out[0].preferred == "A"
    assert slept[0] == 7.0  # Retry-After honoured exactly
    # exponential in the retry number (base 1 s, doubled), jittered into [d/2, d]
    assert 1.0 <= slept[1] <= 2.0 and 2.0 <= slept[2] <= 4.0 and 4.0 <= slept[3] <= 8.0
    assert len(slept) == 4 and j.requests_sent == 5
    assert s.statuses[429] == 1 and s.statuses[500] == 1 and s.statuses[503] == 1


def test_missing_key_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    data = make_dataset(tmp_path, 2)
    with pytest.raises(judges.JudgeError, match="OPENAI_API_KEY"):
        ej.main(config(tmp_path, None, data, [tmp_path / "no-model-here"]))
    assert not list((tmp_path / "out" / "generations").iterdir())


def test_custom_judge_gets_judge_kwargs(tmp_path):
    class Longer(judges.Judge):
        def __init__(self, prefer_longer: bool):
            self.prefer_longer = prefer_longer

        def judge_pair(self, pair):
            la, lb = len(pair.summary_a.split()), len(pair.summary_b.split())
            return judges.Judgment("tie" if la == lb else "A" if (la > lb) == self.prefer_longer else "B")

    judges.register_judge("test-longer")(lambda s: Longer(s.option("prefer_longer", True)))

    n = 4
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [1])
    write_generations(tmp_path / "out", "step_00000001", data, {0: "a b c d e", 1: "a b c", 2: "a", 3: "a b c d"})
    s = ej.main(config(tmp_path, None, data, [run], judge="test-longer", judge_kwargs='{"prefer_longer": false}'))
    r = s["checkpoints"][0]  # references have 3 words: shorter wins 1, tie 1, longer loses 2
    assert (r["wins"], r["ties"], r["losses"], r["win_rate"]) == (1, 1, 2, 1.5 / 4)
    with pytest.raises(ValueError, match="judge 'test-longer' takes no option colour"):
        ej.main(config(tmp_path, None, data, [run], judge="test-longer", judge_kwargs='{"colour": 1}'))


def test_non_retryable_error_is_reported_not_retried():
    with FakeJudgeServer(marker=MARKER, api_key="another-key") as s:
        j = OpenAIJudge(judge_model="m", base_url=s.base_url, max_retries=5, backoff_base=0.01)
        with pytest.raises(judges.JudgeError, match="HTTP 401") as e:
            j.judge_many([Pair("1", "p", "post", "a", "b")], lambda i, v: None)
        assert s.requests == 1 and SECRET not in str(e.value)


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------
def test_exact_win_rates_with_faults_then_rerun_sends_nothing(tmp_path, server, capsys, caplog):
    for name in ("openai", "httpx", "httpx2", "httpcore", "maxent_rlhf", "evaluate_judge"):
        caplog.set_level(logging.DEBUG, logger=name)
    n = 8
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [20, 10])
    out = tmp_path / "out"
    write_generations(out, "step_00000010", data, with_marker(n, {0, 1, 2}, "ten"))
    write_generations(out, "step_00000020", data, with_marker(n, {0, 1, 2, 3, 4, 5}, "twenty"))
    write_generations(out, "sft_baseline", data, with_marker(n, {7}, "sft"))
    server.faults = ["429", "500", "slow", "garbled", None, "503"]
    server.slow_seconds = 1.5
    cfg = config(tmp_path, server, data, [run], sft_model_name_or_path="not-loaded", request_timeout=0.5, plot=True)
    summary = ej.main(cfg)

    rows = summary["checkpoints"]
    assert [r["step"] for r in rows] == [10, 20]
    assert [r["win_rate"] for r in rows] == [3 / 8, 6 / 8]
    assert summary["baseline"]["win_rate"] == 1 / 8
    assert all(r["n"] == 8 and r["invalid"] == 0 for r in rows + [summary["baseline"]])
    assert rows[0]["mean_policy_tokens"] == 5 and rows[0]["mean_reference_tokens"] == 3
    lo, hi = judges_wilson(3, 8)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == pytest.approx((lo, hi)) and summary["ci_method"] == "wilson"
    # every pair judged exactly once despite 429/500/503/timeout/garbled faults
    assert len(server.judged) == 24 and set(server.judged.values()) == {1}
    assert server.statuses[429] == 1 and server.statuses[500] == 1 and server.auth_failures == 0
    assert json.loads((out / "summary.json").read_text())["checkpoints"][1]["win_rate"] == 0.75
    assert (out / "win_rate.png").stat().st_size > 1000
    first = capsys.readouterr()
    assert "24 to judge: 24 requests" in first.out and "95% CI (Wilson)" in first.out

    before = server.requests
    again = ej.main(cfg)
    assert server.requests == before, "a rerun must send no request"
    assert [r["win_rate"] for r in again["checkpoints"]] == [3 / 8, 6 / 8] and again["cached"] == 24
    second = capsys.readouterr()
    assert "0 to judge" in second.out
    assert_no_secret(tmp_path, first.out, first.err, second.out, second.err, caplog.text)


def judges_wilson(k, n):
    import importlib.util

    spec = importlib.util.spec_from_file_location("wr", evaluation.METRIC_PATH / "win_rate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.wilson_interval(k, n)


def test_order_randomisation_maps_back(tmp_path, server):
    """Neither summary has the marker: the server always answers A. The policy must then win exactly on
    the examples where the seeded hash put it in position A."""
    n = 16
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [5])
    write_generations(tmp_path / "out", "step_00000005", data, with_marker(n, set(), neutral=True))
    for seed in (1, 2):
        first = [evaluation.policy_first(seed, f"ex{i}") for i in range(n)]
        assert 0 < sum(first) < n  # both positions used
        s = ej.main(config(tmp_path, server, data, [run], seed=seed, output_dir=str(tmp_path / "out"),
                           cache_path=str(tmp_path / f"cache{seed}.jsonl")))
        assert s["checkpoints"][0]["wins"] == sum(first) and s["checkpoints"][0]["losses"] == n - sum(first)
        recs = [json.loads(l) for l in open(tmp_path / f"cache{seed}.jsonl")]
        assert {r["example_id"]: r["order"] == "policy_A" for r in recs} == {f"ex{i}": first[i] for i in range(n)}
    # and with the marker: the position does not matter any more
    write_generations(tmp_path / "out", "step_00000005", data, with_marker(n, set(range(n))))
    s = ej.main(config(tmp_path, server, data, [run]))
    assert s["checkpoints"][0]["win_rate"] == 1.0


def test_both_orders_always_a_judge_is_pure_position_bias(tmp_path, capsys):
    """A judge that always answers "A": 100% first-position preference, never consistent, and a 50%
    win rate once each order counts half, whatever the summaries (one order alone: the hash decides)."""
    n = 12
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [5])
    write_generations(tmp_path / "out", "step_00000005", data, with_marker(n, {0, 1, 2}))
    with FakeJudgeServer(api_key=SECRET, prefer="A") as srv:
        dry = ej.main(config(tmp_path, srv, data, [run], both_orders=True, dry_run=True))
        assert dry["pairs"] == dry["requests"] == 2 * n and srv.requests == 0  # both orders counted up front
        one = ej.main(config(tmp_path, srv, data, [run], dry_run=True))
        assert dry["estimated_tokens"] == pytest.approx(2 * one["estimated_tokens"], rel=0.05)
        s = ej.main(config(tmp_path, srv, data, [run], both_orders=True))
        r = s["checkpoints"][0]
        assert srv.requests == 2 * n and len(srv.judged) == 2 * n
        assert r["win_rate"] == 0.5 and r["n"] == n and (r["wins"], r["losses"]) == (n, n)
        assert r["first_position_rate"] == 1.0 and r["position_consistency"] == 0.0 and r["n_both_orders"] == n
        lo, hi = judges_wilson(n, n)
        assert (r["first_position_ci_low"], r["first_position_ci_high"]) == pytest.approx((lo, hi))
        assert (r["position_consistency_ci_low"], r["position_consistency_ci_high"]) == pytest.approx(judges_wilson(0, n))
        assert "first pos (95% CI)" in capsys.readouterr().out
        # a rerun sends nothing: the cache key covers the order
        before = srv.requests
        again = ej.main(config(tmp_path, srv, data, [run], both_orders=True))
        assert srv.requests == before and again["cached"] == 2 * n and again["checkpoints"][0]["win_rate"] == 0.5
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["both_orders"] is True and saved["judge_model"] == "fake-judge" and saved["seed"] == 1
    assert saved["template_version"] == judges.TEMPLATE_VERSION and saved["n_examples"] == n
    assert saved["dataset"] == str(data) and len(saved["examples_sha256"]) == 64
    assert saved["decoding"]["max_new_tokens"] == 53 and saved["judge_decoding"]["temperature"] == 0.0


def test_both_orders_length_judge_is_consistent(tmp_path):
    """A judge that always prefers the longer summary picks the same summary in both orders."""
    n = 10
    data = make_dataset(tmp_path, n)  # references have 3 words
    run = fake_run(tmp_path, [5])
    texts = {i: ("a much longer policy summary here" if i < 7 else "short") for i in range(n)}
    write_generations(tmp_path / "out", "step_00000005", data, texts)
    with FakeJudgeServer(api_key=SECRET, prefer="longer") as srv:
        r = ej.main(config(tmp_path, srv, data, [run], both_orders=True))["checkpoints"][0]
    assert r["position_consistency"] == 1.0 and r["first_position_rate"] == 0.5
    assert r["win_rate"] == 7 / 10 and (r["wins"], r["losses"]) == (14, 6)


def test_invalid_answers_are_counted_not_coin_flips(tmp_path, server):
    n = 8
    data = make_dataset(tmp_path, n, garbled={1, 4, 6})
    run = fake_run(tmp_path, [1])
    write_generations(tmp_path / "out", "step_00000001", data, with_marker(n, {0, 1, 2, 3}))
    s = ej.main(config(tmp_path, server, data, [run], parse_retries=2))
    r = s["checkpoints"][0]
    assert (r["invalid"], r["n"], r["wins"], r["losses"]) == (3, 5, 3, 2)  # 1 (a win) is invalid, not a win
    assert r["win_rate"] == 3 / 5
    assert server.requests == 5 + 3 * 3  # each invalid pair asked 1 + parse_retries times
    recs = [json.loads(l) for l in open(tmp_path / "out" / "judgments.jsonl")]
    bad = [x for x in recs if x["verdict"]["preferred"] == "invalid"]
    assert len(bad) == 3 and all(x["verdict"]["attempts"] == 3 for x in bad)


def test_logprobs_soft_win_rate(tmp_path):
    n = 6
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [1])
    write_generations(tmp_path / "out", "step_00000001", data, with_marker(n, {0, 1}))
    with FakeJudgeServer(marker=MARKER, api_key=SECRET, p_preferred=0.9) as s:
        out = ej.main(config(tmp_path, s, data, [run], logprobs=True))
    r = out["checkpoints"][0]
    assert r["win_rate"] == 2 / 6
    assert r["soft_win_rate"] == pytest.approx((2 * 0.9 + 4 * 0.1) / 6) and out["judge_id"].endswith("+logprobs")


def test_dry_run_and_max_requests(tmp_path, server, capsys):
    n = 8
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [1, 2])
    for label in ("step_00000001", "step_00000002"):
        write_generations(tmp_path / "out", label, data, with_marker(n, {0, 1}))
    # step 1 and step 2 generated the same summaries: the same pair is judged once for both
    dry = ej.main(config(tmp_path, server, data, [run], dry_run=True))
    assert dry == {"dry_run": True, "pairs": 16, "cached": 0, "requests": 8, "estimated_tokens": dry["estimated_tokens"]}
    assert dry["estimated_tokens"] > 8 * 60 and server.requests == 0
    capped = ej.main(config(tmp_path, server, data, [run], max_requests=3))
    assert server.requests == 3 and capped["incomplete"] and capped["checkpoints"][0]["n"] == 3
    assert "capped at --max_requests 3" in capsys.readouterr().out
    full = ej.main(config(tmp_path, server, data, [run]))
    assert server.requests == 8 and set(server.judged.values()) == {1} and not full["incomplete"]
    assert [r["win_rate"] for r in full["checkpoints"]] == [2 / 8, 2 / 8]


def test_server_down_stops_with_clear_error_keeping_judgments(tmp_path, server):
    n = 8
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [1])
    write_generations(tmp_path / "out", "step_00000001", data, with_marker(n, {0}))
    server.faults = lambda i, body: "503" if i >= 3 else None
    with pytest.raises(JudgeUnavailableError, match=r"kept failing.*HTTP 503.*3 judgments .*saved") as e:
        ej.main(config(tmp_path, server, data, [run], concurrency=1, max_retries=2))
    assert SECRET not in str(e.value)
    assert len((tmp_path / "out" / "judgments.jsonl").read_text().splitlines()) == 3
    server.faults = None  # the server is back: the rerun judges only the other 5
    s = ej.main(config(tmp_path, server, data, [run]))
    assert s["checkpoints"][0]["n"] == 8 and set(server.judged.values()) == {1} and len(server.judged) == 8
    # nothing listening at all: connection errors, retried, then the same clear error
    with pytest.raises(JudgeUnavailableError, match="connection error"):
        ej.main(config(tmp_path, None, data, [run], base_url="http://127.0.0.1:9/v1", max_retries=1,
                       cache_path=str(tmp_path / "other.jsonl")))


def test_killed_midway_then_restarted_judges_each_pair_once(tmp_path, server):
    n = 10
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [1])
    out = tmp_path / "out"
    write_generations(out, "step_00000001", data, with_marker(n, {0, 3, 5}))
    server.hold_after = 4  # the 5th request hangs: the process is killed with it in flight
    args = ["--output_dir", str(out), "--checkpoints", str(run), "--dataset_name", str(data), "--n", "0",
            "--judge_model", "fake-judge", "--base-url", server.base_url, "--concurrency", "1", "--plot", "false"]
    code = ("import sys, evaluate_judge as ej; from maxent_rlhf.config import parse_config; "
            "ej.main(parse_config(ej.EvalConfig, sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": SECRET}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while server.held == 0 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert server.held == 1, proc.communicate(timeout=5) if proc.poll() is not None else "no request held"
        proc.kill()
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (out / "judgments.jsonl").read_text().splitlines()
    assert len(lines) == 4 and sum(server.judged.values()) == 4  # everything answered was saved
    server.hold_after = None
    server.release.set()
    s = ej.main(config(tmp_path, server, data, [run]))
    assert len(server.judged) == n and set(server.judged.values()) == {1}  # each pair exactly once in total
    assert s["checkpoints"][0]["win_rate"] == 3 / n
    assert_no_secret(tmp_path, stdout.decode(), stderr.decode())


# --------------------------------------------------------------------------------------------------
# generation (tiny local model) + reward-model judge
# --------------------------------------------------------------------------------------------------
def _argmax_decode(model, tok, prompt, steps):
    import torch

    ids = tok(prompt, add_special_tokens=False).input_ids
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_greedy_generation_is_deterministic_and_reward_model_judge(tmp_path, tiny_policy_dir, tiny_reward_dir,
                                                                   monkeypatch):
    from maxent_rlhf.models import load_policy, load_tokenizer

    n = 4
    data = make_dataset(tmp_path, n)
    run = tmp_path / "tinyrun"
    for s in (3, 1):
        d = run / "checkpoints" / f"step_{s:08d}"
        shutil.copytree(tiny_policy_dir, d)
        (d / "trainer_state.json").write_text(json.dumps({"step": s}))
    common = dict(dataset_name=str(data), n=0, judge="reward-model", reward_model_name_or_path=tiny_reward_dir, max_new_tokens=10,
                  plot=False)
    # a run directory (all checkpoints, by step), batch size 1 / one checkpoint directory, batch size 3
    a = ej.main(ej.EvalConfig(output_dir=str(tmp_path / "a"), checkpoints=[str(run)], per_device_eval_batch_size=1, **common))
    b = ej.main(ej.EvalConfig(output_dir=str(tmp_path / "b"), checkpoints=[str(run / "checkpoints" / "step_00000001")],
                              per_device_eval_batch_size=3, **common))
    gens = lambda d, label: [json.loads(l)["generation"] for l in open(tmp_path / d / "generations" / f"{label}.jsonl")]
    assert [r["step"] for r in a["checkpoints"]] == [1, 3]
    assert gens("a", "step_00000001") == gens("b", "step_00000001") == gens("a", "step_00000003")
    # greedy: equals a step-by-step argmax decode without padding or KV cache
    tok, model = load_tokenizer(tiny_policy_dir), load_policy(tiny_policy_dir).eval()
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    assert gens("a", "step_00000001") == [_argmax_decode(model, tok, r["prompt"], 10) for r in rows]
    recs = [json.loads(l) for l in open(tmp_path / "a" / "generations" / "step_00000001.jsonl")]
    assert all(r["n_tokens"] <= 10 and r["reference_tokens"] == 3 for r in recs)
    # reward-model judge: scores recorded, outcome = higher score
    r = a["checkpoints"][0]
    assert r["n"] == n and r["mean_policy_score"] is not None and a["judge"] == "reward-model"
    assert r["win_rate"] == b["checkpoints"][0]["win_rate"]
    # a rerun skips existing generations without loading any model
    monkeypatch.setattr("maxent_rlhf.models.load_policy", lambda *a, **k: pytest.fail("model loaded again"))
    again = ej.main(ej.EvalConfig(output_dir=str(tmp_path / "a"), checkpoints=[str(run)], **common))
    assert again["checkpoints"][0]["win_rate"] == r["win_rate"]


def test_config_options_reach_the_judges_by_name(tmp_path):
    """From a YAML file and the command line to the judge's factory, field by field."""
    from maxent_rlhf.config import parse_config

    f = tmp_path / "eval.yaml"
    f.write_text("judge: openai\nconcurrency: 2\nbase_url: http://127.0.0.1:9/v1\n")
    c = parse_config(ej.EvalConfig, ["--config", str(f), "--request_timeout", "5", "--reward_model_name_or_path", "rm"])
    s = evaluation.judge_settings(c, c.reward_model_name_or_path, c.tokenizer_name_or_path)
    assert (s.concurrency, s.request_timeout, s.max_retries, s.reward_model_name_or_path) == (2, 5.0, 6, "rm")
    j = judges.get_judge(c.judge, s)
    assert (j.concurrency, j.timeout, j.max_retries, j.base_url) == (2, 5.0, 6, "http://127.0.0.1:9/v1")


def test_cache_path_directory_holds_the_cache_and_says_where(tmp_path, server, capsys):
    n = 2
    data = make_dataset(tmp_path, n)
    run = fake_run(tmp_path, [1])
    write_generations(tmp_path / "out", "step_00000001", data, with_marker(n, {0}))
    cache_dir = tmp_path / "caches"
    cache_dir.mkdir()
    s = ej.main(config(tmp_path, server, data, [run], cache_path=str(cache_dir)))
    assert s["checkpoints"][0]["win_rate"] == 0.5
    assert len((cache_dir / "judgments.jsonl").read_text().splitlines()) == n
    assert f"judgment cache: {cache_dir / 'judgments.jsonl'}" in capsys.readouterr().out
    assert not (tmp_path / "out" / "judgments.jsonl").exists()


def test_summary_records_the_hub_dataset_revision(tmp_path, server, monkeypatch):
    """A hub id is loaded at --dataset_revision and summary.json says which; a local dataset refuses one."""
    import datasets

    n = 4
    local = make_dataset(tmp_path, n)
    rows = [json.loads(l) for l in local.read_text().splitlines()]
    calls, real_load_dataset = [], datasets.load_dataset

    def fake_load_dataset(name, split=None, revision=None, **kw):  # the hub, offline
        calls.append((name, split, revision))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    run = fake_run(tmp_path, [1])
    write_generations(tmp_path / "out", "step_00000001", local, with_marker(n, {0}))
    s = ej.main(config(tmp_path, server, "someorg/tldr-like", [run], dataset_revision="abc123"))
    assert calls == [("someorg/tldr-like", "test", "abc123")]
    assert s["dataset"] == "someorg/tldr-like" and s["dataset_revision"] == "abc123"
    with pytest.raises(ValueError, match="dataset_revision"):  # outputs of another revision never mix
        ej.main(config(tmp_path, server, "someorg/tldr-like", [run]))
    write_generations(tmp_path / "out2", "step_00000001", local, with_marker(n, {0}))
    unpinned = ej.main(config(tmp_path, server, "someorg/tldr-like", [run], output_dir=str(tmp_path / "out2")))
    assert unpinned["dataset_revision"].startswith("unpinned")
    monkeypatch.setattr(datasets, "load_dataset", real_load_dataset)
    with pytest.raises(ValueError, match="revisions pin hub datasets only"):
        ej.main(config(tmp_path, server, local, [run], dataset_revision="abc123", output_dir=str(tmp_path / "out3")))
    write_generations(tmp_path / "out4", "step_00000001", local, with_marker(n, {0}))
    assert ej.main(config(tmp_path, server, local, [run], output_dir=str(tmp_path / "out4")))["dataset_revision"] is None


def test_openai_cache_identity_includes_the_server_but_no_credentials(monkeypatch):
    """Two OpenAI-compatible servers may serve different models under one name: their judgments never mix."""
    from maxent_rlhf.judges import OpenAIJudge

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    default = OpenAIJudge(judge_model="gpt-4o-mini").cache_id
    local = OpenAIJudge(judge_model="gpt-4o-mini", base_url="http://user:secret@127.0.0.1:8000/v1/").cache_id
    other = OpenAIJudge(judge_model="gpt-4o-mini", base_url="http://127.0.0.1:8001/v1").cache_id
    assert default == "openai/gpt-4o-mini"
    assert local == "openai/gpt-4o-mini@127.0.0.1:8000/v1"
    assert len({default, local, other}) == 3
    assert "secret" not in local and "user" not in local


# --------------------------------------------------------------------------------------------------
# keyed outputs, never mixed: another judge, template or prompt set never reuses judgments; the figure at 0% and 100%
# --------------------------------------------------------------------------------------------------
N = 40  # at 0/40 and 40/40 the Wilson bound lands ~1e-17 past the estimate (the crash seen)
WINNERS = {0, 1, 2}  # examples where the policy's summary has the word "good"; "bad" on the others


@pytest.fixture
def judge_setup(tmp_path):
    data = tmp_path / "test.jsonl"
    rows = [{"id": f"ex{i}", "prompt": f"SUBREDDIT: r/cats\n\nTITLE: t{i}\n\nPOST: my cat sat {i}\n\nTL;DR:",
             "completion": f" reference summary {i}"} for i in range(N)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = fake_run(tmp_path, [10])  # a run directory: all its checkpoints
    out = tmp_path / "out"
    gen = out / "generations" / "step_00000010.jsonl"
    gen.parent.mkdir(parents=True)
    with open(gen, "w") as f:
        for i, r in enumerate(rows):
            text = "the cat sat good" if i in WINNERS else "the cat sat bad"
            f.write(json.dumps({"id": r["id"], "generation": text, "n_tokens": 4, "reference_tokens": 3,
                                "prompt_sha": evaluation.prompt_hash(r["prompt"]), "max_new_tokens": 53}) + "\n")
    return data, ckpt, out


def judge_config(data, ckpt, out, server, **kw):
    base = dict(output_dir=str(out), checkpoints=[str(ckpt)], dataset_name=str(data), dataset_test_split="test", n=0,
                judge="openai", judge_model="judge-a", base_url=server.base_url, concurrency=2, request_timeout=5.0,
                max_retries=1, backoff_base=0.01, backoff_max=0.05, plot=False)
    base.update(kw)
    return ej.EvalConfig(**base)


def test_another_judge_model_or_template_never_reuses_judgments(judge_setup, monkeypatch):
    """Judge A prefers summaries with "good", judge B (another server) those with "bad". Sharing one
    output_dir and its cache, each judge's win rate is its own: B is asked every pair again, and A
    afterwards none. A new template version is asked every pair again too."""
    data, ckpt, out = judge_setup
    with FakeJudgeServer(marker="good", anti_marker="bad", api_key=SECRET) as a, \
            FakeJudgeServer(marker="bad", anti_marker="good", api_key=SECRET) as b:
        first = ej.main(judge_config(data, ckpt, out, a))
        assert first["checkpoints"][0]["win_rate"] == len(WINNERS) / N and first["judged_now"] == N
        second = ej.main(judge_config(data, ckpt, out, b, judge_model="judge-b"))
        assert second["judged_now"] == N and second["cached"] == 0 and len(b.judged) == N
        assert second["checkpoints"][0]["win_rate"] == (N - len(WINNERS)) / N
        requests_a = a.requests
        again = ej.main(judge_config(data, ckpt, out, a))
        assert a.requests == requests_a and again["cached"] == N
        assert again["checkpoints"][0]["win_rate"] == len(WINNERS) / N
        # same judge model name, new template: judged again (here by B's preferences), never read from A's
        from maxent_rlhf import evaluation, judges

        new_version = judges.TEMPLATE_VERSION + "-next"
        for module in (judges, evaluation, ej):  # every module holding the name (the key is built from it)
            if hasattr(module, "TEMPLATE_VERSION"):
                monkeypatch.setattr(module, "TEMPLATE_VERSION", new_version)
        requests_b = b.requests
        new_template = ej.main(judge_config(data, ckpt, out, b))
        assert new_template["judged_now"] == N and b.requests - requests_b == N
        assert new_template["checkpoints"][0]["win_rate"] == (N - len(WINNERS)) / N
    keys = [json.loads(l)["key"] for l in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(keys) == 3 * N == len(set(keys))


def test_judge_refuses_outputs_made_for_other_prompts(judge_setup):
    data, ckpt, out = judge_setup
    with FakeJudgeServer(api_key=SECRET) as server:
        ej.main(judge_config(data, ckpt, out, server))
        with pytest.raises(ConfigError, match=r"holds outputs made with `max_prompt_length` = 512 \(this run: 256\).*another output_dir"):
            ej.main(judge_config(data, ckpt, out, server, max_prompt_length=256))
        ej.main(judge_config(data, ckpt, out, server, concurrency=1))  # transport settings may change


def test_evaluate_judge_at_0_and_100_percent_win_rates_draws_its_figure(judge_setup):
    """The crash seen against a real server: the figure after judging, at a 0% or 100% win rate."""
    data, ckpt, out = judge_setup
    for judge_model, marker, anti, expected in (("judge-all", "cat", "reference", 1.0), ("judge-none", "reference", "cat", 0.0)):
        (out / "win_rate.png").unlink(missing_ok=True)
        with FakeJudgeServer(marker=marker, anti_marker=anti, api_key=SECRET) as server:
            summary = ej.main(judge_config(data, ckpt, out, server, judge_model=judge_model, plot=True))
        row = summary["checkpoints"][0]
        assert row["win_rate"] == expected and row["n"] == N
        assert row["ci_low"] <= row["win_rate"] + 1e-12 and row["ci_high"] >= row["win_rate"] - 1e-12
        assert (out / "win_rate.png").stat().st_size > 1000


def test_a_figure_that_fails_keeps_the_numbers(judge_setup, monkeypatch, capsys):
    data, ckpt, out = judge_setup

    def broken(*a, **k):
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(plotting, "plot_win_rates", broken)
    with FakeJudgeServer(marker="reference", anti_marker="cat", api_key=SECRET) as server:  # the policy never wins
        summary = ej.main(judge_config(data, ckpt, out, server, plot=True))
    captured = capsys.readouterr()
    assert json.loads((out / "summary.json").read_text())["checkpoints"][0]["win_rate"] == summary["checkpoints"][0]["win_rate"]
    assert "win rate" in captured.out  # the table was printed
    assert "WARNING" in captured.err and "win_rate.png was not drawn" in captured.err and "summary.json" in captured.err
