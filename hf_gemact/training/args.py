"""Command-line flags shared by the three training scripts, and the checks that run before any
model or data is touched. Flag names follow transformers' `examples/pytorch/*_no_trainer.py`."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .errors import UsageError
from .task_table import TASKS as _TASK_TABLE

TASKS = tuple(_TASK_TABLE)

# Flags that may differ between a run and its resumption: they change where and how often the run
# reports or saves, never what it computes. Every other flag defines the run (see resume_conflicts).
# The hub flags are listed ahead of their arrival so that adding them cannot block resumes.
MAY_CHANGE_ON_RESUME = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps",
    "checkpointing_steps", "save_total_limit", "stop_after_steps", "with_tracking", "report_to",
    "no_save_model", "preprocessing_num_workers", "overwrite_cache", "per_device_eval_batch_size",
    "ddp_find_unused_parameters", "trust_remote_code", "push_to_hub", "hub_model_id", "hub_token",
})
# Flags naming files or folders: compared on resume by their resolved absolute path.
PATH_FLAGS = ("model_name_or_path", "config_name", "tokenizer_name", "train_file", "validation_file",
              "train_dir", "validation_dir")
# Filled in from the data or the model when left out; a legacy checkpoint recorded the filled value.
_DERIVED_FLAGS = ("block_size", "max_seq_length")


def build_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_TASK_TABLE[task].script,
        description=f"hf_gemact {task} training (see docs/TRAINING.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", help="pretrained checkpoint (folder or hub id); "
                   "without it the model is built from --config_name / --model_type with random weights")
    m.add_argument("--config_name", help="config folder or hub id for a from-scratch model")
    m.add_argument("--model_type", default=_TASK_TABLE[task].model_type, help="config family for from-scratch runs")
    m.add_argument("--config_overrides", help="comma-separated key=value applied to the config, "
                   "e.g. n_layer=2,n_embd=128 (transformers' update_from_string)")
    m.add_argument("--activation", help="activation name (gem, gem_n1, egem_n2_eps1e-4, velu, gelu, ...): "
                   "set in the config of a from-scratch model, model surgery on a pretrained one")
    m.add_argument("--blend_steps", type=int, default=0, help="surgery on a pretrained model: "
                   "blend old -> new activation over the first K optimizer steps, then finalize "
                   "(K may not exceed the run's optimizer steps)")
    m.add_argument("--calibration_samples", type=int, default=0, metavar="K", help="surgery on a pretrained "
                   "model: calibrate the patch on the first K training examples (per site: the family's free "
                   "parameters fitted to the old activation, and the remaining mean error folded into the bias "
                   "of the projection that reads it; docs/SURGERY.md). 0: a plain patch")
    m.add_argument("--distill_weight", type=float, default=0.0, help="surgery on a pretrained model: add W x "
                   "the KL divergence from the unpatched checkpoint's output distribution (the teacher) to the "
                   "patched model's, per scored position (0: off)")
    m.add_argument("--distill_temperature", type=float, default=1.0, help="with --distill_weight: both "
                   "distributions are softmax(logits / T); the KL is multiplied by T^2 (Hinton et al.) so that "
                   "its gradients keep their scale")
    m.add_argument("--trust_remote_code", action="store_true", help="allow models, configs, tokenizers "
                   "and processors whose code lives in their folder or hub repository (runs that code)")
    m.add_argument("--ignore_mismatched_sizes", action="store_true", help="load a pretrained checkpoint "
                   "whose weights differ in shape from the model (e.g. a classifier head for another "
                   "number of labels): those weights start fresh; without it such a load fails")
    if task != "image":
        m.add_argument("--tokenizer_name", help="tokenizer folder or hub id; default: the checkpoint's, "
                       "or a byte-level BPE trained on the training split (cached)")
        m.add_argument("--use_slow_tokenizer", action="store_true", help="ask for the Python tokenizer, not "
                       "the tokenizers (Rust) one (transformers >= 5 has only the latter and ignores it)")
        m.add_argument("--vocab_size", type=int, default=8192, help="size of the trained BPE")

    d = p.add_argument_group("data")
    d.add_argument("--dataset_name", help="datasets hub id (needs a network)")
    d.add_argument("--dataset_config_name")
    if task == "image":
        d.add_argument("--train_dir", help="folder of training images in imagefolder layout (LABEL/*.png)")
        d.add_argument("--validation_dir", help="folder of validation images, same layout")
        d.add_argument("--train_file", help="same as --train_dir (kept for older command lines)")
        d.add_argument("--validation_file", help="same as --validation_dir")
    else:
        d.add_argument("--train_file", help="txt, json/jsonl or csv")
        d.add_argument("--validation_file", help="same formats as --train_file")
        d.add_argument("--text_column_name", help="column holding the text (json/csv/datasets); default: "
                       "'text', else the only text-typed column (an error names the columns otherwise)")
    d.add_argument("--validation_split_percentage", type=int, default=5,
                   help="when the data has no validation split: the first N%% of train rows become the "
                   "validation split and train keeps the rest (as HF's examples do)")
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
        d.add_argument("--line_by_line", action="store_true", help="every non-empty line is one example "
                       "(truncated to --max_seq_length), instead of concatenating the text into full blocks")
        d.add_argument("--pad_to_max_length", action="store_true", help="with --line_by_line: pad every "
                       "example to --max_seq_length (default: pad each batch to its longest example)")
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
                   help="default: accelerate's config / environment (fp16 needs a GPU)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--ddp_find_unused_parameters", action="store_true")

    o = p.add_argument_group("output, evaluation, checkpoints")
    o.add_argument("--output_dir", required=True)
    o.add_argument("--overwrite_output_dir", action="store_true",
                   help="allow a non-empty output dir: what earlier runs of these scripts wrote there "
                   "(model, logs, metrics, checkpoints) is removed first; other files stay")
    o.add_argument("--eval_steps", type=int, help="evaluate every N optimizer steps (default: every epoch)")
    o.add_argument("--logging_steps", type=int, default=10)
    o.add_argument("--checkpointing_steps", help="an integer N (OUTPUT_DIR/step_N every N steps) or "
                   "'epoch' (OUTPUT_DIR/epoch_N after epoch N, counted from 0)")
    o.add_argument("--save_total_limit", type=int, help="keep only the N newest checkpoints (by training "
                   "position); older ones are deleted after each new one is complete")
    o.add_argument("--resume_from_checkpoint", help="a checkpoint folder (OUTPUT_DIR/step_N or epoch_N) "
                   "or 'latest'; the run-defining flags must equal the checkpoint's")
    o.add_argument("--stop_after_steps", type=int, help="stop after N optimizer steps as if preempted "
                   "(no final eval or save; the schedule still spans --max_train_steps); then resume")
    o.add_argument("--with_tracking", action="store_true")
    o.add_argument("--report_to", default="all", help="with --with_tracking: 'all' (every installed "
                   "tracker) or one or more of accelerate's trackers, comma-separated (" + _tracker_names() + ")")
    o.add_argument("--no_save_model", action="store_true", help="skip save_pretrained at the end")
    o.add_argument("--push_to_hub", action="store_true", help="upload the finished output folder (model, "
                   "tokenizer/processor, model card, metrics; no step_*/epoch_* checkpoints) to the Hub")
    o.add_argument("--hub_model_id", help="repo id for --push_to_hub (default: the output folder's name)")
    o.add_argument("--hub_token", help="Hub token for --push_to_hub (default: HF_TOKEN or the cached "
                   "login); never written to metrics.json or checkpoints")
    return p


def _tracker_names() -> str:
    try:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return "tensorboard, wandb, ..."
    return ", ".join(sorted(LOGGER_TYPE_TO_CLASS))


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


def override_keys(text: str | None) -> set[str]:
    return {item.partition("=")[0].strip() for item in text.split(",")} if text else set()


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


def trackers(args) -> list[str] | str | None:
    """--report_to as accelerate's `log_with` ('all' or a list of names); None without --with_tracking."""
    if not args.with_tracking:
        return None
    names = [n.strip() for n in args.report_to.split(",") if n.strip()]
    return "all" if "all" in names else names


def check_report_to(args) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [n.strip() for n in args.report_to.split(",")]
    if not all(names):
        raise UsageError(f"--report_to {args.report_to!r}: an empty name in the list")
    unknown = [n for n in names if n != "all" and n not in LOGGER_TYPE_TO_CLASS]
    if unknown:
        raise UsageError(f"--report_to: unknown tracker {', '.join(unknown)}; accelerate accepts 'all' or "
                         f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (comma-separated)")
    if args.with_tracking and "all" not in names:
        available = {str(t) for t in get_available_trackers()}
        missing = [n for n in names if n not in available]
        if missing:  # accelerate would skip them without a word
            raise UsageError(f"--report_to {', '.join(missing)}: not installed (pip install the tracker's "
                             "package), or leave it out of --report_to")


def _check_file(flag: str, path: str | None, folder: bool) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file" + (" or folder" if folder else ""))
    if folder:
        if not p.is_dir():
            raise UsageError(f"{flag} {path} is a file; expected a folder of images (LABEL/*.png)")
        if not any(f.is_file() for f in p.rglob("*")):
            raise UsageError(f"{flag} {path}: the image folder is empty")
        return
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder; expected a txt, json or csv file")
    if p.stat().st_size == 0 or not p.read_bytes()[:1 << 20].strip():
        raise UsageError(f"{flag} {path}: the file is empty")
    if p.suffix.lower() not in (".txt", ".text", ".json", ".jsonl", ".csv", ".tokens"):
        raise UsageError(f"{flag} {path}: unsupported extension {p.suffix!r} (txt, json, jsonl, csv)")


def _check_image_dirs(args) -> None:
    """--train_dir/--validation_dir, or their older spelling --train_file/--validation_file (a folder)."""
    for new, old in (("train_dir", "train_file"), ("validation_dir", "validation_file")):
        if getattr(args, new) and getattr(args, old):
            raise UsageError(f"--{new} and --{old} name the same thing; pass only --{new}")
        _check_file(f"--{new}" if getattr(args, new) else f"--{old}",
                    getattr(args, new) or getattr(args, old), folder=True)


def image_dirs(args) -> tuple[str | None, str | None]:
    return args.train_dir or args.train_file, args.validation_dir or args.validation_file


# (flag, lowest allowed value, what to say) for the integer flags; None: the flag may be left out.
_INT_MIN = (("per_device_train_batch_size", 1), ("per_device_eval_batch_size", 1),
            ("gradient_accumulation_steps", 1), ("logging_steps", 1), ("num_train_epochs", 1),
            ("max_train_steps", 0), ("eval_steps", 1), ("num_warmup_steps", 0), ("max_train_samples", 1),
            ("max_eval_samples", 1), ("preprocessing_num_workers", 1), ("vocab_size", 1), ("block_size", 2),
            ("max_seq_length", 3), ("stop_after_steps", 1), ("save_total_limit", 1), ("blend_steps", 0), ("calibration_samples", 0),
            ("eval_mask_seed", 0), ("seed", 0))


def check_numbers(args) -> None:
    """Every numeric flag, before any work: finite, in range (argparse takes 'inf' and 'nan')."""
    for flag, low in _INT_MIN:
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise UsageError(f"--{flag} {value}: must be >= {low}")
    if args.seed >= 2 ** 32:
        raise UsageError(f"--seed {args.seed}: must be < 2**32 (numpy's seed range)")
    if not 0 < args.validation_split_percentage < 100:
        raise UsageError(f"--validation_split_percentage {args.validation_split_percentage}: must be in 1..99")
    floats = {"learning_rate": (0.0, None), "weight_decay": (0.0, None), "adam_beta1": (0.0, 1.0),
              "adam_beta2": (0.0, 1.0), "adam_epsilon": (0.0, None), "max_grad_norm": (0.0, None)}
    for flag, (low, high) in floats.items():
        value = getattr(args, flag)
        if not math.isfinite(value):
            raise UsageError(f"--{flag} {value}: must be a finite number")
        if value < low or (high is not None and value >= high):
            raise UsageError(f"--{flag} {value}: must be >= {low}" + (f" and < {high}" if high else ""))
    for flag in ("distill_weight", "distill_temperature"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (flag == "distill_temperature" and value == 0):
            raise UsageError(f"--{flag} {value}: must be a finite number "
                             + (">= 0" if flag == "distill_weight" else "> 0"))
    prob = getattr(args, "mlm_probability", None)
    if prob is not None and not 0 < prob < 1:
        raise UsageError(f"--mlm_probability {prob}: must be in (0, 1)")


def check_blend(args, max_steps: int | None) -> None:
    """A blend still ramping when the run ends would be saved half-blended: refuse it up front."""
    if args.blend_steps and max_steps is not None and args.blend_steps > max_steps:
        raise UsageError(f"--blend_steps {args.blend_steps} exceeds the run's {max_steps} optimizer steps: "
                         "the model would be saved half-blended; pass --blend_steps <= "
                         f"{max_steps} (or more --max_train_steps)")


def check_distillation(args) -> None:
    """The teacher is the pretrained checkpoint before surgery: without both there is none."""
    if args.distill_weight > 0 and not (args.model_name_or_path and args.activation):
        raise UsageError("--distill_weight needs --model_name_or_path and --activation: the teacher is the "
                         "pretrained checkpoint before its activations are replaced; pass both, or leave "
                         "--distill_weight out")
    if args.distill_weight == 0 and args.distill_temperature != 1.0:
        raise UsageError(f"--distill_temperature {args.distill_temperature} has no effect without --distill_weight; "
                         "pass --distill_weight W > 0 too, or leave --distill_temperature out")


# Derived or secret: never recorded in checkpoints (hub_token must not land on disk).
_INTERNAL = ("task", "resume_path", "hub_repo", "hub_token")


def _normalized(task: str, flags: dict) -> dict:
    """Paths resolved; for images the older --train_file/--validation_file spelling folded into
    --train_dir/--validation_dir, so that switching spelling is not a difference."""
    flags = {k: v for k, v in flags.items() if k not in _INTERNAL}
    if task == "image":
        for new, old in (("train_dir", "train_file"), ("validation_dir", "validation_file")):
            flags[new] = flags.get(new) or flags.get(old)
            flags[old] = None
    for key in PATH_FLAGS:
        value = flags.get(key)
        if value and Path(value).exists():
            flags[key] = os.path.realpath(value)
    return flags


def run_flags(args) -> dict:
    """The flags as given (before the model or data fill in defaults such as --block_size):
    recorded in checkpoints and compared on resume."""
    return _normalized(args.task, vars(args))


def resume_conflicts(task: str, recorded: dict, current: dict, legacy: bool = False) -> list[str]:
    """'--flag old -> new' for every run-defining flag that differs from the checkpoint's record.
    A flag the record lacks (added after the checkpoint was written) counts as its default.
    --mixed_precision is left to the caller, which compares the precision accelerate really used
    (the flag may be unset and come from accelerate's config); a legacy record has only the flag."""
    defaults = vars(build_parser(task).parse_args(["--output_dir", "x"]))
    recorded, current = _normalized(task, recorded), _normalized(task, current)
    diffs = []
    for key in sorted(set(recorded) | set(current)):
        if key in MAY_CHANGE_ON_RESUME or key not in defaults or (key == "mixed_precision" and not legacy):
            continue
        old, new = recorded.get(key, defaults[key]), current.get(key, defaults[key])
        if legacy and key in _DERIVED_FLAGS and new is None:
            continue  # the old record holds the value filled in from the model, not what was typed
        if old != new:
            diffs.append(f"--{key} {old} -> {new}")
    return diffs


def validate(args: argparse.Namespace, task: str) -> argparse.Namespace:
    """Every check that needs no model and no data; raises UsageError."""
    from . import checkpoint

    args.task = task
    check_numbers(args)
    check_activation(args.activation)
    check_report_to(args)
    args.config_overrides = parse_config_overrides(args.config_overrides)
    if task == "image":
        _check_image_dirs(args)
        if image_dirs(args)[1] and not (image_dirs(args)[0] or args.dataset_name):
            raise UsageError("--validation_dir needs --train_dir (or --dataset_name)")
    else:
        _check_file("--train_file", args.train_file, folder=False)
        _check_file("--validation_file", args.validation_file, folder=False)
        if args.validation_file and not (args.train_file or args.dataset_name):
            raise UsageError("--validation_file needs --train_file (or --dataset_name)")
    if task == "mlm" and args.pad_to_max_length and not args.line_by_line:
        raise UsageError("--pad_to_max_length applies to --line_by_line examples (concatenated blocks are "
                         "always full); add --line_by_line or leave it out")
    if args.blend_steps and not (args.model_name_or_path and args.activation):
        raise UsageError("--blend_steps needs --model_name_or_path and --activation (it blends a "
                         "pretrained model's activation into the new one)")
    if args.calibration_samples and not (args.model_name_or_path and args.activation):
        raise UsageError("--calibration_samples needs --model_name_or_path and --activation (it calibrates the "
                         "patch of a pretrained model's activations)")
    if args.calibration_samples and args.blend_steps:
        raise UsageError("--calibration_samples and --blend_steps do not go together (the bias correction is "
                         "exact for the new activation, not for a blend); pass one of them")
    check_distillation(args)
    check_blend(args, args.max_train_steps)
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch":
        if not cs.isdigit() or int(cs) < 1:
            raise UsageError(f"--checkpointing_steps {cs!r}: expected a positive integer or 'epoch'")

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file")
    _check_hub(args, out)
    args.resume_path = checkpoint.resolve(args.resume_from_checkpoint, out) if args.resume_from_checkpoint else None
    continuing = args.resume_path is not None and checkpoint.inside(args.resume_path, out)
    # A run killed with -9 leaves its lock file (not the lock): that alone does not make a folder used.
    if not continuing and out.is_dir() and any(f.name != ".lock" for f in out.iterdir()):
        if not args.overwrite_output_dir:
            raise UsageError(f"--output_dir {out} exists and is not empty; pass --overwrite_output_dir "
                             "to reuse it, or --resume_from_checkpoint latest to continue the run in it")
        _check_inputs_survive(args, checkpoint.previous_outputs(out))
    args.output_dir = os.fspath(out)
    return args


def _check_hub(args, out: Path) -> None:
    from ..hub import HubFlagError, hub_repo

    try:
        args.hub_repo = hub_repo(args.push_to_hub, args.hub_model_id, args.hub_token, out)
    except HubFlagError as err:
        raise UsageError(str(err)) from None
    if args.push_to_hub and args.no_save_model:
        raise UsageError("--push_to_hub uploads the trained model, which --no_save_model skips; drop one of them")


def _check_inputs_survive(args, doomed: list[Path]) -> None:
    """--overwrite_output_dir removes an earlier run's outputs: never when this run reads from them."""
    inputs = [(flag, getattr(args, flag, None)) for flag in PATH_FLAGS] + [
        ("resume_from_checkpoint", args.resume_path)]
    out = Path(os.path.realpath(args.output_dir))
    for flag, value in inputs:
        if not value or not Path(value).exists():
            continue
        source = Path(os.path.realpath(value))
        for path in doomed:
            target = Path(os.path.realpath(path))
            # the input is a doomed file or folder, lies inside one, or is the output folder itself
            if source in (target, out) or target in source.parents:
                raise UsageError(f"--{flag} {value} is read from what --overwrite_output_dir would delete in "
                                 f"{args.output_dir} ({path.name}); copy it elsewhere or pick another --output_dir")
