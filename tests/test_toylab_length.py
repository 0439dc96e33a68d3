"""The toy lab's length channel (build profile `length`, configs/toy/length_*.yaml, the sweep's conditions)
and the report's pre-registration machinery (provenance, the KL figure's outlier check, the task ceiling)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from maxent_rlhf.config import ConfigError, load_yaml
from maxent_rlhf.toylab import build, rules, sweep, task

REPO = Path(__file__).resolve().parents[1]
POST = task.generate_posts(1, seed=0)[0]


def test_the_labeller_adds_its_length_taste_to_the_gold_score():
    ideal = task.key_summary(POST.facts)  # 9 tokens, 4 facts
    assert task.labeller_score(ideal, POST.prompt, POST.facts) == task.gold_score(ideal, POST.prompt, POST.facts) == 4.0
    assert task.labeller_score(ideal, POST.prompt, POST.facts, 0.25) == pytest.approx(4.0 + 0.25 * 9)
    # two free function words: the gold judge is indifferent (within its 12-token budget), the labeller is not
    padded = ideal.replace(" i feel ", " i feel so very ")
    assert task.gold_score(padded, POST.prompt, POST.facts) == 4.0
    assert task.labeller_score(padded, POST.prompt, POST.facts, 0.25) == pytest.approx(4.0 + 0.25 * 11)
    # beyond the budget gold takes 0.5 per token, the labeller's 0.25 does not make up for it
    long = padded + " so very very so"
    assert task.gold_score(long, POST.prompt, POST.facts) == 4.0 - 0.5 * 3
    assert task.labeller_score(long, POST.prompt, POST.facts, 0.25) < task.labeller_score(padded, POST.prompt, POST.facts, 0.25)


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


def _run_dir(root: Path, name: str, config: dict, win: list, info: dict, metrics=None, tokens=None, proxy=None) -> Path:
    d = root / name
    (d / "eval_gold").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    with open(d / "metrics.jsonl", "w") as f:
        for m in metrics or [{"step": s} for s in range(1, 4)]:
            f.write(json.dumps(m) + "\n")
    tokens = tokens or [None] * len(win)
    (d / "eval_gold" / "summary.json").write_text(json.dumps({
        "baseline": {"win_rate": win[0], "mean_policy_tokens": tokens[0]},
        "checkpoints": [{"step": 10 * (i + 1), "win_rate": w, "mean_policy_tokens": t}
                        for i, (w, t) in enumerate(zip(win[1:], tokens[1:]))]}))
    if proxy:
        (d / "eval_proxy").mkdir()
        (d / "eval_proxy" / "summary.json").write_text(json.dumps({
            "baseline": {"mean_policy_score": proxy[0]},
            "checkpoints": [{"step": 10 * (i + 1), "mean_policy_score": p} for i, p in enumerate(proxy[1:])]}))
    (d / "DONE.json").write_text(json.dumps(info))
    return d


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
    options the scripts know (a typo would fail hours into the sweep)."""
    import evaluate_judge
    import train_offline
    import train_online
    import train_rloo

    from maxent_rlhf.config import parse_config
    from maxent_rlhf.toylab import scripts

    classes = {"rloo": (train_rloo.RLOOConfig, "train_rloo.py"), "offline": (train_offline.OfflineConfig, "train_offline.py"),
               "online": (train_online.OnlineConfig, "train_online.py")}
    for c in (c for c in sweep.CONDITIONS if c.enabled()):
        cls, script = classes[c.kind]
        name, lr, seed = c.runs()[0]
        cmd = scripts.script_command(script, scripts.toy_config(c.config), learning_rate=lr, seed=seed, output_dir="/tmp/x",
                                     **c.options)
        parsed = parse_config(cls, cmd[2:])
        assert parsed.learning_rate == lr and all(getattr(parsed, k) == v for k, v in c.options.items())
        opts = {k: v for k, v in c.eval_options.items() if k != "reward_model_name_or_path"}
        cmd = scripts.script_command("evaluate_judge.py", scripts.toy_config("eval"), output_dir="/tmp/x", **opts)
        ev = parse_config(evaluate_judge.EvalConfig, cmd[2:])
        assert all(getattr(ev, k) == v for k, v in opts.items())


def test_length_growth_counts_only_the_excess_over_the_ideal_summary():
    assert len(task.key_summary(POST.facts).split()) == rules.IDEAL_TOKENS
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
