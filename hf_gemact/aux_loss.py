"""VeLU's auxiliary W2 terms in the `loss` a transformers model returns, as Mixtral adds its router
loss: a forward hook on every model that holds VeLU (given by the `post_init` hook that
`integration.install` puts on transformers, and by surgery when it installs a VeLU).

In training mode a returned loss takes over the terms recorded during that forward pass, so any loop
that back-propagates `outputs.loss` (Trainer, accelerate, PEFT, DDP, torch.compile) trains with
them; eval-mode losses stay the task loss alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import VeLU



def _output_loss(output, kwargs):
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, tuple) and output and kwargs.get("labels") is not None:
        first = output[0]  # return_dict=False puts the loss first when labels are given
        if torch.is_tensor(first) and first.dim() == 0:
            return first
    return None


def _with_loss(output, loss):
    if isinstance(output, dict):
        output["loss"] = loss
        return output
    return (loss, *output[1:])


def _counted_labels(model, kwargs):
    """The labels Trainer counts for `num_items_in_batch`, by its own rule: `shift_labels` when
    given, labels[..., 1:] when the model's loss is transformers' causal-LM loss, else labels."""
    if kwargs.get("shift_labels") is not None:
        return kwargs["shift_labels"]
    labels = kwargs.get("labels")
    if labels is None:
        return None
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # transformers < 4.46 counts every label
        return labels
    shifts = (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
              and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return labels[..., 1:] if shifts else labels


def _micro_batch_weight(model, kwargs):
    """1, or this micro-batch's share of an accumulation window when the loss is normalised by
    `num_items_in_batch` (Trainer then does not divide by the accumulation steps): the term keeps
    the same weight per optimizer step whatever the accumulation."""
    total = kwargs.get("num_items_in_batch")
    labels = _counted_labels(model, kwargs) if total is not None else None
    if labels is None:
        return 1.0
    count = labels.ne(-100).sum()
    if torch.is_tensor(total):
        return count / total.to(count.device).clamp_min(1)
    return count / max(int(total), 1)


def fold_auxiliary_loss(model, args, kwargs, output):
    """Forward hook of models holding VeLU: in training mode, a returned loss takes over the W2
    terms recorded during this forward pass (each module then holds no graph)."""
    if not model.training:
        return None
    loss = _output_loss(output, kwargs)
    if loss is None:
        return None
    terms = [t for t in (m.take_aux_loss() for m in model.modules() if isinstance(m, VeLU)) if t is not None]
    if not terms:
        return None
    aux = torch.stack([t.float() for t in terms]).sum() * _micro_batch_weight(model, kwargs)
    return _with_loss(output, loss + aux.to(loss.dtype))


def ensure_aux_hook(model: nn.Module) -> None:
    """Give `model` the fold hook once, if it holds a VeLU module (surgery calls this too)."""
    if getattr(model, "_hf_gemact_aux_hook", None) is not None:
        return
    if any(isinstance(m, VeLU) for m in model.modules()):
        model._hf_gemact_aux_hook = model.register_forward_hook(fold_auxiliary_loss, with_kwargs=True)
