"""ViT recipe: the activation of each layer's feed-forward module, built from ``config.hidden_act``.
transformers < 5.9 holds it in ``ViTIntermediate.intermediate_act_fn``, >= 5.9 in
``ViTMLP.activation_fn``; both are found by the module's role (class name ending in
``Intermediate`` or ``MLP``). The pooler activation (``config.pooler_act``) is a head site."""

from .generic import Recipe


def _in_ffn(parent, child_name, path_in_block):
    name = type(parent).__name__
    return name.endswith("Intermediate") or name.endswith("MLP")


RECIPE = Recipe("vit", is_mlp=_in_ffn, config_attrs=("hidden_act",))


def apply_vit(model, act, **kwargs):
    from hf_gemact.surgery import patch_activations

    return patch_activations(model, act, recipe=RECIPE, **kwargs)
