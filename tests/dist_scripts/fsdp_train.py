"""Sharded training of a tiny GPT-2 with torch's FSDP2 (`fully_shard`) on CPU processes (gloo).

Launched by tests/test_distributed.py as `torchrun --nproc_per_node 2 fsdp_train.py --out DIR
--activations gem velu`. Per activation: train steps [0, RESUME_AT), checkpoint model and optimizer
with accelerate's FSDP2 helpers (the calls `Accelerator.save_state` makes for `fsdp_version: 2` +
`SHARDED_STATE_DICT`: torch.distributed.checkpoint of the sharded state dicts), drop the model and
optimizer, build new ones, load the checkpoint into them (what `load_state` calls), train to STEPS;
write the per-step losses and the gathered full state dict. (New objects rather than new
processes: each launch costs seconds of imports, and nothing but the checkpoint links the halves.) accelerate itself turns FSDP off on CPU, so the model is
sharded here directly, the way accelerate's `fsdp2_prepare_model` does (each block, then the root).

The test imports `build_model`, `global_batches` and the constants to compute its own 1-process
reference, so everything a run depends on is defined here once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

CONFIG = dict(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=96,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: no RNG in the steps
SEQ = 16
GLOBAL_BATCH = 4  # sequences per optimizer step, whatever the number of processes
STEPS = 4
RESUME_AT = 2
LR = 3e-3
WEIGHT_DECAY = 0.1


def build_model(activation: str):
    """The same initial weights in every process (seeded, CPU)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(activation_function=activation, **CONFIG))


def global_batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ) token ids: a fixed data order."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, CONFIG["vocab_size"], (STEPS, GLOBAL_BATCH, SEQ), generator=g)


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def training_loss(model, ids: torch.Tensor) -> torch.Tensor:
    import hf_gemact

    return model(input_ids=ids, labels=ids).loss + hf_gemact.auxiliary_loss(model)


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")


def _train(model, optimizer, batches, steps, rank, world) -> list[float]:
    """Each process takes its contiguous share of every global batch; FSDP averages the gradients."""
    import torch.distributed as dist

    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in steps:
        local = batches[step, rank * per_rank:(rank + 1) * per_rank]
        loss = training_loss(model, local)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--activations", nargs="+", required=True)
    args = parser.parse_args()

    from accelerate import PartialState
    from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    import hf_gemact

    # Sharding is under test here, not the compiled kernels (tests/test_fused.py): eager spares
    # every process the compile time. The test's 1-process reference runs eager too.
    hf_gemact.set_fast_path(False)
    state = PartialState(cpu=True)  # gloo process group; stands in for the Accelerator in the helpers
    rank, world = state.process_index, state.num_processes
    assert GLOBAL_BATCH % world == 0
    mesh = init_device_mesh("cpu", (world,))
    batches = global_batches()
    for activation in args.activations:
        ckpt = str(args.out / f"ckpt_{activation}")
        model = _shard(build_model(activation), mesh)
        optimizer = make_optimizer(model)
        losses = _train(model, optimizer, batches, range(RESUME_AT), rank, world)
        save_fsdp_model(_plugin(), state, model, ckpt)
        save_fsdp_optimizer(_plugin(), state, optimizer, model, ckpt)
        del model, optimizer

        model = _shard(build_model(activation), mesh)
        optimizer = make_optimizer(model)
        load_fsdp_model(_plugin(), state, model, ckpt)
        load_fsdp_optimizer(_plugin(), state, optimizer, model, ckpt)
        losses += _train(model, optimizer, batches, range(RESUME_AT, STEPS), rank, world)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"losses": losses, "state_dict": full}, args.out / f"{activation}.pt")
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
