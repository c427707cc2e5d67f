"""BERT recipe (also RoBERTa-like layouts): the activation held by each layer's ``*Intermediate``
module (``BertIntermediate.intermediate_act_fn``), built from ``config.hidden_act``. The MLM-head
transform (``cls.predictions.transform.transform_act_fn``, also built from ``hidden_act``) and the
pooler's ``Tanh`` are head sites: left alone unless ``heads=True``."""

from .generic import Recipe, parent_class_ends_with

RECIPE = Recipe("bert", is_mlp=parent_class_ends_with("Intermediate"), config_attrs=("hidden_act",),
                projections=("block.output.dense",))
