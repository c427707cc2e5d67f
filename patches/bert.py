"""BERT recipe (also RoBERTa-like layouts): the activation held by each layer's ``*Intermediate``
module (``BertIntermediate.intermediate_act_fn``), built from ``config.hidden_act``. The MLM-head
transform (``cls.predictions.transform.transform_act_fn``, also built from ``hidden_act``) and the
pooler's ``Tanh`` are head sites: left alone unless ``heads=True``."""

from .generic import Recipe


def _in_intermediate(parent, child_name, path_in_block):
    return type(parent).__name__.endswith("Intermediate")


RECIPE = Recipe("bert", is_mlp=_in_intermediate, config_attrs=("hidden_act",))


def apply_bert(model, act, **kwargs):
    from hf_gemact.surgery import patch_activations

    return patch_activations(model, act, recipe=RECIPE, **kwargs)
