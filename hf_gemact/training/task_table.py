"""The one table of the built-in training tasks, read by the flags (the from-scratch model type),
`python -m hf_gemact.train`, the training loop (which validation metric is better), `hf-gemact
sweep` and its tables (the metric each run is compared by). Imports nothing heavy: the sweep reads
it without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    name: str  # as `python -m hf_gemact.train NAME` and `hf-gemact sweep --task NAME` take it
    model_type: str  # the config family a from-scratch run builds (--model_type's default)
    script: str  # the thin script in train_scripts/
    primary_metric: str  # the validation metric the papers report, which sweep tables compare
    higher_is_better: bool  # for primary_metric, and for the metric the best checkpoint is chosen by
    best_metric: str  # metrics.json's "best" record is the eval with the best value of this metric
    about: str


TASKS = {info.name: info for info in (
    # GPT-2 is compared by perplexity and its best eval chosen by loss: the same order (exp is monotonic)
    TaskInfo("clm", "gpt2", "run_clm.py", "perplexity", False, "loss", "causal LM (GPT-2 family)"),
    TaskInfo("mlm", "bert", "run_mlm.py", "loss", False, "loss", "masked LM (BERT family)"),
    TaskInfo("image", "vit", "run_image_classification.py", "accuracy", True, "accuracy",
             "image classification (ViT family)"),
)}
