"""ViT recipe: the activation of each layer's feed-forward module, built from ``config.hidden_act``.
transformers < 5.9 holds it in ``ViTIntermediate.intermediate_act_fn``, >= 5.9 in
``ViTMLP.activation_fn``; both are found by the module's role (class name ending in
``Intermediate`` or ``MLP``). The pooler activation (``config.pooler_act``) is a head site."""

from .generic import Recipe, parent_class_ends_with

RECIPE = Recipe("vit", is_mlp=parent_class_ends_with("Intermediate", "MLP"), config_attrs=("hidden_act",),
                projections=("fc2", "block.output.dense"))
