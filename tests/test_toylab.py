"""Toy lab: gold judge known answers, deterministic data, the artifact cache, and a shortened pipeline
through the project's scripts (profile `test`: seconds-long stages, cache under tmp_path); the length
channel and the report's pre-registration machinery. The report's verdict rules: test_toylab_claims.py."""
from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

from maxent_rlhf.config import ConfigError, load_yaml
from maxent_rlhf.toylab import build, cache, rules, sweep, task
from helpers.toylab_runs import fake_sweep_run

REPO = Path(__file__).resolve().parents[1]

POST = task.format_prompt(
    "relationships",
    "my girlfriend and my texts",
    "so this is about my girlfriend . lately my girlfriend ignores my texts all the time . "
    "my roommate is busy though . we bought the phone last week . honestly i feel angry . need advice .",
)
PERFECT = "my girlfriend ignores my texts and i feel angry"


# --------------------------------------------------------------------------------------------------
# the gold judge
# --------------------------------------------------------------------------------------------------
def test_extract_facts_from_prompt():
    assert task.extract_facts(POST) == {"who": "girlfriend", "action": "ignores", "object": "texts", "feeling": "angry"}


@pytest.mark.parametrize(
    "summary, expected",
    [
        (PERFECT, 4.0),  # every fact, 9 tokens, nothing else
        ("my girlfriend ignores my texts", 3.0),  # the feeling is missing
        ("", 0.0),
        ("my roommate ignores my texts and i feel angry", 3.0 - 0.5),  # wrong person: a distractor from the post
        ("my girlfriend ignores my texts and i feel angry pizza", 4.0 - 1.0),  # hallucinated word
        ("my girlfriend ignores my texts and i feel angry angry", 4.0 - 1.0),  # repetition
        # 16 tokens: 4 over the budget of 12 -> -2; "phone" distractor -0.5; "girlfriend" repeated -1
        ("my girlfriend ignores my texts and my phone and my girlfriend so i feel very angry", 4.0 - 2.0 - 0.5 - 1.0),
    ],
)
def test_gold_score_known_answers(summary, expected):
    assert task.gold_score(summary, POST) == pytest.approx(expected)


def test_gold_breakdown_counts():
    b = task.gold_breakdown("my girlfriend ignores my texts and my phone and my girlfriend so i feel very angry", POST)
    assert (b.facts_hit, b.length, b.over_budget, b.repeats, b.distractor_words, b.hallucinated_words) == (4, 16, 4, 1, 1, 0)


def test_gold_preference_and_judge_registration():
    assert task.gold_preference(PERFECT, "my girlfriend ignores my texts", POST) == 1.0
    assert task.gold_preference("my girlfriend ignores my texts", PERFECT, POST) == 0.0
    assert task.gold_preference(PERFECT, "my girlfriend ignores my texts , i feel angry", POST) == 0.5  # equal scores

    from evaluate_judge import EvalConfig
    from maxent_rlhf.evaluation import judge_settings
    from maxent_rlhf.judges import Pair, get_judge, post_from_prompt

    # found through the toy lab's entry point: this module imports no toy-lab judge code
    judge = get_judge("toy-gold", judge_settings(EvalConfig(seed=3, max_prompt_length=100), None))
    with pytest.raises(ValueError, match="judge 'toy-gold' takes no option tolerance"):
        get_judge("toy-gold", judge_settings(EvalConfig(judge_kwargs='{"tolerance": 0.1}'), None))
    pairs = [
        Pair("a", POST, post_from_prompt(POST), PERFECT, "my girlfriend ignores my texts"),
        Pair("b", POST, post_from_prompt(POST), "my roommate hates my phone", PERFECT),
        Pair("c", POST, post_from_prompt(POST), PERFECT, PERFECT),
        Pair("d", "not a toy post", "x", PERFECT, PERFECT),
    ]
    got = {}
    judge.judge_many(pairs, lambda i, v: got.__setitem__(i, v))
    assert [got[i].preferred for i in range(4)] == ["A", "B", "tie", "invalid"]
    assert got[0].scores == (4.0, 3.0)


def test_references_and_generated_posts_are_consistent():
    posts = task.generate_posts(300, seed=5)
    vocab = set(task.vocabulary())
    kinds = {"short": 0, "detail": 0, "full": 0}
    for p in posts:
        assert task.extract_facts(p.prompt) == p.facts  # the judge recovers the facts from the prompt alone
        assert set((p.prompt + " " + p.reference).split()) <= vocab
        assert task.gold_score(task.key_summary(p.facts), p.prompt) == 4.0
        s = task.gold_score(p.reference, p.prompt)
        kinds["short" if s == 3.0 else "detail" if s == 3.5 else "full"] += 1
        assert s in (3.0, 3.5, 4.0)
    # the reference mix the win rates depend on: mostly short, some with a detail, the rest ideal
    assert kinds["short"] > kinds["full"] > 0 and kinds["detail"] > 0


# --------------------------------------------------------------------------------------------------
# deterministic data
# --------------------------------------------------------------------------------------------------
def test_generator_is_deterministic_per_seed():
    a, b, c = task.generate_posts(50, 7), task.generate_posts(50, 7), task.generate_posts(50, 8)
    assert [(p.prompt, p.reference) for p in a] == [(p.prompt, p.reference) for p in b]
    assert [p.prompt for p in a] != [p.prompt for p in c]


def test_data_artifacts_are_byte_identical_across_builds(tmp_path):
    d1 = build.ensure_artifact("test/sft_data", tmp_path / "c1")
    d2 = build.ensure_artifact("test/sft_data", tmp_path / "c2")
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes()
    rows = build.read_jsonl(d1 / "train.jsonl")
    assert len(rows) == build.PROFILES["test"]["task"]["n_sft_train"]
    assert rows[0]["prompt"].startswith("SUBREDDIT: r/") and rows[0]["prompt"].endswith("TL;DR:")


# --------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------
def _built_at(path: Path) -> float:
    return json.loads((path / cache.MANIFEST).read_text())["built_at"]


def test_partial_and_corrupted_artifacts_are_rebuilt(tmp_path, capsys):
    root = tmp_path / "cache"
    tok = build.ensure_artifact("test/tokenizer", root)
    first = _built_at(tok)
    assert build.ensure_artifact("test/tokenizer", root) == tok and _built_at(tok) == first  # reused

    # a build killed before its manifest: no manifest -> rebuilt, never used
    (tok / cache.MANIFEST).unlink()
    assert "no manifest" in cache.check_artifact(tok, build.recipe_hash("test", "tokenizer"))
    build.ensure_artifact("test/tokenizer", root)
    assert "no manifest" in capsys.readouterr().out and _built_at(tok) != first

    # a file edited / truncated after the build -> checksum or size mismatch -> rebuilt
    f = next(p for p in tok.iterdir() if p.name.endswith(".json") and p.name != cache.MANIFEST)
    f.write_text(f.read_text()[:-5])
    assert "size" in cache.check_artifact(tok, build.recipe_hash("test", "tokenizer"))
    build.ensure_artifact("test/tokenizer", root)
    assert cache.check_artifact(tok, build.recipe_hash("test", "tokenizer")) is None
    same_size = bytearray(f.read_bytes())
    same_size[10] = ord("#") if same_size[10] != ord("#") else ord("$")
    f.write_bytes(bytes(same_size))
    assert "checksum" in cache.check_artifact(tok, build.recipe_hash("test", "tokenizer"))


def test_recipe_change_rebuilds_downstream(monkeypatch):
    before = {a: build.recipe_hash("test", a) for a in build.ARTIFACTS}
    monkeypatch.setitem(build.PROFILES["test"]["sft"], "max_steps", 5)
    after = {a: build.recipe_hash("test", a) for a in build.ARTIFACTS}
    changed = {a for a in build.ARTIFACTS if before[a] != after[a]}
    assert changed == {"sft", "pairs", "reward"}


def test_kill_during_build_is_detected_and_rebuilt(tmp_path):
    """SIGKILL a process in the middle of a build: the half-written artifact is never used."""
    root = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import time
        from maxent_rlhf.toylab import build
        real = build.BUILDERS["prompts"]
        def slow(out, prof, deps):
            real(out, prof, deps)          # every file written ...
            (out / "STARTED").write_text("x")
            time.sleep(60)                 # ... but killed before the manifest
        build.BUILDERS["prompts"] = slow
        build.ensure_artifact("test/prompts", {str(root)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.time() + 60
    while not list((root / "test").glob(".build-prompts-*/STARTED")):
        assert time.time() < deadline and proc.poll() is None, "the build never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    art = root / "test" / "prompts"
    assert cache.check_artifact(art, build.recipe_hash("test", "prompts")) is not None  # not usable
    path = build.ensure_artifact("test/prompts", root)  # the dead process's lock is gone: rebuild
    assert cache.check_artifact(path, build.recipe_hash("test", "prompts")) is None
    assert not list((root / "test").glob(".build-prompts-*"))  # the killed build's leftovers are cleaned


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real = build.BUILDERS["sft_data"]

    def slow(out, prof, deps):
        calls.append(1)
        time.sleep(0.5)
        real(out, prof, deps)

    monkeypatch.setitem(build.BUILDERS, "sft_data", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(build.ensure_artifact("test/sft_data", tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown toy-lab artifact 'sfft'"):
        build.split_name("sfft")
    with pytest.raises(ValueError, match="unknown toy-lab profile"):
        build.split_name("huge/sft")


# --------------------------------------------------------------------------------------------------
# the shortened pipeline through the scripts
# --------------------------------------------------------------------------------------------------
def test_short_pipeline_end_to_end_and_reuse(tmp_path, monkeypatch, capfd):
    # capfd, not capsys: after another test set up accelerate in this process, artifacts are built in a
    # subprocess (toylab._inside_running_script) whose output reaches the file descriptor only
    monkeypatch.setenv("MAXENT_RLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAXENT_RLHF_TOYLAB_PROFILE", "test")
    from maxent_rlhf.toylab import ensure_artifact, sweep

    # SFT (train_offline.py --loss_type sft) -> pairs sampled from the SFT policy -> reward model
    # (--loss_type reward), the scripts run as subprocesses, from a `toylab://` location as a script reads it
    import torch

    from maxent_rlhf.artifacts import resolve_path

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    reward = Path(resolve_path("toylab://reward"))
    assert torch.equal(torch.rand(3), expected)  # building inside a program left its random stream alone
    out = capfd.readouterr().out
    for name in ("tokenizer", "sft_data", "sft", "pairs", "reward"):
        assert f"building {name}" in out
    assert "train_offline.py --loss_type sft" in out  # the command a user would type
    pairs = build.read_jsonl(tmp_path / "cache" / "test" / "pairs" / "train.jsonl")
    assert pairs and all(p["gold_chosen"] != p["gold_rejected"] for p in pairs)
    from maxent_rlhf.models import load_reward_model

    assert load_reward_model(str(reward)).config.num_labels == 1  # loadable as train_rloo loads it
    acc = json.loads((reward / "heldout_accuracy.json").read_text())
    assert 0.0 <= acc["accuracy_vs_labels"] <= 1.0

    # RLOO (train_rloo.main) on toylab:// locations, then evaluate_judge.main with the gold judge and proxy
    run = sweep.run_rloo(tmp_path / "run", "maxent", 1e-3, seed=1, iterations=2,
                         extra={"global_batch_size": 16, "per_device_train_batch_size": 16, "local_rollout_forward_batch_size": 16,
                                "save_steps": 1, "response_length": 8})
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/win_rate" in m]  # configs/toy/*: gold win rate during training too
    metrics = [m for m in metrics if "objective/scores" in m]
    assert len(metrics) == 2 and "objective/entropy_bonus" in metrics[0] and [m["step"] for m in evals] == [0, 2]
    res = sweep.evaluate_run(run, n=8)
    assert [r["step"] for r in res["gold"]["checkpoints"]] == [1, 2]
    assert res["gold"]["baseline"]["n"] == 8 and res["gold"]["judge"] == "toy-gold"
    # judged in both orders: toy-gold scores each summary on its own, so it is consistent by construction
    assert res["gold"]["both_orders"] and res["gold"]["baseline"]["n_both_orders"] == 8
    assert all(r["position_consistency"] == 1.0 and r["first_position_rate"] == 0.5
               for r in res["gold"]["checkpoints"] + [res["gold"]["baseline"]])
    assert res["proxy"]["checkpoints"][0]["mean_policy_score"] is not None

    # a second invocation reuses every cached artifact (no builder runs)
    capfd.readouterr()
    for art in build.ARTIFACTS:
        monkeypatch.setitem(build.BUILDERS, art, lambda *a, **k: pytest.fail("rebuilt a cached artifact"))
    assert ensure_artifact("reward") == reward
    assert "building" not in capfd.readouterr().out

    # the report module reads the run directories
    from maxent_rlhf import plotting
    from maxent_rlhf.toylab.report import analyse

    s = analyse(plotting.load_run(run))
    assert s["steps"] == [0, 1, 2] and s["sft"] is not None


def test_toy_configs_parse_with_the_scripts_config_classes():
    from maxent_rlhf.config import parse_config

    classes = {"dpo": ("train_offline", "OfflineConfig"), "simpo": ("train_offline", "OfflineConfig"),
               "eval": ("evaluate_judge", "EvalConfig")}
    files = sorted((REPO / "configs" / "toy").glob("*.yaml"))
    assert {"maxent", "kl", "none", "minent", "entropy", "overopt", "online_simpo", "online_dpo"} <= {f.stem for f in files}
    for f in files:
        # a config run by train_online.py says so on its first line (`# script: train_online.py`)
        online = f.read_text().startswith("# script: train_online.py")
        script, cls = ("train_online", "OnlineConfig") if online else classes.get(f.stem, ("train_rloo", "RLOOConfig"))
        c = parse_config(getattr(importlib.import_module(script), cls), ["--config", str(f)])
        locations = [v for v in vars(c).values() if isinstance(v, str) and v.startswith("toylab://")]
        assert locations, f"{f.name} names no toylab:// artifact"
        for loc in locations:
            build.split_name(loc[len("toylab://"):])  # every named artifact exists


# --------------------------------------------------------------------------------------------------
# how the toy lab finds and runs the scripts
# --------------------------------------------------------------------------------------------------
def test_scripts_are_found_next_to_the_package_or_through_the_environment(tmp_path, monkeypatch):
    from maxent_rlhf.toylab import scripts

    monkeypatch.delenv(scripts.ENV_SCRIPTS, raising=False)
    assert scripts.scripts_dir() == REPO  # a clone (editable install / PYTHONPATH)
    site = tmp_path / "site-packages"  # a non-editable install: nothing next to the package
    site.mkdir()
    with pytest.raises(FileNotFoundError, match="not part of the installed package.*MAXENT_RLHF_SCRIPTS"):
        scripts.scripts_dir(package_parent=site)
    monkeypatch.setenv(scripts.ENV_SCRIPTS, str(REPO))
    assert scripts.scripts_dir(package_parent=site) == REPO
    monkeypatch.setenv(scripts.ENV_SCRIPTS, str(site))
    with pytest.raises(FileNotFoundError, match="does not hold train_offline.py"):
        scripts.scripts_dir()


def test_script_command_gives_the_script_exactly_these_options():
    """The command line the toy lab runs parses into the config the options say (floats, bools, None, lists)."""
    import train_offline

    from maxent_rlhf.config import config_from_dict, parse_config
    from maxent_rlhf.toylab import scripts

    options = dict(build.OFFLINE_COMMON, loss_type="dpo", model_name_or_path="toylab://sft", dataset_name="toylab://pairs",
                   learning_rate=3e-4, beta=0.1, seed=7, gradient_checkpointing=True, dataset_test_split=None,
                   output_dir="/tmp/x")
    cmd = scripts.script_command("train_offline.py", scripts.toy_config("dpo"), **options)
    assert cmd[1] == str(REPO / "train_offline.py") and cmd[2:4] == ["--config", str(REPO / "configs/toy/dpo.yaml")]
    parsed = parse_config(train_offline.OfflineConfig, cmd[2:])
    from maxent_rlhf.config import load_yaml

    expected = config_from_dict(train_offline.OfflineConfig, {**load_yaml(REPO / "configs/toy/dpo.yaml"), **options})
    assert parsed == expected and parsed.learning_rate == 3e-4 and parsed.dataset_test_split is None


def test_scripts_run_alone_not_as_ranks_of_the_callers_launch(monkeypatch):
    from maxent_rlhf.toylab import scripts

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = scripts.clean_env()
    assert "WORLD_SIZE" not in env and "ACCELERATE_USE_CPU" not in env and env["HF_HUB_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "1"


def test_a_logged_run_writes_its_output_to_the_log_and_a_failure_shows_its_last_lines(tmp_path, capsys):
    """Artifact builds send a script's output (progress bars, its closing summary) to a log file, so the
    caller's own output stays readable; a failure still shows the end of that output and names the log."""
    from maxent_rlhf.toylab import scripts

    log = tmp_path / "sub" / "train.log"
    # the text is assembled at run time, so the command line the caller prints does not contain it
    scripts.run_subprocess([sys.executable, "-c", "print('step', 1); print('summary:', 'verdict n/a')"], "build", log)
    out = capsys.readouterr().out
    assert "summary: verdict n/a" not in out and "step 1" not in out and "build done" in out
    assert log.read_text().splitlines() == ["step 1", "summary: verdict n/a"]
    failing = [sys.executable, "-c", "import sys; print('\\n'.join(f'line {i}' for i in range(40))); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=f"exit status 3; its output is in {log}"):
        scripts.run_subprocess(failing, "build", log)
    err = capsys.readouterr().err
    assert "line 39" in err and "line 20" in err and "line 19" not in err  # the last 20 lines


# ==================================================================================================
# The toy lab's length channel (build profile `length`, configs/toy/length_*.yaml, the sweep's conditions)
# and the report's pre-registration machinery (provenance, the KL figure's outlier check, the task ceiling).
# ==================================================================================================
GENERATED_POST = task.generate_posts(1, seed=0)[0]


def test_the_labeller_adds_its_length_taste_to_the_gold_score():
    ideal = task.key_summary(GENERATED_POST.facts)  # 9 tokens, 4 facts
    assert (task.labeller_score(ideal, GENERATED_POST.prompt, GENERATED_POST.facts)
            == task.gold_score(ideal, GENERATED_POST.prompt, GENERATED_POST.facts) == 4.0)
    assert task.labeller_score(ideal, GENERATED_POST.prompt, GENERATED_POST.facts, 0.25) == pytest.approx(4.0 + 0.25 * 9)
    # two free function words: the gold judge is indifferent (within its 12-token budget), the labeller is not
    padded = ideal.replace(" i feel ", " i feel so very ")
    assert task.gold_score(padded, GENERATED_POST.prompt, GENERATED_POST.facts) == 4.0
    assert task.labeller_score(padded, GENERATED_POST.prompt, GENERATED_POST.facts, 0.25) == pytest.approx(4.0 + 0.25 * 11)
    # beyond the budget gold takes 0.5 per token, the labeller's 0.25 does not make up for it
    long = padded + " so very very so"
    assert task.gold_score(long, GENERATED_POST.prompt, GENERATED_POST.facts) == 4.0 - 0.5 * 3
    assert (task.labeller_score(long, GENERATED_POST.prompt, GENERATED_POST.facts, 0.25)
            < task.labeller_score(padded, GENERATED_POST.prompt, GENERATED_POST.facts, 0.25))


def test_the_length_profile_shares_the_sft_policy_and_changes_only_the_labels():
    for art in ("tokenizer", "sft_data", "prompts", "sft"):
        assert build.owner("length", art) == "default"
        assert build.recipe_hash("length", art) == build.recipe_hash("default", art)
    assert build.owner("length", "pairs") == "length"
    assert build.recipe_hash("length", "pairs") != build.recipe_hash("default", "pairs")
    assert build.recipe_hash("length", "reward") != build.recipe_hash("default", "reward")
    # the main toy's recipes (and so its cached artifacts) are untouched
    assert "label_length_bias" not in build.PROFILES["default"]["pairs"]
    assert build.PROFILES["default"]["pairs"]["bt_temperature"] == 0.5


def test_a_shared_artifact_is_built_once_in_its_owner_profile(tmp_path, monkeypatch):
    calls = []

    def fake_tokenizer(out, prof, deps):
        calls.append(out)
        (out / "vocab.txt").write_text("x")

    monkeypatch.setitem(build.BUILDERS, "tokenizer", fake_tokenizer)
    a = build.ensure_artifact("length/tokenizer", tmp_path)
    b = build.ensure_artifact("default/tokenizer", tmp_path)
    assert a == b == tmp_path / "default" / "tokenizer" and len(calls) == 1
    assert not (tmp_path / "length" / "tokenizer").exists()


def test_length_configs_point_at_the_length_profile_with_room_to_grow():
    for name, normalise in (("length_maxent", True), ("length_entropy", False)):
        c = load_yaml(REPO / "configs" / "toy" / f"{name}.yaml")
        main = load_yaml(REPO / "configs" / "toy" / f"{name.split('_')[1]}.yaml")
        assert c["reward_model_name_or_path"] == "toylab://length/reward" and c["model_name_or_path"] == "toylab://length/sft"
        assert c["response_length"] == c["max_new_tokens"] == sweep.LENGTH_TOKENS > main["response_length"]
        assert c["length_normalize"] is normalise and c["entropy_coef"] == main["entropy_coef"]
        same = {k for k in main if k not in ("response_length", "max_new_tokens", "output_dir", "learning_rate")
                and "name_or_path" not in k and "dataset_name" not in k}
        assert {k: c[k] for k in same} == {k: main[k] for k in same}


def test_the_sweep_conditions_fit_the_budget_and_hooks_wait_for_their_configs():
    names = [r[0] for c in sweep.CONDITIONS for r in c.runs()]
    assert len(names) == len(set(names))
    enabled = {c.name for c in sweep.CONDITIONS if c.enabled()}
    assert {"length_maxent", "length_entropy", "length_simpo_norm", "length_simpo_plain"} <= enabled
    hooks = {"lora_r2_kl", "lora_r2_maxent", "online_simpo", "online_dpo"}
    for c in sweep.CONDITIONS:
        if c.name in hooks:
            assert c.enabled() == (REPO / "configs" / "toy" / f"{c.config}.yaml").exists()
    est = sweep.estimate_minutes(len(sweep.rloo_plan()), len(sweep.offline_plan()))  # hooks counted, enabled or not
    assert est["total"] <= sweep.BUDGET_MINUTES
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    # the SimPO pair differs only in the length normalisation (and beta rescaled for the summed log-prob)
    norm, plain = (next(c for c in sweep.CONDITIONS if c.name == n) for n in ("length_simpo_norm", "length_simpo_plain"))
    assert norm.options["length_normalize"] and not plain.options["length_normalize"]
    assert {k: v for k, v in norm.options.items() if k not in ("beta", "length_normalize")} == \
        {k: v for k, v in plain.options.items() if k not in ("beta", "length_normalize")}


def test_provenance_names_the_code_and_the_rules():
    p = sweep.provenance()
    assert p["rules_sha256"] == rules.rules_sha256() and len(p["rules_sha256"]) == 64
    assert p["code_commit"] is None or len(p["code_commit"]) == 40


def test_a_run_records_the_code_it_started_with_not_the_code_at_its_end(tmp_path, monkeypatch):
    """A commit (or an edit) made while a sweep runs must not relabel the run in progress."""
    monkeypatch.setattr(sweep, "provenance", lambda: {"code_commit": "a" * 40, "code_dirty": False})

    def fake_script(script, config, **options):  # the run: the code changes while it trains
        Path(options["output_dir"]).mkdir(parents=True)
        monkeypatch.setattr(sweep, "provenance", lambda: {"code_commit": "b" * 40, "code_dirty": True})

    monkeypatch.setattr(sweep, "run_script", fake_script)
    out = sweep.run_offline(tmp_path / "simpo_lr1e-3", "simpo", 1e-3)
    done = json.loads((out / "DONE.json").read_text())
    assert done["code_commit"] == "a" * 40 and done["code_dirty"] is False


def _run_dir(root: Path, name: str, config: dict, win: list, info: dict, **kw) -> Path:
    return fake_sweep_run(root, name, config, win, info=info, **kw)


def test_the_report_refuses_runs_of_different_code_unless_told(tmp_path, monkeypatch):
    from maxent_rlhf.toylab.report import ENV_ALLOW_MIXED, write_report

    monkeypatch.setenv("MAXENT_RLHF_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.delenv(ENV_ALLOW_MIXED, raising=False)
    sw = tmp_path / "sweep"
    same = {"rules_sha256": rules.rules_sha256(), "code_dirty": False}
    _run_dir(sw / "rloo", "kl_lr1e-3_s1", {"regularizer": "kl", "learning_rate": 1e-3}, [0.3, 0.8, 0.8],
             {"regularizer": "kl", "code_commit": "a" * 40, **same})
    _run_dir(sw / "rloo", "kl_lr1e-3_s2", {"regularizer": "kl", "learning_rate": 1e-3}, [0.3, 0.8, 0.8],
             {"regularizer": "kl", "code_commit": "b" * 40, **same})
    with pytest.raises(ConfigError, match=f"mixes runs of 2 code/rules versions.*{ENV_ALLOW_MIXED}=1"):
        write_report(sw, tmp_path / "report")
    assert not (tmp_path / "report" / "report.md").exists()
    text = write_report(sw, tmp_path / "report", allow_mixed_code=True).read_text()
    assert "**Mixed provenance**" in text and "code aaaaaaaaaa" in text and "code bbbbbbbbbb" in text
    monkeypatch.setenv(ENV_ALLOW_MIXED, "1")
    assert "**Mixed provenance**" in write_report(sw, tmp_path / "report").read_text()
    (sw / "rloo" / "kl_lr1e-3_s2" / "DONE.json").write_text(json.dumps({"regularizer": "kl", "code_commit": "a" * 40, **same}))
    text = write_report(sw, tmp_path / "report", allow_mixed_code=False).read_text()
    assert "every run was made by code aaaaaaaaaa, rules" in text and "(this checkout)" in text


def test_the_report_judges_the_length_channel_from_run_directories(tmp_path, monkeypatch):
    from maxent_rlhf.toylab import report

    sw = tmp_path / "sweep"
    info = {"rules_sha256": rules.rules_sha256()}
    for name, reg, grow in (("length_maxent", "length_maxent", 0.5), ("length_entropy", "length_entropy", 6.0)):
        for seed in (1, 2):
            _run_dir(sw / "length" / "rloo", f"{name}_lr1e-4_s{seed}", {"regularizer": "entropy", "learning_rate": 1e-4},
                     [0.3, 0.8, 0.5], {**info, "regularizer": reg}, tokens=[9.0, 10.0, 9.0 + grow], proxy=[0.0, 1.0, 1.5])
    for name, norm, grow in (("length_simpo_norm_lr1e-4_s1", True, 0.0), ("length_simpo_plain_lr1e-4_s1", False, 8.0)):
        _run_dir(sw / "length" / "offline", name, {"loss_type": "simpo", "learning_rate": 1e-4, "length_normalize": norm,
                                                   "simpo_gamma": 0.5}, [0.3, 0.8, 0.6], info, tokens=[9.0, 9.0, 9.0 + grow])
    rm = {"n": 100, "accuracy_vs_labels": 0.8, "accuracy_vs_gold": 0.8, "n_length_differs": 90,
          "rm_prefers_longer": 0.9, "gold_prefers_longer": 0.6}
    length = {"rloo": report._load(sw / "length" / "rloo"), "offline": report._load(sw / "length" / "offline")}
    rows = dict((r.split(" | ")[0].strip("| "), r.split(" | ")[-1].strip(" |"))
                for r in report.claims_table([], {}, [], length=length, length_rm=rm) if r.startswith("| 1"))
    assert rows["15"] == "agrees" and rows["16"] == "agrees"
    rows = dict((r.split(" | ")[0].strip("| "), r.split(" | ")[-1].strip(" |"))
                for r in report.claims_table([], {}, [], length=length, length_rm={**rm, "rm_prefers_longer": 0.62})
                if r.startswith("| 1"))
    assert rows["15"].startswith("not testable here") and rows["16"].startswith("not testable here")
    text = "\n".join(report.length_section(length, rm, {"labels_prefer_longer": 0.9}))
    assert "| length_entropy_lr1e-4_s1 | 0.0001 | 30% | 80% (10) | 50% | improves, then declines | 1.00 -> 1.50 | yes | 9.0 -> 15.0 |" in text
    assert "prefers the longer summary in 90%, the gold judge in 60%; its labels prefer the longer in 90%" in text
    # the whole report: the length runs' SFT baseline in the requirements table, their rows, claims 15-16
    monkeypatch.setenv("MAXENT_RLHF_CACHE", str(tmp_path / "no-cache"))
    for d in (sw / "length" / "rloo").iterdir():
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "max_new_tokens": 24}))
    text = report.write_report(sw, tmp_path / "report").read_text()
    assert "| length channel: SFT policy gold win rate (24 new tokens) | 15-50% | 30.0% | yes |" in text
    assert "## The length channel" in text and "| 15 | 3.3 (Eq. 7)" in text


def test_the_report_judges_h1_to_h3_from_run_directories_reused_runs_included(tmp_path, monkeypatch):
    """The pairwise section reads pairwise/{offline,online} and the main grid's maxent runs, resolves sweep.json's
    reused runs (one offline SimPO cell here lives only in offline/), and its verdicts follow the runs both ways."""
    from maxent_rlhf.toylab import report

    monkeypatch.setenv("MAXENT_RLHF_CACHE", str(tmp_path / "no-cache"))
    info = {"rules_sha256": rules.rules_sha256()}
    stable, overopt = ([0.3, 0.8, 0.8], [0.0, 1.0, 1.1]), ([0.3, 0.8, 0.1], [0.0, 1.0, 3.0])
    lr = rules.PAIRWISE_LRS[-1]

    def sweep_dir(root, online_simpo_curve):
        sw = root / "sweep"
        reused = {}
        for seed in (1, 2, 3):
            run = f"_lr{sweep.lr_tag(lr)}_s{seed}"
            for cond, gamma in (("pairwise_offline_simpo", rules.PAIRWISE_GAMMA), ("pairwise_offline_simpo_gamma0", 0.0)):
                cfg = {"loss_type": "simpo", "learning_rate": lr, "simpo_gamma": gamma, "seed": seed}
                if seed == 1 and gamma == 0.0:  # the main grid has it: the sweep did not run it again
                    fake_sweep_run(sw / "offline", "simpo_g0", cfg, stable[0], info=info, proxy=stable[1])
                    reused[f"pairwise/offline/{cond}{run}"] = "offline/simpo_g0"
                else:
                    fake_sweep_run(sw / "pairwise" / "offline", cond + run, cfg, stable[0], info=info, proxy=stable[1])
            for cond, gamma, (win, proxy) in (("online_simpo", rules.PAIRWISE_GAMMA, online_simpo_curve),
                                              ("online_simpo_gamma0", 0.0, overopt)):
                fake_sweep_run(sw / "pairwise" / "online", cond + run, {"loss_type": "simpo", "learning_rate": lr,
                               "simpo_gamma": gamma, "seed": seed}, win, info=info, proxy=proxy,
                               metrics=[{"step": 1, "rewards/accuracies": 0.75, "rewards/margins": 2.0}])
            fake_sweep_run(sw / "rloo", f"maxent{run}", {"regularizer": "entropy", "learning_rate": lr, "seed": seed},
                           overopt[0], info={**info, "regularizer": "maxent"}, proxy=overopt[1])
        (sw / "sweep.json").write_text(json.dumps({"reused_runs": reused}))
        return sw

    text = report.write_report(sweep_dir(tmp_path / "a", overopt), tmp_path / "a" / "report").read_text()
    assert "## Dataset constraint or margin?" in text
    assert "pairwise_offline_simpo_gamma0_lr1e-3_s1 = offline/simpo_g0" in text
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ")[-1].strip(" |") for r in text.splitlines() if r.startswith("| H")}
    # online SimPO fails with and without the margin (equal drops), offline SimPO holds stable, MaxEnt fails too
    assert rows == {"H1": "agrees", "H2": "disagrees", "H3": "agrees"}
    assert f"| offline SimPO gamma 0 (dataset only) | {lr:g} | 3 | 30% | 80% | 80% | 3 stable | 0/3 | - |" in text
    assert f"| online SimPO (margin only) | {lr:g} | 3 | 30% | 80% | 10% | 3 collapses | 3/3 | 0.75 / 2.00 |" in text
    # the margin keeps online SimPO stable: H1 has nothing to stabilise at gamma 0.5 but still at gamma 0 (agrees),
    # H2 agrees, and H3 disagrees (MaxEnt fails where online SimPO does not)
    text = report.write_report(sweep_dir(tmp_path / "b", stable), tmp_path / "b" / "report").read_text()
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ")[-1].strip(" |") for r in text.splitlines() if r.startswith("| H")}
    assert rows == {"H1": "agrees", "H2": "agrees", "H3": "disagrees"}


def test_kl_outliers_are_found_and_named_with_k1_beside():
    from maxent_rlhf import plotting
    from maxent_rlhf.toylab import report

    k3 = [10.0 + 0.5 * s for s in range(40)]
    k3[15] = 2250.0  # one batch: a 5-point moving mean would draw a flat plateau at ~450 for iterations 15-19
    metrics = [{"step": s, "objective/kl_ref_k3": k3[s], "objective/kl_ref": 9.0 + 0.5 * s, "objective/kl_ref_every": 1}
               for s in range(40)]
    r = plotting.Run(Path("maxent_lr1e-3_s1"), {}, metrics)
    assert [(n, x) for n, x, *_ in report.kl_spikes([r])] == [("maxent_lr1e-3_s1", 15)]
    assert "maxent_lr1e-3_s1 it 15: k3 2250.0" in report.spike_note([r]) and "(k1 16.50)" in report.spike_note([r])
    smooth = plotting.Run(Path("kl_lr1e-3_s1"), {}, [{"step": s, "objective/kl_ref_k3": 1.0 + s} for s in range(40)])
    assert report.kl_spikes([smooth]) == [] and "No single-batch k3 outlier" in report.spike_note([smooth])
    curves, (xs, med) = report._seed_lines([r, smooth], "objective/kl_ref_k3")
    assert len(curves) == 2 and med[15] == pytest.approx((2250.0 + 16.0) / 2) and med[3] == pytest.approx((11.5 + 4.0) / 2)


def test_the_task_ceiling_is_the_ideal_summary_against_the_references(tmp_path):
    from maxent_rlhf.toylab.report import task_ceiling

    posts = task.generate_posts(200, seed=3)
    (tmp_path / "prompts").mkdir()
    with open(tmp_path / "prompts" / "test.jsonl", "w") as f:
        for p in posts:
            f.write(json.dumps({"prompt": p.prompt, "completion": " " + p.reference, "facts": p.facts}) + "\n")
    ideal = sum(1 for p in posts if p.reference == task.key_summary(p.facts))
    assert task_ceiling(tmp_path) == pytest.approx(1 - ideal / 200 / 2)  # every other reference loses to it
    assert task_ceiling(None) is None


def test_the_length_conditions_command_lines_parse_into_the_scripts_configs():
    """Each condition's options on top of its config, and the evaluation's options on top of eval.yaml, are
    options the scripts know (a typo would fail hours into the sweep), and its prompt + response fit the toy
    model's positions under the scripts' own check (a 32-token completion budget once stopped a sweep there)."""
    import evaluate_judge
    import train_offline
    import train_online
    import train_rloo

    from maxent_rlhf.config import parse_config
    from maxent_rlhf.models import check_context_length
    from maxent_rlhf.toylab import scripts

    toy_model = types.SimpleNamespace(max_position_embeddings=build.MODEL["max_position_embeddings"])
    classes = {"rloo": (train_rloo.RLOOConfig, "train_rloo.py"), "offline": (train_offline.OfflineConfig, "train_offline.py"),
               "online": (train_online.OnlineConfig, "train_online.py")}
    for c in (c for c in sweep.CONDITIONS if c.enabled()):
        cls, script = classes[c.kind]
        name, lr, seed = c.runs()[0]
        cmd = scripts.script_command(script, scripts.toy_config(c.config), learning_rate=lr, seed=seed, output_dir="/tmp/x",
                                     **c.options)
        parsed = parse_config(cls, cmd[2:])
        assert parsed.learning_rate == lr and all(getattr(parsed, k) == v for k, v in c.options.items())
        response = "max_completion_length" if c.kind == "offline" else "response_length"
        check_context_length(toy_model, parsed.max_prompt_length, getattr(parsed, response), "max_prompt_length", response)
        opts = {k: v for k, v in c.eval_options.items() if k != "reward_model_name_or_path"}
        cmd = scripts.script_command("evaluate_judge.py", scripts.toy_config("eval"), output_dir="/tmp/x", **opts)
        ev = parse_config(evaluate_judge.EvalConfig, cmd[2:])
        assert all(getattr(ev, k) == v for k, v in opts.items())


def test_length_growth_counts_only_the_excess_over_the_ideal_summary():
    assert len(task.key_summary(GENERATED_POST.facts).split()) == rules.IDEAL_TOKENS
    assert rules.length_growth(5.0, 9.0) == 0.0  # SFT's short form -> the ideal: a gain gold shares
    assert rules.length_growth(5.0, 14.0) == 5.0 and rules.length_growth(11.0, 12.0) == 1.0


def test_the_job_list_holds_every_run_once_and_shards_split_it():
    plan, off = sweep.rloo_plan(), sweep.offline_plan()
    extra = sweep.condition_jobs()
    jobs = sweep.job_list(plan, off, extra)
    assert len(jobs) == len(plan) + len(off) + len(extra) and len({repr(j) for j in jobs}) == len(jobs)
    names = [j[1][1] for j in jobs if j[0] == "condition"]
    assert {"length_maxent_lr1e-4_s1", "length_simpo_plain_lr1e-4_s3", "main_job_lr2e-4_s1"} <= set(names)
    # the first seed of everything comes before any later seed of the main grid
    first_later = next(i for i, j in enumerate(jobs) if j[0] == "rloo" and j[1][2] != 1)
    assert all(j[1][3] == 1 for j in jobs[:first_later] if j[0] == "condition")
    shards = [sweep.shard_items(jobs, (i, 2)) for i in range(2)]
    assert len(shards[0]) + len(shards[1]) == len(jobs)
    assert [j for j in sweep.condition_jobs(online=False) if j[1][0].kind == "rloo"] == []
