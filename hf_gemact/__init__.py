"""hf_gemact: GEM / E-GEM / SE-GEM and VeLU activations for HuggingFace Transformers.

Importing the package makes every activation name of the grammar (see `registry`) resolvable
through `transformers.activations.ACT2FN`, so `config.hidden_act = "gem"` just works.
"""

from . import registry as _registry
from .functional import gem, velu, wasserstein_aux_loss
from .fused import fast_path_enabled, set_fast_path
from .modules import GEM, VeLU, auxiliary_loss, recorded_aux_loss
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
from .stats import activation_stats, plot_activation_stats  # noqa: E402  (matplotlib only when plotting)
from . import integration as _integration  # noqa: E402

_integration.install()

__all__ = [
    "GEM", "VeLU", "gem", "velu", "wasserstein_aux_loss", "auxiliary_loss", "recorded_aux_loss", "set_fast_path", "fast_path_enabled",
    "FAMILIES", "PRESETS", "ActivationSpec", "UnknownActivationError", "format_activation",
    "grammar_help", "is_activation_name", "make_activation", "parse_activation",
]
__all__ += ["BlendCallback", "patch_activations", "restore_activations", "set_blend", "finalize_blend", "activation_drift"]
__all__ += ["activation_stats", "plot_activation_stats"]


def __getattr__(name):
    if name == "BlendCallback":  # imports transformers' Trainer machinery, so only when asked for
        from .callbacks import BlendCallback

        return BlendCallback
    raise AttributeError(f"module 'hf_gemact' has no attribute {name!r}")
