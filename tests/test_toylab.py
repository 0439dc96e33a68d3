"""Toy lab: gold judge known answers, deterministic data, the artifact cache, and a shortened pipeline
through the project's scripts (profile `test`: seconds-long stages, cache under tmp_path)."""
from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from maxent_rlhf.toylab import build, cache, task

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


def test_plotting_reads_run_directories(tmp_path):
    from maxent_rlhf import plotting

    run = tmp_path / "kl_lr1e-3_s1"
    (run / "eval_gold").mkdir(parents=True)
    (run / "config.yaml").write_text("regularizer: kl\nlearning_rate: 0.001\n")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 11):
            f.write(json.dumps({"step": s, "objective/rlhf_reward": s / 10, "objective/entropy_bonus": 0.0,
                                "objective/kl_ref_k3": s / 5, "objective/kl_prev_k3": 0.01, "ref/logratio": -0.1}) + "\n")
    (run / "eval_gold" / "summary.json").write_text(json.dumps({
        "baseline": {"win_rate": 0.3, "step": None},
        "checkpoints": [{"step": 5, "win_rate": 0.5}, {"step": 10, "win_rate": 0.6}]}))
    r = plotting.load_run(run)
    assert r.winrate_curve() == ([0, 5, 10], [0.3, 0.5, 0.6]) and r.final_winrate() == 0.6
    assert plotting.regularizer_of(r) == "KL"
    for p in (plotting.plot_reward_and_entropy([r], tmp_path / "f1.png"), plotting.plot_kl([r], tmp_path / "f3.png"),
              plotting.plot_ref_logratio(r, tmp_path / "f4.png"),
              plotting.plot_winrate_per_checkpoint([r], tmp_path / "f6.png", label=lambda x: "a", panel=lambda x: "b")):
        assert p.exists() and p.stat().st_size > 1000


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
