"""Two processes on CPU (gloo, `accelerate launch --config_file configs/accelerate/cpu.yaml`) against one.

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
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CPU_YAML = ROOT / "configs" / "accelerate" / "cpu.yaml"
from helpers.run_compare import WEIGHT_ATOL  # noqa: E402  (tolerances and comparisons shared with the other N-process tests)
from helpers.run_compare import assert_metrics_close as _assert_metrics_close  # noqa: E402
from helpers.run_compare import checkpoint_weights as _weights  # noqa: E402
from helpers.run_compare import max_weight_diff as _max_weight_diff  # noqa: E402
from helpers.run_compare import run_metrics as _metrics  # noqa: E402

DRIVER = """
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

    (d / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
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
