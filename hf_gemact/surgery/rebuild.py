"""Rebuilding the activations a config records, when transformers constructs a model from it
(`apply_config_record`, run by the post_init hook that integration.py installs): every entry is
checked before anything changes, and a malformed one fails the load naming the entry and the file."""

from __future__ import annotations

import json
import math
import os
import sys

from torch import nn

from .blend import BlendedActivation
from .errors import ConfigRecordError
from .record import BLEND_ATTR, RECORD_ATTR
from .sites import _NAME, _base_prefix, _build, find_sites, guess_name
from .wrappers import _is_hf_model


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
        return _build(value)
    except (KeyError, ValueError) as err:
        raise error(f"= {value!r}: {_first_line(err)}") from None


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
