"""What the loop feeds the model: the epoch order of the training examples, micro-batches grouped
into optimizer steps, and the optimizer's parameter groups."""

from __future__ import annotations

import torch
from torch import nn


class EpochSampler(torch.utils.data.Sampler):
    """A permutation that is a pure function of (seed, epoch): the same on every process, and the
    same after a resume (no generator state to carry). The epoch is set with `use_epoch`, not
    `set_epoch`: accelerate calls `set_epoch(number of times this loader was iterated)`, which is
    wrong for the loader that skip_first_batches builds on resume."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of linear/conv layers only: not on biases, norms, embeddings
    (nor an output layer tied to them) or activation parameters such as VeLU's `lam`."""
    from transformers.pytorch_utils import Conv1D

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d))
               and isinstance(getattr(m, "weight", None), nn.Parameter) and id(m.weight) not in embeddings}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def grouped(dataloader, size: int):
    group = []
    for batch in dataloader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
