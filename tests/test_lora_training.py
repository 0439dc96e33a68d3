"""LoRA in the trainers (use_peft): DPO / SimPO / SFT / reward model and RLOO (kl and entropy) end to end on
tiny models; the reference is the policy with its adapter switched off and equals the base model loaded
separately; adapter checkpoints resume exactly and are judged exactly as their merged copy; sharded runs
(DDP, FSDP2) on two CPU processes equal one process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the scripts are top-level modules, importable from the repo root

import train_offline  # noqa: E402
from maxent_rlhf import checkpoints, lora, models, objectives, rollout, runs  # noqa: E402
from maxent_rlhf.config import ConfigError  # noqa: E402
from helpers.resume import copy_killed_run, run_killed_inside
from test_train_offline import datasets, make_cfg  # noqa: E402,F401  (the module's fixture and config builder)

LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)


def _trainable_names(ckpt) -> set:
    from safetensors import safe_open

    with safe_open(str(Path(ckpt) / lora.ADAPTER_WEIGHTS), framework="pt") as f:
        return set(f.keys())


# --------------------------------------------------------------------------------------------------
# offline: every family end to end, the reference is the adapter switched off
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["dpo", "simpo", "sft", "reward"])
def test_offline_lora_runs_and_saves_an_adapter(loss, tmp_path, datasets, tiny_policy_dir):
    from peft import PeftModel

    dataset = datasets["sft4"] if loss == "sft" else datasets["pairs4"]
    kw = dict(LORA, lora_task_type="SEQ_CLS", normalize_reward=False) if loss == "reward" else LORA
    c = make_cfg(tmp_path, tiny_policy_dir, dataset, loss_type=loss, max_steps=5, learning_rate=2e-2, **kw)
    run = train_offline.main(c)
    metrics = [m for m in runs.read_metrics(run) if "train/loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] - 1e-3  # one fixed batch: the adapter fits it
    ckpt = checkpoints.latest_checkpoint(run)
    assert lora.is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").exists()  # the adapter, not the weights
    config = lora.read_adapter_config(ckpt)
    assert config["base_model_name_or_path"] == tiny_policy_dir and config["r"] == 4
    names = _trainable_names(ckpt)
    assert names and all("lora_" in n or (loss == "reward" and "score" in n) for n in names)
    if loss == "reward":
        assert any("score" in n for n in names)  # SEQ_CLS: the new head trains in full and is saved
        return
    base = models.load_policy(tiny_policy_dir)
    loaded = PeftModel.from_pretrained(base, str(ckpt))  # what the issue promises: peft loads it as is
    assert any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)  # it trained


def test_offline_lora_dpo_loads_no_reference_copy(tmp_path, datasets, tiny_policy_dir, monkeypatch):
    loaded = []
    real = models.load_policy
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: loaded.append(a[0]) or real(*a, **k))
    c = make_cfg(tmp_path, tiny_policy_dir, datasets["pairs4"], loss_type="dpo", max_steps=1, **LORA)
    train_offline.main(c)
    assert loaded == [tiny_policy_dir]  # the policy once; the reference is the same weights, adapter off


def test_reference_logprobs_of_the_adapter_off_policy_equal_the_base_model(tmp_path, datasets, tiny_policy_dir):
    """Trainer level: the DPO reference log-probs precomputed by the LoRA run (adapter off) equal those of
    the base model loaded separately (a full-fine-tuning run's reference copy), and a live LoRA reference
    logs the same ref/logratio after training moved the adapter."""
    captured = {}
    real = train_offline.reference_logprobs_table

    def capture(c, model, shared, examples, pad_id, accelerator):
        captured.setdefault(c.use_peft, real(c, model, shared, examples, pad_id, accelerator))
        return captured[c.use_peft]

    train_offline.reference_logprobs_table = capture
    try:
        for use_peft in (False, True):
            kw = LORA if use_peft else {}
            train_offline.main(make_cfg(tmp_path / f"p{use_peft}", tiny_policy_dir, datasets["pairs12"], loss_type="dpo",
                                        max_steps=1, precompute_ref_logprobs=True, mixed_precision="no", **kw))
    finally:
        train_offline.reference_logprobs_table = real
    assert torch.equal(captured[True], captured[False])
    # the live adapter-off reference during training: ref/logratio is the base model's at every step
    live = train_offline.main(make_cfg(tmp_path / "live", tiny_policy_dir, datasets["pairs12"], loss_type="dpo",
                                       max_steps=3, learning_rate=2e-2, **LORA))
    pre = train_offline.main(make_cfg(tmp_path / "pre", tiny_policy_dir, datasets["pairs12"], loss_type="dpo",
                                      max_steps=3, learning_rate=2e-2, precompute_ref_logprobs=True, **LORA))
    ml, mp = [m for m in runs.read_metrics(live) if "train/loss" in m], [m for m in runs.read_metrics(pre) if "train/loss" in m]
    assert len(ml) == 3 and ml[-1]["rewards/margins"] != ml[0]["rewards/margins"]
    for a, b in zip(ml, mp):
        for k in ("ref/logratio", "train/loss", "rewards/margins"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


# --------------------------------------------------------------------------------------------------
# adapter checkpoints: exact resume, the judge sees the merged model
# --------------------------------------------------------------------------------------------------
def test_adapter_checkpoint_resume_after_kill_equals_the_uninterrupted_run(tmp_path, datasets, tiny_policy_dir,
                                                                           monkeypatch):
    # as test_offline's full-weights version: 12 examples / batch 4, 6 steps across an epoch, checkpoints at
    # 2 and 4, killed inside step 5; LoRA dropout on, so the restored RNG streams matter too
    kw = dict(LORA, lora_dropout=0.1, loss_type="dpo", max_steps=6, save_steps=2, lr_scheduler_type="cosine",
              warmup_ratio=0.34, learning_rate=2e-2)
    full = train_offline.main(make_cfg(tmp_path / "a", tiny_policy_dir, datasets["pairs12"], **kw))
    cfg_b = make_cfg(tmp_path / "b", tiny_policy_dir, datasets["pairs12"], **kw)
    # 4 steps x 2 micro-batches, then the process "dies" inside step 5
    run_killed_inside(monkeypatch, train_offline.objectives, "dpo_loss", 4 * 2, lambda: train_offline.main(cfg_b))
    step4 = checkpoints.latest_checkpoint(cfg_b.output_dir)
    assert checkpoints.checkpoint_step(step4) == 4 and lora.is_adapter_dir(step4)
    blob = torch.load(step4 / "trainer_state.pt", weights_only=True)  # the optimizer holds the adapter only
    assert len(blob["optimizer"]["state"]) == len(_trainable_names(step4)) > 0
    cfg_b.resume = "latest"
    resumed = train_offline.main(cfg_b)

    from safetensors.torch import load_file

    a = load_file(str(checkpoints.latest_checkpoint(full) / lora.ADAPTER_WEIGHTS))
    b = load_file(str(checkpoints.latest_checkpoint(resumed) / lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = [m for m in runs.read_metrics(full) if "train/loss" in m]
    mb = [m for m in runs.read_metrics(resumed) if "train/loss" in m]
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    for key in ("train/loss", "train/lr", "ref/logratio", "train/grad_norm"):
        assert [m[key] for m in ma] == [m[key] for m in mb], key


def test_a_full_weights_checkpoint_is_not_resumed_as_an_adapter(tmp_path, datasets, tiny_policy_dir):
    kw = dict(loss_type="simpo", max_steps=2, save_steps=1)
    c = make_cfg(tmp_path, tiny_policy_dir, datasets["pairs4"], **kw)
    train_offline.main(c)
    with pytest.raises(RuntimeError, match="holds no adapter"):
        train_offline.main(make_cfg(tmp_path, tiny_policy_dir, datasets["pairs4"], resume="latest",
                                    **dict(kw, max_steps=3), **LORA))


def test_evaluate_judge_on_an_adapter_checkpoint_equals_its_merged_copy(tmp_path, datasets, tiny_policy_dir,
                                                                        tiny_reward_dir):
    import evaluate_judge as ej
    from test_evaluate_judge import make_dataset

    c = make_cfg(tmp_path, tiny_policy_dir, datasets["sft4"], loss_type="sft", max_steps=5, learning_rate=5e-2, **LORA)
    ckpt = checkpoints.latest_checkpoint(train_offline.main(c))
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "maxent_rlhf.lora", "merge", str(ckpt), str(merged)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    common = dict(dataset_name=str(make_dataset(tmp_path, 6)), n=0, judge="reward-model", max_new_tokens=10,
                  reward_model_name_or_path=tiny_reward_dir, plot=False, per_device_eval_batch_size=2)
    out = {name: ej.main(ej.EvalConfig(output_dir=str(tmp_path / f"eval_{name}"), checkpoints=[str(path)], **common))
           for name, path in (("adapter", ckpt), ("merged", merged), ("base", tiny_policy_dir))}

    def generations(name):
        files = list((tmp_path / f"eval_{name}" / "generations").glob("*.jsonl"))
        assert len(files) == 1
        return [(r["id"], r["generation"]) for r in map(json.loads, files[0].read_text().splitlines())]

    assert generations("adapter") == generations("merged")  # same generations...
    assert generations("adapter") != generations("base")  # ...of a model that is not the base
    row = lambda name: {k: v for k, v in out[name]["checkpoints"][0].items() if k not in ("label", "path", "step")}
    assert row("adapter") == row("merged")  # ...and the same verdicts


# --------------------------------------------------------------------------------------------------
# RLOO: kl and entropy regularisers, the reference is the adapter switched off
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rloo_base(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    import train_rloo
    from test_train_rloo import PROMPT_WORDS

    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("lora_rloo_data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: "
                                        f"{' '.join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 6)))} TL;DR:"}) + "\n"
                            for _ in range(24)))
    return train_rloo.RLOOConfig(
        model_name_or_path=tiny_policy_dir, reward_model_name_or_path=tiny_reward_dir, dataset_name=str(path),
        global_batch_size=8, rloo_k=2, num_mini_batches=2, per_device_train_batch_size=2, num_ppo_epochs=2,
        num_iterations=2, response_length=6, max_prompt_length=16, report_to="none", sample_every=0,
        learning_rate=2e-2, **LORA)


@pytest.mark.parametrize("overrides", [dict(regularizer="kl", kl_coef=0.05, shared_prefix=False),
                                       dict(regularizer="entropy", entropy_coef=0.1, length_normalize=True)],
                         ids=["kl", "maxent-eq7"])
def test_rloo_lora_runs_with_the_adapter_off_reference(rloo_base, tmp_path, overrides, monkeypatch, tiny_policy_dir):
    import dataclasses

    import train_rloo
    from test_train_rloo import EVERY_METRIC

    loaded, ref_vs_base = [], []
    real_load, real_ref = rollout.load_policy, rollout.reference_logprobs
    monkeypatch.setattr(rollout, "load_policy", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    base_model = models.load_policy(tiny_policy_dir).eval()

    def checked_reference(c, m, ro):  # the trainer's reference log-probs vs the base model loaded separately
        out = real_ref(c, m, ro)
        ref_vs_base.append((out, rollout.policy_logprobs(c, m, ro, base_model, m.sharing.ref)))
        return out

    monkeypatch.setattr(rollout, "reference_logprobs", checked_reference)
    c = dataclasses.replace(rloo_base, output_dir=str(tmp_path / "run"), **overrides)
    run = Path(train_rloo.main(c))
    assert loaded == [tiny_policy_dir]  # the policy only: no reference copy
    assert len(ref_vs_base) == 2
    if c.shared_prefix:  # the shared prompt pass through peft's LoRA layers rounds differently by an ulp
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in ref_vs_base)
    else:  # the plain forward: bit for bit
        assert all(torch.equal(a, b) for a, b in ref_vs_base)
    records = runs.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(records[1][k], float) and records[1][k] == records[1][k] for k in EVERY_METRIC)
    if overrides["regularizer"] == "kl":  # iteration 1 samples from the reference itself (B = 0): KL exactly 0
        assert records[0]["objective/kl_ref"] == 0.0
    assert records[1]["objective/kl_ref_k3"] > 0  # the adapter moved the policy away from its adapter-off self
    ckpt = checkpoints.latest_checkpoint(run)
    assert lora.is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").exists()
    assert lora.read_adapter_config(ckpt)["base_model_name_or_path"] == tiny_policy_dir


def test_rloo_lora_resume_is_exact(rloo_base, tmp_path):
    """4 iterations straight == 2, 'kill' (only what was on disk), resume for the last 2: identical adapter."""
    import dataclasses
    import shutil

    import train_rloo
    from safetensors.torch import load_file

    c = dataclasses.replace(rloo_base, num_iterations=4, save_steps=2, output_dir=str(tmp_path / "full"))
    full = Path(train_rloo.main(c))
    killed = copy_killed_run(full, tmp_path / "killed", checkpoint_step=2, logged_lines=3)  # step 3 logged, then the kill
    resumed = Path(train_rloo.main(dataclasses.replace(c, output_dir=str(killed), resume="latest")))
    a = load_file(full / "checkpoints" / "step_00000004" / lora.ADAPTER_WEIGHTS)
    b = load_file(resumed / "checkpoints" / "step_00000004" / lora.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = runs.read_metrics(full), runs.read_metrics(resumed)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        for key in ("objective/scores", "objective/kl_ref", "objective/kl_prev", "policy/approxkl"):
            assert ra[key] == rb[key], key


# --------------------------------------------------------------------------------------------------
# sharded: DDP and FSDP2 on two CPU processes == one process (the FSDP2 machinery of tests/test_distributed.py)
# --------------------------------------------------------------------------------------------------
LORA_SHARDED = ("dpo", "rloo_kl", "rloo_entropy")
LORA_BACKENDS = {"ddp": ("cpu.yaml", ["--num_processes", "2"], {"ACCELERATE_USE_CPU": "true"}),
                 "fsdp2": ("cpu_fsdp2.yaml", [], {"ACCELERATE_USE_CPU": "true"})}


@pytest.fixture(scope="module")
def lora_sharded_runs():
    """One 1-process run and one 2-process launch per backend of DPO / RLOO-kl / RLOO-entropy with LoRA
    (4 steps, a checkpoint at step 2; DPO and RLOO-kl also resumed from it in a fresh run directory)."""
    import shutil
    import tempfile

    import yaml
    from test_distributed import ACCEL, SHARDING_DRIVER as DRIVER, _build_assets, _env, _jobs, _run

    d = Path(tempfile.mkdtemp(prefix="maxent_rlhf_lora_sharded_"))
    try:
        configs = {name: (script, dict(config, **LORA, learning_rate=2e-2))
                   for name, (script, config) in _build_assets(d).items() if name in LORA_SHARDED}
        (d / "jobs-p1.yaml").write_text(yaml.safe_dump(_jobs(d, configs, "p1", resume=False)))
        _run([sys.executable, str(DRIVER), str(d / "jobs-p1.yaml"), str(d / "report-p1")], d, _env({}), d / "p1.log")
        for name, (config, flags, env) in LORA_BACKENDS.items():
            (d / f"jobs-{name}.yaml").write_text(yaml.safe_dump(_jobs(d, configs, name, resume=True)))
            _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config), *flags,
                  str(DRIVER), str(d / f"jobs-{name}.yaml"), str(d / f"report-{name}")], d, _env(env), d / f"{name}.log")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _adapter(run, step: int = 4) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "checkpoints" / f"step_{step:08d}" / lora.ADAPTER_WEIGHTS))


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(LORA_BACKENDS))
def test_lora_two_processes_match_one_process(lora_sharded_runs, backend):
    from helpers.run_compare import WEIGHT_ATOL, assert_metrics_close, max_weight_diff, run_metrics

    d = lora_sharded_runs
    reports = [json.loads((d / f"report-{backend}" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    for entry in reports[0] + reports[1]:  # the backend really ran: FSDP2 holds half the parameters per process
        assert entry["num_processes"] == 2 and entry["distributed_type"] == ("FSDP" if backend == "fsdp2" else "MULTI_CPU")
        if backend == "fsdp2":
            assert 0.4 < entry["param_numel_local"] / entry["param_numel_full"] < 0.6, entry
    for script in LORA_SHARDED:
        one, two = d / f"{script}-p1", d / f"{script}-{backend}"
        m1, m2 = run_metrics(one), run_metrics(two)
        assert sorted({m["step"] for m in m2}) == [1, 2, 3, 4]
        assert_metrics_close(m2, m1)
        a1, a2 = _adapter(one), _adapter(two)
        assert max_weight_diff(a1, a2) <= WEIGHT_ATOL, script
        assert max(v.abs().max().item() for k, v in a2.items() if "lora_B" in k) > 10 * WEIGHT_ATOL  # it trained
        assert lora.read_adapter_config(two / "checkpoints" / "step_00000004")["base_model_name_or_path"] == \
            str(d / "policy")
    for script in ("dpo", "rloo_kl"):  # resumed at step 2 == uninterrupted, exactly
        full, resumed = d / f"{script}-{backend}", d / f"{script}-{backend}-resumed"
        a, b = _adapter(full), _adapter(resumed)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), script
        assert_metrics_close(run_metrics(resumed), run_metrics(full)[2:], exact=True)


# --------------------------------------------------------------------------------------------------
# use_peft without peft: one line, nothing written
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["train_offline.py", "train_rloo.py"])
def test_use_peft_without_peft_is_one_line_naming_the_install(script, tmp_path, tiny_policy_dir):
    code = ("import runpy, sys; sys.modules['peft'] = None; "  # `import peft` raises ImportError
            f"sys.argv = [{script!r}] + sys.argv[1:]; runpy.run_path({script!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, "--use_peft", "true", "--model_name_or_path", tiny_policy_dir,
                           "--output_dir", str(tmp_path / "run"), "--report_to", "none"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: `use_peft: true` needs the peft library"), lines
    assert 'pip install -e ".[peft]"' in lines[0]
    assert not (tmp_path / "run").exists()
