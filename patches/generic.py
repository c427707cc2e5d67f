"""Generic recipe: any HF family whose MLP activation is built by transformers' ACT2FN.

A *site* is a module attribute holding an activation module (an ACT2FN class, GEM, VeLU or a
blend). A site is an MLP site when it lies inside a transformer block (an element of the outermost
``nn.ModuleList`` on its path) and no module name between the block and the site mentions
attention. This covers RoBERTa/XLM-R (``intermediate.intermediate_act_fn``), DistilBERT
(``ffn.activation``), OPT (``activation_fn`` directly on the decoder layer), Llama/Mistral/Qwen
gated MLPs (``mlp.act_fn``), T5 (``DenseReluDense.act``), ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Config attributes that transformers models read their feed-forward activation from (the one list:
# the training tasks read it too).
GENERIC_CONFIG_ATTRS = ("hidden_act", "activation_function", "activation", "hidden_activation",
                        "dense_act_fn", "ffn_activation", "act_fn")


def _no_attention_between(parent, child_name: str, path_in_block: str) -> bool:
    parts = path_in_block.lower().split(".")
    return not any("attn" in p or "attention" in p for p in parts)


def parent_class_ends_with(*suffixes: str) -> Callable:
    """The rule of families whose MLP activation is an attribute of a module whose class name ends
    in one of `suffixes` (``GPT2MLP``, ``BertIntermediate``)."""
    def is_mlp(parent, child_name: str, path_in_block: str) -> bool:
        return type(parent).__name__.endswith(suffixes)

    return is_mlp


@dataclass(frozen=True)
class Recipe:
    """How to find a family's MLP activations: ``is_mlp(parent, child_name, path_in_block)`` decides
    the role of an activation site found inside a transformer block (path_in_block is the site's
    path below the block, e.g. ``mlp.act``); ``config_attrs`` are the config attributes (in order
    of preference) the MLP activation is built from; ``projections`` are the paths of the module
    that reads the activation's output (calibrated surgery folds a bias correction into it),
    relative to the site's parent or, written ``block.PATH``, to its block; the first that exists
    is used. None (the generic recipe) infers it: the one linear layer reading the activation's
    width, unless two write it (a gated MLP, whose activation error is multiplied, not added)."""

    family: str
    is_mlp: Callable = _no_attention_between
    config_attrs: tuple = GENERIC_CONFIG_ATTRS
    projections: tuple | None = None


RECIPE = Recipe("generic")
