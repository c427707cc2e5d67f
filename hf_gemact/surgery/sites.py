"""Where a model's activations are (sites, their roles and blocks), what each computes (its name),
which blocks a `layers` selection means, and how a new activation module is built for a site."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import VeLU
from ..patches import recipe_for
from ..registry import format_activation, make_activation, module_classes, name_of_module, parse_activation
from .blend import BlendedActivation
from .errors import LayerSelectionError

_NAME = "_hf_gemact_name"  # marker on every activation module this package installs


def _activation_types() -> tuple:
    from transformers.activations import ACT2FN

    types = {*module_classes(), BlendedActivation}
    for value in dict.values(ACT2FN):
        cls = value[0] if isinstance(value, tuple) else value
        if isinstance(cls, type):
            types.add(cls)
    return tuple(types)


@dataclass
class Site:
    path: str  # full module path in the model
    key: str  # path relative to the base model (the config record key)
    parent: nn.Module
    attr: str
    module: nn.Module
    role: str  # "mlp" (feed-forward of a block), "block-other" (elsewhere in a block), "head"
    stack: str | None = None  # path of the block list
    block: int | None = None
    n_blocks: int | None = None


def _base_prefix(model) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module) and getattr(model, prefix) is not model:
        return prefix + "."
    return ""


def find_sites(model: nn.Module, recipe=None) -> list[Site]:
    """Every activation site of the model, in module order, with its role under `recipe`."""
    if recipe is None:
        recipe = recipe_for(model)
    types = _activation_types()
    prefix = _base_prefix(model)
    sites: list[Site] = []

    def visit(module, path, block_ctx):
        is_stack = isinstance(module, nn.ModuleList) and block_ctx is None
        for name, child in module._modules.items():
            if child is None:
                continue
            child_path = f"{path}.{name}" if path else name
            ctx = (path, int(name), len(module), child_path) if is_stack and name.isdigit() else block_ctx
            if isinstance(child, types):
                key = child_path[len(prefix):] if prefix and child_path.startswith(prefix) else child_path
                if ctx is None:
                    sites.append(Site(child_path, key, module, name, child, "head"))
                else:
                    stack, index, n, block_path = ctx
                    in_block = child_path[len(block_path) + 1:]
                    role = "mlp" if recipe.is_mlp(module, name, in_block) else "block-other"
                    sites.append(Site(child_path, key, module, name, child, role, stack, index, n))
            else:
                visit(child, child_path, ctx)

    visit(model, "", None)
    return sites


_PROBE = torch.linspace(-6.0, 6.0, 97).reshape(1, 97)


def _same_function(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr():
        return False
    if any(True for _ in a.parameters()):
        return True  # parameters may have been trained; type and settings decide
    try:
        with torch.no_grad():
            return torch.equal(a(_PROBE.clone()), b(_PROBE.clone()))
    except Exception:
        return False


def _builtin_names():
    from transformers.activations import ACT2FN

    return list(dict.keys(ACT2FN))


def guess_name(module: nn.Module, prefer=()) -> str | None:
    """The activation name of a module: its hf_gemact marker, else the first of `prefer` and then of
    transformers' built-in names whose module computes the same function; None if none does."""
    if isinstance(module, BlendedActivation):
        return module.new_name
    marker = getattr(module, _NAME, None)
    if marker:
        return marker
    name = name_of_module(module)  # GEM / VeLU from their settings
    if name is not None:
        return name
    for name in [*prefer, *_builtin_names()]:
        if not isinstance(name, str):
            continue
        try:
            if _same_function(module, make_activation(name)):
                return name
        except Exception:
            continue
    return None


def canonical_name(name: str) -> str:
    """Validate an activation name (UnknownActivationError if neither built in nor in the grammar)
    and return its canonical spelling (the shortest grammar name; built-in names unchanged)."""
    from transformers.activations import ACT2FN

    if isinstance(name, str) and dict.__contains__(ACT2FN, name):
        return name
    return format_activation(parse_activation(name))


def _parse_layers_string(text: str):
    items = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if ":" in part:
            bits = part.split(":")
            if len(bits) > 3:
                raise LayerSelectionError(f"bad layer slice {part!r} in layers={text!r}")
            try:
                items.append(slice(*[int(b) if b else None for b in bits]))
            except ValueError:
                raise LayerSelectionError(f"bad layer slice {part!r} in layers={text!r}") from None
        else:
            try:
                items.append(int(part))
            except ValueError:
                raise LayerSelectionError(
                    f"bad layer index {part!r} in layers={text!r}: use integers and python slices, "
                    f"e.g. '10,11', '-2:' (last two), '6:12'") from None
    return items


def _resolve_layers(layers, n: int, stack: str) -> set[int]:
    if layers is None:
        return set(range(n))
    if isinstance(layers, str):
        items = _parse_layers_string(layers)
    elif isinstance(layers, (int, slice)) and not isinstance(layers, bool):
        items = [layers]
    else:
        try:
            items = list(layers)
        except TypeError:
            raise LayerSelectionError(f"layers must be an int, a slice, a range, an iterable of ints "
                                      f"or a string like '-2:', got {layers!r}") from None
    chosen = set()
    for item in items:
        if isinstance(item, slice):
            chosen.update(range(n)[item])
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            raise LayerSelectionError(f"layer indices must be integers, got {item!r} in layers={layers!r}")
        index = item + n if item < 0 else item
        if not 0 <= index < n:
            raise LayerSelectionError(
                f"layer index {item} is out of range: {stack or 'the model'} has {n} blocks "
                f"(valid indices 0..{n - 1}, or -{n}..-1 counting from the end)")
        chosen.add(index)
    return chosen


def _reference_tensor(*modules):
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                return tensor
    return None


def _match(module: nn.Module, ref) -> nn.Module:
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype)
    return module


def _build(name: str, ref=None) -> nn.Module:
    """A fresh module for `name`, marked as installed by hf_gemact, on the device and dtype of `ref`."""
    module = make_activation(name)
    if isinstance(module, VeLU):
        module.reset_parameters()
    setattr(module, _NAME, name)
    return _match(module, ref)
