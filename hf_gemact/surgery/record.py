"""The config record of a patch (see the package docstring) and the per-model surgery state that
remembers what the first patch found, so that `restore_activations` can undo it."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from ..patches import recipe_for
from ..registry import is_activation_name, make_activation
from .blend import BlendedActivation
from .sites import _NAME, Site, _same_function, find_sites, guess_name

RECORD_ATTR = "hf_gemact_activations"
BLEND_ATTR = "hf_gemact_blend"
_STATE = "_hf_gemact_surgery"


@dataclass
class _State:
    recipe: object
    attr: str | None
    orig_attr_value: object
    orig_record: object
    orig_blend: object
    originals: dict = field(default_factory=dict)  # full path -> module before the first patch
    biases: dict = field(default_factory=dict)  # projection bias path -> its value before calibration


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


def site_name(site: Site, native: str | None) -> str | None:
    """The activation a site computes: its marker (hf_gemact installed it) or blend, else for an MLP
    site the `native` value of the family's config attribute it was built from, else the name of
    the function it computes (preferring `native`)."""
    module = site.module
    if isinstance(module, BlendedActivation) or getattr(module, _NAME, None):
        return guess_name(module)
    if site.role == "mlp" and native is not None:
        return native
    return guess_name(module, [native] if native is not None else [])


def _site_name(site: Site, state: _State) -> str | None:
    return site_name(site, state.orig_attr_value if state.attr else None)


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


def describe_sites(model) -> list[dict]:
    """path, role, block, type, activation name and recipe of every activation site of `model`
    (what `hf-gemact inspect` prints)."""
    recipe = recipe_for(model)
    sites = find_sites(model, recipe)
    attr = _config_attr(model, recipe, sites)
    native = getattr(model.config, attr) if attr else None
    return [{"path": s.path, "role": s.role, "block": s.block, "type": type(s.module).__name__,
             "name": site_name(s, native), "recipe": recipe.family} for s in sites]


def site_history(model) -> list[dict]:
    """`describe_sites` plus, per site, what it was patched from (in this process, or the old branch
    of a blend) and the blend t (what the model card shows)."""
    rows = describe_sites(model)
    modules = {s.path: s.module for s in find_sites(model)}
    state = model.__dict__.get(_STATE)
    for row in rows:
        module = modules[row["path"]]
        row["from"], row["t"] = None, None
        if isinstance(module, BlendedActivation):
            row["from"], row["t"] = module.old_name, module.t
        elif state is not None and state.originals.get(row["path"], module) is not module:
            prefer = [state.orig_attr_value] if state.attr else []
            row["from"] = guess_name(state.originals[row["path"]], prefer)
    return rows
