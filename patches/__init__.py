"""Per-family activation-surgery recipes (shipped as ``hf_gemact.patches``).

A recipe is data (``generic.Recipe``): the family's name, the config attributes its MLP activation
is built from, and the rule that tells an MLP activation from the other activations of a block.
One module per family holds its recipe and says where that family keeps its MLP activation;
``MODEL_TYPE_TO_RECIPE`` is the one map from ``config.model_type`` to a recipe, and ``recipe_for``
falls back to the generic recipe for any other type.
"""

from . import bert, generic, gpt2, vit
from .generic import GENERIC_CONFIG_ATTRS, Recipe, parent_class_ends_with

MODEL_TYPE_TO_RECIPE = {
    "gpt2": gpt2.RECIPE,
    "bert": bert.RECIPE,
    "vit": vit.RECIPE,
}


def recipe_for(model) -> Recipe:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return MODEL_TYPE_TO_RECIPE.get(model_type, generic.RECIPE)


__all__ = ["GENERIC_CONFIG_ATTRS", "MODEL_TYPE_TO_RECIPE", "Recipe", "parent_class_ends_with", "recipe_for"]
