"""The one place that owns activation names.

Grammar:  FAMILY ( "_" KEY VALUE )*      e.g. gem_n3, egem_n2_eps1e-4, segem_n1_eps1e-4_a0.05,
          velu_alpha2_beta11_beta20.7 (key and value are written together; keys are listed below).

Any such name resolves without prior registration, through `parse_activation`, and once
`hf_gemact` is imported also through transformers' `ACT2FN[name]`, `name in ACT2FN` and
`get_activation(name)`. Names never contain "," or "=" (transformers' `update_from_string` splits
on them). Parameters left out take the family defaults; `format_activation` writes the shortest
canonical name (only the parameters that differ from the defaults).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .modules import GEM, VeLU

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER + r"\Z")


@dataclass(frozen=True)
class _Family:
    module: type
    keys: dict  # name key -> (module kwarg, type)
    defaults: dict  # module kwarg -> default value
    doc: str


# N = 2 is the paper's choice for transformers; small eps (1e-4) its choice for deep networks and
# larger transformers; SE-GEM's CIFAR-10 result used eps = 1e-4. See README's presets table.
FAMILIES: dict[str, _Family] = {
    "gem": _Family(GEM, {"n": ("n", int)}, {"n": 2, "eps": 1.0, "a": 0.0},
                   "GEM: x^(2N+1)/(1+x^(2N)) for x>0, else 0"),
    "egem": _Family(GEM, {"n": ("n", int), "eps": ("eps", float)}, {"n": 2, "eps": 1e-4, "a": 0.0},
                    "E-GEM: x^(2N+1)/(eps+x^(2N)) for x>0, else 0"),
    "segem": _Family(GEM, {"n": ("n", int), "eps": ("eps", float), "a": ("a", float)},
                     {"n": 2, "eps": 1e-4, "a": 0.01},
                     "SE-GEM: E-GEM for x>=0, a*x^(2N+1)/(eps+x^(2N)) for x<0"),
    "velu": _Family(
        VeLU,
        {"alpha": ("alpha", float), "beta1": ("beta1", float), "beta2": ("beta2", float),
         "gamma": ("gamma", float), "mu": ("mu", float), "eps": ("eps", float),
         "ot": ("lambda_ot", float), "dim": ("dim", int)},
        {"alpha": 0.1, "beta1": 0.1, "beta2": 0.1, "gamma": 0.1, "mu": 0.9, "eps": 1e-6,
         "lambda_ot": 0.1, "dim": -1},
        "VeLU: lam*x*sigmoid(alpha*(atan(beta1 x)+asin(beta2 x)))*(1+gamma*tanh(mu/rms(x)))",
    ),
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


def _split_token(name, family: _Family, token: str):
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


def make_activation(name: str):
    """Any registry name -> a fresh nn.Module. Transformers' built-in names work too."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


# ----------------------------------------------------------------------------- transformers hooks


def _install_act2fn() -> None:
    """Teach transformers' ACT2FN the grammar without adding or changing any built-in entry."""
    from transformers import activations

    base = type(activations.ACT2FN)
    if getattr(base, "_hf_gemact", False):
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


def _install_init_hook() -> None:
    """Give learnable activation parameters their initial value whenever transformers initialises
    weights that a checkpoint lacks (its `_init_weights` does not know these modules)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights
    if getattr(original, "_hf_gemact", False):
        return

    def _initialize_weights(self, module, *args, **kwargs):
        if (
            isinstance(module, VeLU)
            and not getattr(module, "_is_hf_initialized", False)
            and not getattr(module.lam, "_is_hf_initialized", False)
        ):
            module.reset_parameters()
        return original(self, module, *args, **kwargs)

    _initialize_weights._hf_gemact = True
    PreTrainedModel._initialize_weights = _initialize_weights


def install() -> None:
    _install_act2fn()
    _install_init_hook()

