"""Test driver: the scripts' `main(cfg)` under FSDP2 or DeepSpeed ZeRO on CPU processes (gloo).

    accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml tests/helpers/cpu_sharding.py jobs.yaml report_dir

accelerate 1.15 never shards CPU processes, so this driver corrects accelerate's process state before
the scripts build their `Accelerator` (two shims, test-only, found by running it; tests/test_distributed.py):

- FSDP: with ACCELERATE_USE_CPU=true the config's FSDP section is dropped silently: accelerate selects
  FSDP only for GPU-like multi-process types (state.py, AcceleratorState: MULTI_GPU, MULTI_XPU, ...), so
  the processes run MULTI_CPU (plain DDP). Without the variable they do not even join a group. The shim
  turns the MULTI_CPU state into FSDP with the plugin accelerate built from the config; everything
  after that (fully_shard, DTensor parameters, DCP checkpoints, gathered state dicts) is accelerate's
  and torch's own code on gloo.
- DeepSpeed: with ACCELERATE_USE_CPU=true DeepSpeed is dropped the same way (`... and not cpu`).
  Without it, DeepSpeed's CPU accelerator forms a 2-process gloo group, but accelerate's PartialState,
  which found no GPU backend, records num_processes = 1 and process_index = 0 on both processes, and
  `deepspeed.initialize` fails with "train_batch_size is not equal to micro_batch_per_gpu *
  gradient_acc_step * world_size 2 != 2 * 1 * 2". The shim copies rank and world size from the group.

What the shims do NOT prove: accelerate's own launch-time selection of the backend on GPUs.

Each process writes report_dir/rank_<r>.json: per job the distributed type accelerate ended with and
how much of the policy's parameters / optimizer state this process holds (the evidence of sharding).
"""
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def install_shims() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    fsdp = {}
    accelerator_state_init = AcceleratorState.__init__

    def accelerator_state(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            fsdp["plugin"] = fsdp_plugin
        # every later AcceleratorState() copies PartialState's type back in: re-apply each time
        if fsdp and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp["plugin"]

    partial_state_init = PartialState.__init__

    def partial_state(self, *args, **kwargs):
        partial_state_init(self, *args, **kwargs)
        dist = torch.distributed
        if self.distributed_type == DistributedType.DEEPSPEED and dist.is_initialized() and self.num_processes == 1:
            self.backend = dist.get_backend()
            self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
            self.local_process_index = int(os.environ.get("LOCAL_RANK", self.process_index))

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        AcceleratorState.__init__ = accelerator_state
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        PartialState.__init__ = partial_state


def _local_numel(p) -> int:
    if hasattr(p, "ds_numel"):  # ZeRO-3: the process holds ds_tensor, a 1/N slice
        return p.ds_tensor.numel()
    if hasattr(p, "to_local"):  # FSDP2 DTensor
        return p.to_local().numel()
    return p.numel()


def _full_numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def record_sharding(report: list) -> None:
    """Wrap Accelerator.prepare: after the policy is prepared, note how much of it this process holds."""
    from accelerate import Accelerator

    prepare = Accelerator.prepare

    def recording_prepare(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        from maxent_rlhf import distributed

        model, optimizer = out[0], out[1] if len(out) > 1 else None
        params = list(model.parameters())
        entry = {
            "distributed_type": distributed.distributed_type(self),
            "fsdp_version": distributed.fsdp_version(self),
            "zero_stage": distributed.zero_stage(self),
            "num_processes": self.num_processes,
            "mixed_precision": self.mixed_precision,
            "param_numel_local": sum(_local_numel(p) for p in params),
            "param_numel_full": sum(_full_numel(p) for p in params),
        }
        inner = getattr(optimizer, "optimizer", None)
        partitions = getattr(inner, "single_partition_of_fp32_groups", None)  # ZeRO-1/2 fp32 master shards
        if partitions is None:
            partitions = getattr(inner, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        if partitions is not None:
            entry["optimizer_numel_local"] = sum(t.numel() for t in partitions)
        report.append(entry)
        return out

    Accelerator.prepare = recording_prepare


def main(jobs_file: str, report_dir: str) -> None:
    install_shims()
    import yaml
    from accelerate.state import PartialState

    import train_offline
    import train_rloo
    from maxent_rlhf.config import config_from_dict

    report: list = []
    record_sharding(report)
    # several runs in one process: keep the process group alive across them (`end_training()` destroys
    # it, and re-creating it under torchrun can hang), as tests/test_distributed.py does
    destroy, PartialState.destroy_process_group = PartialState.destroy_process_group, lambda self, group=None: None
    scripts = {"offline": (train_offline, train_offline.OfflineConfig), "rloo": (train_rloo, train_rloo.RLOOConfig)}
    for job in yaml.safe_load(open(jobs_file)):
        module, cls = scripts[job["script"]]
        before = len(report)
        module.main(config_from_dict(cls, job["config"], source=job["name"]))
        for entry in report[before:]:
            entry["job"] = job["name"]
    rank = PartialState().process_index
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    (Path(report_dir) / f"rank_{rank}.json").write_text(json.dumps(report, indent=1))
    destroy(PartialState())


if __name__ == "__main__":
    main(*sys.argv[1:3])
