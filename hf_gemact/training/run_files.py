"""What a training run writes into OUTPUT_DIR besides checkpoints: the log (log.jsonl and the
trackers), JSON written atomically, the command line and flags with secrets left out, the versions,
the bookkeeping of which top-level files the run wrote (for --overwrite_output_dir), and the
content of metrics.json."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import checkpoint
from .common import current_activation


def library_versions() -> dict:
    import accelerate
    import datasets
    import evaluate
    import tokenizers
    import transformers

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__, "evaluate": evaluate.__version__,
            "tokenizers": tokenizers.__version__, "hf_gemact": __version__}


class RunLog:
    """OUTPUT_DIR/log.jsonl (main process) and the trackers."""

    def __init__(self, accelerator, path: Path, tracking: bool):
        self.accelerator, self.path, self.tracking = accelerator, path, tracking

    def truncate_after(self, step: int) -> None:
        if self.accelerator.is_main_process and self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracking:
            split = record["split"]
            self.accelerator.log({f"{split}/{k}": v for k, v in record.items()
                                  if k not in ("step", "split") and isinstance(v, (int, float))},
                                 step=record["step"])


SECRET_FLAGS = ("hub_token", "hub_repo")


def command_line() -> str:
    """sys.argv as run, with the values of secret flags replaced."""
    words, hide = [], False
    for word in sys.argv:
        flag, eq, _ = word.partition("=")
        if hide:
            word, hide = "***", False
        elif flag.lstrip("-") in SECRET_FLAGS:
            word, hide = (f"{flag}=***", False) if eq else (word, True)
        words.append(word)
    return " ".join(words)


def jsonable(args) -> dict:
    """The flags as written into metrics.json and checkpoints (secrets left out)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in SECRET_FLAGS}


def write_json(path: Path, obj) -> None:
    """Written beside and renamed into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def top_level_files(out: Path) -> dict:
    """name -> identity of each entry at the top of OUTPUT_DIR, to see what a save rewrote."""
    found = {}
    for entry in out.iterdir():
        info = entry.lstat()
        found[entry.name] = (info.st_mtime_ns, info.st_size, info.st_ino)
    return found


def written_since(out: Path, before: dict) -> list[str]:
    return [name for name, ident in top_level_files(out).items() if before.get(name) != ident]


def prepare_output_dir(args, accelerator) -> Path:
    """Create OUTPUT_DIR; for a new run over an earlier one (--overwrite_output_dir), remove what
    earlier runs of these scripts wrote there, so that no old model, log or checkpoint sits beside
    the new run's (files they did not write stay)."""
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        continuing = args.resume_path is not None and checkpoint.inside(args.resume_path, out)
        if not continuing and args.overwrite_output_dir:
            removed = checkpoint.remove_previous_outputs(out)
            if removed:
                accelerator.print(f"--overwrite_output_dir: removed an earlier run's {', '.join(p.name for p in removed)}")
        checkpoint.record_outputs(out, ["log.jsonl"])
    accelerator.wait_for_everyone()
    return out


def run_summary(t, model, sparsity: dict | None) -> dict:
    """metrics.json of a finished run: `t` is the loop's Training, `model` the unwrapped model."""
    args, accelerator, progress, unit = t.args, t.accelerator, t.progress, t.unit
    teacher = t.teacher
    metric_names = list(t.spec.metric_keys)
    return {
        "task": t.task,
        "activation": current_activation(model, args),
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final": {k: progress.last_eval[k] for k in ["step"] + metric_names},
        "best": {k: progress.best[k] for k in ["step"] + metric_names},
        "steps": progress.step,
        "epochs": round(progress.step / t.steps_per_epoch, 4),
        f"{unit}_seen": progress.units,
        f"{unit}_per_s": progress.units / max(progress.train_time_s, 1e-9),
        "train_time_s": progress.train_time_s,
        "wall_time_s": time.time() - t.start_wall,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(args.resume_path) if args.resume_path else None,
        "validation_loss_note": "task loss only (no auxiliary or distillation loss)",
        "distillation": ({"weight": args.distill_weight, "temperature": args.distill_temperature,
                          "teacher": args.model_name_or_path,
                          "mean_loss": progress.distill_loss_sum / max(progress.micro_batches, 1)}
                         if teacher is not None else None),
        "activation_sparsity": sparsity,
        **{k: v for k, v in t.data.info.items() if v is not None},
        "args": jsonable(args),
        "versions": library_versions(),
        "command": command_line(),
    }
