"""The public surgery calls: patch_activations, restore_activations, set_blend / get_blend,
finalize_blend, and the report they return."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..aux_loss import ensure_aux_hook
from ..patches import recipe_for
from ..registry import make_activation
from .blend import BlendedActivation, _check_t
from .calibrate import SiteCalibration, calibrate_site, check_batches, fold_bias
from .errors import LayerSelectionError, NoActivationError, SurgeryError
from .record import BLEND_ATTR, RECORD_ATTR, _STATE, _get_state, _set_or_del, _site_name, _State, _sync_config
from .sites import _build, _reference_tensor, _resolve_layers, canonical_name, find_sites, guess_name
from .wrappers import _refuse_parameter_change_under_ddp, _unwrap


@dataclass
class SiteChange:
    path: str
    block: int | None
    role: str
    old: str | None
    new: str | None
    blend_t: float | None = None
    calibration: SiteCalibration | None = None  # patch_activations(..., calibrate=batches)


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
        calibrated = [c for c in self.changes if c.calibration is not None]
        if calibrated:
            lines.append("  calibration (mean squared difference to the old activation on the calibration data):")
            lines += [f"    {c.path}: {c.calibration}" for c in calibrated]
        return "\n".join(lines)

    __repr__ = __str__


def _taken_out_by_patch(module, blend: bool):
    """The module a patch removes from a site: all of it, except that a new blend keeps the current
    activation as its old branch (re-blending a blend drops only its new branch)."""
    if isinstance(module, BlendedActivation):
        return module.new if blend else module
    return None if blend else module


def patch_activations(model: nn.Module, act: str, *, layers=None, blend: bool = False,
                      heads: bool = False, recipe=None, calibrate=None) -> SurgeryReport:
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
    if calibrate is not None and blend:
        raise SurgeryError("patch_activations: calibrate and blend=True do not go together (the bias correction "
                           "is exact for the new activation alone, not for a blend of it with the old one); "
                           "calibrate a plain patch, or blend without calibration")
    if calibrate is not None:
        calibrate = check_batches(calibrate)
        reference = copy.deepcopy(model)  # the model before this patch: what each site is fitted to

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
        calibration = None
        if calibrate is not None:  # on the model as patched so far: the sites before this one are in place
            new, calibration, projection, correction = calibrate_site(model, reference, s, name, calibrate, recipe, ref)
            if projection is not None:
                path = calibration.projection + ".bias"
                state.biases.setdefault(path, projection.bias.detach().clone())
                fold_bias(projection, correction)
        else:
            new = _build(name, ref)
        if blend:
            new = BlendedActivation(base, new, 0.0, base_name, name)
        state.originals.setdefault(s.path, current)
        setattr(s.parent, s.attr, new)
        new_name = calibration.fitted if calibration is not None else name
        changes.append(SiteChange(s.path, s.block, s.role, old_name, new_name, 0.0 if blend else None, calibration))
    _sync_config(model, state)
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
    with torch.no_grad():
        for path, original in state.biases.items():
            model.get_parameter(path).copy_(original)
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
    state = model.__dict__.get(_STATE) or _get_state(model, recipe_for(model), find_sites(model))
    changes = []
    for s in sites:
        blend = s.module
        setattr(s.parent, s.attr, blend.new)
        changes.append(SiteChange(s.path, s.block, s.role, f"blend(t={blend.t:g})", blend.new_name))
    _sync_config(model, state)
    return SurgeryReport("finalize blend", state.recipe.family, changes)
