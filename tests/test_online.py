"""train_online.py (online DPO / SimPO / ...) on tiny local models: the pair selection on hand-built scores,
the online loss equal to train_offline's on the same pairs, learning on a fixed pair, every metric of a run,
exact resume, and 2 processes == 1 process (slow)."""
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
import yaml

import train_offline
import train_online
from maxent_rlhf import data, generation, objectives, rollout
from maxent_rlhf.checkpoints import list_checkpoints
from maxent_rlhf.runs import read_metrics
from helpers.resume import assert_same_checkpoint_weights, copy_killed_run

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2-core test machine: one torch thread

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a my cat dog ran sat on mat far away home happy sad big small today we i you it".split()




# --------------------------------------------------------------------------------------------------
# step 3: chosen = best, rejected = worst; ties skipped
# --------------------------------------------------------------------------------------------------
def test_pairs_k2():
    sel = objectives.best_worst_pairs(torch.tensor([[1.0, 2.0], [3.0, 3.0], [0.5, -1.0]]))
    assert sel.chosen.tolist() == [1, 0, 0] and sel.rejected.tolist() == [0, 0, 1]
    assert sel.valid.tolist() == [True, False, True]  # the equal pair is a tie


def test_pairs_k4_with_partial_and_full_ties():
    scores = torch.tensor([[0.0, 3.0, 3.0, 1.0],  # two equal best: the first; worst unique
                           [2.0, 2.0, 2.0, 2.0],  # every score equal: a tie, skipped
                           [1.0, 1.0, -2.0, -2.0],  # equal best and equal worst: the first of each
                           [-0.1, 5.0, -3.0, 0.2]])
    sel = objectives.best_worst_pairs(scores)
    assert sel.chosen.tolist() == [1, 0, 0, 1] and sel.rejected.tolist() == [0, 0, 2, 2]
    assert sel.valid.tolist() == [True, False, True, True]


def test_pairs_refuse_k1_and_non_finite_scores():
    with pytest.raises(ValueError, match="k >= 2"):
        objectives.best_worst_pairs(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        objectives.best_worst_pairs(torch.tensor([[1.0, float("nan")]]))


def test_select_pairs_gives_rollout_rows():
    ro = rollout.Rollout(torch.zeros(8, 2, dtype=torch.long), torch.ones(8, 2, dtype=torch.long),
                         torch.zeros(8, 3, dtype=torch.long), torch.ones(8, 3, dtype=torch.long), torch.ones(8, dtype=torch.bool))
    ro.scores = torch.tensor([0.0, 1.0, 5.0, 2.0, 7.0, 7.0, 7.0, 7.0])  # k = 4: prompt 0 and a tied prompt 1
    c = train_online.OnlineConfig(model_name_or_path="unused", rloo_k=4, global_batch_size=8, per_device_train_batch_size=2)
    sel = train_online.select_pairs(c, ro)
    assert sel.chosen.tolist() == [2, 4] and sel.rejected.tolist() == [0, 4] and sel.valid.tolist() == [True, False]


def test_one_loss_dispatch_for_both_trainers():
    assert set(train_offline.LOSSES) - {"sft", "reward"} == set(objectives.PREFERENCE_LOSSES)
    assert set(train_online.ONLINE_LOSSES) | set(train_online.OFFLINE_ONLY) == set(train_offline.LOSSES)
    s, n = torch.tensor([[-2.0, -5.0]]), torch.tensor([[2.0, 4.0]])
    params = objectives.PreferenceLossParams(beta=2.0, simpo_gamma=0.5)
    out = objectives.preference_loss("simpo", s, n, None, params)  # -log sigma(2 (-1) - 2 (-1.25) - 0.5) = log 2
    assert float(out.losses) == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="`ref_logps` is required"):
        objectives.preference_loss("dpo", s, n, None, params)
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        objectives.preference_loss("sft", s, n, None, params)


# --------------------------------------------------------------------------------------------------
# step 5 on hand-built pairs: the same numbers as train_offline; learning on a fixed pair
# --------------------------------------------------------------------------------------------------
PROMPTS = ["SUBREDDIT: r/cats POST: my cat sat on the mat TL;DR:", "SUBREDDIT: r/dogs POST: dog ran TL;DR:",
           "SUBREDDIT: r/cats POST: we sat far away home today TL;DR:"]
CHOSEN = ["my cat sat", "dog ran far away home", "we sat"]
REJECTED = ["the the the a a", "sad", "home home big small"]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _models(tiny_policy_dir, lr=1e-2):
    from accelerate import Accelerator

    from maxent_rlhf.models import load_policy, load_tokenizer

    tok = load_tokenizer(tiny_policy_dir, padding_side="left")
    policy, ref = load_policy(tiny_policy_dir), load_policy(tiny_policy_dir)
    rollout.disable_dropout(policy)
    rollout.disable_dropout(ref)
    m = rollout.Models(Accelerator(cpu=True), tok, policy, ref_policy=ref)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return m, optimizer, scheduler


def _pair_rollout(tok, eos=True):
    """The three prompts, each with (chosen, rejected) as its k = 2 samples (rows 2p, 2p + 1)."""
    eos_ids = [tok.eos_token_id] if eos else []
    prompts = [_ids(tok, p) for p in PROMPTS]
    responses = [r for ch, rj in zip(CHOSEN, REJECTED) for r in (_ids(tok, " " + ch) + eos_ids, _ids(tok, " " + rj) + eos_ids)]
    q_ids, q_mask = generation.left_pad([p for p in prompts for _ in range(2)], tok.pad_token_id)
    width = max(len(r) for r in responses)
    resp = torch.full((len(responses), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(resp)
    for i, r in enumerate(responses):
        resp[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    ro = rollout.Rollout(q_ids, q_mask, resp, mask, torch.full((len(responses),), eos))
    ro.scores = torch.tensor([1.0, 0.0] * len(PROMPTS))
    examples = [{"prompt": p, "responses": [responses[2 * i], responses[2 * i + 1]]} for i, p in enumerate(prompts)]
    return ro, examples


def _online_config(loss_type, **kw):
    base = dict(model_name_or_path="unused", loss_type=loss_type, rloo_k=2, global_batch_size=6,
                per_device_train_batch_size=3, temperature=1.0, beta=0.5, simpo_gamma=0.3, max_grad_norm=0.0)
    return train_online.OnlineConfig(**{**base, **kw})


def _online_step(c, m, ro, optimizer, scheduler):
    plan = train_online.batch_plan(c, 1)
    if c.needs_loss_ref():
        ro.ref_logprobs = rollout.policy_logprobs(c, m, ro, m.ref_policy, 1)
    stats = train_online.update(c, m, plan, ro, train_online.select_pairs(c, ro), optimizer, scheduler)
    return {k: float(v) / stats["n_pairs"] for k, v in stats["sums"].items()}


@pytest.mark.parametrize("loss_type", train_online.ONLINE_LOSSES)
def test_online_loss_equals_offline_loss_on_the_same_pairs(tiny_policy_dir, loss_type):
    m, optimizer, scheduler = _models(tiny_policy_dir)
    ro, examples = _pair_rollout(m.tokenizer)
    c = _online_config(loss_type)
    online = _online_step(c, m, ro, optimizer, scheduler)  # metrics of the pre-update forward

    m2, _, _ = _models(tiny_policy_dir)
    off_c = train_offline.OfflineConfig(model_name_or_path="unused", loss_type=loss_type, beta=c.beta,
                                        simpo_gamma=c.simpo_gamma)
    om = train_offline.Models(model=m2.policy, hf_model=m2.policy, ref_model=m2.ref_policy)
    batch = data.collate_responses(examples, m2.tokenizer.pad_token_id)
    with torch.no_grad():
        losses, stats = train_offline.batch_loss(off_c, om, batch, None)
    offline = {"train/loss": float(losses.mean()), **{k: float(v.mean()) for k, v in stats.items()}}
    assert set(offline) == set(online)  # the same pairwise metrics, ref/logratio where the loss reads the reference
    for k in offline:
        assert online[k] == pytest.approx(offline[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("loss_type", ["simpo", "dpo"])
def test_loss_goes_down_and_margin_grows_on_a_fixed_pair(tiny_policy_dir, loss_type):
    m, optimizer, scheduler = _models(tiny_policy_dir, lr=3e-3)
    ro, _ = _pair_rollout(m.tokenizer)
    c = _online_config(loss_type)
    steps = [_online_step(c, m, ro, optimizer, scheduler) for _ in range(6)]
    losses, margins = [s["train/loss"] for s in steps], [s["rewards/margins"] for s in steps]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert steps[-1]["rewards/accuracies"] == 1.0


def test_all_tied_iteration_makes_no_step(tiny_policy_dir):
    m, optimizer, scheduler = _models(tiny_policy_dir)
    ro, _ = _pair_rollout(m.tokenizer)
    ro.scores = torch.zeros(len(ro))
    before = {k: v.clone() for k, v in m.policy.state_dict().items()}
    c = _online_config("simpo")
    stats = train_online.update(c, m, train_online.batch_plan(c, 1), ro, train_online.select_pairs(c, ro),
                                optimizer, scheduler)
    assert stats["n_pairs"] == 0 and not stats["sums"]
    assert all(torch.equal(before[k], v) for k, v in m.policy.state_dict().items())


# --------------------------------------------------------------------------------------------------
# end to end: every metric, resume
# --------------------------------------------------------------------------------------------------
EVERY_METRIC = [
    "objective/scores", "objective/entropy", "objective/entropy_per_token", "objective/kl_ref", "objective/kl_ref_k3",
    "objective/kl_prev", "objective/kl_prev_k3", "objective/kl_prev_reverse", "objective/kl_prev_reverse_k3",
    "objective/kl_prev_ess", "policy/entropy", "response/length", "response/eos_fraction",
    "train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "online/pairs", "online/ties", "online/score_gap", "train/lr",
]




@pytest.fixture(scope="module")
def base(tiny_policy_dir, tiny_reward_dir, prompts_file):
    return train_online.OnlineConfig(
        model_name_or_path=tiny_policy_dir, reward_model_name_or_path=tiny_reward_dir, dataset_name=prompts_file,
        global_batch_size=8, rloo_k=2, per_device_train_batch_size=2, num_iterations=2, response_length=6,
        max_prompt_length=16, report_to="none", sample_every=1, num_samples=2, learning_rate=1e-3, beta=0.5,
    )


@pytest.mark.parametrize("loss_type", ["simpo", "dpo"])
def test_run_logs_every_metric(base, tmp_path, loss_type):
    c = replace(base, loss_type=loss_type, rloo_k=4, per_device_train_batch_size=1, output_dir=str(tmp_path / "run"))
    run = Path(train_online.main(c))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        missing = [k for k in EVERY_METRIC if k not in r]
        assert not missing, missing
        assert r["online/pairs"] + r["online/ties"] == 2 and r["online/score_gap"] > 0
        assert r["objective/kl_ref_k3"] >= 0 and 0 < r["objective/kl_prev_ess"] <= 1 + 1e-6
        assert ("ref/logratio" in r) == (loss_type == "dpo")
    assert records[0]["objective/kl_ref"] == 0.0 and records[1]["objective/kl_ref_k3"] > 0  # iteration 1 samples pi_ref
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2] and {s["pair"] for s in samples} <= {"chosen", "rejected", ""}
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert (run / "curves.png").exists()


def test_reference_free_loss_without_kl_ref_loads_no_reference(base, tmp_path):
    c = replace(base, loss_type="simpo", kl_ref_every=0, output_dir=str(tmp_path / "run"))
    assert not c.needs_ref() and replace(c, loss_type="dpo").needs_ref()
    records = read_metrics(train_online.main(c))
    assert all("objective/kl_ref" not in r and r["objective/kl_ref_every"] == 0 for r in records)


def test_resume_is_exact(base, tmp_path):
    """4 iterations straight == 2 iterations, 'kill', resume for the last 2: identical weights and metrics."""
    c = replace(base, loss_type="dpo", num_iterations=4, save_steps=2, output_dir=str(tmp_path / "full"))
    full = Path(train_online.main(c))
    killed = copy_killed_run(full, tmp_path / "killed", checkpoint_step=2, logged_lines=3)  # step 3 logged, then the kill
    resumed = Path(train_online.main(replace(c, output_dir=str(killed), resume="latest")))
    assert_same_checkpoint_weights(full, resumed, step=4)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}  # noqa: E731
    assert [strip(r) for r in read_metrics(full)] == [strip(r) for r in read_metrics(resumed)]


def test_batch_errors_name_the_numbers():
    from maxent_rlhf.config import ConfigError

    c = _online_config("simpo", global_batch_size=8, rloo_k=2, per_device_train_batch_size=2, num_iterations=1)
    plan = train_online.batch_plan(c, 2)
    assert (plan.prompts_local, plan.rows_local, plan.grad_accum) == (2, 4, 1)
    with pytest.raises(ConfigError, match=r"`global_batch_size` = 6 completions must be a multiple of num_processes x rloo_k"):
        train_online.batch_plan(replace(c, global_batch_size=6), 2)
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        train_online.batch_plan(replace(c, per_device_train_batch_size=3), 2)
    with pytest.raises(ConfigError, match="`rloo_k` = 1"):
        _online_config("simpo", rloo_k=1)
    with pytest.raises(ConfigError, match="offline loss"):
        _online_config("sft")


def test_online_config_refuses_what_the_online_loss_cannot_do():
    from maxent_rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="the pairwise loss takes no importance weights"):
        _online_config("simpo", use_vllm=True, vllm_importance_sampling_correction=True)
    with pytest.raises(ConfigError, match="the online policy is a causal LM"):
        _online_config("simpo", use_peft=True, lora_task_type="SEQ_CLS")


# --------------------------------------------------------------------------------------------------
# LoRA: the adapter trains, the reference is the policy with it switched off
# --------------------------------------------------------------------------------------------------
def test_lora_online_dpo_trains_an_adapter_against_its_adapter_off_self(base, tmp_path, monkeypatch, tiny_policy_dir):
    pytest.importorskip("peft")
    from maxent_rlhf import checkpoints, lora

    loaded, real_load = [], rollout.load_policy
    monkeypatch.setattr(rollout, "load_policy", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    c = replace(base, loss_type="dpo", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=2e-2,
                shared_prefix=False, output_dir=str(tmp_path / "run"))
    run = Path(train_online.main(c))
    assert loaded == [tiny_policy_dir]  # the policy only: no reference copy
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    # iteration 1 samples from the reference itself (B = 0): KL exactly 0 and DPO's implicit margins 0
    assert records[0]["objective/kl_ref"] == 0.0 and abs(records[0]["rewards/margins"]) < 1e-5
    assert records[1]["objective/kl_ref_k3"] > 0  # the adapter moved the policy away from its adapter-off self
    ckpt = checkpoints.latest_checkpoint(run)
    assert lora.is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# the rollout engine gets the weights after every update (as in train_rloo.py)
# --------------------------------------------------------------------------------------------------
class CopyEngine:
    """The vLLM engine's interface on CPU: a copy of the policy that only `load_weights` changes, which samples
    (`generation.sample`) and scores from that copy, so an engine that missed a sync probes stale weights."""

    dtype, enable_sleep_mode, start_seconds = "float32", False, 0.0

    def __init__(self, path):
        from maxent_rlhf.models import load_policy

        self.model, self.loads = load_policy(path).eval(), 0

    def wake_up(self):
        pass

    def sleep(self):
        pass

    def close(self):
        pass

    def load_weights(self, named_tensors):
        missing, unexpected = self.model.load_state_dict(dict(named_tensors), strict=False)
        assert not unexpected and all("embed_out" in k or "lm_head" in k for k in missing), (missing, unexpected)
        self.loads += 1

    def _logprobs(self, ids, mask, context_length, temperature):
        with torch.no_grad():
            return generation.response_logprobs(self.model, ids, mask, context_length, temperature)

    def sequence_logprobs(self, prompt, tokens, temperature):
        ids = torch.tensor([prompt + tokens])
        return self._logprobs(ids, torch.ones_like(ids), len(prompt), temperature)[0]

    def generate(self, prompts, n, max_tokens, temperature, eos_token_id, pad_token_id, seed, row_offset):
        query_ids, query_mask = generation.left_pad([p for p in prompts for _ in range(n)], pad_token_id)
        torch.manual_seed(seed + row_offset)
        with torch.no_grad():
            raw = generation.sample(self.model, query_ids, query_mask, max_tokens, eos_token_id, pad_token_id,
                                    temperature=temperature)
        responses, response_mask, _ = generation.truncate_after_eos(raw, eos_token_id, pad_token_id)
        lp = self._logprobs(torch.cat([query_ids, responses], 1), torch.cat([query_mask, response_mask], 1),
                            query_ids.shape[1], temperature)
        return raw, lp * response_mask


def test_the_engine_takes_the_weights_after_every_update_and_a_missed_sync_stops_the_run(base, tmp_path, monkeypatch):
    from maxent_rlhf import vllm_engine

    engines = []
    monkeypatch.setattr(vllm_engine, "start_engine",
                        lambda c, accelerator, max_model_len: engines.append(CopyEngine(c.model_name_or_path)) or engines[-1])
    c = replace(base, loss_type="dpo", use_vllm=True, learning_rate=1e-2, output_dir=str(tmp_path / "synced"))
    records = read_metrics(train_online.main(c))
    assert [r["step"] for r in records] == [1, 2] and engines[0].loads == 2  # one push per update
    for r in records:  # after each push the engine's log-probs are the trainer's
        assert r["rollout/engine_logprob_diff"] <= 1e-5 and r["rollout/engine_trainer_logprob_diff"] <= 1e-5, r
        assert r["time/weight_sync"] > 0
    assert records[0]["objective/kl_prev"] != 0  # the update moved the policy: a stale engine would show

    monkeypatch.setattr(CopyEngine, "load_weights", lambda self, named_tensors: None)  # the push skipped
    with pytest.raises(vllm_engine.EngineSyncError, match="iteration 1"):
        train_online.main(replace(c, output_dir=str(tmp_path / "stale")))


# --------------------------------------------------------------------------------------------------
# 2 processes == 1 process (gloo on CPU), and the 2-process resume
# --------------------------------------------------------------------------------------------------
DRIVER = """
import sys, yaml
sys.path.insert(0, {root!r})
from accelerate.state import PartialState
import train_online
from maxent_rlhf.config import config_from_dict
destroy, PartialState.destroy_process_group = PartialState.destroy_process_group, lambda self, group=None: None
for job in yaml.safe_load(open(sys.argv[1])):
    train_online.main(config_from_dict(train_online.OnlineConfig, job["config"], source=job["name"]))
destroy(PartialState())
"""


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_tokenizer):
    from helpers.run_compare import WEIGHT_ATOL, assert_metrics_close, checkpoint_weights, max_weight_diff, run_metrics

    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model

    d = Path(tempfile.mkdtemp(prefix="maxent_rlhf_online_"))
    try:
        build_tiny_policy(tiny_tokenizer, seed=0, save_dir=str(d / "policy"))
        build_tiny_reward_model(tiny_tokenizer, seed=1, save_dir=str(d / "reward"))
        import random

        rng = random.Random(0)
        with open(d / "prompts.jsonl", "w") as f:
            for i in range(16):
                f.write(json.dumps({"prompt": f"SUBREDDIT: r/cats POST: {' '.join(rng.choice(WORDS) for _ in range(2 + i % 5))} TL;DR:"}) + "\n")
        config = dict(model_name_or_path=str(d / "policy"), reward_model_name_or_path=str(d / "reward"),
                      dataset_name=str(d / "prompts.jsonl"), report_to="none", mixed_precision="no", global_batch_size=8,
                      rloo_k=2, per_device_train_batch_size=1, local_rollout_forward_batch_size=4, num_iterations=4,
                      save_steps=2, response_length=6, max_prompt_length=16, learning_rate=1e-3, loss_type="dpo", beta=0.5,
                      sample_every=0)
        simpo = dict(config, loss_type="simpo", beta=2.0, simpo_gamma=0.5, save_steps=0)

        def jobs(tag):
            out = [{"name": f"{n}-{tag}", "config": dict(cfg, output_dir=str(d / f"{n}-{tag}"))}
                   for n, cfg in (("dpo", config), ("simpo", simpo))]
            if tag == "p2":
                out.append({"name": "dpo-p2-resumed", "config": dict(config, output_dir=str(d / "dpo-p2-resumed"),
                                                                      resume=str(d / "dpo-p2" / "checkpoints" / "step_00000002"))})
            return out

        (d / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
        for tag in ("p1", "p2"):
            (d / f"jobs_{tag}.yaml").write_text(yaml.safe_dump(jobs(tag)))
        env = dict(os.environ, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        cmds = {"p2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", "2",
                       str(d / "driver.py"), str(d / "jobs_p2.yaml")],
                "p1": [sys.executable, str(d / "driver.py"), str(d / "jobs_p1.yaml")]}
        for tag, cmd in cmds.items():
            p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, f"{tag} failed:\n{(p.stdout + p.stderr)[-4000:]}"
        from safetensors.torch import load_file

        start = load_file(str(d / "policy" / "model.safetensors"))
        for name in ("dpo", "simpo"):
            m1 = run_metrics(d / f"{name}-p1")
            assert_metrics_close(run_metrics(d / f"{name}-p2"), m1)
            assert sum(m["online/pairs"] for m in m1) > 0
            final = checkpoint_weights(d / f"{name}-p2")
            assert max_weight_diff(checkpoint_weights(d / f"{name}-p1"), final) <= WEIGHT_ATOL
            # and the runs did train: the weights moved well beyond the tolerance
            assert max((final[k] - start[k]).abs().max().item() for k in final if k in start) > 10 * WEIGHT_ATOL
        # the resumed 2-process run equals the uninterrupted one exactly
        assert_metrics_close(run_metrics(d / "dpo-p2-resumed")[-2:], run_metrics(d / "dpo-p2")[-2:], exact=True)
        wa, wb = checkpoint_weights(d / "dpo-p2"), checkpoint_weights(d / "dpo-p2-resumed")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    finally:
        shutil.rmtree(d, ignore_errors=True)
