"""Every shipped config rehearsed: each YAML in configs/ runs through its script for one iteration / two
steps, with ONLY the hub ids swapped for local tiny stand-ins and the batch sizes scaled down.

Overridden keys, per script (asserted: `test_only_the_listed_keys_were_overridden`, and the resolved
config.yaml of every run equals the shipped YAML on every other key):

    train_rloo.py      model_name_or_path, reward_model_name_or_path, dataset_name      (hub ids)
                       global_batch_size, per_device_train_batch_size,
                       local_rollout_forward_batch_size                                  (batch sizes)
                       num_iterations, output_dir                                        (1 iteration, a temp dir)
    train_online.py    the same keys as train_rloo.py                                    (pairs per micro-batch: 2)
    train_offline.py   model_name_or_path, dataset_name, reward_norm_dataset             (hub ids)
                       global_batch_size, per_device_train_batch_size,
                       per_device_eval_batch_size                                        (batch sizes)
                       max_steps, output_dir                                             (2 steps, a temp dir)
    evaluate_judge.py  checkpoints, sft_model_name_or_path, dataset_name                 (a stand-in policy, hub ids)
                       n, per_device_eval_batch_size, output_dir                         (4 prompts, a temp dir)

Stand-ins: the paper's hub models (cleanrl/EleutherAI_pythia-*-deduped__{sft,reward}__tldr,
EleutherAI/pythia-1b-deduped) -> a tiny GPT-NeoX causal LM / one-label classifier built here;
`trl-lib/tldr` and `trl-lib/tldr-preference` -> local split files with exactly the hub datasets'
columns (prompt / completion; prompt / chosen / rejected, all strings; TL;DR prompt format
"SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:", completions " " + summary; see the dataset
cards on the hub); `toylab://NAME` -> `toylab://test/NAME`, the toy lab's own seconds-long profile
(same formats, tiny sizes). Everything else (sequence lengths 512 / 53 / 169, gradient checkpointing,
precomputed reference log-probs, reward normalisation, regularisers, schedules) runs as shipped.

Accelerate configs: every file parsed and validated by accelerate's own launch code (the environment
it would hand the processes is checked key by key); run on CPU processes where the backend runs there:
single_gpu.yaml, multi_gpu.yaml and fsdp2.yaml here (2 processes instead of 8), cpu.yaml in
tests/test_distributed.py, cpu_fsdp2.yaml / deepspeed_zero2.yaml / deepspeed_zero3.yaml in
the same file.

Slow group (`pytest -m slow`), except the parsing checks.
"""
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ACCEL = CONFIGS / "accelerate"
SCRIPT_OF = {  # every experiment config and the script that runs it (a new config must be added here)
    "dpo_1b.yaml": "offline", "rm_1b.yaml": "offline", "sft_1b.yaml": "offline", "simpo_1b.yaml": "offline",
    "kl_1b.yaml": "rloo", "kl_2p8b.yaml": "rloo", "kl_6p9b.yaml": "rloo", "kl_6p9b_lora.yaml": "rloo",
    "maxent_1b.yaml": "rloo", "maxent_2p8b.yaml": "rloo", "maxent_6p9b.yaml": "rloo", "maxent_6p9b_lora.yaml": "rloo",
    "minent_1b.yaml": "rloo", "minent_2p8b.yaml": "rloo",
    "toy/dpo.yaml": "offline", "toy/simpo.yaml": "offline",
    "toy/entropy.yaml": "rloo", "toy/kl.yaml": "rloo", "toy/maxent.yaml": "rloo", "toy/minent.yaml": "rloo",
    "toy/none.yaml": "rloo", "toy/overopt.yaml": "rloo", "toy/length_maxent.yaml": "rloo", "toy/length_entropy.yaml": "rloo",
    "online_dpo_1b.yaml": "online", "online_simpo_1b.yaml": "online",
    "toy/online_dpo.yaml": "online", "toy/online_simpo.yaml": "online", "toy/online_simpo_gamma0.yaml": "online",
    "toy/eval.yaml": "judge",
}
HUB_KEYS = ("model_name_or_path", "ref_model_name_or_path", "reward_model_name_or_path", "tokenizer_name_or_path",
            "sft_model_name_or_path", "dataset_name", "eval_dataset_name", "reward_norm_dataset")
ALLOWED_OVERRIDES = {
    "rloo": {"model_name_or_path", "reward_model_name_or_path", "dataset_name", "global_batch_size",
             "per_device_train_batch_size", "local_rollout_forward_batch_size", "num_iterations", "output_dir"},
    "online": {"model_name_or_path", "reward_model_name_or_path", "dataset_name", "global_batch_size",
               "per_device_train_batch_size", "local_rollout_forward_batch_size", "num_iterations", "output_dir"},
    "offline": {"model_name_or_path", "dataset_name", "reward_norm_dataset", "global_batch_size",
                "per_device_train_batch_size", "per_device_eval_batch_size", "max_steps", "output_dir"},
    "judge": {"checkpoints", "sft_model_name_or_path", "dataset_name", "n", "per_device_eval_batch_size", "output_dir"},
}
# the hub datasets' formats (dataset cards of trl-lib/tldr and trl-lib/tldr-preference)
HUB_FORMATS = {
    "trl-lib/tldr": {"columns": ["prompt", "completion"], "splits": ["train", "validation", "test"]},
    "trl-lib/tldr-preference": {"columns": ["prompt", "chosen", "rejected"], "splits": ["train", "validation"]},
}
HUB_MODEL = re.compile(r"^(cleanrl/EleutherAI_pythia-(1b|2\.8b|6\.9b)-deduped__(sft|reward)__tldr|EleutherAI/pythia-1b-deduped)$")
WORDS = ("the a my we i you it is was and but not very good bad help cat dog home work friend today "
         "yesterday long short happy sad big small boyfriend girlfriend job money advice").split()
SUBREDDITS = ["relationships", "AskReddit", "personalfinance", "cats"]


def _sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _tldr_prompt(rng):
    return (f"SUBREDDIT: r/{rng.choice(SUBREDDITS)}\n\nTITLE: {_sentence(rng, 3, 8)}\n\n"
            f"POST: {_sentence(rng, 20, 60)}\n\nTL;DR:")


def _build_standins(d: Path) -> dict:
    from maxent_rlhf.data import load_any_dataset
    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model, build_word_tokenizer

    tok = build_word_tokenizer(["SUBREDDIT:", "TITLE:", "POST:", "TL;DR:"] + [f"r/{s}" for s in SUBREDDITS] + WORDS)
    # 1024 positions: the paper configs' 512-token prompts + 169-token responses must fit, as in Pythia (2048)
    build_tiny_policy(tok, seed=0, save_dir=d / "policy", max_position_embeddings=1024)
    build_tiny_reward_model(tok, seed=1, save_dir=d / "reward", max_position_embeddings=1024)
    rng = random.Random(0)
    sizes = {"train": 16, "validation": 8, "test": 8}
    rows = {
        "trl-lib/tldr": lambda: {"prompt": _tldr_prompt(rng), "completion": " " + _sentence(rng, 4, 20)},
        "trl-lib/tldr-preference": lambda: {"prompt": _tldr_prompt(rng), "chosen": " " + _sentence(rng, 4, 20),
                                            "rejected": " " + _sentence(rng, 4, 30)},
    }
    paths = {}
    for hub_id, fmt in HUB_FORMATS.items():
        out = d / hub_id.replace("/", "__")
        out.mkdir()
        for split in fmt["splits"]:
            with open(out / f"{split}.jsonl", "w") as f:
                for _ in range(sizes[split]):
                    f.write(json.dumps(rows[hub_id]()) + "\n")
            ds = load_any_dataset(str(out), split)  # what the scripts will read: exactly the hub's columns
            assert ds.column_names == fmt["columns"], (hub_id, split, ds.column_names)
            assert all(ds.features[c].dtype == "string" for c in fmt["columns"])
        paths[hub_id] = str(out)
    return {"policy": str(d / "policy"), "reward": str(d / "reward"), **paths}


@pytest.fixture(scope="module")
def standins():
    d = Path(tempfile.mkdtemp(prefix="maxent_rlhf_rehearsal_"))
    previous = os.environ.get("MAXENT_RLHF_CACHE")
    os.environ["MAXENT_RLHF_CACHE"] = str(d / "toylab_cache")  # the toy lab's test profile, built here
    try:
        yield d, _build_standins(d)
    finally:
        if previous is None:
            os.environ.pop("MAXENT_RLHF_CACHE", None)
        else:
            os.environ["MAXENT_RLHF_CACHE"] = previous
        shutil.rmtree(d, ignore_errors=True)


def _standin(value, paths: dict):
    if not isinstance(value, str):
        return None
    m = HUB_MODEL.match(value)
    if m:
        return paths["reward"] if value.endswith("__reward__tldr") else paths["policy"]
    if value in HUB_FORMATS:
        return paths[value]
    if value.startswith("toylab://"):  # toylab://NAME or toylab://PROFILE/NAME -> the test profile's NAME
        return "toylab://test/" + value[len("toylab://"):].split("/")[-1]
    return None


def rehearsal_overrides(name: str, shipped: dict, paths: dict, out: Path) -> dict:
    """The keys the rehearsal changes: hub ids -> stand-ins, batch sizes down, a short run, a temp dir."""
    script = SCRIPT_OF[name]
    over = {"output_dir": str(out)}
    for key in HUB_KEYS:
        if shipped.get(key) is not None:
            swapped = _standin(shipped[key], paths)
            assert swapped is not None, f"{name}: `{key}` = {shipped[key]!r} has no local stand-in"
            over[key] = swapped
    if script in ("rloo", "online"):
        k = shipped.get("rloo_k", 2)
        over.update(global_batch_size=2 * k, per_device_train_batch_size=2, local_rollout_forward_batch_size=2, num_iterations=1)
    elif script == "offline":
        over.update(global_batch_size=4, per_device_train_batch_size=2, max_steps=2)
        if "per_device_eval_batch_size" in shipped:
            over["per_device_eval_batch_size"] = 2
    else:  # the shipped run directory (runs/toy/maxent) -> the toy lab's test-profile policy
        over.update(checkpoints=["toylab://test/sft"], n=4, per_device_eval_batch_size=2)
    return over


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.parametrize("name", sorted(SCRIPT_OF))
def test_only_the_listed_keys_were_overridden(name):
    """Without running anything: the rehearsal's overrides of each config are within the documented list."""
    from maxent_rlhf.config import load_yaml

    shipped = load_yaml(CONFIGS / name)
    paths = {"policy": "P", "reward": "R", **{h: h.upper() for h in HUB_FORMATS}}
    over = rehearsal_overrides(name, shipped, paths, Path("unused"))
    assert set(over) <= ALLOWED_OVERRIDES[SCRIPT_OF[name]], set(over) - ALLOWED_OVERRIDES[SCRIPT_OF[name]]
    for key in HUB_KEYS:  # every hub id is swapped
        assert (key in over) == (shipped.get(key) is not None), key


def test_every_shipped_config_is_rehearsed():
    on_disk = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent.name != "accelerate"}
    assert on_disk == set(SCRIPT_OF), f"configs without a rehearsal entry: {on_disk - set(SCRIPT_OF)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPT_OF))
def test_config_rehearsal(standins, name):
    import evaluate_judge
    import train_offline
    import train_online
    import train_rloo
    from maxent_rlhf.config import config_from_dict, load_yaml
    from maxent_rlhf.checkpoints import list_checkpoints
    from maxent_rlhf.runs import read_metrics

    d, paths = standins
    shipped = load_yaml(CONFIGS / name)
    out = d / "runs" / name.replace("/", "__").replace(".yaml", "")
    over = rehearsal_overrides(name, shipped, paths, out)
    script = SCRIPT_OF[name]
    module, cls = {"rloo": (train_rloo, train_rloo.RLOOConfig), "offline": (train_offline, train_offline.OfflineConfig),
                   "online": (train_online, train_online.OnlineConfig),
                   "judge": (evaluate_judge, evaluate_judge.EvalConfig)}[script]
    torch.set_num_threads(1)
    result = module.main(config_from_dict(cls, {**shipped, **over}, source=name))

    # the resolved config is the shipped one on every key the rehearsal did not override
    resolved = yaml.safe_load((out / ("eval_config.yaml" if script == "judge" else "config.yaml")).read_text())
    for key, value in shipped.items():
        if key not in over:
            assert resolved[key] == value, (key, resolved[key], value)
    if script == "judge":
        text = (out / "summary.json").read_text()
        assert "win_rate" in text, text[:500]
        return
    metrics = read_metrics(out)
    last = metrics[-1]
    ckpts = list_checkpoints(out)
    assert ckpts, "no checkpoint written"
    from transformers import AutoConfig

    if shipped.get("use_peft"):  # a LoRA checkpoint: the adapter, naming its base model
        from maxent_rlhf.lora import read_adapter_config

        assert read_adapter_config(ckpts[-1])["base_model_name_or_path"] == over["model_name_or_path"]
    else:
        AutoConfig.from_pretrained(ckpts[-1])  # an HF model directory
    if script == "rloo":
        last = [m for m in metrics if "objective/scores" in m][-1]  # not an eval/* record (toy configs evaluate)
        assert last["step"] == 1 and _finite(last["objective/scores"]) and _finite(last["loss/policy"]), last
        if shipped.get("regularizer", "kl") == "kl" or shipped.get("kl_ref_every", 1) > 0:
            assert _finite(last["objective/kl_ref"]), last
        assert Path(result) == out
    elif script == "online":
        last = [m for m in metrics if "objective/scores" in m][-1]
        assert last["step"] == 1 and _finite(last["objective/scores"]) and _finite(last["objective/kl_ref"]), last
        assert last["online/pairs"] + last["online/ties"] == over["global_batch_size"] // shipped.get("rloo_k", 2), last
        assert Path(result) == out
    else:
        train = [m for m in metrics if "train/loss" in m]
        assert train and train[-1]["step"] == 2 and _finite(train[-1]["train/loss"]), metrics
        if shipped.get("dataset_test_split"):
            assert any(_finite(m.get("eval/loss")) for m in metrics), metrics
        if shipped.get("loss_type") == "reward" and shipped.get("normalize_reward", True):
            assert any(_finite(m.get("reward/shift")) for m in metrics), metrics


# --------------------------------------------------------------------------------------------------
# accelerate configs
# --------------------------------------------------------------------------------------------------
EXPECTED_LAUNCH = {  # what accelerate's launcher would hand every process
    "cpu.yaml": ("multi_gpu", 2, "no", {}),
    "cpu_fsdp2.yaml": ("fsdp", 2, "no", {"FSDP_VERSION": "2", "FSDP_TRANSFORMER_CLS_TO_WRAP": "GPTNeoXLayer",
                                         "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}),
    "fsdp2.yaml": ("fsdp", 8, "bf16", {"FSDP_VERSION": "2", "FSDP_TRANSFORMER_CLS_TO_WRAP": "GPTNeoXLayer",
                                       "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}),
    "deepspeed_zero2.yaml": ("deepspeed", 8, "bf16", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    "deepspeed_zero3.yaml": ("deepspeed", 8, "bf16", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                                      "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
                                                      "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}),
    "multi_gpu.yaml": ("multi_gpu", 8, "bf16", {}),
    "single_gpu.yaml": ("simple", 1, "bf16", {}),
}
RUN_HERE = {"single_gpu.yaml": [], "multi_gpu.yaml": ["--num_processes", "2", "--main_process_port", "0"],
            "fsdp2.yaml": ["--num_processes", "2", "--main_process_port", "0"]}
RUN_ELSEWHERE = {"cpu.yaml": "test_distributed.py", "cpu_fsdp2.yaml": "test_distributed.py",
                 "deepspeed_zero2.yaml": "test_distributed.py", "deepspeed_zero3.yaml": "test_distributed.py"}


def _launch_env(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train_rloo.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return "deepspeed", args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp:
        return "fsdp", args, prepare_multi_gpu_env(args)
    if args.multi_gpu:
        return "multi_gpu", args, prepare_multi_gpu_env(args)
    return "simple", args, prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("name", sorted(EXPECTED_LAUNCH))
def test_accelerate_config_parses_and_validates(name):
    launcher, args, env = _launch_env(ACCEL / name)
    kind, processes, precision, extra = EXPECTED_LAUNCH[name]
    assert (launcher, int(args.num_processes), env["ACCELERATE_MIXED_PRECISION"]) == (kind, processes, precision)
    for key, value in extra.items():
        assert env.get(key) == value, (key, env.get(key))
    if kind == "fsdp":  # the wrapped layer class is GPT-NeoX's
        from transformers.models.gpt_neox import modeling_gpt_neox

        assert hasattr(modeling_gpt_neox, env["FSDP_TRANSFORMER_CLS_TO_WRAP"])


def test_every_accelerate_config_runs_somewhere():
    on_disk = {p.name for p in ACCEL.glob("*.yaml")}
    assert on_disk == set(EXPECTED_LAUNCH) == set(RUN_HERE) | set(RUN_ELSEWHERE)
    for name, test_file in RUN_ELSEWHERE.items():
        assert name in (ROOT / "tests" / test_file).read_text(), f"{test_file} does not launch {name}"


def test_cpu_fsdp2_is_fsdp2_on_cpu():
    """cpu_fsdp2.yaml is fsdp2.yaml with two processes, a free port and float32: nothing else differs."""
    cpu, gpu = (yaml.safe_load((ACCEL / n).read_text()) for n in ("cpu_fsdp2.yaml", "fsdp2.yaml"))
    differ = {k for k in set(cpu) | set(gpu) if cpu.get(k) != gpu.get(k)}
    assert differ == {"num_processes", "main_process_port", "mixed_precision"}, differ


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUN_HERE))
def test_accelerate_config_runs_on_cpu_processes(standins, name):
    """One RLOO-KL run (2 iterations) under the shipped accelerate config, bf16 as shipped, on CPU
    processes (only the process count is lowered); fsdp2.yaml through tests/helpers/cpu_sharding.py."""
    d, paths = standins
    out = d / "accelerate" / name
    job = {"name": name, "script": "rloo", "config": dict(
        model_name_or_path=paths["policy"], reward_model_name_or_path=paths["reward"], dataset_name=paths["trl-lib/tldr"],
        global_batch_size=4, rloo_k=2, per_device_train_batch_size=2, local_rollout_forward_batch_size=2,
        num_iterations=2, response_length=8, max_prompt_length=64, report_to="none", output_dir=str(out))}
    jobs = d / f"jobs-{name}"
    jobs.write_text(yaml.safe_dump([job]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    if name != "single_gpu.yaml":
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / name), *RUN_HERE[name],
           str(ROOT / "tests" / "helpers" / "cpu_sharding.py"), str(jobs), str(d / f"report-{name}")]
    run = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    report = json.loads((d / f"report-{name}" / "rank_0.json").read_text())
    expected = {"single_gpu.yaml": ("NO", 1), "multi_gpu.yaml": ("MULTI_CPU", 2), "fsdp2.yaml": ("FSDP", 2)}[name]
    assert (report[0]["distributed_type"], report[0]["num_processes"]) == expected, report
    assert report[0]["mixed_precision"] == "bf16", report  # as shipped: mixed_precision auto takes the launcher's
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(_finite(m["loss/policy"]) for m in metrics)
