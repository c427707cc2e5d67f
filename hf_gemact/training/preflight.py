"""What the loop checks and says before its first step: the precision accelerate will really use,
whether a checkpoint continues this run (and its state), and the run's shape."""

from __future__ import annotations

from . import checkpoint
from .errors import UsageError


def check_precision(args, accelerator) -> None:
    """accelerate runs fp16 on CPU as plain fp32 while still calling it fp16: refuse rather than
    train in another precision than the one metrics.json would report."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        source = ("--mixed_precision fp16" if args.mixed_precision == "fp16"
                  else "mixed precision fp16 (from accelerate's config or ACCELERATE_MIXED_PRECISION)")
        raise UsageError(f"{source} needs a GPU: on CPU accelerate would train in fp32; pass "
                         "--mixed_precision no (or bf16, which runs on CPU)")


def resume_state(args, flags: dict, accelerator, task: str) -> dict | None:
    """The checkpoint's state, after checking that this invocation continues the same run."""
    from .args import MAY_CHANGE_ON_RESUME, resume_conflicts

    if args.resume_path is None:
        return None
    path = args.resume_path
    state = checkpoint.read_state(path)
    if state.get("task", task) != task:
        raise UsageError(f"--resume_from_checkpoint {path} is a {state['task']} checkpoint, not {task}")
    recorded = state.get("flags")
    legacy = recorded is None
    diffs = resume_conflicts(task, state.get("args", {}) if legacy else recorded, flags, legacy)
    processes = state.get("num_processes") or checkpoint.saved_processes(path)
    if processes != accelerator.num_processes:
        diffs.append(f"number of processes {processes} -> {accelerator.num_processes}")
    precision = state.get("mixed_precision")
    if precision is not None and precision != accelerator.mixed_precision:
        diffs.append(f"mixed precision {precision} -> {accelerator.mixed_precision}")
    if diffs:
        may_change = sorted(f for f in MAY_CHANGE_ON_RESUME if f in flags)
        raise UsageError(f"cannot resume from {path}: it was written by a run with other settings: "
                         + "; ".join(diffs) + ". Resume with the run's own settings, or start a new run "
                         "(another --output_dir). Only these may change on resume: --" + ", --".join(may_change))
    return state


def announce(say, *, examples, eval_examples, epochs, steps_per_epoch, max_steps, per_device, processes, accum,
              resume_path, start_step, args) -> None:
    say("***** Running training *****")
    say(f"  examples: {examples} train, {eval_examples} validation")
    say(f"  epochs: {epochs} ({steps_per_epoch} optimizer steps each)")
    say(f"  batch size per device: {per_device}")
    say(f"  total batch size: {per_device * processes * accum} ({per_device} per device x {processes} "
        f"processes x {accum} accumulation steps)")
    say(f"  gradient accumulation steps: {accum}")
    say(f"  optimizer steps: {max_steps}")
    say(f"  processes: {processes}")
    if args.distill_weight > 0:
        say(f"  distillation: weight {args.distill_weight:g}, temperature {args.distill_temperature:g}, teacher: "
            f"{args.model_name_or_path} before surgery")
    if resume_path is not None:
        say(f"  resuming at step {start_step} from {resume_path}")
