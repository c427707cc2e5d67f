"""Every change `import hf_gemact` makes to transformers and PEFT, in one place; `install()` (called
by `hf_gemact/__init__.py`) makes them, each at most once.

* `ACT2FN[name]`, `name in ACT2FN` and `get_activation(name)` resolve every name of the registry's
  grammar (no built-in entry is added or changed).
* `PreTrainedModel._initialize_weights` gives VeLU's `lam` its initial value when a checkpoint lacks it.
* `PreTrainedModel.post_init` rebuilds the activations a config records (surgery's
  hf_gemact_activations / hf_gemact_blend) before the weights load, and gives a model that holds VeLU
  the hook that adds its auxiliary W2 terms to the `loss` it returns in training mode (aux_loss.py).
* `from_pretrained` loads checkpoints written when VeLU's `lam` was a 0-dim tensor.
* Trainer puts no weight decay on activation parameters (VeLU's `lam`), as for LayerNorm and bias.
* PEFT adapters record the activation patch of the model they were trained on, and loading one
  onto a base that lacks that patch fails with the fix.
Trainer and PEFT are patched right after they are imported (they cost seconds to import).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

from torch import nn

from .aux_loss import ensure_aux_hook, fold_auxiliary_loss
from .modules import VeLU
from .patches import recipe_for
from .registry import UnknownActivationError, is_activation_name, module_classes, parse_activation
from .surgery import BLEND_ATTR, RECORD_ATTR, BlendedActivation, apply_config_record

_MARK = "_hf_gemact"


def _mark(fn, original):
    setattr(fn, _MARK, True)
    fn.__wrapped__ = original
    return fn


# ------------------------------------------------------------------------------ ACT2FN and names


def _install_act2fn() -> None:
    """Teach transformers' ACT2FN the grammar without adding or changing any built-in entry."""
    from transformers import activations

    base = type(activations.ACT2FN)
    if getattr(base, _MARK, False):
        return

    class GemactClassInstantier(base):
        _hf_gemact = True

        def __missing__(self, key):
            try:
                spec = parse_activation(key)
            except UnknownActivationError as err:
                builtin = ", ".join(sorted(dict.keys(self)))
                raise UnknownActivationError(f"{err}\nBuilt into transformers: {builtin}.") from None
            return spec.module_class, spec.module_kwargs

        def __contains__(self, key):
            return dict.__contains__(self, key) or is_activation_name(key)

    activations.ACT2FN.__class__ = GemactClassInstantier

    def get_activation(activation_string):
        """transformers' get_activation, whose KeyError for a bad name now shows the grammar."""
        return activations.ACT2FN[activation_string]

    activations.get_activation = get_activation


# ------------------------------------------------------------------------- model construction


def _install_init_hook() -> None:
    """Give learnable activation parameters their initial value whenever transformers initialises
    weights that a checkpoint lacks (its `_init_weights` does not know these modules)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights
    if getattr(original, _MARK, False):
        return

    def _initialize_weights(self, module, *args, **kwargs):
        if (
            isinstance(module, VeLU)
            and not getattr(module, "_is_hf_initialized", False)
            and not getattr(module.lam, "_is_hf_initialized", False)
        ):
            module.reset_parameters()
        return original(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = _mark(_initialize_weights, original)


def _install_post_init() -> None:
    """Every model construction (from_config, from_pretrained, plain __init__): the config's
    recorded activations are rebuilt before transformers initialises and loads weights, and a model
    holding VeLU gets the auxiliary-loss hook afterwards."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, _MARK, False):
        return

    def post_init(self, *args, **kwargs):
        apply_config_record(self)
        result = original(self, *args, **kwargs)
        ensure_aux_hook(self)
        return result

    PreTrainedModel.post_init = _mark(post_init, original)


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
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (*module_classes(), BlendedActivation)):
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
    config = getattr(model, "config", None)
    if config is None:
        return {}
    touched = (getattr(config, RECORD_ATTR, None) or getattr(config, BLEND_ATTR, None)
               or any(isinstance(m, module_classes()) for m in model.modules()))
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
    _install_act2fn()
    _install_init_hook()
    _install_post_init()
    _install_scalar_lam_loading()
    _after_import("transformers.trainer", _patch_trainer)
    _after_import("peft", _patch_peft)


__all__ = ["ADAPTER_RECORD", "AdapterBaseMismatchError", "activation_parameter_names", "activation_record",
           "check_adapter_base", "ensure_aux_hook", "fold_auxiliary_loss", "install"]
