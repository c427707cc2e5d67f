"""The three tasks: how each builds its model and datasets and how it scores a validation batch.

`task_table.py` holds the facts about each task (model type, script, metric); this module maps each
task's name to the class that implements it (text_tasks.py, image_task.py; common.py holds what
they share). The loop (`loop.py`) knows nothing task-specific; a task returns a `Setup` and scores batches as
per-example sums (loss summed over the example's scored tokens, and their count), which
`hf_gemact.metrics.mean_loss` turns into a mean loss exactly, whatever the batching or the number
of processes.
"""

from .common import (Setup, activation_attr, build_config, build_model, check_teacher_vocabulary, current_activation,
                     distillation_kl, frozen_copy, per_example_ce, pretrained)
from .image_task import VIT_DEFAULTS, ImageClassification, channels_of, data_channels
from .text_tasks import CausalLM, MaskedLM, MaskedTrainSet, load_tokenizer, mask_tokens, pad_collate

# name -> the class implementing that row of task_table.TASKS (same names)
TASKS = {"clm": CausalLM, "mlm": MaskedLM, "image": ImageClassification}

__all__ = ["TASKS", "CausalLM", "ImageClassification", "MaskedLM", "MaskedTrainSet", "Setup", "VIT_DEFAULTS",
           "activation_attr", "build_config", "build_model", "channels_of", "check_teacher_vocabulary",
           "current_activation", "data_channels", "distillation_kl", "frozen_copy", "load_tokenizer", "mask_tokens",
           "pad_collate", "per_example_ce", "pretrained"]
