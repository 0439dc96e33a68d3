"""`maxent_rlhf.cli` through the three scripts: every bad input costs the user ONE line naming the field, file or
row, and no traceback.

The table below runs the four scripts as subprocesses, exactly as a user types them (in parallel, so
the whole table takes well under a minute: most cases fail before any model loads; the few that need a
model or data get tiny local ones from `env`). Each case asserts the exit status (2: usage and
configuration, 1: data and run state), that stderr is exactly one line `script.py: error: ...`
containing the expected words, and that no "Traceback" appears anywhere. Progress bars are switched off
through their libraries' own environment variables (TQDM_DISABLE, HF_DATASETS_DISABLE_PROGRESS_BARS),
so nothing is filtered out of stderr.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.scripts import run_script, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

RLOO, OFFLINE, JUDGE, ONLINE = "train_rloo.py", "train_offline.py", "evaluate_judge.py", "train_online.py"

# (case id, script, arguments, exit status, words the one error line must contain)
# {pol} tiny policy (64 positions), {rm} tiny reward model, {d} the folder of the bad files below
CASES = [
    # ---- train_rloo.py: configuration -------------------------------------------------------------
    ("rloo_k_1", RLOO, "--rloo_k 1", 2, ["`rloo_k` = 1"]),
    ("rloo_group_does_not_divide", RLOO, "--global_batch_size 10 --rloo_k 4", 2, ["`global_batch_size` = 10", "rloo_k"]),
    ("rloo_micro_batch_does_not_divide", RLOO, "--global_batch_size 8 --per_device_train_batch_size 3", 2,
     ["`per_device_train_batch_size` = 3 does not divide"]),
    ("rloo_mini_batches_do_not_divide", RLOO, "--global_batch_size 8 --num_mini_batches 3", 2, ["`num_mini_batches` = 3"]),
    ("rloo_temperature_0", RLOO, "--temperature 0", 2, ["`temperature` = 0.0 must be > 0"]),
    ("rloo_cliprange_negative", RLOO, "--cliprange -0.1", 2, ["`cliprange` = -0.1"]),
    ("rloo_negative_lr", RLOO, "--learning_rate -1e-6", 2, ["`learning_rate` = -1e-06"]),
    ("rloo_typo_key", RLOO, "--rloo_kk 2", 2, ["unknown key `rloo_kk`", "did you mean `rloo_k`"]),
    ("rloo_close_key", RLOO, "--lr_scheduler cosine", 2, ["unknown key `lr_scheduler`", "did you mean `lr_scheduler_type`"]),
    ("rloo_bad_choice", RLOO, "--regularizer maxent", 2, ["`regularizer` must be one of"]),
    ("rloo_bad_type", RLOO, "--num_ppo_epochs two", 2, ["`num_ppo_epochs` expects int", "'two'"]),
    ("rloo_option_without_value", RLOO, "--global_batch_size", 2, ["--global_batch_size", "expected one argument"]),
    ("rloo_stray_argument", RLOO, "configs/maxent_1b.yaml", 2, ["unexpected argument 'configs/maxent_1b.yaml'"]),
    ("rloo_kl_ref_every_negative", RLOO, "--kl_ref_every -1", 2, ["`kl_ref_every` = -1 must be >= 0"]),
    ("rloo_negative_save_steps", RLOO, "--save_steps -1", 2, ["`save_steps` = -1"]),
    ("offline_logging_steps_zero", OFFLINE, "--logging_steps 0", 2, ["`logging_steps` = 0 must be >= 1"]),
    ("rloo_kl_prev_per_prompt_above_k", RLOO, "--rloo_k 2 --kl_prev_per_prompt 3", 2,
     ["`kl_prev_per_prompt` = 3", "rloo_k = 2"]),
    ("rloo_bad_reward_fn", RLOO, "--reward_fn nosuchmodule:score", 2, ["`reward_fn` = 'nosuchmodule:score'"]),
    # ---- YAML files ----------------------------------------------------------------------------------
    ("yaml_malformed", RLOO, "--config {d}/malformed.yaml", 2, ["malformed.yaml, line 3, column", "not valid YAML"]),
    ("yaml_unsafe_tag", RLOO, "--config {d}/unsafe.yaml", 2, ["unsafe.yaml, line 2, column", "python/object", "safe_load"]),
    ("yaml_missing_file", OFFLINE, "--config {d}/nope.yaml", 2, ["nope.yaml", "does not exist"]),
    ("yaml_top_level_list", OFFLINE, "--config {d}/list.yaml", 2, ["list.yaml", "must be a mapping"]),
    ("yaml_unknown_key_in_file", OFFLINE, "--config {d}/typo.yaml", 2, ["typo.yaml", "unknown key `learning_rte`"]),
    ("yaml_wrong_type_in_file", JUDGE, "--config {d}/wrongtype.yaml", 2, ["wrongtype.yaml", "field `n` expects int"]),
    # ---- models and run state --------------------------------------------------------------------------
    ("rloo_model_abs_path_missing", RLOO, "--model_name_or_path /nope/model", 2, ["'/nope/model'", "does not exist"]),
    ("offline_model_rel_path_missing", OFFLINE, "--model_name_or_path ./runs/x", 2, ["'./runs/x'", "does not exist"]),
    ("offline_model_path_under_a_local_folder", OFFLINE, "--model_name_or_path runs/x", 2, ["'runs/x'", "does not exist"]),
    ("rloo_hub_model_unreachable", RLOO, "--model_name_or_path nobody/no-such-model", 2,
     ["'nobody/no-such-model' cannot be loaded"]),
    ("offline_model_is_a_run_dir", OFFLINE, "--model_name_or_path {d}/a_run", 2, ["a_run", "run directory", "step_00000002"]),
    ("rloo_context_too_long", RLOO, "--model_name_or_path {pol} --reward_model_name_or_path {rm} --max_prompt_length 60 "
     "--response_length 10 --dataset_name {d}/prompts.jsonl", 2,
     ["`max_prompt_length` + `response_length` = 60 + 10 = 70", "max_position_embeddings = 64"]),
    ("rloo_use_vllm_without_vllm", RLOO, "--use_vllm true --model_name_or_path {pol} --reward_model_name_or_path {rm} "
     "--max_prompt_length 32 --response_length 8", 2, ["vLLM is not installed", '".[vllm]"']),
    ("rloo_vllm_mode_server", RLOO, "--use_vllm true --vllm_mode server", 2, ["`vllm_mode` must be one of"]),
    ("rloo_vllm_memory_fraction", RLOO, "--vllm_gpu_memory_utilization 1.5", 2, ["`vllm_gpu_memory_utilization` = 1.5"]),
    ("rloo_vllm_is_cap_below_1", RLOO, "--vllm_importance_sampling_cap 0.5", 2, ["`vllm_importance_sampling_cap` = 0.5"]),
    ("offline_context_too_long", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/pairs.jsonl --global_batch_size 2 "
     "--per_device_train_batch_size 1 --max_prompt_length 40 --max_completion_length 40", 2,
     ["`max_prompt_length` + `max_completion_length` = 40 + 40 = 80", "max_position_embeddings = 64"]),
    ("rloo_resume_not_a_checkpoint", RLOO, "--resume {d}/not_a_checkpoint", 1, ["not_a_checkpoint", "not a complete checkpoint"]),
    ("offline_resume_damaged_weights", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/pairs.jsonl "
     "--global_batch_size 2 --per_device_train_batch_size 1 --max_prompt_length 24 --max_completion_length 8 "
     "--max_steps 2 --resume {d}/damaged_run/checkpoints/step_00000002",
     1, ["damaged_run/checkpoints/step_00000002/model.safetensors is damaged and cannot be read",
         "--resume ", "damaged_run/checkpoints/step_00000001, or start over with --overwrite_output_dir"]),
    ("rloo_output_dir_holds_a_run", RLOO, "--output_dir {d}/a_run", 2, ["a_run", "already holds a run", "--resume latest",
                                                                         "--overwrite_output_dir"]),
    # ---- train_online.py: configuration ------------------------------------------------------------------
    ("online_rloo_k_1", ONLINE, "--rloo_k 1", 2, ["`rloo_k` = 1", "at least 2 completions per prompt"]),
    ("online_offline_only_loss", ONLINE, "--loss_type sft", 2, ["`loss_type` = 'sft' is an offline loss", "train_offline.py"]),
    ("online_unknown_loss", ONLINE, "--loss_type dpoo", 2, ["unknown loss_type 'dpoo'", "simpo"]),
    ("online_group_does_not_divide", ONLINE, "--model_name_or_path {pol} --reward_model_name_or_path {rm} "
     "--dataset_name {d}/prompts.jsonl --global_batch_size 10 --rloo_k 4", 2, ["`global_batch_size` = 10", "rloo_k"]),
    # ---- train_offline.py: configuration and data --------------------------------------------------------
    ("offline_bad_loss", OFFLINE, "--loss_type dpoo", 2, ["`loss_type` must be one of"]),
    ("offline_micro_batch_does_not_divide", OFFLINE, "--global_batch_size 6 --per_device_train_batch_size 4", 2,
     ["`global_batch_size` = 6", "`per_device_train_batch_size` = 4 does not divide"]),
    ("offline_warmup_ratio", OFFLINE, "--warmup_ratio 1.5", 2, ["`warmup_ratio` = 1.5 must be in [0, 1]"]),
    ("offline_adam_beta1", OFFLINE, "--adam_beta1 1", 2, ["`adam_beta1` = 1.0 must be in [0, 1)"]),
    ("offline_no_steps", OFFLINE, "--num_train_epochs 0", 2, ["`max_steps` > 0 or `num_train_epochs` > 0"]),
    ("offline_empty_file", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/empty.jsonl", 1, ["empty.jsonl", "empty"]),
    ("offline_broken_jsonl_line", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/broken.jsonl", 1,
     ["broken.jsonl, line 3", "not valid JSON"]),
    ("offline_column_changes_type", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/mixed.jsonl", 1,
     ["mixed.jsonl, line 2", "column `chosen`"]),
    ("offline_missing_column", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/norejected.jsonl", 1,
     ["norejected.jsonl", "missing column(s) ['rejected']"]),
    ("offline_bad_cell", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/dictcell.jsonl", 1,
     ["row 0, column `chosen`", "must be a string"]),
    ("offline_dataset_dir_missing", OFFLINE, "--model_name_or_path {pol} --dataset_name ./no_such_data/", 1,
     ["'./no_such_data/'", "does not exist"]),
    ("offline_dataset_dir_without_split", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/a_run", 1,
     ["a_run", "has no train.jsonl"]),
    ("offline_fewer_rows_than_batch", OFFLINE, "--model_name_or_path {pol} --dataset_name {d}/pairs.jsonl "
     "--global_batch_size 16 --per_device_train_batch_size 4", 2, ["4 usable examples", "global_batch_size = 16"]),
    # ---- evaluate_judge.py ---------------------------------------------------------------------------
    ("judge_negative_n", JUDGE, "--n -3", 2, ["`n` = -3 must be >= 0"]),
    ("judge_confidence_level", JUDGE, "--confidence_level 1.5", 2, ["`confidence_level` = 1.5"]),
    ("judge_concurrency_0", JUDGE, "--concurrency 0", 2, ["`concurrency` = 0"]),
    ("judge_nothing_to_evaluate", JUDGE, "--dataset_name {d}/test.jsonl", 2, ["nothing to evaluate", "--checkpoints"]),
    ("judge_checkpoints_dir_without_model", JUDGE, "--checkpoints {d}/empty_dir --dataset_name {d}/test.jsonl", 2,
     ["empty_dir", "no model (config.json)"]),
    ("judge_dataset_missing", JUDGE, "--checkpoints {pol} --dataset_name {d}/nope.jsonl", 1, ["nope.jsonl", "does not exist"]),
    ("judge_missing_reference_column", JUDGE, "--checkpoints {pol} --dataset_name {d}/prompts.jsonl", 1,
     ["missing column(s) ['completion']"]),
    ("judge_repeated_id", JUDGE, "--checkpoints {pol} --dataset_name {d}/dupids.jsonl", 2, ["row 1 repeats example id 'a'"]),
    ("judge_unknown_judge", JUDGE, "--checkpoints {pol} --dataset_name {d}/test.jsonl --judge gpt5", 2,
     ["unknown judge 'gpt5'"]),
    ("judge_kwargs_not_json", JUDGE, "--checkpoints {pol} --dataset_name {d}/test.jsonl --judge_kwargs {{oops", 2,
     ["judge_kwargs: not valid JSON"]),
    ("judge_no_api_key", JUDGE, "--checkpoints {pol} --dataset_name {d}/test.jsonl --judge openai", 1, ["OPENAI_API_KEY"]),
]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    """Tiny models (64 positions, so the context-length checks trip) and the bad files of the table."""
    from maxent_rlhf.checkpoints import save_checkpoint
    from maxent_rlhf.models import build_tiny_policy, build_tiny_reward_model
    from maxent_rlhf.runs import RunDir

    d = tmp_path_factory.mktemp("bad_inputs")
    pol, rm = d / "policy", d / "reward"
    model = build_tiny_policy(tiny_tokenizer, seed=0, save_dir=pol, max_position_embeddings=64)
    damaged = RunDir(d / "damaged_run")  # two real checkpoints; the newest one's weights cut short by a kill
    save_checkpoint(damaged, 1, model, tiny_tokenizer)
    weights = save_checkpoint(damaged, 2, model, tiny_tokenizer) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    build_tiny_reward_model(tiny_tokenizer, seed=1, save_dir=rm, max_position_embeddings=64)
    pair = {"prompt": "POST: my cat sat TL;DR:", "chosen": " the cat sat", "rejected": " the dog ran"}
    files = {
        "malformed.yaml": "learning_rate: 1e-6\nrloo_k: [2, 4\n",
        "unsafe.yaml": "learning_rate: 1e-6\nrloo_k: !!python/object/apply:os.system ['echo pwned']\n",
        "list.yaml": "- learning_rate\n- 1e-6\n",
        "typo.yaml": "learning_rte: 1e-6\n",
        "wrongtype.yaml": "n: many\n",
        "empty.jsonl": "",
        "broken.jsonl": _jsonl([pair, pair]) + '{"prompt": "POST: x TL;DR:", "chosen": " a"\n' + _jsonl([pair]),
        "mixed.jsonl": _jsonl([pair, {**pair, "chosen": [" the cat"]}]),
        "norejected.jsonl": _jsonl([{"prompt": pair["prompt"], "chosen": pair["chosen"]}] * 2),
        "dictcell.jsonl": _jsonl([{**pair, "chosen": {"text": "x"}}] * 2),
        "pairs.jsonl": _jsonl([pair] * 4),
        "prompts.jsonl": _jsonl([{"prompt": "POST: my cat sat TL;DR:"}] * 8),
        "test.jsonl": _jsonl([{"id": str(i), "prompt": "POST: my cat TL;DR:", "completion": " the cat"} for i in range(2)]),
        "dupids.jsonl": _jsonl([{"id": "a", "prompt": "POST: cat TL;DR:", "completion": " cat"}] * 2),
        "a_run/metrics.jsonl": '{"step": 1}\n',
        "a_run/checkpoints/step_00000002/trainer_state.json": '{"step": 2}',
        "not_a_checkpoint/readme.txt": "not a checkpoint",
    }
    for name, text in files.items():
        _write(d / name, text)
    (d / "empty_dir").mkdir()
    return {"d": str(d), "pol": str(pol), "rm": str(rm)}


# The table runs through one launcher process that imports what the scripts import (torch, transformers,
# accelerate, datasets: ~2 s of CPU per interpreter) once and then FORKS one child per case, which runs
# the script as `__main__` with its own argv, cwd, stdout and stderr: what `python script.py ...` does,
# minus the repeated imports, so ~50 cases fit in well under a minute even on a busy 2-core machine.
LAUNCHER = r"""
import json, os, runpy, signal, sys, traceback
sys.path.insert(0, ROOT)
import train_rloo, train_offline, train_online, evaluate_judge  # noqa: F401  (their imports, once)
import datasets, openai, transformers  # noqa: F401  (and what they import lazily on the way to an error)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
import transformers.models.gpt_neox.modeling_gpt_neox  # noqa: F401
cases = json.loads(sys.stdin.read())
results, running, queue = {}, {}, list(cases)

def child(case):
    out = os.open(case["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(case["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1); os.dup2(err, 2)
    signal.alarm(300)
    os.chdir(case["cwd"])
    sys.argv = [case["script"], *case["argv"]]
    status = 0
    try:
        runpy.run_path(case["script"], run_name="__main__")
    except SystemExit as e:  # what the interpreter does with SystemExit and uncaught exceptions
        code = e.code
        status = code if isinstance(code, int) else (0 if code is None else 1)
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(status)

while queue or running:
    while queue and len(running) < WORKERS:
        case = queue.pop(0)
        pid = os.fork()
        if pid == 0:
            child(case)
        running[pid] = case
    pid, status = os.wait()
    case = running.pop(pid)
    results[case["name"]] = os.waitstatus_to_exitcode(status)
print(json.dumps(results))
"""


def run_table(cases: list[tuple[str, str, list[str]]], cwd: Path, workers: int = 4) -> dict:
    """{name: CompletedProcess} of (name, script, argv) cases, run by the forking launcher above."""
    specs = [{"name": n, "script": str(ROOT / script), "argv": argv, "cwd": str(cwd),
              "out": str(cwd / f"{n}.stdout"), "err": str(cwd / f"{n}.stderr")} for n, script, argv in cases]
    code = LAUNCHER.replace("ROOT", repr(str(ROOT)), 1).replace("WORKERS", str(workers), 1)
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(specs), capture_output=True, text=True,
                          timeout=600, env=subprocess_env(), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.splitlines()[-1])
    return {s["name"]: subprocess.CompletedProcess(
        [s["script"], *s["argv"]], statuses[s["name"]], Path(s["out"]).read_text(), Path(s["err"]).read_text(),
    ) for s in specs}


@pytest.fixture(scope="module")
def results(env, tmp_path_factory):
    """Every case of the table, run once; {case id: CompletedProcess}."""
    work = tmp_path_factory.mktemp("bad_inputs_cwd")
    (work / "runs").mkdir()  # `runs/x` then means a local path
    table = []
    for name, script, args, _, _ in CASES:
        argv = args.format(**env).split()
        if "--output_dir" not in argv:  # each case its own (never the default runs/default)
            argv += ["--output_dir", str(work / name)]
        if script != JUDGE:
            argv += ["--report_to", "none"]
        table.append((name, script, argv))
    return run_table(table, work)


def test_the_table_is_large_and_distinct():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) and len({(c[1], c[2]) for c in CASES}) == len(CASES)
    assert len(CASES) >= 30 and {c[1] for c in CASES} == {RLOO, OFFLINE, JUDGE, ONLINE}


@pytest.mark.parametrize("name,script,args,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_costs_one_line(results, name, script, args, status, words):
    proc = results[name]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-3000:]}"
    (line,) = lines
    assert line.startswith(f"{script}: error: "), line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    assert proc.returncode == status, (proc.returncode, line)


def test_debug_variable_shows_the_traceback(env, tmp_path):
    proc = run_script(RLOO, ["--rloo_k", "1", "--output_dir", str(tmp_path / "o"), "--report_to", "none"], tmp_path,
                      {"MAXENT_RLHF_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError: `rloo_k` = 1" in proc.stderr


def test_unexpected_errors_keep_their_traceback_and_user_errors_map_to_statuses():
    from dataclasses import dataclass

    from maxent_rlhf.checkpoints import CheckpointError
    from maxent_rlhf.cli import describe_error, run_script as entry
    from maxent_rlhf.config import BaseConfig, ConfigError
    from maxent_rlhf.data import DataError
    from maxent_rlhf.runs import NonFiniteError

    @dataclass
    class C(BaseConfig):
        pass

    def buggy(config):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not swallowed into a line: a bug needs its traceback
        entry(buggy, C, argv=[])
    assert describe_error(ConfigError("x")) == ("x", 2)
    assert describe_error(DataError("f.jsonl, line 3: y")) == ("f.jsonl, line 3: y", 1)
    assert describe_error(NonFiniteError("nan\nmore")) == ("nan; more", 1)
    assert describe_error(CheckpointError("step_00000002/model.safetensors is damaged")) == (
        "step_00000002/model.safetensors is damaged", 1)
    assert describe_error(FileNotFoundError(2, "No such file or directory", "/x/y")) == ("/x/y: No such file or directory", 1)
    assert describe_error(ValueError("bug")) is None
