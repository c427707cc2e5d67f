"""Command-line flags shared by the three training scripts, and the checks that run before any
model or data is touched. Flag names follow transformers' `examples/pytorch/*_no_trainer.py`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TASKS = ("clm", "mlm", "image")
_MODEL_TYPE = {"clm": "gpt2", "mlm": "bert", "image": "vit"}


class UsageError(ValueError):
    """Bad input found before training; the message says what to change."""


def build_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"run_{'image_classification' if task == 'image' else task}.py",
        description=f"hf_gemact {task} training (see docs/TRAINING.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", help="pretrained checkpoint (folder or hub id); "
                   "without it the model is built from --config_name / --model_type with random weights")
    m.add_argument("--config_name", help="config folder or hub id for a from-scratch model")
    m.add_argument("--model_type", default=_MODEL_TYPE[task], help="config family for from-scratch runs")
    m.add_argument("--config_overrides", help="comma-separated key=value applied to the config, "
                   "e.g. n_layer=2,n_embd=128 (transformers' update_from_string)")
    m.add_argument("--activation", help="activation name (gem, gem_n1, egem_n2_eps1e-4, velu, gelu, ...): "
                   "set in the config of a from-scratch model, model surgery on a pretrained one")
    m.add_argument("--blend_steps", type=int, default=0, help="surgery on a pretrained model: "
                   "blend old -> new activation over the first K optimizer steps, then finalize")
    if task != "image":
        m.add_argument("--tokenizer_name", help="tokenizer folder or hub id; default: the checkpoint's, "
                       "or a byte-level BPE trained on the training split (cached)")
        m.add_argument("--vocab_size", type=int, default=8192, help="size of the trained BPE")

    d = p.add_argument_group("data")
    d.add_argument("--dataset_name", help="datasets hub id (needs a network)")
    d.add_argument("--dataset_config_name")
    d.add_argument("--train_file", help="txt, json/jsonl or csv (text) or a folder of images (image task)")
    d.add_argument("--validation_file", help="same formats as --train_file")
    d.add_argument("--validation_split_percentage", type=int, default=5,
                   help="held out of train when the data has no validation split")
    d.add_argument("--max_train_samples", type=int, help="truncate the training set (after grouping)")
    d.add_argument("--max_eval_samples", type=int, help="truncate the validation set (after grouping)")
    d.add_argument("--preprocessing_num_workers", type=int)
    d.add_argument("--overwrite_cache", action="store_true", help="ignore datasets' map cache")
    if task == "clm":
        d.add_argument("--block_size", type=int, help="tokens per training example; default: the "
                       "model's context length, at most 1024")
    if task == "mlm":
        d.add_argument("--max_seq_length", type=int, help="tokens per example incl. special tokens; "
                       "default: the model's max_position_embeddings, at most 512")
        d.add_argument("--mlm_probability", type=float, default=0.15)
        d.add_argument("--eval_mask_seed", type=int, default=1234, help="fixes the validation masks "
                       "(independent of --seed, so every run is scored on the same masked positions)")
    if task == "image":
        d.add_argument("--image_column_name", help="default: image, img or pixel_values")
        d.add_argument("--label_column_name", help="default: label, labels or fine_label")

    t = p.add_argument_group("training")
    t.add_argument("--per_device_train_batch_size", type=int, default=8)
    t.add_argument("--per_device_eval_batch_size", type=int, default=8)
    t.add_argument("--learning_rate", type=float, default=5e-5)
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.999)
    t.add_argument("--adam_epsilon", type=float, default=1e-8)
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--num_train_epochs", type=int, default=3)
    t.add_argument("--max_train_steps", type=int, help="optimizer steps; overrides --num_train_epochs "
                   "(0: evaluate only)")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--lr_scheduler_type", default="linear",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"])
    t.add_argument("--num_warmup_steps", type=int, default=0)
    t.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                   help="default: accelerate's config / environment")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--ddp_find_unused_parameters", action="store_true")

    o = p.add_argument_group("output, evaluation, checkpoints")
    o.add_argument("--output_dir", required=True)
    o.add_argument("--overwrite_output_dir", action="store_true",
                   help="allow a non-empty output dir (its log.jsonl, metrics.json and step_* go)")
    o.add_argument("--eval_steps", type=int, help="evaluate every N optimizer steps (default: every epoch)")
    o.add_argument("--logging_steps", type=int, default=10)
    o.add_argument("--checkpointing_steps", help="an integer N (every N steps) or 'epoch'")
    o.add_argument("--resume_from_checkpoint", help="a checkpoint folder (OUTPUT_DIR/step_N) or 'latest'")
    o.add_argument("--stop_after_steps", type=int, help="stop after N optimizer steps as if preempted "
                   "(no final eval or save; the schedule still spans --max_train_steps); then resume")
    o.add_argument("--with_tracking", action="store_true")
    o.add_argument("--report_to", default="all", choices=["all", "tensorboard", "wandb", "comet_ml",
                                                           "mlflow", "trackio"])
    o.add_argument("--no_save_model", action="store_true", help="skip save_pretrained at the end")
    return p


def parse_config_overrides(text: str | None) -> str | None:
    """Check `k=v,k=v` (transformers applies it with update_from_string)."""
    if not text:
        return None
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--config_overrides: {item!r} is not key=value "
                             "(expected e.g. n_layer=2,n_embd=128)")
    return text


def check_activation(name: str | None) -> None:
    if name is None:
        return
    import hf_gemact  # noqa: F401  (teaches ACT2FN the grammar)
    from transformers.activations import ACT2FN

    if name in ACT2FN:
        return
    try:
        hf_gemact.parse_activation(name)
    except (KeyError, ValueError) as err:
        raise UsageError(f"--activation {name!r} is not a known activation.\n{err}") from None


def _check_file(flag: str, path: str | None, task: str) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if p.is_dir():
        if task != "image":
            raise UsageError(f"{flag} {path} is a folder; expected a txt, json or csv file")
        if not any(f.is_file() for f in p.rglob("*")):
            raise UsageError(f"{flag} {path}: the image folder is empty")
        return
    if p.stat().st_size == 0 or not p.read_bytes()[:1 << 20].strip():
        raise UsageError(f"{flag} {path}: the file is empty")
    if task != "image" and p.suffix.lower() not in (".txt", ".text", ".json", ".jsonl", ".csv", ".tokens"):
        raise UsageError(f"{flag} {path}: unsupported extension {p.suffix!r} (txt, json, jsonl, csv)")


def validate(args: argparse.Namespace, task: str) -> argparse.Namespace:
    """Every check that needs no model and no data; raises UsageError."""
    from . import checkpoint

    args.task = task
    check_activation(args.activation)
    args.config_overrides = parse_config_overrides(args.config_overrides)
    _check_file("--train_file", args.train_file, task)
    _check_file("--validation_file", args.validation_file, task)
    if args.validation_file and not (args.train_file or args.dataset_name):
        raise UsageError("--validation_file needs --train_file (or --dataset_name)")
    if args.blend_steps < 0:
        raise UsageError("--blend_steps must be >= 0")
    if args.blend_steps and not (args.model_name_or_path and args.activation):
        raise UsageError("--blend_steps needs --model_name_or_path and --activation (it blends a "
                         "pretrained model's activation into the new one)")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "num_train_epochs"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 0:
        raise UsageError("--max_train_steps must be >= 0")
    if args.eval_steps is not None and args.eval_steps < 1:
        raise UsageError("--eval_steps must be >= 1")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch":
        if not cs.isdigit() or int(cs) < 1:
            raise UsageError(f"--checkpointing_steps {cs!r}: expected a positive integer or 'epoch'")
    if task == "mlm" and not 0 < args.mlm_probability < 1:
        raise UsageError("--mlm_probability must be in (0, 1)")

    out = Path(args.output_dir)
    if args.resume_from_checkpoint:
        args.resume_path = checkpoint.resolve(args.resume_from_checkpoint, out)
    else:
        args.resume_path = None
        if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
            raise UsageError(f"--output_dir {out} exists and is not empty; pass --overwrite_output_dir "
                             "to reuse it, or --resume_from_checkpoint latest to continue the run in it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file")
    args.output_dir = os.fspath(out)
    return args
