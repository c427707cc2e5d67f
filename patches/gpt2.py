"""GPT-2 recipe: the activation held by each block's ``*MLP`` module (``GPT2MLP.act``), built from
``config.activation_function``. The double-heads summary activation is a head site."""

from .generic import Recipe


def _in_mlp(parent, child_name, path_in_block):
    return type(parent).__name__.endswith("MLP")


RECIPE = Recipe("gpt2", is_mlp=_in_mlp, config_attrs=("activation_function",))


def apply_gpt2(model, act, **kwargs):
    from hf_gemact.surgery import patch_activations

    return patch_activations(model, act, recipe=RECIPE, **kwargs)
