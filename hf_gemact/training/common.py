"""What every task shares: the Setup a task hands the loop, building the config and the model (with
surgery and the distillation teacher), and the per-example scoring the metrics add up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..patches import recipe_for
from ..surgery import patch_activations
from .errors import UsageError
from .task_table import TASKS as TASK_TABLE


class Task:
    """What the loop asks of a task: `setup`, `units`, `inputs`, `scored`, `eval_batch`; `name` picks
    its row of task_table.TASKS, which says by which metric its best evaluation is chosen."""

    name: str

    @property
    def best_key(self) -> str:
        return TASK_TABLE[self.name].best_metric

    @property
    def greater_is_better(self) -> bool:
        return TASK_TABLE[self.name].higher_is_better


@dataclass
class Setup:
    model: torch.nn.Module
    train_dataset: Any
    eval_dataset: Any
    processor: Any  # tokenizer or image processor, saved beside the model
    collate_fn: Callable | None = None
    info: dict = field(default_factory=dict)  # extra facts for metrics.json
    teacher: torch.nn.Module | None = None  # --distill_weight: the checkpoint before surgery


# ----------------------------------------------------------------------------- model / config

def activation_attr(config) -> str | None:
    """The config attribute the model family builds its MLP activation from (the surgery recipe's)."""
    for attr in recipe_for(config).config_attrs:
        if hasattr(config, attr):
            return attr
    return None


def pretrained(loader, source, args, **kwargs):
    """`loader(source)` with --trust_remote_code; a folder or repository with custom code, refused
    without the flag, gives a one-line error instead of transformers' traceback."""
    try:
        return loader(source, trust_remote_code=args.trust_remote_code, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UsageError(f"{source} holds custom code (auto_map); pass --trust_remote_code to run it, "
                             "only for sources you trust") from None
        raise


def build_config(args, defaults: dict | None = None):
    from transformers import CONFIG_MAPPING, AutoConfig

    if args.model_name_or_path:
        config = pretrained(AutoConfig.from_pretrained, args.model_name_or_path, args)
    elif args.config_name:
        config = pretrained(AutoConfig.from_pretrained, args.config_name, args)
    else:
        if args.model_type not in CONFIG_MAPPING:
            raise UsageError(f"--model_type {args.model_type!r} is not a transformers model type")
        config = CONFIG_MAPPING[args.model_type](**(defaults or {}))
    if args.config_overrides:
        try:
            config.update_from_string(args.config_overrides)
        except ValueError as err:
            raise UsageError(f"--config_overrides {args.config_overrides!r}: {err}") from None
    if args.activation and not args.model_name_or_path:
        attr = activation_attr(config)
        if attr is None:
            raise UsageError(f"{type(config).__name__} has no activation field "
                             f"({', '.join(recipe_for(config).config_attrs)})")
        setattr(config, attr, args.activation)
    return config


def _load_pretrained_weights(auto_class, args, config, **kwargs):
    try:
        return pretrained(auto_class.from_pretrained, args.model_name_or_path, args, config=config,
                          ignore_mismatched_sizes=args.ignore_mismatched_sizes, **kwargs)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise UsageError(f"--model_name_or_path {args.model_name_or_path}: some weights differ in shape from "
                         "the model built for this data (e.g. a classifier head for another number of labels); "
                         "pass --ignore_mismatched_sizes to start those weights fresh") from None


def build_model(auto_class, args, config, **kwargs):
    """(model, surgery report, teacher): the teacher (--distill_weight) is a copy of the loaded
    checkpoint taken before surgery, so that it holds exactly the weights the student starts from,
    a freshly initialised head included, with the old activations."""
    if args.model_name_or_path:
        model = _load_pretrained_weights(auto_class, args, config, **kwargs)
        if args.activation:
            teacher = frozen_copy(model) if args.distill_weight > 0 else None
            # --calibration_samples: patched once the training data exist (calibrate_surgery)
            report = (None if args.calibration_samples else
                      patch_activations(model, args.activation, blend=args.blend_steps > 0))
            return model, report, teacher
        return model, None, None
    return auto_class.from_config(config, trust_remote_code=args.trust_remote_code), None, None


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy that never trains: eval mode (no dropout), no parameter asks for a gradient."""
    import copy

    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def check_teacher_vocabulary(teacher, tokenizer_size: int) -> None:
    """A tokenizer larger than the checkpoint's vocabulary makes the student grow new output rows
    that the teacher has no probability for: the two distributions would not be comparable."""
    if teacher is None:
        return
    rows = teacher.get_input_embeddings().weight.shape[0]
    if tokenizer_size > rows:
        raise UsageError(f"--distill_weight: the tokenizer has {tokenizer_size} tokens, the checkpoint's vocabulary "
                         f"{rows}; the teacher cannot score the added tokens. Use the checkpoint's own tokenizer "
                         "(leave --tokenizer_name out), or leave --distill_weight out")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of softmax(logits / T), summed over the classes and averaged
    over the rows (the scored positions); float32 whatever the logits' precision. T^2 keeps the
    gradient's scale as T changes (Hinton et al. 2015: the gradient of the softened KL shrinks
    as 1/T^2)."""
    t = temperature
    if student_logits.shape[0] == 0:  # nothing scored in this micro-batch: a zero that keeps the graph
        return student_logits.float().sum() * 0.0
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_row = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return per_row.mean() * (t * t)


def current_activation(model, args) -> str | None:
    if args.activation:
        return args.activation
    attr = activation_attr(model.config)
    return getattr(model.config, attr) if attr else None


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of scored tokens) per example; labels -100 are skipped."""
    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none")
    loss = loss.view(labels.shape)
    if loss.dim() == 1:
        return loss, (labels != -100).long()
    return loss.sum(-1), (labels != -100).sum(-1)


def _select(dataset, n):
    return dataset.select(range(min(n, len(dataset)))) if n is not None else dataset


def calibrate_surgery(model, setup: Setup, args, inputs) -> str:
    """--calibration_samples K: the patch that build_model left for later, calibrated on the first K
    training examples, collated in training batches; inputs(batch) picks the model inputs. Returns
    the surgery note of the calibrated patch."""
    from transformers import default_data_collator

    collate = setup.collate_fn or default_data_collator
    rows = [setup.train_dataset[i] for i in range(min(args.calibration_samples, len(setup.train_dataset)))]
    size = args.per_device_train_batch_size
    batches = [inputs(collate(rows[i:i + size])) for i in range(0, len(rows), size)]
    return surgery_note(patch_activations(model, args.activation, calibrate=batches))


def surgery_note(report) -> str | None:
    """The surgery report as metrics.json keeps it."""
    return None if report is None else str(report)
