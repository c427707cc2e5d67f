"""What `import hf_gemact` changes in transformers and PEFT, so that stock training code is right.

* Models holding VeLU add its auxiliary W2 terms to the `loss` they return in training mode, as
  Mixtral adds its router loss: any loop that back-propagates `outputs.loss` (Trainer, accelerate,
  PEFT, DDP, torch.compile) trains with the term, and eval-mode losses stay the task loss alone.
* `from_pretrained` loads checkpoints written when VeLU's `lam` was a 0-dim tensor.
* Trainer puts no weight decay on activation parameters (VeLU's `lam`), as for LayerNorm and bias.
* PEFT adapters record the activation patch of the model they were trained on, and loading one
  onto a base that lacks that patch fails with the fix (PEFT is patched when it is imported).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .modules import GEM, VeLU

_MARK = "_hf_gemact"


def _mark(fn, original):
    setattr(fn, _MARK, True)
    fn.__wrapped__ = original
    return fn


# ------------------------------------------------------------------------ auxiliary loss in `loss`


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


def _install_aux_hook() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, _MARK, False) == "aux":
        return

    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        ensure_aux_hook(self)
        return result

    PreTrainedModel.post_init = _mark(post_init, original)
    post_init._hf_gemact = "aux"


# -------------------------------------------------------------------- loading VeLU's old 0-dim lam


def _install_scalar_lam_loading() -> None:
    """Let transformers >= 5's `from_pretrained` load checkpoints whose VeLU `lam` is 0-dim (lam
    is (1,) now, so that FSDP can shard it).

    That loader sets each checkpoint tensor on the model itself (`core_model_loading.
    set_param_for_module`) and treats any shape difference as a mismatch to re-initialise, without
    calling `_load_from_state_dict`; so a 0-dim `lam` bound for a VeLU is reshaped to (1,) first.
    transformers 4.x loads through `module.load_state_dict`, which `VeLU._load_from_state_dict`
    already covers."""
    try:
        from transformers import core_model_loading as loading
    except ImportError:  # transformers 4.x
        return
    original = getattr(loading, "set_param_for_module", None)
    if original is None or getattr(original, _MARK, False):
        return

    def set_param_for_module(model, target_name, param_value, *args, **kwargs):
        module_path, _, name = target_name.rpartition(".")
        if name == "lam" and param_value.dim() == 0 and isinstance(model.get_submodule(module_path), VeLU):
            param_value = param_value.reshape(1)
        return original(model, target_name, param_value, *args, **kwargs)

    loading.set_param_for_module = _mark(set_param_for_module, original)


# ------------------------------------------------------------------------------- Trainer's decay


def activation_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters()) of the parameters of activation modules."""
    from .surgery import BlendedActivation

    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (GEM, VeLU, BlendedActivation)):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    return names


def _patch_trainer(trainer_module) -> None:
    Trainer = trainer_module.Trainer
    original = getattr(Trainer, "get_decay_parameter_names", None)
    if original is None or getattr(original, _MARK, False):
        return

    def get_decay_parameter_names(self, model):
        exempt = activation_parameter_names(model)
        return [name for name in original(self, model) if name not in exempt]

    Trainer.get_decay_parameter_names = _mark(get_decay_parameter_names, original)


# ------------------------------------------------------------------------------------------ PEFT

ADAPTER_RECORD = "hf_gemact.json"


class AdapterBaseMismatchError(ValueError):
    """An adapter trained on a patched model is being loaded onto a base without that patch."""


def activation_record(model: nn.Module) -> dict:
    """The config fields that define a model's activations (family attribute and hf_gemact's
    per-site records); empty when hf_gemact has not touched the model."""
    from .patches import recipe_for
    from .surgery import BLEND_ATTR, RECORD_ATTR

    config = getattr(model, "config", None)
    if config is None:
        return {}
    touched = (getattr(config, RECORD_ATTR, None) or getattr(config, BLEND_ATTR, None)
               or any(isinstance(m, (GEM, VeLU)) for m in model.modules()))
    if not touched:
        return {}
    fields = [a for a in recipe_for(model).config_attrs if isinstance(getattr(config, a, None), str)]
    return {a: getattr(config, a, None) for a in [*fields, RECORD_ATTR, BLEND_ATTR]}


def _base_of(peft_model) -> nn.Module:
    get_base = getattr(peft_model, "get_base_model", None)
    return get_base() if get_base is not None else peft_model


def _save_adapter_record(peft_model, save_directory) -> None:
    record = activation_record(_base_of(peft_model))
    if record and Path(save_directory).is_dir():
        (Path(save_directory) / ADAPTER_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def check_adapter_base(base: nn.Module, adapter, subfolder: str | None = None) -> None:
    """Raise AdapterBaseMismatchError when the adapter folder records activations that `base` lacks."""
    folder = Path(str(adapter))
    candidates = [folder / subfolder / ADAPTER_RECORD] if subfolder else []
    candidates.append(folder / ADAPTER_RECORD)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return
    try:
        expected = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterBaseMismatchError(f"{path}: unreadable hf_gemact record ({err})") from None
    config = getattr(base, "config", None)
    actual = {k: getattr(config, k, None) for k in expected}
    if actual == expected:
        return
    diffs = "; ".join(f"{k}: adapter trained with {expected[k]!r}, base has {actual[k]!r}"
                      for k in expected if expected[k] != actual[k])
    raise AdapterBaseMismatchError(
        f"the adapter in {folder} was trained on a model whose activations hf_gemact patched, and the "
        f"base model given differs ({diffs}). Patch the base the same way before loading the adapter "
        f"(e.g. hf_gemact.patch_activations(base, NAME[, layers=...])), or load the patched base that "
        f"save_pretrained wrote after surgery.")


def _patch_peft(peft) -> None:
    PeftModel = getattr(peft, "PeftModel", None)
    if PeftModel is None or getattr(PeftModel.save_pretrained, _MARK, False):
        return
    save, load_adapter = PeftModel.save_pretrained, PeftModel.load_adapter
    from_pretrained = PeftModel.from_pretrained.__func__

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = save(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            _save_adapter_record(self, save_directory)
        return result

    def peft_from_pretrained(cls, model, model_id, *args, **kwargs):
        check_adapter_base(model, model_id, kwargs.get("subfolder"))
        return from_pretrained(cls, model, model_id, *args, **kwargs)

    def peft_load_adapter(self, model_id, *args, **kwargs):
        check_adapter_base(_base_of(self), model_id, kwargs.get("subfolder"))
        return load_adapter(self, model_id, *args, **kwargs)

    PeftModel.save_pretrained = _mark(save_pretrained, save)
    PeftModel.from_pretrained = classmethod(_mark(peft_from_pretrained, from_pretrained))
    PeftModel.load_adapter = _mark(peft_load_adapter, load_adapter)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` is imported."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = None
        for finder in sys.meta_path:  # whichever finder would have found it (editable installs too)
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _after_import(name: str, patch) -> None:
    """Patch the module now if it is loaded, else when it is (Trainer and PEFT cost seconds to
    import, which `import hf_gemact` must not add)."""
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(f, _PatchAfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(name, patch))


def install() -> None:
    _install_aux_hook()
    _install_scalar_lam_loading()
    _after_import("transformers.trainer", _patch_trainer)
    _after_import("peft", _patch_peft)
