"""The blend module: a site running (1 - t) * old(x) + t * new(x) while surgery ramps t to 1."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..modules import VeLU


class BlendedActivation(nn.Module):
    """(1 - t) * old(x) + t * new(x). t = 0 runs only `old` (bit-identical to the unpatched site),
    t = 1 only `new` (identical to a direct patch)."""

    def __init__(self, old: nn.Module, new: nn.Module, t: float = 0.0, old_name=None, new_name=None):
        super().__init__()
        self.old = old
        self.new = new
        self.t = _check_t(t)
        self.old_name = old_name
        self.new_name = new_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.t
        if t == 0.0:
            _clear_aux(self.new)
            return self.old(x)
        if t == 1.0:
            _clear_aux(self.old)
            return self.new(x)
        return (1.0 - t) * self.old(x) + t * self.new(x)

    def extra_repr(self) -> str:
        return f"t={self.t:g}, {self.old_name} -> {self.new_name}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written after finalize_blend holds the new branch's parameters at the site
        # itself (`act.lam`); a run resumed from it rebuilds the blend first (BlendCallback).
        for name, _ in self.new.named_parameters():
            flat, branch = prefix + name, prefix + "new." + name
            if flat in state_dict and branch not in state_dict:
                state_dict[branch] = state_dict.pop(flat)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _clear_aux(module):
    if isinstance(module, VeLU):
        module.clear_aux_loss()


def _check_t(t) -> float:
    t = float(t)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"blend t must be in [0, 1], got {t!r}")
    return t
