"""Models inside wrappers (DataParallel, DDP, torch.compile, a module holding one transformers
model): which transformers model a surgery call works on, and what it may not do under DDP."""

from __future__ import annotations

import torch
from torch import nn

from .errors import SurgeryError


def _is_hf_model(module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _peel(module):
    """Strip DataParallel / DistributedDataParallel / torch.compile wrappers (any nesting); returns
    (inner module, whether a DistributedDataParallel was among them)."""
    from torch.nn.parallel import DistributedDataParallel

    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    compiled = getattr(compiled, "OptimizedModule", ())
    ddp = False
    while True:
        if isinstance(module, DistributedDataParallel):
            ddp, module = True, module.module
        elif isinstance(module, nn.DataParallel):
            module = module.module
        elif compiled and isinstance(module, compiled):
            module = module._orig_mod
        else:
            return module, ddp


def _outermost_hf_models(module, path=""):
    found = []
    for name, child in module._modules.items():
        if child is None:
            continue
        child_path = f"{path}.{name}" if path else name
        if _is_hf_model(child):
            found.append((child_path, child))
        else:
            found += _outermost_hf_models(child, child_path)
    return found


def _unwrap(model: nn.Module, caller: str):
    """The transformers model that `caller` should work on, and whether it sits under a
    DistributedDataParallel. DataParallel, DDP and torch.compile wrappers are stripped; a custom
    wrapper that holds exactly one transformers model (as an attribute, at any depth) is replaced by
    it, so the patch is recorded in that model's config. Anything else is returned unchanged."""
    from torch.nn.parallel import DistributedDataParallel

    inner, ddp = _peel(model)
    if _is_hf_model(inner):
        return inner, ddp
    found = _outermost_hf_models(inner)
    if len(found) > 1:
        paths = ", ".join(path for path, _ in found)
        raise SurgeryError(
            f"{caller}: {type(inner).__name__} holds {len(found)} transformers models ({paths}); pass "
            f"the one you mean, e.g. hf_gemact.{caller}(wrapper.{found[0][0]}, ...)")
    if not found:
        return inner, ddp
    ddp = ddp or any(isinstance(m, DistributedDataParallel) for m in inner.modules())
    return _peel(found[0][1])[0], ddp


def _has_parameters(module) -> bool:
    return any(True for _ in module.parameters())


def _refuse_parameter_change_under_ddp(caller, ddp, added=(), removed=()):
    """DDP registers its parameters when it is built: a parameter added later is never synchronised
    and one removed later breaks its reducer, so an activation change that adds or removes
    parameters (VeLU's lam) must happen before the model is wrapped."""
    if not ddp or not any(_has_parameters(m) for m in (*added, *removed)):
        return
    raise SurgeryError(
        f"{caller} on a DistributedDataParallel model would add or remove activation parameters "
        f"after DDP registered its parameters (they would not be synchronised across processes): call "
        f"hf_gemact.{caller}(model, ...) on the model before wrapping it in DistributedDataParallel "
        f"(or before accelerator.prepare), then wrap it again")
