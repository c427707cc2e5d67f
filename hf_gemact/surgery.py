"""Activation surgery: swap the feed-forward activations of an already-built HF model in place.

    report = hf_gemact.patch_activations(model, "gem", layers=slice(-2, None))   # last 2 blocks
    hf_gemact.restore_activations(model)                                        # bit-identical undo

    hf_gemact.patch_activations(model, "gem", blend=True)   # each site: (1-t)*old(x) + t*new(x), t=0
    hf_gemact.set_blend(model, 0.5); ...; hf_gemact.set_blend(model, 1.0)
    hf_gemact.finalize_blend(model)                         # drop the old branch

How a patch is recorded in the config (see docs/SURGERY.md):
  * the family's own attribute (``activation_function`` for GPT-2, ``hidden_act`` for BERT/ViT,
    ...) is set to the most common activation of the MLP sites, preferring hf_gemact names, so that
    a process that did not ``import hf_gemact`` fails loudly instead of building the old model;
  * ``config.hf_gemact_activations = {site key: name}`` lists every site whose activation differs
    from what the native constructor would build from that attribute (per-layer patches, and head
    sites that read the same attribute but were not patched). A site key is the module path
    relative to the base model (``h.10.mlp.act``), or the full path for sites outside it;
  * ``config.hf_gemact_blend = {site key: {"from": old name, "t": t}}`` lists blended sites.
  A hook on ``PreTrainedModel.post_init`` (installed by ``import hf_gemact``) rebuilds the recorded
  sites whenever a model is constructed from such a config, before the weights are loaded, so
  ``from_pretrained`` and ``from_config`` give exactly the patched architecture.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import GEM, VeLU
from .registry import UnknownActivationError, format_activation, is_activation_name, make_activation, parse_activation

RECORD_ATTR = "hf_gemact_activations"
BLEND_ATTR = "hf_gemact_blend"
_NAME = "_hf_gemact_name"  # marker on every activation module this package installs
_STATE = "_hf_gemact_surgery"


class SurgeryError(ValueError):
    """A patch request that cannot be carried out (the message says why and what to do)."""


class NoActivationError(SurgeryError):
    """The model has no recognisable (ACT2FN / hf_gemact) activation where one was asked for."""


class LayerSelectionError(SurgeryError, IndexError):
    """`layers` names a block that does not exist, or selects nothing."""


# ----------------------------------------------------------------------------------- blend module


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


# ------------------------------------------------------------------------------------- site search


def _activation_types() -> tuple:
    from transformers.activations import ACT2FN

    types = {GEM, VeLU, BlendedActivation}
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
        from .patches import recipe_for

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


# ------------------------------------------------------------------------------- naming functions


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
    if isinstance(module, (GEM, VeLU)):
        from .registry import ActivationSpec

        for family, fam in _families().items():
            if fam.module is not type(module):
                continue
            keyed = {kw for kw, _ in fam.keys.values()}
            if any(getattr(module, kw) != value for kw, value in fam.defaults.items() if kw not in keyed):
                continue
            params = tuple((kw, getattr(module, kw)) for kw, _ in fam.keys.values())
            return format_activation(ActivationSpec(family, params))
    for name in [*prefer, *_builtin_names()]:
        if not isinstance(name, str):
            continue
        try:
            if _same_function(module, make_activation(name)):
                return name
        except Exception:
            continue
    return None


def _families():
    from .registry import FAMILIES

    return FAMILIES


def canonical_name(name: str) -> str:
    """Validate an activation name (UnknownActivationError if neither built in nor in the grammar)
    and return its canonical spelling (the shortest grammar name; built-in names unchanged)."""
    from transformers.activations import ACT2FN

    if isinstance(name, str) and dict.__contains__(ACT2FN, name):
        return name
    return format_activation(parse_activation(name))


# -------------------------------------------------------------------------------- state and config


@dataclass
class _State:
    recipe: object
    attr: str | None
    orig_attr_value: object
    orig_record: object
    orig_blend: object
    originals: dict = field(default_factory=dict)  # full path -> module before the first patch


_MISSING = object()


def _config_attr(model, recipe, sites) -> str | None:
    config = model.config
    present = [a for a in recipe.config_attrs if isinstance(getattr(config, a, None), str)]
    native = [s.module for s in sites if s.role == "mlp" and getattr(s.module, _NAME, None) is None
              and not isinstance(s.module, BlendedActivation)]
    for attr in present:
        try:
            reference = make_activation(getattr(config, attr))
        except Exception:
            continue
        if not native or any(_same_function(m, reference) for m in native):
            return attr
    return None


def _snapshot(config, attr):
    value = getattr(config, attr, _MISSING)
    return value if value is _MISSING else copy.deepcopy(value)


def _get_state(model, recipe, sites) -> _State:
    state = model.__dict__.get(_STATE)
    if state is None:
        config = model.config
        attr = _config_attr(model, recipe, sites)
        state = _State(
            recipe=recipe,
            attr=attr,
            orig_attr_value=getattr(config, attr) if attr else None,
            orig_record=_snapshot(config, RECORD_ATTR),
            orig_blend=_snapshot(config, BLEND_ATTR),
        )
        model.__dict__[_STATE] = state
    return state


def _set_or_del(config, attr, value):
    if value is _MISSING or value is None or value == {}:
        if attr in config.__dict__:
            delattr(config, attr)
    else:
        setattr(config, attr, value)


def _site_name(site: Site, state: _State) -> str | None:
    module = site.module
    if isinstance(module, BlendedActivation) or getattr(module, _NAME, None):
        return guess_name(module)
    prefer = [state.orig_attr_value] if state.attr else []
    if site.role == "mlp" and state.attr:
        return state.orig_attr_value
    return guess_name(module, prefer)


def _sync_config(model, state: _State) -> None:
    """Write the model's current activations into its config (see the module docstring)."""
    config = model.config
    sites = find_sites(model, state.recipe)
    names = {s.path: _site_name(s, state) for s in sites}
    attr = state.attr
    if attr:
        mlp_names = [names[s.path] for s in sites if s.role == "mlp" and names[s.path]]
        pool = [n for n in mlp_names if is_activation_name(n)] or mlp_names
        if pool:
            counts = Counter(pool)
            top = max(counts.values())
            tied = [n for n in counts if counts[n] == top]
            native = state.orig_attr_value if state.orig_attr_value in tied else tied[0]
            setattr(config, attr, native)
    native_value = getattr(config, attr) if attr else None
    orig_reference = None
    if attr:
        try:
            orig_reference = make_activation(state.orig_attr_value)
        except Exception:
            orig_reference = None
    record, blend = {}, {}
    for s in sites:
        name = names[s.path]
        module = s.module
        if isinstance(module, BlendedActivation):
            blend[s.key] = {"from": module.old_name, "t": module.t}
        if name is None:
            continue
        installed = isinstance(module, BlendedActivation) or getattr(module, _NAME, None)
        if s.role == "mlp" and attr:
            predicted = native_value
        elif installed:
            predicted = None  # a patched or pinned non-MLP site: always recorded
        elif attr and orig_reference is not None and _same_function(module, orig_reference):
            predicted = native_value  # reads the family attribute too (e.g. BERT's MLM transform)
        else:
            predicted = name  # built from something else: untouched by our config changes
        if name != predicted:
            record[s.key] = name
    _set_or_del(config, RECORD_ATTR, record)
    _set_or_del(config, BLEND_ATTR, blend)


# --------------------------------------------------------------------------------- layer selection


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


# ------------------------------------------------------------------------------------------ report


@dataclass
class SiteChange:
    path: str
    block: int | None
    role: str
    old: str | None
    new: str | None
    blend_t: float | None = None


@dataclass
class SurgeryReport:
    action: str
    family: str
    changes: list

    @property
    def count(self) -> int:
        return len(self.changes)

    def __len__(self):
        return self.count

    def __iter__(self):
        return iter(self.changes)

    def __str__(self) -> str:
        lines = [f"hf_gemact {self.action} ({self.family} recipe): {self.count} activation site"
                 f"{'s' if self.count != 1 else ''}"]
        if not self.changes:
            return lines[0]
        width = max(len(c.path) for c in self.changes)
        lines.append(f"  {'block':>5}  {'path':<{width}}  {'old':<16} new")
        for c in self.changes:
            block = "-" if c.block is None else str(c.block)
            new = str(c.new) + (f"  (blend t={c.blend_t:g})" if c.blend_t is not None else "")
            lines.append(f"  {block:>5}  {c.path:<{width}}  {str(c.old):<16} {new}")
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------------------- wrapped models


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


# -------------------------------------------------------------------------------------- public API


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


def _build(name: str, ref) -> nn.Module:
    module = make_activation(name)
    if isinstance(module, VeLU):
        module.reset_parameters()
    setattr(module, _NAME, name)
    return _match(module, ref)


def _taken_out_by_patch(module, blend: bool):
    """The module a patch removes from a site: all of it, except that a new blend keeps the current
    activation as its old branch (re-blending a blend drops only its new branch)."""
    if isinstance(module, BlendedActivation):
        return module.new if blend else module
    return None if blend else module


def patch_activations(model: nn.Module, act: str, *, layers=None, blend: bool = False,
                      heads: bool = False, recipe=None) -> SurgeryReport:
    """Replace the feed-forward (MLP) activations of `model` in place by `act` (any hf_gemact or
    transformers name) and record the change in `model.config`.

    layers: None (all blocks), an int, a slice, a range, an iterable of ints (negative counts from
        the end, python style: [-2, -1] or slice(-2, None) are the last two blocks) or a string
        ('10,11', '-2:', '6:12'). Indices apply within each block stack.
    blend: wrap each site as (1 - t) * old(x) + t * new(x) with t = 0 (see `set_blend`).
    heads: also patch activations outside the transformer blocks (BERT's MLM-head transform,
        poolers, ...); off by default.
    Patching an already patched site replaces its activation (never stacks); the old branch of a
    new blend is the site's current activation (the original one when the site is blended).
    `model` may be wrapped (DataParallel, DistributedDataParallel, torch.compile, or a module holding
    one transformers model as an attribute): the transformers model inside is patched and its config
    records the patch. Under DDP a patch that adds or removes parameters (VeLU) is refused.
    """
    name = canonical_name(act)
    added = make_activation(name)  # fails before anything is touched
    model, ddp = _unwrap(model, "patch_activations")
    if recipe is None:
        from .patches import recipe_for

        recipe = recipe_for(model)
    sites = find_sites(model, recipe)
    what = f"{type(model).__name__} (model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r})"
    if not sites:
        raise NoActivationError(
            f"{what} has no recognisable activation: no module built by transformers' ACT2FN (or an "
            f"hf_gemact activation) was found, so there is nothing to patch. Models that call "
            f"activation functions directly (not as ACT2FN modules) are not supported.")
    mlp = [s for s in sites if s.role == "mlp"]
    if not mlp and not heads:
        found = ", ".join(f"{s.path} ({type(s.module).__name__})" for s in sites[:6])
        raise NoActivationError(
            f"{what} has no recognisable MLP activation inside a transformer block (recipe "
            f"{recipe.family!r}); activations found: {found}. Pass heads=True to patch those.")
    by_stack = {}
    for s in mlp:
        by_stack.setdefault(s.stack, s.n_blocks)
    chosen = {stack: _resolve_layers(layers, n, stack) for stack, n in by_stack.items()}
    selected = [s for s in mlp if s.block in chosen[s.stack]]
    if heads:
        selected += [s for s in sites if s.role == "head"]
    if not selected:
        raise LayerSelectionError(f"layers={layers!r} selects no block with an MLP activation in {what}")
    if getattr(model, "config", None) is None:
        raise SurgeryError(f"patch_activations records the patch in model.config, and {type(model).__name__} "
                           f"has none: pass the transformers model (a PreTrainedModel)")
    removed = [m for m in (_taken_out_by_patch(s.module, blend) for s in selected) if m is not None]
    _refuse_parameter_change_under_ddp("patch_activations", ddp, [added], removed)

    state = _get_state(model, recipe, sites)
    changes = []
    for s in selected:
        current = s.module
        old_name = _site_name(s, state)
        if isinstance(current, BlendedActivation):
            base, base_name = current.old, current.old_name
        else:
            base, base_name = current, old_name
        ref = _reference_tensor(s.parent, model)
        new = _build(name, ref)
        if blend:
            new = BlendedActivation(base, new, 0.0, base_name, name)
        state.originals.setdefault(s.path, current)
        setattr(s.parent, s.attr, new)
        changes.append(SiteChange(s.path, s.block, s.role, old_name, name, 0.0 if blend else None))
    _sync_config(model, state)
    from .integration import ensure_aux_hook

    ensure_aux_hook(model)
    return SurgeryReport("patch" + (" (blend)" if blend else ""), recipe.family, changes)


def _patched_state(model) -> _State:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise SurgeryError(
            f"{type(model).__name__} was not patched by hf_gemact.patch_activations in this process, "
            f"so there is nothing to undo (the original modules are kept only in the process that "
            f"patched; a loaded patched checkpoint can be patched again with the old name instead).")
    return state


def restore_activations(model: nn.Module) -> SurgeryReport:
    """Undo every patch of `model` made in this process: the original activation modules go back
    (outputs bit-identical to before the first patch) and the config is restored."""
    model, ddp = _unwrap(model, "restore_activations")
    state = _patched_state(model)
    sites = [s for s in find_sites(model, state.recipe) if s.path in state.originals]
    _refuse_parameter_change_under_ddp("restore_activations", ddp,
                                       [state.originals[s.path] for s in sites if state.originals[s.path] is not s.module],
                                       [s.module for s in sites if state.originals[s.path] is not s.module])
    changes = []
    for site in sites:
        path = site.path
        original = state.originals[path]
        old_name = _site_name(site, state)
        _match_if_moved(original, _reference_tensor(site.parent, model))
        setattr(site.parent, site.attr, original)
        changes.append(SiteChange(path, site.block, site.role, old_name, guess_name(original, [state.orig_attr_value])))
    config = model.config
    if state.attr:
        setattr(config, state.attr, state.orig_attr_value)
    _set_or_del(config, RECORD_ATTR, state.orig_record)
    _set_or_del(config, BLEND_ATTR, state.orig_blend)
    del model.__dict__[_STATE]
    return SurgeryReport("restore", state.recipe.family, changes)


def _match_if_moved(module, ref):
    if ref is None:
        return
    for p in module.parameters():
        if p.is_floating_point() and (p.device != ref.device or p.dtype != ref.dtype):
            module.to(device=ref.device, dtype=ref.dtype)
            return


def _blends(model):
    return [(path, m) for path, m in model.named_modules() if isinstance(m, BlendedActivation)]


def set_blend(model: nn.Module, t: float) -> None:
    """Set t in [0, 1] on every blended site of `model` (and in its config)."""
    t = _check_t(t)
    model, _ = _unwrap(model, "set_blend")
    blends = _blends(model)
    if not blends:
        raise SurgeryError("set_blend: the model has no blended activation; patch it with "
                           "patch_activations(model, act, blend=True) first")
    for _, module in blends:
        module.t = t
    key = {s.path: s.key for s in find_sites(model)}
    record = getattr(model.config, BLEND_ATTR, None)
    if isinstance(record, dict):
        for path, _ in blends:
            entry = record.get(key.get(path, path))
            if isinstance(entry, dict):
                entry["t"] = t


def get_blend(model: nn.Module) -> float | None:
    """The blend t of the model's blended sites (None when none is blended)."""
    model, _ = _unwrap(model, "get_blend")
    ts = {m.t for _, m in _blends(model)}
    if len(ts) > 1:
        raise SurgeryError(f"blended sites have different t: {sorted(ts)}")
    return ts.pop() if ts else None


def finalize_blend(model: nn.Module, *, force: bool = False) -> SurgeryReport:
    """Replace every blended site by its new branch, leaving a plain patched model. Requires t = 1
    (outputs unchanged by the call) unless force=True."""
    model, ddp = _unwrap(model, "finalize_blend")
    sites = [s for s in find_sites(model) if isinstance(s.module, BlendedActivation)]
    if not sites:
        raise SurgeryError("finalize_blend: the model has no blended activation")
    pending = sorted({s.module.t for s in sites if s.module.t != 1.0})
    if pending and not force:
        raise SurgeryError(f"finalize_blend: blend t is {pending} (not 1): call "
                           f"hf_gemact.set_blend(model, 1.0) first, or pass force=True to drop the "
                           f"old branch anyway (this changes the model's outputs)")
    _refuse_parameter_change_under_ddp("finalize_blend", ddp, removed=[s.module.old for s in sites])
    from .patches import recipe_for

    state = model.__dict__.get(_STATE) or _get_state(model, recipe_for(model), find_sites(model))
    changes = []
    for s in sites:
        blend = s.module
        setattr(s.parent, s.attr, blend.new)
        changes.append(SiteChange(s.path, s.block, s.role, f"blend(t={blend.t:g})", blend.new_name))
    _sync_config(model, state)
    return SurgeryReport("finalize blend", state.recipe.family, changes)


# ------------------------------------------------------------------------------------ load hook


class ConfigRecordError(SurgeryError):
    """An entry of a config's hf_gemact_activations / hf_gemact_blend that cannot be applied (the
    message names the entry and the config file)."""


def _record_file(config, attr):
    """The config.json this config was loaded from, when that file holds the same `attr` record
    (a record set in memory afterwards does not come from the file); else None."""
    folder = getattr(config, "_name_or_path", None)
    if not (isinstance(folder, str) and folder and os.path.isdir(folder)):
        return None
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f).get(attr)
    except (OSError, ValueError, AttributeError):
        return None
    return path if stored == getattr(config, attr, None) else None


def _record_source(config, attr) -> str:
    """Where a record came from, for error messages: the checkpoint's config.json when the model is
    being loaded from a folder."""
    path = _record_file(config, attr)
    if path:
        return path
    name = getattr(config, "_name_or_path", None)
    if isinstance(name, str) and name and not os.path.isdir(name):
        return f"the config.json of {name!r}"
    return "the model's config"


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _record_site(model, sites, key):
    """The site a record key names: its key (path relative to the base model) first, else its full
    path (a full path names exactly one module, so it is applied too), else, when `model` is itself
    the base model, a full path of a class that holds it (`transformer.h.0.mlp.act` on GPT2Model)."""
    for site in sites:
        if site.key == key:
            return site
    for site in sites:
        if site.path == key:
            return site
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not _base_prefix(model) and key.startswith(prefix + "."):
        rest = key[len(prefix) + 1:]
        for site in sites:
            if site.key == rest:
                return site
    return None


def _module_at(model, key):
    """The module a dotted path names in `model` or in its base model, or None."""
    roots = [model]
    prefix = _base_prefix(model)
    if prefix:
        roots.append(getattr(model, prefix[:-1]))
    for root in roots:
        try:
            return root.get_submodule(key)
        except AttributeError:
            continue
    return None


def _built_inside_another_model(model) -> bool:
    """Whether `model` is being constructed inside the __init__ of another transformers model that
    shares its config (BertModel inside BertForMaskedLM): the outer model applies and checks the
    same record when its own post_init runs, with all of its modules in place."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if owner is not model and _is_hf_model(owner) and getattr(owner, "config", None) is model.config:
                return True
        frame = frame.f_back
    return False


def _is_foreign_head(model, key, attr) -> bool:
    """Whether a key that names no site of `model` may be skipped as a head of another class sharing
    this config: a BertForMaskedLM record names `cls.predictions.transform.transform_act_fn`, which
    BertModel lacks (loaded alone, or built inside BertForMaskedLM). Not when the key's first step
    is a module of this model (the path is wrong further down: a typo), nor when this class saved
    the checkpoint (config.architectures[0], with the record read from its config.json)."""
    if _built_inside_another_model(model):
        return True
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not _base_prefix(model) and key.startswith(prefix + "."):
        key = key[len(prefix) + 1:]
    first = key.split(".", 1)[0]
    roots = [model]
    if _base_prefix(model):
        roots.append(getattr(model, _base_prefix(model)[:-1]))
    if any(first in root._modules for root in roots):
        return False
    saved_by = getattr(model.config, "architectures", None) or []
    written_here = bool(saved_by) and saved_by[0] == type(model).__name__ and _record_file(model.config, attr)
    return not written_here


def _unknown_key_problem(model, sites, key) -> str:
    module = _module_at(model, key) if isinstance(key, str) and key else None
    if module is not None:
        what = f"names a {type(module).__name__} module, which is not an activation site"
    else:
        what = f"names no module of {type(model).__name__} (a typo?)"
    known = ", ".join(s.key for s in sites[:4]) + (", ..." if len(sites) > 4 else "")
    return f"{what}; its activation sites are keyed like {known or '(none)'}: fix or remove the entry"


def _record_activation(value, error):
    """A fresh module for a recorded activation name; `error(problem)` builds the exception."""
    if value is None:
        raise error("is null: give an activation name such as 'gem', or remove the entry to keep the "
                    "site's native activation")
    if not isinstance(value, str):
        raise error(f"= {value!r} is of type {type(value).__name__}, not an activation name")
    try:
        module = make_activation(value)
    except (KeyError, ValueError) as err:
        raise error(f"= {value!r}: {_first_line(err)}") from None
    setattr(module, _NAME, value)
    return module


_BLEND_FIELDS = ("from", "t")


def _record_t(entry, error) -> float:
    if "t" not in entry:
        raise error("has no 't' (the blend weight of the new activation, a number in [0, 1])")
    t = entry["t"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise error(f"has t = {t!r}: it must be a number in [0, 1]")
    return float(t)


def _plan_config_record(model, record, blend):
    """Check every entry of the two records against `model` before anything is changed; returns
    ([(site, name)], [(site, old name, t)]) to apply. Raises ConfigRecordError naming the entry and
    the config file for anything that is neither applicable nor a head of another class."""
    def error_for(attr, key=None):
        where = f"{attr}[{key!r}]" if key is not None else attr
        return lambda problem: ConfigRecordError(f"{_record_source(model.config, attr)}: {where} {problem}")

    for attr, value, shape in ((RECORD_ATTR, record, "{site key: activation name}"),
                               (BLEND_ATTR, blend, '{site key: {"from": activation name, "t": number}}')):
        if value is not None and not isinstance(value, dict):
            raise error_for(attr)(f"must be a JSON object {shape}, got {type(value).__name__} {value!r}"[:300])
    sites = find_sites(model)

    def resolve(attr, key):
        if not isinstance(key, str):
            raise error_for(attr, key)(f"has a {type(key).__name__} key; keys are module paths")
        site = _record_site(model, sites, key)
        if site is None and not _is_foreign_head(model, key, attr):
            raise error_for(attr, key)(_unknown_key_problem(model, sites, key))
        return site

    renames = []
    for key, name in (record or {}).items():
        site = resolve(RECORD_ATTR, key)
        module = _record_activation(name, error_for(RECORD_ATTR, key))
        if site is not None:
            renames.append((site, name, module))
    blends = []
    for key, entry in (blend or {}).items():
        error = error_for(BLEND_ATTR, key)
        if not isinstance(entry, dict):
            raise error(f"= {entry!r} must be an object {{'from': old activation name, 't': number in [0, 1]}}")
        unknown = sorted(set(entry) - set(_BLEND_FIELDS), key=str)
        if unknown:
            raise error(f"has unknown field(s) {unknown}: only 'from' and 't' are allowed")
        if "from" not in entry:
            raise error("has no 'from' (the site's activation before the blend)")
        old = _record_activation(entry["from"], lambda problem: error(f"'from' {problem}"))
        t = _record_t(entry, error)
        site = resolve(BLEND_ATTR, key)
        if site is not None:
            blends.append((site, entry["from"], old, t))
    return renames, blends


def apply_config_record(model: nn.Module) -> int:
    """Rebuild the activations recorded in `model.config` (hf_gemact_activations / _blend); returns
    the number of sites changed. Called by the post_init hook; idempotent. Every entry is checked
    before anything changes: see `_plan_config_record` for what raises ConfigRecordError."""
    config = getattr(model, "config", None)
    record = getattr(config, RECORD_ATTR, None) if config is not None else None
    blend = getattr(config, BLEND_ATTR, None) if config is not None else None
    if not record and not blend:
        return 0
    renames, blends = _plan_config_record(model, record, blend)
    changed = 0
    for site, name, module in renames:
        if isinstance(site.module, BlendedActivation) or getattr(site.module, _NAME, None) == name:
            continue
        setattr(site.parent, site.attr, module)
        site.module = module
        changed += 1
    for site, old_name, old, t in blends:
        if isinstance(site.module, BlendedActivation):
            continue
        new = site.module
        new_name = getattr(new, _NAME, None) or guess_name(new)
        setattr(site.parent, site.attr, BlendedActivation(old, new, t, old_name, new_name))
        changed += 1
    return changed


def install_load_hook() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, "_hf_gemact", False):
        return

    def post_init(self, *args, **kwargs):
        apply_config_record(self)
        return original(self, *args, **kwargs)

    post_init._hf_gemact = True
    post_init.__wrapped__ = original
    PreTrainedModel.post_init = post_init


# ------------------------------------------------------------------------------------------ drift


@dataclass
class DriftReport:
    rel_error: float  # ||h_patched - h_ref|| / ||h_ref|| of the last hidden state
    kl: float | None = None  # mean KL(ref || patched) of the output distributions (next token for LMs)
    loss_before: float | None = None
    loss_after: float | None = None

    def __str__(self) -> str:
        parts = [f"last-hidden-state relative error {self.rel_error:.4g}"]
        if self.kl is not None:
            parts.append(f"KL(ref||patched) {self.kl:.4g} nats")
        if self.loss_before is not None:
            parts.append(f"loss {self.loss_before:.4f} -> {self.loss_after:.4f}")
        return "drift: " + ", ".join(parts)


def _is_causal_lm(model) -> bool:
    return type(model).__name__.endswith(("LMHeadModel", "ForCausalLM"))


@torch.no_grad()
def activation_drift(reference_model: nn.Module, patched_model: nn.Module, batch: dict) -> DriftReport:
    """How far a patch moves a model on `batch` (a dict of model inputs): relative error of the last
    hidden state; when the models return logits, the mean KL(ref || patched) of the output
    distributions (for causal LMs: next-token distributions over non-padding positions) and, for
    causal LMs or when `batch` has labels, the loss of each model."""
    reference_model, _ = _unwrap(reference_model, "activation_drift")
    patched_model, _ = _unwrap(patched_model, "activation_drift")
    batch = dict(batch)
    mask = batch.get("attention_mask")
    if _is_causal_lm(reference_model) and "labels" not in batch and "input_ids" in batch:
        labels = batch["input_ids"].clone()
        if mask is not None:
            labels[mask == 0] = -100
        batch["labels"] = labels
    outs = []
    for model in (reference_model, patched_model):
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            outs.append(model(**inputs, output_hidden_states=True, return_dict=True))
        finally:
            model.train(was_training)
    ref, new = outs

    def last_hidden(out):
        h = getattr(out, "last_hidden_state", None)
        return h if h is not None else out.hidden_states[-1]

    h0, h1 = last_hidden(ref).float(), last_hidden(new).float().to(last_hidden(ref).device)
    rel = (torch.linalg.vector_norm(h1 - h0) / torch.linalg.vector_norm(h0).clamp_min(1e-30)).item()
    report = DriftReport(rel)
    logits0, logits1 = getattr(ref, "logits", None), getattr(new, "logits", None)
    if torch.is_tensor(logits0) and torch.is_tensor(logits1):
        lp0 = torch.log_softmax(logits0.float(), -1)
        lp1 = torch.log_softmax(logits1.float().to(lp0.device), -1)
        kl = (lp0.exp() * (lp0 - lp1)).sum(-1)
        if kl.dim() == 2 and mask is not None and mask.shape == kl.shape:
            m = mask.to(kl.device).float()
            report.kl = ((kl * m).sum() / m.sum().clamp_min(1)).item()
        else:
            report.kl = kl.mean().item()
    if getattr(ref, "loss", None) is not None and getattr(new, "loss", None) is not None:
        report.loss_before, report.loss_after = ref.loss.item(), new.loss.item()
    return report


__all__ = [
    "BlendedActivation", "ConfigRecordError", "DriftReport", "LayerSelectionError", "NoActivationError", "Site",
    "SurgeryError", "SurgeryReport", "UnknownActivationError", "activation_drift",
    "apply_config_record", "find_sites", "finalize_blend", "get_blend", "guess_name",
    "patch_activations", "restore_activations", "set_blend",
]

install_load_hook()
