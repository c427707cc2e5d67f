"""Does AdamW's state survive accelerate's FSDP checkpoint round trip? FSDP1 vs FSDP2, on CPU.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_scripts/fsdp_optimizer_roundtrip.py

For each FSDP version: shard a tiny GPT-2 (FSDP1: FullyShardedDataParallel with use_orig_params
and one unit per block, as train_scripts/configs' old fsdp_8gpu.yaml asked; FSDP2: fully_shard),
take 2 AdamW steps, save model and optimizer with accelerate's `save_fsdp_model` /
`save_fsdp_optimizer` and `SHARDED_STATE_DICT` (what `Accelerator.save_state` calls; or
`--state_dict_type FULL_STATE_DICT`), load them into a new model and optimizer with
`load_fsdp_model` / `load_fsdp_optimizer` (what `load_state` calls), and print how many parameters
have AdamW state before saving and after loading, and the largest difference of `exp_avg_sq`
between the two: one line per version (`--fsdp_versions`, default 1 2) on rank 0.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_train import GLOBAL_BATCH, build_model, global_batches, make_optimizer, training_loss  # noqa: E402


def _shard(version: int, model, mesh):
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={GPT2Block})
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))


def _adam_state(version: int, model, optimizer) -> dict[str, torch.Tensor]:
    """Full exp_avg_sq per parameter name (gathered), for the parameters that have state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if version == 1:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(),
                                  FullOptimStateDictConfig(rank0_only=False)):
            osd = FSDP.optim_state_dict(model, optimizer)
    else:
        osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return {name: s["exp_avg_sq"].clone() for name, s in osd["state"].items() if "exp_avg_sq" in s}


class _AcceleratorView:
    """What accelerate's FSDP checkpoint helpers read from their `accelerator` argument."""

    def __init__(self, state, fsdp_version: int):
        self._state, self.is_fsdp2 = state, fsdp_version == 2

    def __getattr__(self, name):
        return getattr(self._state, name)


def _new(version, activation, mesh):
    model = _shard(version, build_model(activation), mesh)
    return model, make_optimizer(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state_dict_type", default="SHARDED_STATE_DICT", choices=["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
    parser.add_argument("--fsdp_versions", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    args = parser.parse_args()

    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, broadcast_object_list
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.device_mesh import init_device_mesh

    import hf_gemact

    hf_gemact.set_fast_path(False)  # no compile time; the kernels do not matter here
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    mesh = init_device_mesh("cpu", (world,))
    per_rank = GLOBAL_BATCH // world
    batches = global_batches()
    # One folder for all processes: rank 0 makes it and tells the others.
    ckpt_root = Path(broadcast_object_list([tempfile.mkdtemp() if rank == 0 else None])[0])
    for version in args.fsdp_versions:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type=args.state_dict_type)
        ckpt = str(ckpt_root / f"v{version}")
        accelerator = _AcceleratorView(state, version)
        model, optimizer = _new(version, "gem", mesh)
        for step in range(2):
            training_loss(model, batches[step, rank * per_rank:(rank + 1) * per_rank]).backward()
            optimizer.step()
            optimizer.zero_grad()
        before = _adam_state(version, model, optimizer)
        save_fsdp_model(plugin, accelerator, model, ckpt)
        save_fsdp_optimizer(plugin, accelerator, optimizer, model, ckpt)

        model, optimizer = _new(version, "gem", mesh)
        load_fsdp_model(plugin, accelerator, model, ckpt)
        load_fsdp_optimizer(plugin, accelerator, optimizer, model, ckpt)
        after = _adam_state(version, model, optimizer)
        diff = max(((before[k] - after[k]).abs().max().item() for k in before if k in after), default=float("nan"))
        if rank == 0:
            print(f"FSDP{version}: AdamW state for {len(before)} parameters before save_state, "
                  f"{len(after)} after load_state; max |exp_avg_sq difference| {diff:.3g}", flush=True)
    state.wait_for_everyone()
    if rank == 0:
        shutil.rmtree(ckpt_root)
    state.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # FSDP1's ShardedTensor deprecation, per call
    main()
