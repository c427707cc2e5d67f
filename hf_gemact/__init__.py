"""hf_gemact: GEM / E-GEM / SE-GEM and VeLU activations for HuggingFace Transformers.

Importing the package makes every activation name of the grammar (see `registry`) resolvable
through `transformers.activations.ACT2FN`, so `config.hidden_act = "gem"` just works.
"""

from . import registry as _registry
from .functional import gem, velu, wasserstein_aux_loss
from .fused import fast_path_enabled, set_fast_path
from .modules import GEM, VeLU, auxiliary_loss
from .registry import (
    FAMILIES,
    PRESETS,
    ActivationSpec,
    UnknownActivationError,
    format_activation,
    grammar_help,
    is_activation_name,
    make_activation,
    parse_activation,
)

__version__ = "0.1.0"

_registry.install()

from .surgery import activation_drift, finalize_blend, patch_activations, restore_activations, set_blend  # noqa: E402

__all__ = [
    "GEM", "VeLU", "gem", "velu", "wasserstein_aux_loss", "auxiliary_loss", "set_fast_path", "fast_path_enabled",
    "FAMILIES", "PRESETS", "ActivationSpec", "UnknownActivationError", "format_activation",
    "grammar_help", "is_activation_name", "make_activation", "parse_activation",
]
__all__ += ["patch_activations", "restore_activations", "set_blend", "finalize_blend", "activation_drift"]
