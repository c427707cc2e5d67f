"""hf_gemact: GEM / E-GEM / SE-GEM and VeLU activations for HuggingFace Transformers.

Importing the package makes every activation name of the grammar (see `registry`) resolvable
through `transformers.activations.ACT2FN`, so `config.hidden_act = "gem"` just works; integration.py
lists every change the import makes to transformers and PEFT.
"""

from ._source_checkout import map_recipes as _map_recipes

_map_recipes()  # hf_gemact.patches also when this is a source checkout that is not installed

from .functional import gem, velu, wasserstein_aux_loss  # noqa: E402
from .fused import fast_path_enabled, set_fast_path  # noqa: E402
from .modules import GEM, VeLU, auxiliary_loss, recorded_aux_loss  # noqa: E402
from .registry import (  # noqa: E402
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

from .surgery import activation_drift, finalize_blend, patch_activations, restore_activations, set_blend  # noqa: E402
from .stats import activation_stats, plot_activation_stats  # noqa: E402  (matplotlib only when plotting)
from . import integration as _integration  # noqa: E402

_integration.install()  # every change hf_gemact makes to transformers and PEFT (integration.py)

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
