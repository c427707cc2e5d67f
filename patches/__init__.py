"""Per-family activation-surgery recipes (shipped as ``hf_gemact.patches``).

One module per family, each with a ``RECIPE`` and an ``apply_<family>`` function; ``recipe_for``
maps a model's ``config.model_type`` to its recipe and falls back to the generic one.
"""

from . import bert, generic, gpt2, vit
from .bert import apply_bert
from .generic import Recipe, apply_generic
from .gpt2 import apply_gpt2
from .vit import apply_vit

MODEL_TYPE_TO_RECIPE = {
    "gpt2": gpt2.RECIPE,
    "bert": bert.RECIPE,
    "vit": vit.RECIPE,
}


def recipe_for(model) -> Recipe:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return MODEL_TYPE_TO_RECIPE.get(model_type, generic.RECIPE)


__all__ = ["MODEL_TYPE_TO_RECIPE", "Recipe", "recipe_for", "apply_bert", "apply_generic",
           "apply_gpt2", "apply_vit"]
