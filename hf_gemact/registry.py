"""The one place that owns activation names.

Grammar:  FAMILY ( "_" KEY VALUE )*      e.g. gem_n3, egem_n2_eps1e-4, segem_n1_eps1e-4_a0.05,
          velu_alpha2_beta11_beta20.7 (key and value are written together; keys are listed below).

Any such name resolves without prior registration, through `parse_activation`, and once
`hf_gemact` is imported also through transformers' `ACT2FN[name]` (integration.py teaches it), `name in ACT2FN` and
`get_activation(name)`. Names never contain "," or "=" (transformers' `update_from_string` splits
on them). Parameters left out take the family defaults; `format_activation` writes the shortest
canonical name (only the parameters that differ from the defaults).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from .modules import GEM, VeLU

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER + r"\Z")


@dataclass(frozen=True)
class Family:
    """One activation family of the grammar (docs/ARCHITECTURE.md, "Adding an activation")."""

    module: type  # the nn.Module class; its constructor checks the values (ValueError)
    keys: dict  # name key -> (module kwarg, type)
    defaults: dict  # module kwarg -> default value, for every constructor argument
    doc: str


_Family = Family  # the name before it was public


def constructor_defaults(module_class: type) -> dict:
    """Every keyword argument of a module's constructor with its default: the family defaults are
    the module's own, written once (in its signature)."""
    return {name: p.default for name, p in inspect.signature(module_class.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


_GEM = constructor_defaults(GEM)  # n = 2, eps = 1, a = 0: GEM itself
_VELU_KEYS = {"alpha": ("alpha", float), "beta1": ("beta1", float), "beta2": ("beta2", float),
              "gamma": ("gamma", float), "mu": ("mu", float), "eps": ("eps", float),
              "ot": ("lambda_ot", float), "dim": ("dim", int)}

# N = 2 is the paper's choice for transformers; small eps (1e-4) its choice for deep networks and
# larger transformers; SE-GEM's CIFAR-10 result used eps = 1e-4. See README's presets table.
FAMILIES: dict[str, Family] = {
    "gem": Family(GEM, {"n": ("n", int)}, _GEM, "GEM: x^(2N+1)/(1+x^(2N)) for x>0, else 0"),
    "egem": Family(GEM, {"n": ("n", int), "eps": ("eps", float)}, {**_GEM, "eps": 1e-4},
                   "E-GEM: x^(2N+1)/(eps+x^(2N)) for x>0, else 0"),
    "segem": Family(GEM, {"n": ("n", int), "eps": ("eps", float), "a": ("a", float)},
                    {**_GEM, "eps": 1e-4, "a": 0.01},
                    "SE-GEM: E-GEM for x>=0, a*x^(2N+1)/(eps+x^(2N)) for x<0"),
    "velu": Family(VeLU, _VELU_KEYS, constructor_defaults(VeLU),
                   "VeLU: lam*x*sigmoid(alpha*(atan(beta1 x)+asin(beta2 x)))*(1+gamma*tanh(mu/rms(x)))"),
}

PRESETS = ("gem", "gem_n1", "gem_n2", "egem", "segem", "velu")


class UnknownActivationError(KeyError, ValueError):
    """An activation name that is neither built into transformers nor in hf_gemact's grammar."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return self.args[0]


def grammar_help() -> str:
    lines = ["hf_gemact activation names: FAMILY(_KEYVALUE)*, e.g. gem_n3, egem_n2_eps1e-4, "
             "segem_n1_eps1e-4_a0.05, velu_alpha2_beta11_beta20.7. Families, their keys and defaults:"]
    for name, fam in FAMILIES.items():
        keys = ", ".join(f"{k}={fam.defaults[kw]!r}" for k, (kw, _) in fam.keys.items())
        lines.append(f"  {name:6s} {keys:75s} {fam.doc}")
    lines.append("Presets: " + ", ".join(PRESETS) + ". Keys take an integer (n, dim) or a number "
                 "like 0.05, 1e-4. Names contain no ',' or '='.")
    return "\n".join(lines)


def _error(name, problem: str) -> UnknownActivationError:
    return UnknownActivationError(f"{problem} in activation name {name!r}.\n{grammar_help()}")


@dataclass(frozen=True)
class ActivationSpec:
    """A fully resolved activation: its family and every parameter (defaults filled in)."""

    family: str
    params: tuple  # ((module kwarg, value), ...) in the family's key order

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def module_class(self) -> type:
        return FAMILIES[self.family].module

    @property
    def module_kwargs(self) -> dict:
        """Every constructor argument: the family defaults, overridden by the spec's parameters."""
        return {**FAMILIES[self.family].defaults, **self.kwargs}

    def build(self):
        return self.module_class(**self.module_kwargs)

    @property
    def name(self) -> str:
        return format_activation(self)


def _format_number(value) -> str:
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    text = re.sub(r"e([+-]?)0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), text)
    return text[:-2] if text.endswith(".0") else text


def _split_token(name, family: Family, token: str):
    # Longest key first, so that a future key that prefixes another still parses (beta1 vs beta).
    for key in sorted(family.keys, key=len, reverse=True):
        if token.startswith(key) and _NUMBER_RE.match(token[len(key):]):
            kwarg, kind = family.keys[key]
            raw = token[len(key):]
            if kind is int:
                value = float(raw)
                if not value.is_integer():
                    raise _error(name, f"{key} must be an integer, got {raw!r}")
                return kwarg, int(value)
            return kwarg, float(raw)
    raise _error(name, f"malformed parameter {token!r}")


def parse_activation(name: str) -> ActivationSpec:
    """Parse a name of the grammar into an ActivationSpec; raise with the grammar on bad names."""
    if not isinstance(name, str) or not name:
        raise _error(name, "not a non-empty string")
    family_name, *tokens = name.split("_")
    family = FAMILIES.get(family_name)
    if family is None:
        raise _error(name, f"unknown family {family_name!r}")
    values = {}
    for token in tokens:
        kwarg, value = _split_token(name, family, token)
        if kwarg in values:
            raise _error(name, f"parameter {token!r} given twice")
        values[kwarg] = value
    ordered = tuple((kw, values.get(kw, family.defaults[kw])) for kw, _ in family.keys.values())
    spec = ActivationSpec(family_name, ordered)
    try:
        spec.build()  # the module's own checks: N >= 1, eps > 0, finite values, ...
    except ValueError as err:
        raise _error(name, str(err)) from None
    return spec


def format_activation(spec: ActivationSpec) -> str:
    """The canonical (shortest) name of a spec; parse_activation(format_activation(s)) == s."""
    family = FAMILIES[spec.family]
    key_of = {kw: key for key, (kw, _) in family.keys.items()}
    parts = [spec.family]
    for kwarg, value in spec.params:
        if value != family.defaults[kwarg]:
            parts.append(key_of[kwarg] + _format_number(value))
    return "_".join(parts)


def is_activation_name(name) -> bool:
    try:
        parse_activation(name)
    except (KeyError, ValueError):
        return False
    return True


def module_classes() -> tuple:
    """The nn.Module classes of every family (GEM, VeLU, ...), each once."""
    return tuple(dict.fromkeys(family.module for family in FAMILIES.values()))


def name_of_module(module) -> str | None:
    """The canonical name of the activation an hf_gemact module computes (the inverse of
    `parse_activation(name).build()`), or None when no family builds a module with its settings."""
    for family, fam in FAMILIES.items():
        if fam.module is not type(module):
            continue
        keyed = {kw for kw, _ in fam.keys.values()}
        if any(getattr(module, kw) != value for kw, value in fam.defaults.items() if kw not in keyed):
            continue  # e.g. a GEM with eps != 1 is not a "gem" (eps is no key of that family)
        params = tuple((kw, getattr(module, kw)) for kw, _ in fam.keys.values())
        return format_activation(ActivationSpec(family, params))
    return None


def make_activation(name: str):
    """Any registry name -> a fresh nn.Module. Transformers' built-in names work too."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]
