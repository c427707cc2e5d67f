"""GPT-2 recipe: the activation held by each block's ``*MLP`` module (``GPT2MLP.act``), built from
``config.activation_function``; ``c_proj`` reads it. The double-heads summary activation is a head site."""

from .generic import Recipe, parent_class_ends_with

RECIPE = Recipe("gpt2", is_mlp=parent_class_ends_with("MLP"), config_attrs=("activation_function",),
                projections=("c_proj",))
