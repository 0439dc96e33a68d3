"""FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo) against one process.

Per backend, one 2-process `accelerate launch` runs, through the scripts' `main(cfg)` (driver:
tests/helpers/cpu_sharding.py, which also explains the two shims accelerate needs to shard CPU processes):
train_offline.py DPO and SimPO, train_rloo.py KL and entropy (length-normalised, kl_ref every other
iteration), 4 steps each with a checkpoint at step 2, plus DPO and RLOO-KL resumed from that step-2
checkpoint in a fresh run directory. One 1-process run of the same four configs is the reference.
Launch configs: configs/accelerate/cpu_fsdp2.yaml (ACCELERATE_USE_CPU=true), and the SHIPPED
deepspeed_zero2.yaml / deepspeed_zero3.yaml with `--num_processes 2 --mixed_precision no` (float32 on
CPU; zero3 keeps zero3_init_flag, so frozen models take the zero.Init-off path and their own
CPU-offloaded inference engines).

Asserted per backend:
- it sharded: accelerate ended with FSDP (version 2) / DEEPSPEED (stage 2 or 3), and each process holds
  half of the policy's parameters (FSDP2, ZeRO-3) or of the fp32 optimizer state (ZeRO-2);
- 2 processes match 1: metrics within RTOL / ATOL, final weights within WEIGHT_ATOL (as
  tests/test_distributed.py for DDP: same global batch, reduction order differs); RLOO samples the
  same tokens (generation runs on the sharded policy: FSDP2 all-gathers per layer with synced_gpus,
  ZeRO-3 gathers the full weights);
- resume: the run resumed at step 2 equals the uninterrupted one exactly (weights bit for bit, metrics
  except timings);
- the checkpoint is a full HF model: plain `from_pretrained` loads it with no missing / unexpected keys,
  full shapes, weights within WEIGHT_ATOL of the 1-process run's; engine_state/ holds one shard per process.

Slow group (`pytest -m slow`): about 2.5 minutes for the three backends on 2 cores (README "Scale out").
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ROOT / "configs" / "accelerate"
DRIVER = ROOT / "tests" / "helpers" / "cpu_sharding.py"
from helpers.run_compare import WEIGHT_ATOL  # noqa: E402  (tolerances and comparisons shared with the other N-process tests)
from helpers.run_compare import assert_metrics_close as _assert_metrics_close  # noqa: E402
from helpers.run_compare import checkpoint_weights as _weights  # noqa: E402
from helpers.run_compare import max_weight_diff as _max_diff  # noqa: E402
from helpers.run_compare import run_metrics as _metrics  # noqa: E402
DS_OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
BACKENDS = {
    # name: (accelerate config, extra launch flags, extra environment, expected (type, fsdp version, zero stage))
    "fsdp2": (ACCEL / "cpu_fsdp2.yaml", [], {"ACCELERATE_USE_CPU": "true"}, ("FSDP", 2, 0)),
    "zero2": (ACCEL / "deepspeed_zero2.yaml", DS_OVERRIDES, {}, ("DEEPSPEED", 0, 2)),
    "zero3": (ACCEL / "deepspeed_zero3.yaml", DS_OVERRIDES, {}, ("DEEPSPEED", 0, 3)),
}
SCRIPTS = ("dpo", "simpo", "rloo_kl", "rloo_entropy")
RESUMED = ("dpo", "rloo_kl")

def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken build
        return False
    return True


WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it".split()


def _build_assets(d: Path) -> dict:
    import random

    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model, build_word_tokenizer
    from conftest import TINY_WORDS

    tok = build_word_tokenizer(TINY_WORDS)
    build_tiny_policy(tok, seed=0, save_dir=d / "policy")
    build_tiny_reward_model(tok, seed=1, save_dir=d / "reward")
    rng = random.Random(0)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(d / "pairs.jsonl", "w") as f:  # trl-lib/tldr-preference's columns
        for i in range(16):
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {sentence(3 + i % 3)} TL;DR:",
                                "chosen": sentence(2 + i % 3), "rejected": sentence(4 + i % 2)}) + "\n")
    with open(d / "prompts.jsonl", "w") as f:  # trl-lib/tldr's prompt column
        for i in range(16):
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {sentence(2 + i % 5)} TL;DR:",
                                "completion": sentence(3)}) + "\n")
    offline = dict(
        model_name_or_path=str(d / "policy"), dataset_name=str(d / "pairs.jsonl"), report_to="none", mixed_precision="no",
        global_batch_size=8, per_device_train_batch_size=2, max_steps=4, save_steps=2, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_ratio=0.0, max_prompt_length=32, max_completion_length=12,
    )
    rloo = dict(
        model_name_or_path=str(d / "policy"), reward_model_name_or_path=str(d / "reward"),
        dataset_name=str(d / "prompts.jsonl"), report_to="none", mixed_precision="no", global_batch_size=8, rloo_k=2,
        num_mini_batches=1, per_device_train_batch_size=2, local_rollout_forward_batch_size=4, num_ppo_epochs=2,
        num_iterations=4, save_steps=2, response_length=6, max_prompt_length=16, learning_rate=1e-3,
        sample_every=1, num_samples=8,
    )
    return {
        "dpo": ("offline", dict(offline, loss_type="dpo", beta=0.5)),
        "simpo": ("offline", dict(offline, loss_type="simpo", beta=2.0, simpo_gamma=0.5)),
        "rloo_kl": ("rloo", dict(rloo, regularizer="kl", kl_coef=0.05)),
        "rloo_entropy": ("rloo", dict(rloo, regularizer="entropy", entropy_coef=0.1, length_normalize=True, kl_ref_every=2)),
    }


def _jobs(d: Path, configs: dict, tag: str, resume: bool) -> list:
    jobs = [{"name": f"{name}-{tag}", "script": script, "config": dict(config, output_dir=str(d / f"{name}-{tag}"))}
            for name, (script, config) in configs.items()]
    if resume:  # a fresh run directory, continued from the uninterrupted run's step-2 checkpoint
        jobs += [{"name": f"{j['name']}-resumed", "script": j["script"],
                  "config": dict(j["config"], output_dir=j["config"]["output_dir"] + "-resumed",
                                 resume=j["config"]["output_dir"] + "/checkpoints/step_00000002")}
                 for j in jobs if j["name"].rsplit("-", 1)[0] in RESUMED]
    return jobs


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _run(cmd: list, cwd: Path, env: dict, log: Path, timeout: int = 600) -> None:
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed (exit {p.returncode}):\n{log.read_text()[-5000:]}"


@pytest.fixture(scope="module")
def workdir():
    # not under pytest's basetemp: a concurrent pytest session rotates those away mid-launch
    d = Path(tempfile.mkdtemp(prefix="maxent_rlhf_sharded_"))
    try:
        yield d, _build_assets(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def one_process(workdir):
    d, configs = workdir
    (d / "jobs-p1.yaml").write_text(yaml.safe_dump(_jobs(d, configs, "p1", resume=False)))
    _run([sys.executable, str(DRIVER), str(d / "jobs-p1.yaml"), str(d / "report-p1")], d, _env({}), d / "p1.log")
    return d


_launched: dict = {}


@pytest.fixture(scope="module", params=list(BACKENDS))
def sharded(request, workdir):
    name = request.param
    if name.startswith("zero") and not _has_deepspeed():
        pytest.skip("deepspeed is not installed (pip install deepspeed); it runs here on CPU processes (gloo) "
                    "through tests/helpers/cpu_sharding.py")
    d, configs = workdir
    config, flags, extra_env, expected = BACKENDS[name]
    (d / f"jobs-{name}.yaml").write_text(yaml.safe_dump(_jobs(d, configs, name, resume=True)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *flags,
           str(DRIVER), str(d / f"jobs-{name}.yaml"), str(d / f"report-{name}")]
    _run(cmd, d, _env(extra_env), d / f"{name}.log")
    return name, d, expected


# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_backend_really_shards(sharded):
    name, d, (dtype, fsdp_version, stage) = sharded
    reports = [json.loads((d / f"report-{name}" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    jobs = [j["name"] for j in yaml.safe_load((d / f"jobs-{name}.yaml").read_text())]
    assert [e["job"] for e in reports[0]] == jobs  # one prepared policy per job
    for rank_report in reports:
        for entry in rank_report:
            assert (entry["distributed_type"], entry["fsdp_version"], entry["zero_stage"], entry["num_processes"]) == \
                (dtype, fsdp_version, stage, 2), entry
            if name in ("fsdp2", "zero3"):  # the parameters themselves are split: each process holds about half
                assert 0.4 < entry["param_numel_local"] / entry["param_numel_full"] < 0.6, entry
            else:  # ZeRO-2: whole weights, half of the fp32 master weights / Adam state per process
                assert entry["param_numel_local"] == entry["param_numel_full"]
                assert 0.4 < entry["optimizer_numel_local"] / entry["param_numel_full"] < 0.6, entry


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_sharded_run_matches_one_process(one_process, sharded, script):
    name, d, _ = sharded
    one, two = d / f"{script}-p1", d / f"{script}-{name}"
    m1, m2 = _metrics(one), _metrics(two)
    assert sorted({m["step"] for m in m2}) == [1, 2, 3, 4]
    _assert_metrics_close(m2, m1)
    assert _max_diff(_weights(one), _weights(two)) <= WEIGHT_ATOL
    start = load_file(str(d / "policy" / "model.safetensors"))
    final = _weights(two)  # and the run did train: the weights moved far beyond the tolerance
    assert max((final[k] - start[k]).abs().max().item() for k in final if k in start) > 10 * WEIGHT_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rloo_kl", "rloo_entropy"])
def test_generation_on_sharded_weights_samples_the_same_tokens(one_process, sharded, script):
    name, d, _ = sharded

    def samples(run):
        return [(r["step"], r["prompt"], r["completion"]) for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())]

    # samples.jsonl holds the main process's rows: all 8 of the 1-process batch, rank 0's first 4
    one, two = samples(d / f"{script}-p1"), samples(d / f"{script}-{name}")
    assert len(one) == 4 * 8 and len(two) == 4 * 4
    assert two == [row for step in range(1, 5) for row in [r for r in one if r[0] == step][:4]]
    assert any(c for _, _, c in two), "every completion is empty: generation did not run"


@pytest.mark.slow
@pytest.mark.parametrize("script", RESUMED)
def test_sharded_resume_equals_uninterrupted_run(sharded, script):
    name, d, _ = sharded
    full, resumed = d / f"{script}-{name}", d / f"{script}-{name}-resumed"
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"
    _assert_metrics_close(_metrics(resumed), _metrics(full)[2:], exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_sharded_checkpoint_loads_as_a_full_hf_model(one_process, sharded, script):
    from transformers import GPTNeoXForCausalLM

    name, d, _ = sharded
    ckpt = d / f"{script}-{name}" / "checkpoints" / "step_00000004"
    model, info = GPTNeoXForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    fresh = GPTNeoXForCausalLM.from_pretrained(d / "policy")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    reference = GPTNeoXForCausalLM.from_pretrained(d / f"{script}-p1" / "checkpoints" / "step_00000004")
    ref = reference.state_dict()
    assert max((v - ref[k]).abs().max().item() for k, v in model.state_dict().items()) <= WEIGHT_ATOL
    engine = ckpt / "engine_state"  # the sharded optimizer state: written by both processes
    files = [p.name for p in engine.rglob("*") if p.is_file()]
    if name == "fsdp2":
        assert {"__0_0.distcp", "__1_0.distcp"} <= set(files), files
    else:
        assert any("rank_0" in f for f in files) and any("rank_1" in f for f in files), files


# --------------------------------------------------------------------------------------------------
# without the test driver's shims accelerate does not shard CPU processes: the scripts refuse to pretend
# --------------------------------------------------------------------------------------------------
def test_a_sharding_config_that_accelerate_did_not_honour_is_refused(monkeypatch):
    from types import SimpleNamespace

    from maxent_rlhf.distributed import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match=r"asks for FSDP over 2 process\(es\), but accelerate set up MULTI_CPU over 2"):
        check_launch(SimpleNamespace(distributed_type="MULTI_CPU", num_processes=2))
    check_launch(SimpleNamespace(distributed_type="FSDP", num_processes=2))  # honoured: fine
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match=r"asks for DEEPSPEED over 2 process\(es\), but accelerate set up DEEPSPEED over 1"):
        check_launch(SimpleNamespace(distributed_type="DEEPSPEED", num_processes=1))


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_plain_launch_on_cpu_processes_is_refused(workdir, backend):
    """The evidence behind tests/helpers/cpu_sharding.py's shims, re-checked on every run: the scripts launched
    directly under a sharding config on CPU processes stop with the refusal, not a silent DDP run."""
    if backend.startswith("zero") and not _has_deepspeed():
        pytest.skip("deepspeed is not installed")
    d, configs = workdir
    config, flags, extra_env, _ = BACKENDS[backend]
    (d / f"plain-{backend}.yaml").write_text(yaml.safe_dump(dict(configs["dpo"][1], output_dir=str(d / f"plain-{backend}"))))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *flags,
           str(ROOT / "train_offline.py"), "--config", str(d / f"plain-{backend}.yaml")]
    out = subprocess.run(cmd, cwd=d, env=_env(extra_env), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    dtype = {"fsdp2": "FSDP over 2 process(es), but accelerate set up MULTI_CPU over 2",
             "zero2": "DEEPSPEED over 2 process(es), but accelerate set up DEEPSPEED over 1",
             "zero3": "DEEPSPEED over 2 process(es), but accelerate set up DEEPSPEED over 1"}[backend]
    assert f"the accelerate config asks for {dtype}" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    assert not (d / f"plain-{backend}" / "metrics.jsonl").exists()
