"""Distributed training (maxent_rlhf.distributed): DDP on two CPU processes against one; FSDP2, ZeRO-2 and
ZeRO-3 on two CPU processes against one (slow group); single-process checks of the branches that need a GPU.

Two processes on CPU (gloo, `accelerate launch --config_file configs/accelerate/cpu.yaml`) against one.

One 2-process launch runs four jobs through the scripts' `main(cfg)` entry points (a small driver,
written below, so torch is imported once): train_offline.py (DPO) and train_rloo.py (KL), each 4 steps
with a checkpoint at step 2, and each resumed from that step-2 checkpoint in a fresh run directory. A
1-process run of the same two configs goes alongside. Same configs, same seed, same GLOBAL batch:

- offline DPO: the data order is a seeded permutation of the global batch and the gradient is the
  global-batch mean either way, so the runs agree up to float reduction order (micro-batch sums,
  all-reduce): metrics within 1e-4 relative / 1e-5 absolute, weights within 1e-4 absolute (at lr 3e-3,
  a thirtieth of one Adam step; Adam's per-coordinate normalisation amplifies rounding noise where a
  gradient is ~0, which is why weights get a looser bound than metrics).
- RLOO: sampling streams are tied to rows of the global batch (distributed.sampling_rng) and the rollout
  chunk size (4) divides the per-process batch (8 / 2), so both runs sample the SAME tokens: asserted
  exactly on samples.jsonl. The rest is deterministic, with the same tolerances as offline.
  (Before this, every process drew the same random numbers: the 2-process run sampled differently.)
  With num_mini_batches > 1 the runs would legitimately differ: one process draws mini-batches from the
  whole batch, N processes from their own shares.
- resume: the resumed 2-process runs equal the uninterrupted ones exactly (weights bit for bit,
  metrics except timings), since layout, reduction order and every random stream are the same.

Plus the in-training win rate (a DPO run with the reward-model judge, maxent_rlhf.evaluation): the
same greedy generations and eval/* metrics from 2 processes as from 1. Plus main-process-only files and the batch-size errors (these need no launch: the plan functions take
the number of processes). About 60-80 s on 2 cores, nearly all of it the two launches.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from maxent_rlhf import distributed
from maxent_rlhf.checkpoints import ENGINE_STATE_DIR, load_checkpoint, save_checkpoint, uses_engine_state
from maxent_rlhf.distributed import check_launch
from maxent_rlhf.models import build_tiny_policy
from maxent_rlhf.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
CPU_YAML = ROOT / "configs" / "accelerate" / "cpu.yaml"
from helpers.run_compare import WEIGHT_ATOL  # noqa: E402  (tolerances and comparisons shared with the other N-process tests)
from helpers.run_compare import assert_metrics_close as _assert_metrics_close  # noqa: E402
from helpers.run_compare import checkpoint_weights as _weights  # noqa: E402
from helpers.run_compare import max_weight_diff as _max_weight_diff  # noqa: E402
from helpers.run_compare import run_metrics as _metrics  # noqa: E402

DDP_DRIVER = """
import sys, yaml
sys.path.insert(0, {root!r})
from accelerate.state import PartialState
import train_offline, train_rloo
from maxent_rlhf.config import config_from_dict
# one run per process is the scripts' normal life; to run several in one process keep the process group
# alive across them (`accelerator.end_training()` destroys it, and re-creating it under torchrun can hang)
destroy, PartialState.destroy_process_group = PartialState.destroy_process_group, lambda self, group=None: None
for job in yaml.safe_load(open(sys.argv[1])):
    mod, cls = {{"offline": (train_offline, train_offline.OfflineConfig), "rloo": (train_rloo, train_rloo.RLOOConfig)}}[job["script"]]
    mod.main(config_from_dict(cls, job["config"], source=job["name"]))
destroy(PartialState())
"""

WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it".split()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def launched(tiny_tokenizer):
    import tempfile

    # not under pytest's basetemp: a concurrent pytest session on the same machine rotates those
    # directories away, which would pull the files from under the minute-long launch
    d = Path(tempfile.mkdtemp(prefix="maxent_rlhf_distributed_"))
    try:
        yield _launch(d, tiny_tokenizer)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _launch(d, tiny_tokenizer):
    import random

    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model

    tiny_policy_dir, tiny_reward_dir = str(d / "policy"), str(d / "reward")
    build_tiny_policy(tiny_tokenizer, seed=0, save_dir=tiny_policy_dir)
    build_tiny_reward_model(tiny_tokenizer, seed=1, save_dir=tiny_reward_dir)
    rng = random.Random(0)
    pairs, prompts = d / "pairs.jsonl", d / "prompts.jsonl"
    with open(pairs, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {_sentence(rng, 3 + i % 3)} TL;DR:",
                                "chosen": _sentence(rng, 2 + i % 3), "rejected": _sentence(rng, 4 + i % 2),
                                "completion": _sentence(rng, 3)}) + "\n")  # reference summaries (reward norm)
    with open(prompts, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {_sentence(rng, 2 + i % 5)} TL;DR:"}) + "\n")
    (d / "refs").mkdir()
    with open(d / "refs" / "test.jsonl", "w") as f:  # 7 prompts with references: an odd share per process
        for i in range(7):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"SUBREDDIT: r/dogs POST: {_sentence(rng, 3 + i % 4)} TL;DR:",
                                "completion": _sentence(rng, 3)}) + "\n")
    offline = dict(
        model_name_or_path=tiny_policy_dir, dataset_name=str(pairs), loss_type="dpo", report_to="none", mixed_precision="no",
        global_batch_size=8, per_device_train_batch_size=2, max_steps=4, save_steps=2, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_ratio=0.0, max_prompt_length=32, max_completion_length=12, beta=0.5,
    )
    rloo = dict(
        model_name_or_path=tiny_policy_dir, reward_model_name_or_path=tiny_reward_dir, dataset_name=str(prompts),
        report_to="none", mixed_precision="no", global_batch_size=8, rloo_k=2, num_mini_batches=1,
        per_device_train_batch_size=2, local_rollout_forward_batch_size=4, num_ppo_epochs=1, num_iterations=4,
        save_steps=2, response_length=6, max_prompt_length=16, learning_rate=1e-3, regularizer="kl", kl_coef=0.05,
        sample_every=1, num_samples=8,
    )

    # two more shapes for the 1-vs-2 comparison: a reward model with sharded evaluation and the
    # reduced reference-mean normalisation, and the maxent regulariser with advantages whitened over
    # the gathered global batch and kl_ref computed every other iteration
    reward = dict(offline, loss_type="reward", learning_rate=1e-3, dataset_test_split="train", max_eval_samples=10, eval_steps=2,
                  per_device_eval_batch_size=4, save_steps=0)
    # the in-training win rate (maxent_rlhf.evaluation): generation split over processes, judged on the main one
    winrate = dict(offline, save_steps=0, eval_steps=2, judge="reward-model", judge_reward_model_name_or_path=tiny_reward_dir,
                   judge_dataset_name=str(d / "refs"), judge_max_samples=0, max_new_tokens=6, per_device_eval_batch_size=2)
    # (rloo: one epoch of one mini-batch, so train_rloo.update takes the old log-probs from its own forward; maxent: two epochs, the plain update)
    maxent = dict(rloo, regularizer="entropy", entropy_coef=0.1, length_normalize=True, whiten_advantages=True,
                  kl_ref_every=2, save_steps=0, sample_every=0, num_ppo_epochs=2)

    def jobs(tag, resume):
        out = [
            {"name": f"{name}-{tag}", "script": script, "config": dict(config, output_dir=str(d / f"{name}-{tag}"))}
            for name, script, config in (("offline", "offline", offline), ("rloo", "rloo", rloo),
                                         ("reward", "offline", reward), ("maxent", "rloo", maxent),
                                         ("winrate", "offline", winrate))
        ]
        if resume:  # a fresh run directory, continued from the uninterrupted run's step-2 checkpoint
            out += [
                {"name": f"{j['script']}-{tag}-resumed", "script": j["script"],
                 "config": dict(j["config"], output_dir=j["config"]["output_dir"] + "-resumed",
                                resume=j["config"]["output_dir"] + "/checkpoints/step_00000002")}
                for j in out[:2]
            ]
        return out

    (d / "driver.py").write_text(DDP_DRIVER.format(root=str(ROOT)))
    (d / "jobs2.yaml").write_text(yaml.safe_dump(jobs("p2", resume=True)))
    (d / "jobs1.yaml").write_text(yaml.safe_dump(jobs("p1", resume=False)))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    two = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_YAML), "--num_processes", "2",
           str(d / "driver.py"), str(d / "jobs2.yaml")]
    one = [sys.executable, str(d / "driver.py"), str(d / "jobs1.yaml")]
    procs = {}
    for name, cmd in (("2 processes", two), ("1 process", one)):
        log = open(d / f"{name.replace(' ', '_')}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
    for name, (p, log) in procs.items():
        try:
            p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
        log.close()
        text = Path(log.name).read_text()
        assert p.returncode == 0, f"{name} run failed (exit {p.returncode}):\n{text[-4000:]}"
    return d




@pytest.mark.parametrize("script", ["offline", "rloo", "reward", "maxent"])
def test_two_processes_match_one_process(launched, script):
    one, two = launched / f"{script}-p1", launched / f"{script}-p2"
    m1, m2 = _metrics(one), _metrics(two)
    assert sorted({m["step"] for m in m2}) == [1, 2, 3, 4]
    _assert_metrics_close(m2, m1)
    assert _max_weight_diff(_weights(one), _weights(two)) <= WEIGHT_ATOL
    # and the runs did train: the weights moved well beyond the tolerance
    start = load_file(str(Path(yaml.safe_load((two / "config.yaml").read_text())["model_name_or_path"]) / "model.safetensors"))
    final = _weights(two)
    assert max((final[k] - start[k]).abs().max().item() for k in final if k in start) > 10 * WEIGHT_ATOL


def test_in_training_win_rate_two_processes_equals_one(launched):
    """Each process generates its share (padded to equal batches), the main one judges: the same
    generations and eval/* metrics as one process, every process returning the same dict."""
    one, two = launched / "winrate-p1", launched / "winrate-p2"
    evals = lambda run: [m for m in _metrics(run) if "eval/win_rate" in m or "eval/missing" in m]
    e1, e2 = evals(one), evals(two)
    assert [m["step"] for m in e2] == [0, 2, 4] and all(m["eval/n"] == 7 for m in e2)
    _assert_metrics_close(e2, e1)
    for step in (0, 2, 4):
        name = f"eval/generations/step_{step:08d}.jsonl"
        assert (one / name).read_text() == (two / name).read_text()


def test_rloo_two_processes_sample_the_same_tokens(launched):
    def samples(run):
        rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        return [(r["step"], r["prompt"], r["completion"]) for r in rows]

    # samples.jsonl holds the main process's first rows: all 8 of the 1-process batch, rank 0's 4 of 8
    one, two = samples(launched / "rloo-p1"), samples(launched / "rloo-p2")
    assert len(two) == 4 * 4 and len(one) == 4 * 8
    by_step = {}
    for step, prompt, completion in one:
        by_step.setdefault(step, []).append((step, prompt, completion))
    assert two == [row for step in sorted(by_step) for row in by_step[step][:4]]


@pytest.mark.parametrize("script", ["offline", "rloo"])
def test_two_process_resume_equals_uninterrupted_run(launched, script):
    full, resumed = launched / f"{script}-p2", launched / f"{script}-p2-resumed"
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"
    _assert_metrics_close(_metrics(resumed), _metrics(full)[2:], exact=True)


def test_only_the_main_process_writes(launched):
    for run in ("offline-p2", "rloo-p2"):
        steps = [m["step"] for m in _metrics(launched / run)]
        assert steps == [1, 2, 3, 4], f"{run}: metrics.jsonl written by more than one process? {steps}"
        ckpts = sorted(p.name for p in (launched / run / "checkpoints").iterdir())
        assert ckpts == ["step_00000002", "step_00000004"], ckpts  # no leftover .tmp-* directories
        for ck in ckpts:  # one RNG file per process: a resume restores each process's own streams
            assert {p.name for p in (launched / run / "checkpoints" / ck).glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    rows = (launched / "rloo-p2" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 4 * 4  # 4 iterations x the main process's 4 rows, once


# --------------------------------------------------------------------------------------------------
# batch sizes that do not divide: the error names the numbers (no launch needed)
# --------------------------------------------------------------------------------------------------
def test_batch_size_errors_name_the_numbers():
    import train_rloo
    from maxent_rlhf.config import ConfigError, derive_batch_sizes

    assert derive_batch_sizes(8, 2, 2) == (4, 2)
    with pytest.raises(ConfigError, match=r"`global_batch_size` = 6 does not divide over 4 processes; use a multiple of 4"):
        derive_batch_sizes(6, 4, 1)
    with pytest.raises(ConfigError, match=r"= 8 over 2 processes gives 4 per process, which `per_device_train_batch_size` = 3 does not divide"):
        derive_batch_sizes(8, 2, 3)
    c = train_rloo.RLOOConfig(model_name_or_path="unused", reward_model_name_or_path="unused",
                              global_batch_size=8, rloo_k=2, num_mini_batches=1, per_device_train_batch_size=2, num_iterations=1)
    plan = train_rloo._batch_plan(c, 2)
    assert (plan.rows_local, plan.prompts_local, plan.mini_local, plan.grad_accum) == (4, 2, 4, 2)
    with pytest.raises(ConfigError, match=r"`global_batch_size` = 6 completions must be a multiple of num_processes x rloo_k = 2 x 2 = 4"):
        train_rloo._batch_plan(replace(c, global_batch_size=6), 2)
    with pytest.raises(ConfigError, match=r"8 over 2 processes gives 4 per process, which `per_device_train_batch_size` = 3 does not divide"):
        train_rloo._batch_plan(replace(c, per_device_train_batch_size=3), 2)


# ==================================================================================================
# FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo) against one process.
#
# Per backend, one 2-process `accelerate launch` runs, through the scripts' `main(cfg)` (driver:
# tests/helpers/cpu_sharding.py, which also explains the two shims accelerate needs to shard CPU processes):
# train_offline.py DPO and SimPO, train_rloo.py KL and entropy (length-normalised, kl_ref every other
# iteration), 4 steps each with a checkpoint at step 2, plus DPO and RLOO-KL resumed from that step-2
# checkpoint in a fresh run directory. One 1-process run of the same four configs is the reference.
# Launch configs: configs/accelerate/cpu_fsdp2.yaml (ACCELERATE_USE_CPU=true), and the SHIPPED
# deepspeed_zero2.yaml / deepspeed_zero3.yaml with `--num_processes 2 --mixed_precision no` (float32 on
# CPU; zero3 keeps zero3_init_flag, so frozen models take the zero.Init-off path and their own
# CPU-offloaded inference engines).
#
# Asserted per backend:
# - it sharded: accelerate ended with FSDP (version 2) / DEEPSPEED (stage 2 or 3), and each process holds
# half of the policy's parameters (FSDP2, ZeRO-3) or of the fp32 optimizer state (ZeRO-2);
# - 2 processes match 1: metrics within RTOL / ATOL, final weights within WEIGHT_ATOL (as
# the DDP tests above: same global batch, reduction order differs); RLOO samples the
# same tokens (generation runs on the sharded policy: FSDP2 all-gathers per layer with synced_gpus,
# ZeRO-3 gathers the full weights);
# - resume: the run resumed at step 2 equals the uninterrupted one exactly (weights bit for bit, metrics
# except timings);
# - the checkpoint is a full HF model: plain `from_pretrained` loads it with no missing / unexpected keys,
# full shapes, weights within WEIGHT_ATOL of the 1-process run's; engine_state/ holds one shard per process.
#
# Slow group (`pytest -m slow`): about 2.5 minutes for the three backends on 2 cores (README "Scale out").
# ==================================================================================================
ACCEL = ROOT / "configs" / "accelerate"
SHARDING_DRIVER = ROOT / "tests" / "helpers" / "cpu_sharding.py"
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
    _run([sys.executable, str(SHARDING_DRIVER), str(d / "jobs-p1.yaml"), str(d / "report-p1")], d, _env({}), d / "p1.log")
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
           str(SHARDING_DRIVER), str(d / f"jobs-{name}.yaml"), str(d / f"report-{name}")]
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
    assert _max_weight_diff(_weights(one), _weights(two)) <= WEIGHT_ATOL
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


# ==================================================================================================
# Single-process checks of the distributed plumbing whose DeepSpeed / FSDP branches cannot run here
# (no GPU, no deepspeed): checkpoint branch selection and contents, DeepSpeed config filling, the
# accumulation context, generation refusal, launch check. The fakes stand in for an
# accelerate Accelerator with exactly the attributes the code reads.
# ==================================================================================================
class FakeAccelerator:
    """Just enough of accelerate.Accelerator for runs.py / checkpoints.py / distributed.py in one process."""

    def __init__(self, dtype=DistributedType.NO, num_processes=1, ds_config=None, fsdp_version=None):
        self.distributed_type = dtype
        self.num_processes = num_processes
        self.gradient_accumulation_steps = 1
        self.process_index = 0
        self.is_main_process = True
        self.device = torch.device("cpu")
        self.trackers = []
        self.calls = []
        self._models = []
        self.gradient_state = types.SimpleNamespace(sync_gradients=True)
        self.gradient_state._set_sync_gradients = lambda v: setattr(self.gradient_state, "sync_gradients", v)
        plugin = types.SimpleNamespace(deepspeed_config=ds_config, zero_stage=(ds_config or {}).get("zero_optimization", {}).get("stage", 0))
        self.state = types.SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=types.SimpleNamespace(fsdp_version=fsdp_version))

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model):
        return model.state_dict()

    def save_state(self, output_dir):
        self.calls.append(("save_state", output_dir))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "shard_rank0").write_text("engine")

    def load_state(self, input_dir):
        self.calls.append(("load_state", input_dir))

    def no_sync(self, model):
        self.calls.append(("no_sync",))
        return torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)  # any context manager


def _model_opt(tok):
    model = build_tiny_policy(tok, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 20, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model, opt


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def test_engine_checkpoint_branch_uses_save_state_and_keeps_hf_weights(tmp_path, tiny_tokenizer):
    acc = FakeAccelerator(DistributedType.DEEPSPEED)
    assert uses_engine_state(acc) and uses_engine_state(FakeAccelerator(DistributedType.FSDP))
    assert not uses_engine_state(FakeAccelerator(DistributedType.MULTI_GPU)) and not uses_engine_state(None)
    model, opt = _model_opt(tiny_tokenizer)
    path = save_checkpoint(RunDir(tmp_path / "run", acc), 3, model, tiny_tokenizer, opt, state={"position": 7})
    assert acc.calls == [("save_state", str(tmp_path / "run/checkpoints/.tmp-step_00000003" / ENGINE_STATE_DIR))]
    assert (path / ENGINE_STATE_DIR / "shard_rank0").exists() and (path / "model.safetensors").exists()
    blob = torch.load(path / "trainer_state.pt", weights_only=True)
    assert blob["engine_state"] is True and blob["optimizer"] is None  # only rank 0's shard: not saved

    # resume: load_state restores weights + optimizer; load_checkpoint must not touch them itself
    acc2 = FakeAccelerator(DistributedType.DEEPSPEED)
    acc2._models = [model]
    model2, opt2 = build_tiny_policy(tiny_tokenizer, seed=5), None
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    state = load_checkpoint(path, model2, opt2, accelerator=acc2)
    assert state == {"position": 7, "step": 3}
    assert acc2.calls == [("load_state", str(path / ENGINE_STATE_DIR))]
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())


def test_engine_checkpoint_must_be_loaded_after_prepare(tmp_path, tiny_tokenizer):
    acc = FakeAccelerator(DistributedType.FSDP)
    model, opt = _model_opt(tiny_tokenizer)
    path = save_checkpoint(RunDir(tmp_path / "run", acc), 1, model, tiny_tokenizer, opt)
    with pytest.raises(RuntimeError, match="after accelerator.prepare"):
        load_checkpoint(path, model, opt, accelerator=FakeAccelerator(DistributedType.FSDP))


def test_checkpoint_kinds_do_not_mix(tmp_path, tiny_tokenizer):
    model, opt = _model_opt(tiny_tokenizer)
    plain = save_checkpoint(RunDir(tmp_path / "plain"), 1, model, tiny_tokenizer, opt)
    blob = torch.load(plain / "trainer_state.pt", weights_only=True)
    assert "engine_state" not in blob and blob["optimizer"] is not None  # CPU/DDP layout unchanged
    with pytest.raises(RuntimeError, match=r"without DeepSpeed/FSDP .* this run uses DEEPSPEED"):
        load_checkpoint(plain, model, opt, accelerator=FakeAccelerator(DistributedType.DEEPSPEED))
    engine = save_checkpoint(RunDir(tmp_path / "eng", FakeAccelerator(DistributedType.DEEPSPEED)), 1, model, tiny_tokenizer, opt)
    with pytest.raises(RuntimeError, match=r"under DeepSpeed/FSDP .* this run uses no accelerator"):
        load_checkpoint(engine, model, opt)
    # reading only the run state (no model / optimizer) is allowed from either kind
    assert load_checkpoint(engine)["step"] == 1


# --------------------------------------------------------------------------------------------------
# launch check
# --------------------------------------------------------------------------------------------------
def test_launch_without_a_process_group_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*accelerate sees 1.*ACCELERATE_USE_CPU=true"):
        RunDir(tmp_path / "run", FakeAccelerator(num_processes=1))
    check_launch(FakeAccelerator(DistributedType.MULTI_CPU, num_processes=2))  # a real group: fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(None)


# --------------------------------------------------------------------------------------------------
# DeepSpeed config, accumulation, generation, frozen models
# --------------------------------------------------------------------------------------------------
def test_configure_deepspeed_fills_auto_fields_and_names_conflicts():
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    acc = FakeAccelerator(DistributedType.DEEPSPEED, num_processes=4, ds_config=cfg)
    distributed.configure_deepspeed(acc, micro_batch_size=2, max_grad_norm=1.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_batch_size"] == 8 and cfg["gradient_clipping"] == 1.0
    # a script using accelerator.accumulate: DeepSpeed accumulates (and scales the loss) as many times
    cfg3 = {"zero_optimization": {"stage": 3}}
    acc3 = FakeAccelerator(DistributedType.DEEPSPEED, num_processes=2, ds_config=cfg3)
    acc3.gradient_accumulation_steps = 3
    distributed.configure_deepspeed(acc3, micro_batch_size=2, max_grad_norm=0.0)
    assert (cfg3["gradient_accumulation_steps"], cfg3["train_batch_size"], cfg3["gradient_clipping"]) == (3, 12, 0.0)
    bad = {"gradient_clipping": 0.5}
    with pytest.raises(ValueError, match=r"`gradient_clipping` = 0.5, but max_grad_norm = 1.0"):
        distributed.configure_deepspeed(FakeAccelerator(DistributedType.DEEPSPEED, ds_config=bad), 2, 1.0)
    distributed.configure_deepspeed(FakeAccelerator(DistributedType.MULTI_GPU, ds_config=None), 2, 1.0)  # no-op


def test_micro_step_holds_deepspeed_sync_until_the_last_micro_batch():
    acc = FakeAccelerator(DistributedType.DEEPSPEED, num_processes=2, ds_config={"zero_optimization": {"stage": 2}})
    seen = []
    for last in (False, False, True):
        with distributed.micro_step(acc, None, last):
            seen.append(acc.gradient_state.sync_gradients)
    assert seen == [False, False, True] and acc.gradient_state.sync_gradients is True
    ddp = FakeAccelerator(DistributedType.MULTI_GPU, num_processes=2)
    for last in (False, True):
        with distributed.micro_step(ddp, None, last):
            pass
    assert ddp.calls == [("no_sync",)]  # all-reduce skipped only before the last micro-batch


def test_generation_refuses_fsdp1_and_flags_synced_gpus(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    with pytest.raises(NotImplementedError, match="FSDP version 1.*fsdp2.yaml"):
        with distributed.unwrap_for_generation(FakeAccelerator(DistributedType.FSDP, fsdp_version=1), model):
            pass
    fsdp2 = FakeAccelerator(DistributedType.FSDP, fsdp_version=2)
    with distributed.unwrap_for_generation(fsdp2, model) as m:
        assert m is model
    assert distributed.needs_synced_gpus(fsdp2)
    assert distributed.needs_synced_gpus(FakeAccelerator(DistributedType.DEEPSPEED, ds_config={"zero_optimization": {"stage": 3}}))
    assert not distributed.needs_synced_gpus(FakeAccelerator(DistributedType.DEEPSPEED, ds_config={"zero_optimization": {"stage": 2}}))
    assert not distributed.needs_synced_gpus(FakeAccelerator(DistributedType.MULTI_GPU)) and not distributed.needs_synced_gpus(None)


def test_generate_accepts_a_ddp_style_wrapper(tiny_tokenizer):
    from maxent_rlhf.generation import hf_generate

    model = build_tiny_policy(tiny_tokenizer, seed=0)
    wrapper = torch.nn.Module()
    wrapper.module = model  # DDP exposes the model as .module and has no .generate
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    torch.manual_seed(0)
    a = hf_generate(wrapper, ids, mask, 4, 0, 1, do_sample=False)
    b = hf_generate(model, ids, mask, 4, 0, 1, do_sample=False)
    assert torch.equal(a, b) and a.shape == (1, 4)


def test_frozen_inference_config_offloads_and_drops_training_fields(monkeypatch):
    ds = {
        "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"}, "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto"},
    }
    cfg = distributed.frozen_inference_config(ds, "cpu", hidden_size=8)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu" and cfg["bf16"] == {"enabled": True}
    assert "optimizer" not in cfg and "offload_optimizer" not in cfg["zero_optimization"] and "train_batch_size" not in cfg
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["zero_optimization"]["reduce_bucket_size"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and "optimizer" in ds  # the policy's config is untouched
    monkeypatch.setenv("MAXENT_FROZEN_OFFLOAD", "gpu")
    with pytest.raises(ValueError, match="MAXENT_FROZEN_OFFLOAD must be 'cpu' or 'none'"):
        distributed.frozen_offload_device()


def test_prepare_frozen_model_without_zero3_is_a_frozen_replica(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=0).train()
    out = distributed.prepare_frozen_model(model, FakeAccelerator(DistributedType.MULTI_CPU, num_processes=2), dtype=torch.bfloat16)
    assert out is model and not model.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    with distributed.frozen_model_loading(FakeAccelerator()):
        pass


# --------------------------------------------------------------------------------------------------
# shipped accelerate configs
# --------------------------------------------------------------------------------------------------
def test_accelerate_configs_load_and_use_bf16_on_gpu():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.stem for p in (ROOT / "configs/accelerate").glob("*.yaml")}
    assert {"cpu", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"} <= names
    for name in sorted(names):
        path = ROOT / "configs/accelerate" / f"{name}.yaml"
        raw = yaml.safe_load(path.read_text())
        cfg = load_config_from_file(str(path))
        assert cfg.mixed_precision == ("no" if name.startswith("cpu") else "bf16"), name  # cpu*.yaml: float32 on CPU
        assert path.read_text().lstrip().startswith("#"), f"{name}: starts with a comment on when to pick it"
    z3 = yaml.safe_load((ROOT / "configs/accelerate/deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    assert z3["zero_stage"] == 3 and z3["zero3_init_flag"] and z3["zero3_save_16bit_model"]
    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "GPTNeoXLayer"


def test_frozen_model_loading_switches_fsdp_rank0_only_loading_off(monkeypatch):
    import os

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with distributed.frozen_model_loading(FakeAccelerator(DistributedType.FSDP, fsdp_version=2)):
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # real weights on every rank
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


@pytest.mark.parametrize("config", ["multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_slurm_launch_line_gives_torchrun_a_c10d_rendezvous(config):
    """What scripts/slurm/train_multinode.sbatch hands `accelerate launch` on node 1 of 2 becomes
    torchrun's nnodes / node_rank / rdzv_endpoint (parsed only: nothing is launched)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    sbatch = (ROOT / "scripts/slurm/train_multinode.sbatch").read_text()
    for flag in ("--num_machines", "--machine_rank \"$SLURM_PROCID\"", "--main_process_ip", "--rdzv_backend c10d"):
        assert flag in sbatch, flag
    args = launch_command_parser().parse_args([
        "--config_file", str(ROOT / f"configs/accelerate/{config}.yaml"), "--num_machines", "2", "--num_processes", "16",
        "--machine_rank", "1", "--main_process_ip", "node-a", "--main_process_port", "29500", "--rdzv_backend", "c10d",
        "train_rloo.py", "--config", "x.yaml",
    ])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # several nodes: torchrun on each node, not DeepSpeed's pdsh runner over ssh
        assert args.deepspeed_multinode_launcher == "standard"
    prepare_multi_gpu_env(args)  # the env torchrun gets (DeepSpeed's "standard" launcher builds the same)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("c10d", "node-a:29500")
